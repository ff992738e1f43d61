"""Perplexity from onnxruntime must equal the perplexity torch computes on the same windows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcompile.errors import CalibrationError
from qcompile.evaluate import perplexity, window_nll
from qcompile.runtime import make_session
from tiny_model import random_tokens, tiny_onnx, tiny_source


def _torch_ppl(model, windows: np.ndarray) -> float:
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_window_nll_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32) * 30  # large values: needs the max-shift
    ids = rng.integers(0, 7, size=5)
    expected = 0.0
    for t in range(4):
        row = logits[t].astype(np.float64)
        expected += -(row[ids[t + 1]] - math.log(np.sum(np.exp(row - row.max()))) - row.max())
    assert window_nll(logits, ids) == pytest.approx(expected, rel=1e-12)


def test_perplexity_matches_torch():
    windows = random_tokens(5, 19, seed=11)
    ref = _torch_ppl(tiny_source().load_model(), windows)
    ppl, n = perplexity(tiny_onnx(), windows, batch_size=2, progress=False)
    assert n == 5 * 18
    assert ppl == pytest.approx(ref, rel=1e-5)
    # a model without attention_mask input gives the same numbers
    ppl_nomask, _ = perplexity(tiny_onnx(with_attention_mask=False), windows, batch_size=3, progress=False)
    assert ppl_nomask == pytest.approx(ref, rel=1e-5)


def test_perplexity_fp16_close_to_fp32():
    windows = random_tokens(3, 16, seed=12)
    ref = _torch_ppl(tiny_source().load_model(), windows)
    ppl, _ = perplexity(tiny_onnx(dtype="float16"), windows, progress=False)
    assert ppl == pytest.approx(ref, rel=1e-2)


def test_path_and_session_object_agree():
    windows = random_tokens(2, 10, seed=13)
    a, _ = perplexity(tiny_onnx(), windows, progress=False)
    b, _ = perplexity(make_session(str(tiny_onnx())), windows, progress=False)
    assert a == b


def test_bad_windows():
    with pytest.raises(CalibrationError, match="seq>=2"):
        perplexity(tiny_onnx(), np.zeros((2, 1), np.int64), progress=False)
    with pytest.raises(CalibrationError, match="vocab is 260"):
        perplexity(tiny_onnx(), np.full((1, 4), 5000, np.int64), progress=False)
