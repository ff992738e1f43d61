"""The deployable decoder: a KV-cache ONNX graph in an onnxruntime-genai model folder, the compiler's input.

Why onnxruntime-genai's model builder and not our own export (docs/results.md, "Decoder graph"): it covers
the common decoder architectures (Llama, Mistral, Qwen, Gemma, Phi, ...), builds the default model in
seconds rather than minutes, and writes a graph with past/present KV tensors and fused
``com.microsoft.GroupQueryAttention`` (rotary inside), which decodes an order of magnitude faster than a
full-sequence graph re-run over the whole prefix. It also writes the ``genai_config.json``, tokenizer and
chat template that onnxruntime-genai loads.

We build with q/k/v kept apart (``disable_qkv_fusion``) so per-layer options such as ``-L '*.v_proj:...'``
keep meaning what they mean on the transformers model, and rename the weights to the transformers
parameter names (``model.layers.0.self_attn.q_proj.weight``, ``model.norm.weight``, ``lm_head.weight``), so
reports, ``-L`` patterns and whole-model fine-tuning (which works on the transformers model) all speak one
language. A GGUF source goes through transformers once (dequantized to float32) into a cached model folder.

The graph is used as it is for calibration and evaluation: a prefill with zero-length past tensors computes
the same logits as a full-sequence graph (:func:`prefill_feeds`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from qcompile.cache import atomic_dir, cache_path, entry_lock
from qcompile.errors import QCompileError, UnsupportedModelError
from qcompile.models.sources import (META_DTYPE, META_EXPORT_VERSION, ModelSource)

#: Bump when the build or the import step changes the graph.
DECODER_VERSION = 2
META_DECODER = "qcompile.decoder"  # JSON: what feeding the KV-cache inputs takes (see DecoderInfo)
GENAI_CONFIG = "genai_config.json"
#: Files of the builder's folder that travel with every compiled model (tokenizer and chat template).
PROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
_BUILDER_PRECISION = {"float32": "fp32", "float16": "fp16"}

#: Builder weight names -> transformers parameter names (checked against the source's own names).
_RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^model\.layers\.(\d+)\.attn\.(\w+)\.MatMul\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^model\.layers\.(\d+)\.attn\.(\w+)\.Add\.bias$", r"model.layers.\1.self_attn.\2.bias"),
    (r"^model\.layers\.(\d+)\.mlp\.(\w+)\.MatMul\.weight$", r"model.layers.\1.mlp.\2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.(\w+)\.Add\.bias$", r"model.layers.\1.mlp.\2.bias"),
    (r"^model\.layers\.\d+\.final_norm_layernorm\.weight$", "model.norm.weight"),
    (r"^lm_head\.MatMul\.weight$", "lm_head.weight"),
    (r"^lm_head\.Add\.bias$", "lm_head.bias"),
))


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    """How to feed a KV-cache decoder: its past-KV input names and the shape of one layer's cache."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"

    @classmethod
    def from_genai_config(cls, config: Mapping[str, Any]) -> "DecoderInfo":
        dec = config["model"]["decoder"]
        inputs = dec.get("inputs", {})
        return cls(int(dec["num_hidden_layers"]), int(dec["num_key_value_heads"]), int(dec["head_size"]),
                   inputs.get("past_key_names", cls.past_key), inputs.get("past_value_names", cls.past_value))

    @classmethod
    def of_model(cls, model: onnx.ModelProto, folder: Path | None = None) -> "DecoderInfo | None":
        """From our metadata, else from a ``genai_config.json`` beside the model; None for a plain graph."""
        meta = {p.key: p.value for p in model.metadata_props}
        if META_DECODER in meta:
            return cls(**json.loads(meta[META_DECODER]))
        if folder is not None and (folder / GENAI_CONFIG).is_file():
            try:
                return cls.from_genai_config(json.loads((folder / GENAI_CONFIG).read_text()))
            except (KeyError, ValueError, TypeError):
                return None
        return None

    @classmethod
    def of_session(cls, session: Any, folder: Path | None = None) -> "DecoderInfo | None":
        """From an onnxruntime session's metadata (ours), else a ``genai_config.json`` in ``folder``."""
        meta = session.get_modelmeta().custom_metadata_map
        if META_DECODER in meta:
            return cls(**json.loads(meta[META_DECODER]))
        proto = onnx.ModelProto()
        return cls.of_model(proto, None if folder is None else Path(folder))

    def past_names(self) -> set[str]:
        return {p % i for i in range(self.num_layers) for p in (self.past_key, self.past_value)}


