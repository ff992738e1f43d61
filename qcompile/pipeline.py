"""The compile pipeline: source → float ONNX → discover → calibrate → quantize → lower → evaluate → report.

Formats plug in through :mod:`qcompile.formats`; nothing here knows a format's internals. The output
folder is written aside and renamed into place, so an error or Ctrl-C never leaves a half-written OUT.
Every finished layer is also checkpointed (:class:`~qcompile.layer_checkpoint.LayerCheckpoint`, under the
cache, keyed by model, format, options and calibration data), so a killed compile of a slow format resumes
from the last finished layer; the checkpoint is removed once OUT is complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from qcompile.errors import QCompileError, UnsupportedModelError
from qcompile.formats import get_format
from qcompile.formats.base import Format, LayerOverride, QuantizedWeight, is_whole_model_option
from qcompile.gptq import relative_output_error
from qcompile.layer_checkpoint import LayerCheckpoint
from qcompile.passes.discover_linears import LinearMatch, discover_linears, ensure_node_names, initializer_map
from qcompile.passes.lower_weights import lower_weights
from qcompile.passes.share_initializers import share_initializers
from qcompile import report as reports


@dataclasses.dataclass
class CompileConfig:
    """Everything a compile needs; the CLI and the Python API both build one of these."""

    model: str
    format: str
    output: Path
    emit: str | None = None  # None: the format's default
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # format options (group_size, ...)
    # per-layer options over ``options``: LayerOverride objects or "PATTERN:KEY=VALUE[,...]" strings
    layer_options: list[LayerOverride | str] = dataclasses.field(default_factory=list)
    calib_samples: int | None = None  # None: the format's default (Format.calib_samples)
    seq_len: int = 256
    eval_samples: int = 32
    eval_seq_len: int = 512
    eval_text: Path | None = None
    evaluate: bool = True
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    include_lm_head: bool = False
    sequential: bool = False
    force: bool = False
    resume: bool = True  # reuse layers a killed compile with the same inputs already finished
    progress: bool = True
    tokenizer: str | None = None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QCompileError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise QCompileError(f"unknown device {device!r}; accepted: auto, cpu, cuda")
    return device


def _peak_memory_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 1024.0


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with external data beside it when large (protobuf's 2 GB limit), IR pinned for onnxruntime."""
    model.ir_version = min(model.ir_version, 10)
    data_name = path.name + ".data"
    if sum(reports.tensor_nbytes(t) for t in model.graph.initializer) > 100 * 2**20:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _prepare_output(out: Path, force: bool) -> Path:
    """A fresh sibling temp folder to write into; checks OUT can be created before any work is done."""
    out = Path(out)
    if out.exists() and not force:
        raise QCompileError(f"output {out} already exists (use --force to replace it)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise QCompileError(f"cannot write output folder {out}: {e.strerror}") from None


def _commit_output(tmp: Path, out: Path) -> None:
    """Atomically put ``tmp`` at ``out`` (replacing an old OUT only after the new one is complete)."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def quantization_threads(device: str) -> Iterator[None]:
    """GPTQ's column sweep is many small tensor ops: on CPU one thread beats several (measured 10x under
    load on 2 cores), so quantize single-threaded unless QCOMPILE_QUANT_THREADS says otherwise."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("QCOMPILE_QUANT_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stages:
    """Wall-clock per stage, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def compile_model(cfg: CompileConfig) -> dict[str, Any]:
    """Compile ``cfg.model`` into ``cfg.output``; returns the report dict (also written as report.json/md)."""
    t_start = time.perf_counter()
    fmt = get_format(cfg.format)
    opts = fmt.resolve_options(cfg.options)
    overrides = [o if isinstance(o, LayerOverride) else LayerOverride.parse(o) for o in cfg.layer_options]
    for ov in overrides:
        fmt.parse_layer_override(ov)
    layer_overrides = [str(o) for o in (*fmt.layer_options, *overrides)]  # in the order they apply
    emit = cfg.emit or fmt.default_emit
    if emit not in fmt.emits:
        raise QCompileError(f"format {fmt.name} cannot emit {emit!r}; it emits: {', '.join(fmt.emits)}")
    device = resolve_device(cfg.device)
    if cfg.calib_samples is None:
        cfg = dataclasses.replace(cfg, calib_samples=fmt.calib_samples)
    for name in ("calib_samples", "seq_len", "eval_samples", "eval_seq_len"):
        if getattr(cfg, name) < 1:
            raise QCompileError(f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    tmp = _prepare_output(cfg.output, cfg.force)
    stages = _Stages()
    try:
        from qcompile import data as qdata
        from qcompile.models.sources import resolve_source

        source = resolve_source(cfg.model, tokenizer=cfg.tokenizer)
        float_path = stages.run("export", lambda: float_onnx(source, cfg.dtype))
        model = ensure_node_names(onnx.load(str(float_path)))
        matches = discover_linears(model, include_lm_head=cfg.include_lm_head)
        if not matches:
            raise UnsupportedModelError(f"{cfg.model}: no MatMul/Gemm with a constant weight to quantize")
        tokenizer = source.load_tokenizer()
        # Calibrated even for RTN: the Hessians give every layer's output error in the report (cached).
        calib = stages.run("tokenize", lambda: qdata.calibration_windows(tokenizer, cfg.calib_samples,
                                                                         cfg.seq_len, seed=cfg.seed))
        calib_tokens = int(calib.size)
        inits = initializer_map(model)
        per_layer = fmt.resolve_layer_options(opts, overrides, [m.name for m in matches])
        ckpt = _layer_checkpoint(source, float_path, fmt, opts, layer_overrides, calib, cfg, device)
        done_before = set(ckpt.names()) & {m.name for m in matches}
        if not cfg.resume:
            done_before = set()
        elif done_before:
            print(f"qcompile: resuming: {len(done_before)} of {len(matches)} layers already quantized "
                  f"({ckpt.directory})", file=sys.stderr)
        layer_seconds: dict[str, float | None] = {}
        resumed: set[str] = set()

        def quantize_layer(m: LinearMatch, h: torch.Tensor | None) -> QuantizedWeight:
            hit = ckpt.get_entry(m.name) if m.name in done_before else None
            if hit is not None:
                resumed.add(m.name)
                secs = hit[1].get("seconds")
                layer_seconds[m.name] = float(secs) if isinstance(secs, (int, float)) else None
                return hit[0]
            t0 = time.perf_counter()
            with quantization_threads(device):
                qw = fmt.quantize(m.weight(inits), h if fmt.needs_calibration else None, device=device,
                                  **per_layer[m.name])
            layer_seconds[m.name] = time.perf_counter() - t0
            ckpt.put(m.name, qw, {"seconds": layer_seconds[m.name]})
            return qw

        quantized: dict[str, QuantizedWeight] = {}
        layers: list[dict[str, Any]] = []
        if cfg.sequential:
            quantized, hessians = stages.run("calibrate+quantize", lambda: _sequential(
                float_path, model, matches, calib, quantize_layer, cfg.progress))
        else:
            hessians = stages.run("calibrate", lambda: _hessians(float_path, matches, calib, cfg))
            bar = tqdm(matches, desc=f"quantize {fmt.name}", unit="layer", disable=not cfg.progress)
            for m in bar:
                bar.set_postfix_str(m.name[-32:])
                quantized[m.name] = stages.run("quantize", lambda: quantize_layer(m, hessians.get(m.name)))
        tune_summary = None
        if fmt.tune is not None:
            tuned = stages.run("tune", lambda: fmt.tune(source, quantized, calib, opts, device, cfg.progress,
                                                        float_names=_private_initializers(model)))
            if tuned is not None:
                quantized.update(tuned[0])
                _override_initializers(model, tuned[1])
                tune_summary = tuned[2]
        for m in matches:
            qw = quantized[m.name]
            w = torch.from_numpy(m.weight(inits).T)
            h = hessians.get(m.name)
            err = relative_output_error(w, torch.from_numpy(qw.dequantize().T), h) if h is not None else None
            own = {k: v for k, v in per_layer[m.name].items() if v != opts[k]}
            layers.append({"name": m.name, "shape": list(m.shape), "format": fmt.name,
                           "bits_per_weight": qw.bits_per_weight(), "rel_output_error": err,
                           "quantize_seconds": layer_seconds.get(m.name), "resumed": m.name in resumed,
                           **({"layer_options": own} if own else {}), **qw.extra_report()})

        lowered = stages.run("lower", lambda: share_initializers(lower_weights(model, matches, quantized, emit)))
        lowered.metadata_props.add(key="qcompile.format", value=fmt.name)
        lowered.metadata_props.add(key="qcompile.emit", value=emit)
        _copy_source_metadata(model, lowered)
        out_model = tmp / "model.onnx"
        stages.run("save", lambda: save_model(lowered, out_model))
        del lowered

        sizes = reports.layer_sizes(onnx.load(str(out_model), load_external_data=False))
        by_name = {s.name: s for s in sizes}
        for layer in layers:  # size truth: what the file holds (simulated: what native storage would hold)
            s = by_name[layer["name"]]
            layer["bits_per_weight"] = s.packed_bits_per_weight if emit == "simulated" else s.bits_per_weight
        report: dict[str, Any] = {
            "format": fmt.name, "emit": emit, "model": cfg.model, "options": opts, "device": device,
            "layer_options": layer_overrides,
            "bits_per_weight": reports.overall_bits(sizes, packed=emit == "simulated"),
            "bits_per_weight_in_file": reports.overall_bits(sizes),
            "quantized_params": sum(s.params for s in sizes), "quantized_layers": len(sizes),
            "file_bytes": reports.model_file_bytes(out_model),
            "float_file_bytes": reports.model_file_bytes(float_path),
            "calib_tokens": calib_tokens, "calib_samples": cfg.calib_samples, "seq_len": cfg.seq_len,
            "seed": cfg.seed, "runtime": fmt.runtime if emit == "native" else "stock onnxruntime",
        }
        if cfg.evaluate:
            report.update(stages.run("evaluate", lambda: _evaluate(float_path, out_model, emit, fmt, tokenizer, cfg)))
        report["resumed_layers"] = len(resumed)
        if tune_summary is not None:
            report["tune"] = tune_summary
        report["layers"] = layers
        report["stage_seconds"] = stages.seconds
        report["compile_seconds"] = time.perf_counter() - t_start
        report["peak_memory_mib"] = _peak_memory_mib()
        reports.write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(reports.render_markdown(report))
        _commit_output(tmp, cfg.output)
        shutil.rmtree(ckpt.directory, ignore_errors=True)  # OUT is complete: nothing left to resume
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _private_initializers(model: onnx.ModelProto) -> set[str]:
    """Float initializers read by exactly one node: safe to retune (the exporter merges equal constants, e.g.
    norm weights that are all ones, into one shared initializer, which must then stay as it is)."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i in set(node.input):
            uses[i] = uses.get(i, 0) + 1
    return {t.name for t in model.graph.initializer if uses.get(t.name) == 1
            and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}


