"""Perplexity of an ONNX causal LM on token windows, with onnxruntime.

Definition (the one every report uses): within each window, token ``t`` predicts token ``t+1``; the
negative log-likelihood comes from a float64 log-softmax of the model's logits; perplexity is
``exp(mean NLL)`` over all ``n_windows * (seq_len - 1)`` predictions.  Windows are independent (no
context carried over): each is one forward pass from the start of the text (an ``attention_mask`` of ones,
and zero-length past tensors for a KV-cache decoder, :func:`qcompile.models.decoder.prefill_feeds`).

Sessions come from :func:`qcompile.runtime.make_session` (our op library registered when the model needs
it); an already open session may be passed instead of a path.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import CalibrationError, QCompileError
from qcompile.models.decoder import DecoderInfo, prefill_feeds, session_inputs

def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of one window: ``logits [seq, vocab]`` (any float dtype), ``ids [seq]``."""
    x = logits[:-1].astype(np.float64)
    target = ids[1:]
    m = x.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=-1)))
    picked = x[np.arange(x.shape[0]), target]
    return float(np.sum(lse - picked))


def perplexity(
    onnx_path_or_session: str | os.PathLike | Any,
    token_windows: np.ndarray,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[float, int]:
    """``(perplexity, number of predicted tokens)`` of the model on ``token_windows [n, seq]`` int64.

    Logits of one batch are alive at a time (``batch_size * seq * vocab`` floats).  Non-finite logits
    give a NaN/inf perplexity rather than an exception, so a broken quantization shows in the report.
    """
    windows = np.asarray(token_windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise CalibrationError(f"evaluation windows must be [n, seq>=2] token ids, got shape {list(windows.shape)}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise CalibrationError(f"evaluation windows must be integer token ids, got {windows.dtype}")
    windows = windows.astype(np.int64, copy=False)
    folder = None
    if isinstance(onnx_path_or_session, (str, os.PathLike)):
        from qcompile.runtime import make_session

        folder = Path(onnx_path_or_session).parent
        sess = make_session(str(onnx_path_or_session))
    else:
        sess = onnx_path_or_session
    inputs = session_inputs(sess)
    info = DecoderInfo.of_session(sess, folder)
    out_names = [o.name for o in sess.get_outputs()]
    if "input_ids" not in inputs:
        raise QCompileError(f"model has no input_ids input (inputs: {', '.join(inputs)})")
    prefill_feeds(inputs, windows[:1], info)  # every input can be fed, before any work
    logits_name = "logits" if "logits" in out_names else out_names[0]
    vocab = sess.get_outputs()[out_names.index(logits_name)].shape[-1]
    if isinstance(vocab, int):
        _check_vocab(windows, vocab)

    nb = (len(windows) + batch_size - 1) // batch_size
    batches = range(nb)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=nb, desc="perplexity", unit="batch", leave=False)
    total_nll = 0.0
    count = 0
    vocab_checked = False
    for b in batches:
        ids = windows[b * batch_size : (b + 1) * batch_size]
        logits = sess.run([logits_name], prefill_feeds(inputs, ids, info))[0]
        if logits.shape[:2] != ids.shape:
            raise QCompileError(f"model output {logits_name} has shape {list(logits.shape)}, expected [{ids.shape[0]}, {ids.shape[1]}, vocab]")
        if not vocab_checked:
            _check_vocab(windows, logits.shape[-1])
            vocab_checked = True
        for i in range(ids.shape[0]):
            total_nll += window_nll(logits[i], ids[i])
            count += ids.shape[1] - 1
        del logits
    mean = total_nll / count
    return (math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf") if mean == mean else float("nan")), count


def decode_perplexity(onnx_path_or_session: str | os.PathLike | Any, token_windows: np.ndarray, *,
                      progress: bool = True) -> tuple[float, int]:
    """``(perplexity, predicted tokens)`` computed the way decode runs: one window at a time, one token per
    step through a KV-cache decoder (every matrix product sees one row of activations).

    Why: at batch 1 the ops take other kernels than in prefill (the M = 1 walks, and at ``accuracy_level``
    4 their fixed-point tables), so this is the perplexity a user's generation gets; the prefill figure
    of :func:`perplexity` may not show what those kernels change."""
    windows = np.asarray(token_windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise CalibrationError(f"evaluation windows must be [n, seq>=2] token ids, got shape {list(windows.shape)}")
    windows = windows.astype(np.int64, copy=False)
    folder = None
    if isinstance(onnx_path_or_session, (str, os.PathLike)):
        from qcompile.runtime import make_session

        folder = Path(onnx_path_or_session).parent
        sess = make_session(str(onnx_path_or_session))
    else:
        sess = onnx_path_or_session
    inputs = session_inputs(sess)
    info = DecoderInfo.of_session(sess, folder)
    if info is None or not info.past_names() <= set(inputs):
        raise QCompileError("decode perplexity needs a KV-cache decoder (past_key_values inputs); this model has "
                            f"inputs {', '.join(inputs)}")
    outputs = [o.name for o in sess.get_outputs()]
    # the cache comes back as present.N.key / present.N.value (our decoders' and onnxruntime-genai's names)
    present = {info.past_key % i: "present.%d.key" % i for i in range(info.num_layers)}
    present |= {info.past_value % i: "present.%d.value" % i for i in range(info.num_layers)}
    missing = sorted(set(present.values()) - set(outputs))
    if "logits" not in outputs or missing:
        raise QCompileError(f"decode perplexity needs outputs logits and present.N.key/value; missing "
                            f"{', '.join((['logits'] if 'logits' not in outputs else []) + missing)}")
    vocab = sess.get_outputs()[outputs.index("logits")].shape[-1]
    if isinstance(vocab, int):
        _check_vocab(windows, vocab)
    steps = windows.shape[0] * (windows.shape[1] - 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="decode perplexity", unit="token", leave=False)
    total_nll, count = 0.0, 0
    names = ["logits", *present.values()]
    for ids in windows:
        feeds = prefill_feeds(inputs, ids[None, :1], info)  # zero-length past, one token
        for t in range(len(ids) - 1):
            out = dict(zip(names, sess.run(names, feeds)))
            logits = out["logits"][0, -1].astype(np.float64)
            m = logits.max()
            total_nll += float(m + np.log(np.exp(logits - m).sum()) - logits[ids[t + 1]])
            count += 1
            feeds = {name: out[present[name]] for name in present}
            for name, (dtype, _shape) in inputs.items():
                if name == "input_ids":
                    feeds[name] = ids[None, t + 1 : t + 2].astype(dtype)
                elif name == "attention_mask":
                    feeds[name] = np.ones((1, t + 2), dtype=dtype)
                elif name == "position_ids":
                    feeds[name] = np.array([[t + 1]], dtype=dtype)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    mean = total_nll / count
    return (math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf") if mean == mean else float("nan")), count


def _check_vocab(windows: np.ndarray, vocab: int) -> None:
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= vocab:
        raise CalibrationError(f"token ids range {lo}..{hi} but the model's vocab is {vocab}: wrong tokenizer?")


def text_windows(tokenizer, *, text: str | os.PathLike | None = None, samples: int = 32,
                 seq_len: int = 512) -> np.ndarray:
    """The evaluation windows every perplexity in qcompile is computed on: the first ``samples`` windows of
    ``seq_len`` tokens of ``text`` (a UTF-8 file), or of the bundled evaluation split."""
    from qcompile import data as qdata

    texts = qdata.load_text_file(text) if text else None
    return qdata.eval_windows(tokenizer, seq_len, samples, texts=texts)


def forward_logits(model: str | os.PathLike | Any, ids: np.ndarray) -> np.ndarray:
    """Logits ``[batch, seq, vocab]`` of one forward pass over ``ids`` from the start of the text, for a
    full-sequence graph or a KV-cache decoder alike (``model``: a path, or an open session)."""
    folder = None
    if isinstance(model, (str, os.PathLike)):
        from qcompile.runtime import make_session

        folder = Path(model).parent
        model = make_session(str(model))
    return model.run(["logits"], prefill_feeds(session_inputs(model), np.asarray(ids, dtype=np.int64),
                                               DecoderInfo.of_session(model, folder)))[0]