def prefill_feeds(inputs: Mapping[str, tuple[np.dtype, Sequence[Any]]], ids: np.ndarray,
                  info: DecoderInfo | None) -> dict[str, np.ndarray]:
    """Feeds for one forward pass over ``ids [batch, seq]`` from the start of the text: token ids, a mask of
    ones, positions ``0..seq-1`` and, for a KV-cache decoder, zero-length past tensors (so the graph computes
    exactly what a full-sequence graph computes). ``inputs`` maps each graph input to its dtype and shape."""
    batch, seq = ids.shape
    past = info.past_names() if info is not None else set()
    feeds: dict[str, np.ndarray] = {}
    for name, (dtype, _shape) in inputs.items():
        if name == "input_ids":
            feeds[name] = ids.astype(dtype, copy=False)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif name in past:
            feeds[name] = np.zeros((batch, info.num_kv_heads, 0, info.head_size), dtype=dtype)
        else:
            known = "input_ids, attention_mask, position_ids" + (", past key/value" if past else "")
            raise QCompileError(f"cannot feed model input {name!r} (knows {known})")
    return feeds


def graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list[Any]]]:
    """``{input name: (numpy dtype, shape with dim names)}`` of a model's real graph inputs."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        out[i.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
                       [d.dim_param or d.dim_value for d in t.shape.dim])
    return out


def session_inputs(session: Any) -> dict[str, tuple[np.dtype, list[Any]]]:
    """The same mapping for an onnxruntime session."""
    types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}
    out = {}
    for i in session.get_inputs():
        if i.type not in types:
            raise QCompileError(f"model input {i.name} has type {i.type}, which evaluation cannot feed")
        out[i.name] = (np.dtype(types[i.type]), list(i.shape))
    return out


# ---- building -----------------------------------------------------------------------------------------------


def cached_hf_folder(src: ModelSource) -> Path | None:
    """The float32 transformers folder a GGUF source was converted to, if a decoder build made it."""
    folder = cache_path("hf", DECODER_VERSION, src.fingerprint)
    return folder if (folder / "config.json").is_file() else None


def hf_folder(src: ModelSource) -> Path:
    """A transformers model folder for ``src``: the folder itself, or (GGUF) a cached float32 conversion."""
    if src.kind in ("hf_dir", "hub"):
        return src.path
    if src.kind not in ("bundled", "gguf"):
        raise UnsupportedModelError(f"{src.spec}: a {src.kind} source has no transformers weights to build from")
    folder = cache_path("hf", DECODER_VERSION, src.fingerprint)
    if cached_hf_folder(src) is not None:
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    model = src.load_model("float32")
    config = model.config
    if hasattr(config, "quantization_config"):  # GGUF loading leaves it; it would make the folder "quantized"
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    with atomic_dir(folder) as tmp:
        fresh.save_pretrained(str(tmp))
        src.load_tokenizer().save_pretrained(str(tmp))
    return folder


def build_decoder(src: ModelSource, dtype: str = "float32", *, verbose: bool = False, verify: bool = True,
                  log: Callable[[str], None] | None = None) -> Path:
    """The cached float decoder folder of ``src`` (onnxruntime-genai layout); returns its ``model.onnx``."""
    log = log or (lambda msg, _err=sys.stderr: print(msg, file=_err, flush=True))  # not the redirected one
    if dtype not in _BUILDER_PRECISION:
        raise QCompileError(f"decoder dtype {dtype!r}: expected one of {', '.join(_BUILDER_PRECISION)}")
    import onnxruntime_genai

    folder = cache_path("decoder", DECODER_VERSION, src.fingerprint, dtype, onnxruntime_genai.__version__)
    with entry_lock(folder):  # a concurrent compile of the same source waits here, then reuses the build
        if (folder / "model.onnx").is_file():
            log(f"[qcompile] using cached decoder {folder}")
            return folder / "model.onnx"
        _build_decoder(src, dtype, folder, verbose, verify, log)
    return folder / "model.onnx"


def _build_decoder(src: ModelSource, dtype: str, folder: Path, verbose: bool, verify: bool,
                   log: Callable[[str], None]) -> None:
    log(f"[qcompile] building the KV-cache decoder of {src.spec} ({dtype}) with onnxruntime-genai ...")
    t0 = time.time()
    from qcompile.models.export import exporter_output

    with atomic_dir(folder) as tmp, exporter_output(verbose):
        hf = hf_folder(src)
        raw = tmp / "builder"
        _run_builder(hf, raw, _BUILDER_PRECISION[dtype], verbose)
        model = onnx.load(str(raw / "model.onnx"))
        config = json.loads((raw / GENAI_CONFIG).read_text())
        import_builder_graph(model, _hf_parameter_names(hf))
        compact_rotary_caches(model)
        info = DecoderInfo.from_genai_config(config)
        set_decoder_metadata(model, src, dtype, info)
        from qcompile.models.export import save_onnx

        save_onnx(model, tmp / "model.onnx")
        for name in (GENAI_CONFIG, *PROCESSING_FILES):
            if (raw / name).is_file():
                shutil.copyfile(raw / name, tmp / name)
        shutil.rmtree(raw)
        if verify:
            verify_decoder(tmp / "model.onnx", hf, dtype)
    log(f"[qcompile] decoder built in {time.time() - t0:.0f} s -> {folder}")


def _run_builder(hf: Path, out: Path, precision: str, verbose: bool) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "--extra_options", "disable_qkv_fusion=true"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(cmd, env=env, text=True, capture_output=not verbose)
    if res.returncode != 0 or not (out / "model.onnx").is_file():
        tail = "\n".join(((res.stdout or "") + (res.stderr or "")).strip().splitlines()[-6:])
        raise UnsupportedModelError(f"onnxruntime-genai's model builder could not build {hf}:\n{tail}")


def _hf_parameter_names(hf: Path) -> set[str]:
    """The transformers parameter names of a model folder, read from its safetensors headers (no weights)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            names.update(fh.keys())
    return names