def _override_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Replace float initializers (e.g. norm weights a tune step adjusted), keeping each one's dtype and shape."""
    from onnx import helper, numpy_helper

    protos = {t.name: t for t in model.graph.initializer}
    for name, value in values.items():
        if name not in protos:
            raise QCompileError(f"tune step returned {name!r}, which is not an initializer of the model")
        t = protos[name]
        arr = np.asarray(value).astype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if list(arr.shape) != list(t.dims):
            raise QCompileError(f"tune step returned {name} with shape {list(arr.shape)}, expected {list(t.dims)}")
        t.CopyFrom(numpy_helper.from_array(arr, name))


def _layer_checkpoint(source: Any, float_path: Path, fmt: Format, opts: dict[str, Any], layer_overrides: list[str],
                      calib: np.ndarray, cfg: CompileConfig, device: str) -> LayerCheckpoint:
    """Checkpoint folder for this exact compile: every input that determines a layer's result is in the key
    (model file, format, options and per-layer overrides, calibration tokens, sequential mode, device);
    progress bars and the whole-model ``finetune*`` options (they act after every layer is done) are not."""
    from qcompile.cache import cache_dir, digest_array, key_hash

    layer_opts = {k: v for k, v in opts.items() if k != "progress" and not is_whole_model_option(k)}
    key = key_hash("layers-v3", getattr(source, "fingerprint", None), str(float_path), _file_key(float_path),
                   fmt.name, layer_opts, layer_overrides, digest_array(np.asarray(calib)), cfg.sequential,
                   cfg.include_lm_head, device)
    return LayerCheckpoint(cache_dir() / "layers" / key, fingerprint=key)


def _copy_source_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    have = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in have:
            dst.metadata_props.add(key=p.key, value=p.value)


def float_onnx(source: Any, dtype: str) -> Path:
    """The float ONNX model of a source: the .onnx itself, or a cached export."""
    from qcompile.models.export import export_onnx

    return export_onnx(source, dtype=dtype)  # .onnx sources come back as they are


def _hessians(float_path: Path, matches: list[LinearMatch], calib: np.ndarray, cfg: CompileConfig) -> dict[str, torch.Tensor]:
    from qcompile.calibration import collect_hessians

    key = (str(float_path), _file_key(float_path), calib.shape, int(np.asarray(calib).sum()), cfg.seed)
    return collect_hessians(float_path, {m.name: m.input for m in matches}, calib, cache_key=key,
                            progress=cfg.progress)


def _sequential(float_path, model, matches, calib, quantize_layer, progress):
    """Calibrate block by block on the outputs of the already-quantized blocks."""
    from qcompile.calibration import collect_hessians_sequential

    groups: list[list[LinearMatch]] = []
    for m in matches:
        block = _block_of(m.name)
        if not groups or _block_of(groups[-1][0].name) != block:
            groups.append([])
        groups[-1].append(m)
    quantized: dict[str, QuantizedWeight] = {}
    hessians: dict[str, torch.Tensor] = {}

    def quantize_group(hs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {}
        for m in (m for g in groups for m in g if m.name in hs):
            quantized[m.name] = quantize_layer(m, hs[m.name])
            hessians[m.name] = hs[m.name]
            w = quantized[m.name].dequantize()
            out[m.initializer] = w.T if m.transposed else w
        return out

    collect_hessians_sequential(float_path, [{m.name: m.input for m in g} for g in groups], calib, quantize_group,
                                progress=progress)
    return quantized, hessians


def _block_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the transformer block a linear belongs to)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _file_key(path: Path) -> tuple:
    st = Path(path).stat()
    return (st.st_size, int(st.st_mtime))