def import_builder_graph(model: onnx.ModelProto, hf_names: set[str]) -> dict[str, str]:
    """Rename the builder's weights to the transformers names (only where the source has that parameter, so an
    unknown layout keeps the builder's names rather than getting wrong ones); returns the renames."""
    from qcompile.models.export import rename_tensor

    renames = {}
    for t in model.graph.initializer:
        for pattern, repl in _RENAMES:
            new = pattern.sub(repl, t.name)
            if new != t.name:
                if new in hf_names or (new == "lm_head.weight" and "model.embed_tokens.weight" in hf_names):
                    renames[t.name] = new
                break
    for old, new in renames.items():
        rename_tensor(model, old, new)
    return renames


def compact_rotary_caches(model: onnx.ModelProto, names: tuple[str, str] = ("cos_cache", "sin_cache")) -> bool:
    """Replace the builder's ``[context, rotary_dim/2]`` cos/sin tables (2 MB for the default model: as much
    as a 4-bit matrix of 4M weights) by the few nodes that compute them from one row of frequencies; onnxruntime
    folds those constants once when the session is created. Done only where the recomputed tables equal the
    stored ones to one float32 ulp (checked in onnxruntime's own arithmetic, the one that will run them), so
    the graph computes what it computed before. Returns whether it was done."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    if not all(n in inits for n in names):
        return False
    cos, sin = (numpy_helper.to_array(inits[n]) for n in names)
    if cos.dtype != np.float32 or cos.ndim != 2 or cos.shape != sin.shape or cos.shape[0] < 2:
        return False
    scale = np.float32(cos[0, 0])
    if not (np.all(cos[0] == scale) and np.all(sin[0] == 0) and scale > 0):
        return False
    # frequencies: the angle at position 1, refined to the float32 value that reproduces far positions best
    # (the builder multiplies in float32, so its table fixes every bit of the frequency)
    first = np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64)).astype(np.float32)
    ulps = np.arange(-64, 65, dtype=np.float64)[:, None] * np.spacing(first).astype(np.float64)
    cands = (first.astype(np.float64) + ulps).astype(np.float32)  # [129, D]
    probes = np.unique(np.array([cos.shape[0] - 1, cos.shape[0] // 2, cos.shape[0] // 3, 2], np.int64))
    err = sum(np.abs(np.cos((np.float32(p) * cands).astype(np.float64)) * scale - cos[p]) for p in probes)
    freq = cands[err.argmin(axis=0), np.arange(cands.shape[1])]
    g = "/model/rotary_cache"
    consts = {f"{g}/start": np.array(0, np.float32), f"{g}/limit": np.array(cos.shape[0], np.float32),
              f"{g}/delta": np.array(1, np.float32), f"{g}/axis": np.array([1], np.int64),
              f"{g}/frequencies": freq.reshape(1, -1)}
    if scale != 1:
        consts[f"{g}/scale"] = np.array(scale, np.float32)
    nodes = [helper.make_node("Range", [f"{g}/start", f"{g}/limit", f"{g}/delta"], [f"{g}/positions"], name=f"{g}/Range"),
             helper.make_node("Unsqueeze", [f"{g}/positions", f"{g}/axis"], [f"{g}/column"], name=f"{g}/Unsqueeze"),
             helper.make_node("Mul", [f"{g}/column", f"{g}/frequencies"], [f"{g}/angles"], name=f"{g}/Mul")]
    for op, out in (("Cos", names[0]), ("Sin", names[1])):
        if scale == 1:
            nodes.append(helper.make_node(op, [f"{g}/angles"], [out], name=f"{g}/{op}"))
        else:
            nodes += [helper.make_node(op, [f"{g}/angles"], [f"{g}/{op}"], name=f"{g}/{op}"),
                      helper.make_node("Mul", [f"{g}/{op}", f"{g}/scale"], [out], name=f"{g}/{op}/Scale")]
    probe = helper.make_model(helper.make_graph(nodes, "rotary", [], [
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names],
        [numpy_helper.from_array(v, k) for k, v in consts.items()]), opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 10
    import onnxruntime as ort

    got = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    ulp = np.float32(2.0 ** -23) * 2
    if any(np.abs(a - b).max() > ulp * max(1.0, float(scale)) for a, b in zip(got, (cos, sin))):
        return False
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [numpy_helper.from_array(v, k) for k, v in consts.items()])
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)
    return True


def set_decoder_metadata(model: onnx.ModelProto, src: ModelSource, dtype: str, info: DecoderInfo) -> None:
    from qcompile.models.export import set_metadata

    set_metadata(model, {**src.metadata(), META_DTYPE: dtype, META_EXPORT_VERSION: f"decoder-{DECODER_VERSION}",
                         META_DECODER: json.dumps(dataclasses.asdict(info))})


def verify_decoder(path: Path, hf: Path, dtype: str) -> None:
    """onnxruntime's prefill logits against transformers' on a small batch: the build must be exact."""
    import torch
    from transformers import AutoModelForCausalLM

    from qcompile.runtime import make_session

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=getattr(torch, dtype)).eval()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float().numpy()
    sess = make_session(str(path), ["CPUExecutionProvider"])
    proto = onnx.load(str(path), load_external_data=False)
    got = sess.run(["logits"], prefill_feeds(session_inputs(sess), ids.numpy(), DecoderInfo.of_model(proto)))[0]
    err = float(np.max(np.abs(got.astype(np.float32) - ref)) / max(float(np.max(np.abs(ref))), 1e-6))
    tol = 1e-3 if dtype == "float32" else 5e-2
    if not np.isfinite(err) or err > tol:
        raise QCompileError(f"the decoder built from {hf} disagrees with transformers: max relative logit "
                            f"error {err:.2e} > {tol}")


# ---- the compiled folder ------------------------------------------------------------------------------------


def is_decoder_folder(folder: Path) -> bool:
    return (folder / GENAI_CONFIG).is_file()


def write_genai_folder(float_folder: Path, out: Path, *, needs_library: bool) -> None:
    """Make ``out`` (which holds the compiled ``model.onnx``) an onnxruntime-genai model folder: the float
    folder's config, tokenizer and chat template, and, when the graph uses our ops, our op library copied in
    and named in the config (onnxruntime-genai resolves it inside the folder)."""
    config = json.loads((float_folder / GENAI_CONFIG).read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.pop("custom_ops_library", None)
    if needs_library:
        from qcompile.runtime import LIBRARY_NAME, ops_library_path

        shutil.copyfile(ops_library_path(), out / LIBRARY_NAME)
        options["custom_ops_library"] = LIBRARY_NAME
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    for name in PROCESSING_FILES:
        if (float_folder / name).is_file():
            shutil.copyfile(float_folder / name, out / name)