def session_factory_for(emit: str, fmt: Format) -> Callable[[str], Any]:
    """Plain onnxruntime for stock ops; our op library registered when the format's op needs it."""
    if emit == "native" and "qcompile_ops" in fmt.runtime:
        from qcompile.runtime import make_session

        return lambda p: make_session(p)
    import onnxruntime as ort

    return lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])


def _evaluate(float_path: Path, out_model: Path, emit: str, fmt: Format, tokenizer: Any,
              cfg: CompileConfig) -> dict[str, Any]:
    from qcompile import data as qdata
    from qcompile.cache import cache_path
    from qcompile.evaluate import perplexity

    texts = qdata.load_text_file(cfg.eval_text) if cfg.eval_text else None
    windows = qdata.eval_windows(tokenizer, cfg.eval_seq_len, cfg.eval_samples, texts=texts)
    key_path = cache_path("ppl", str(float_path), _file_key(float_path), windows.shape, int(windows.sum()))
    if key_path.exists():
        ref = float(key_path.read_text())
    else:
        ref, _ = perplexity(float_path, windows, progress=cfg.progress)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.write_text(repr(ref))
    q, n_tokens = perplexity(out_model, windows, session_factory=session_factory_for(emit, fmt), progress=cfg.progress)
    return {"ppl_reference": ref, "ppl_quantized": q, "ppl_ratio": q / ref, "eval_tokens": n_tokens,
            "eval_samples": cfg.eval_samples, "eval_seq_len": cfg.eval_seq_len,
            "eval_text": str(cfg.eval_text) if cfg.eval_text else "bundled wikipedia eval split"}
