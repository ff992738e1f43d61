"""The compile driver: check the request, read the source, run :data:`qcompile.passes.PIPELINE`, save,
evaluate, report.

Nothing here knows a format's internals: formats plug in through :mod:`qcompile.formats`, and every step in
between is a pass. The output folder is written aside and renamed into place, so an error or Ctrl-C never
leaves a half-written OUT; finished layers are checkpointed by the quantize pass, so a killed compile of a
slow format resumes, and the checkpoint is removed once OUT is complete.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from qcompile import report as reports
from qcompile.errors import QCompileError
from qcompile.formats import get_format
from qcompile.formats.base import EMIT_MODES, Format, LayerOverride
from qcompile.formats.palette import AUTO, Budget, Candidate
from qcompile.models.decoder import is_decoder_folder, write_genai_folder
from qcompile.models.export import save_onnx
from qcompile.runtime import needs_ops_library
from qcompile.passes import PIPELINE, CompileState


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
    embeddings: str | None = None  # the vocabulary tables: float, int8 or int4; None: the format's default
    budget: float | None = None  # -f auto: bits per weight over the quantized linears
    budget_mb: float | None = None  # -f auto: the whole file, in MB of 10^6 bytes
    palette: list[str] = dataclasses.field(default_factory=list)  # -f auto: entries (default: the registry's)
    tie: bool = False  # -f auto: layers that read one input (q/k/v, gate/up) take one palette entry
    sequential: bool = False
    force: bool = False
    resume: bool = True  # reuse layers a killed compile with the same inputs already finished
    progress: bool = True
    verbose: bool = False  # show the exporter's own warnings and logs
    tokenizer: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked request: everything resolved that can be resolved before any model is loaded."""

    cfg: CompileConfig
    fmt: Format | None  # None: -f auto
    options: dict[str, Any]
    overrides: tuple[LayerOverride, ...]
    emit: str
    device: str
    palette: tuple[Candidate, ...] = ()
    budget: Budget | None = None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QCompileError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise QCompileError(f"unknown device {device!r}; accepted: auto, cpu, cuda")
    return device


def plan(cfg: CompileConfig) -> Plan:
    """Check every option of the request before any work, so a typo fails at once."""
    if cfg.format == AUTO:
        return _plan_auto(cfg)
    if cfg.budget is not None or cfg.budget_mb is not None or cfg.palette or cfg.tie:
        raise QCompileError(f"--budget, --budget-mb, --palette and --tie go with -f {AUTO}, not -f {cfg.format}")
    fmt = get_format(cfg.format)
    options = fmt.resolve_options(cfg.options)
    overrides = tuple(o if isinstance(o, LayerOverride) else LayerOverride.parse(o) for o in cfg.layer_options)
    for ov in overrides:
        fmt.parse_layer_override(ov)
    emit = cfg.emit or fmt.default_emit
    if emit not in EMIT_MODES or emit not in fmt.emits:
        raise QCompileError(f"format {fmt.name} cannot emit {emit!r}; it emits: {', '.join(fmt.emits)}")
    if cfg.calib_samples is None:
        cfg = dataclasses.replace(cfg, calib_samples=fmt.calib_samples)
    if cfg.embeddings is None:
        cfg = dataclasses.replace(cfg, embeddings=fmt.embeddings)
    _check_common(cfg)
    return Plan(cfg, fmt, options, overrides, emit, resolve_device(cfg.device))


def _check_common(cfg: CompileConfig) -> None:
    from qcompile.passes.embeddings import EMBEDDINGS

    for name in ("calib_samples", "seq_len", "eval_samples", "eval_seq_len"):
        if getattr(cfg, name) < 1:
            raise QCompileError(f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.embeddings is not None and cfg.embeddings not in EMBEDDINGS:
        raise QCompileError(f"--embeddings {cfg.embeddings!r}: expected one of {', '.join(EMBEDDINGS)}")
    if cfg.evaluate and cfg.eval_text is not None:
        from qcompile.data import load_text_file

        load_text_file(cfg.eval_text)  # readable UTF-8 text, before any work (its length is checked once tokenized)


def _plan_auto(cfg: CompileConfig) -> Plan:
    """``-f auto``: the palette and the budget checked; options may only be the whole-model (fine-tuning) ones, which
    act on every tunable layer at once; the calibration is the largest any palette format asks for."""
    from qcompile.formats.base import finetune_options, is_whole_model_option
    from qcompile.formats.palette import Budget, parse_palette

    budget = Budget(cfg.budget, cfg.budget_mb)
    palette = parse_palette(cfg.palette)
    if cfg.layer_options:
        raise QCompileError(f"-L does not apply to -f {AUTO}: give per-layer settings as --palette entries, e.g. "
                            "'spqr-w3:bits=4'")
    if cfg.sequential:
        raise QCompileError(f"--sequential does not apply to -f {AUTO}")
    table = finetune_options()
    bad = sorted(k for k in cfg.options if not is_whole_model_option(k) or k not in table)
    if bad:
        raise QCompileError(f"-f {AUTO} takes only whole-model options with -O ({', '.join(sorted(table))}); "
                            f"{', '.join(bad)} belongs in a --palette entry, e.g. 'spqr-w3:{bad[0]}=...'")
    options = {k: o.default for k, o in table.items()}
    options.update({k: table[k].parse(k, v) for k, v in cfg.options.items()})
    emit = cfg.emit or "native"
    cannot = [c.text for c in palette if emit not in c.fmt.emits]
    if emit not in EMIT_MODES or cannot:
        raise QCompileError(f"-f {AUTO} cannot emit {emit!r}: palette entries {', '.join(cannot)} do not")
    if cfg.calib_samples is None:
        cfg = dataclasses.replace(cfg, calib_samples=max(c.fmt.calib_samples for c in palette))
    if cfg.embeddings is None and budget.bits is not None:  # 2-bit-class budgets store 4-bit tables (as aqlm-2x8 does)
        cfg = dataclasses.replace(cfg, embeddings="int4" if budget.bits < 3 else "int8")
    _check_common(cfg)  # (--budget-mb without --embeddings: the allocate pass chooses int8 or int4)
    return Plan(cfg, None, options, (), emit, resolve_device(cfg.device), palette, budget)


def compile_model(cfg: CompileConfig) -> dict[str, Any]:
    """Compile ``cfg.model`` into ``cfg.output``; returns the report dict (also written as report.json/md)."""
    t_start = time.perf_counter()
    p = plan(cfg)
    cfg = p.cfg
    tmp = _prepare_output(cfg.output, cfg.force)
    stages = _Stages()
    state: CompileState | None = None
    try:
        from qcompile.models.sources import resolve_source

        source = resolve_source(cfg.model, tokenizer=cfg.tokenizer)
        tokenizer = source.load_tokenizer()
        eval_windows = None
        if cfg.evaluate:  # enough evaluation text, before the slow steps
            from qcompile.evaluate import text_windows

            eval_windows = text_windows(tokenizer, text=cfg.eval_text, samples=cfg.eval_samples,
                                        seq_len=cfg.eval_seq_len)
        float_path = stages.run("export", lambda: float_onnx(source, cfg.dtype, verbose=cfg.verbose))
        state = CompileState(cfg=cfg, fmt=p.fmt, options=p.options, overrides=p.overrides, emit=p.emit,
                             device=p.device, palette=p.palette, budget=p.budget, source=source, float_path=float_path,
                             model=onnx.load(str(float_path)), tokenizer=tokenizer, eval_windows=eval_windows)
        for step in PIPELINE:
            state = stages.run(step.name, lambda: step.run(state))
        out_model = tmp / "model.onnx"
        _copy_source_metadata(state.float_model, state.model)
        stages.run("save", lambda: save_onnx(state.model, out_model))
        if is_decoder_folder(state.float_path.parent):
            write_genai_folder(state.float_path.parent, tmp, needs_library=needs_ops_library(state.model))
        report = _report(state, out_model)
        if cfg.evaluate:
            report.update(stages.run("evaluate", lambda: _evaluate(state, out_model)))
        report["resumed_layers"] = len(state.resumed)
        if state.tune_summary is not None:
            report["tune"] = state.tune_summary
        report["layers"] = list(state.layers)
        if state.allocation is not None:
            report["allocation"] = reports.allocation_summary(state.allocation, report)
        report["stage_seconds"] = stages.seconds
        report["compile_seconds"] = time.perf_counter() - t_start
        report["peak_memory_mib"] = _peak_memory_mib()
        reports.write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(reports.render_markdown(report))
        _commit_output(tmp, cfg.output)
        shutil.rmtree(state.checkpoint.directory, ignore_errors=True)  # OUT is complete: nothing left to resume
        return report
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, QCompileError) and state is not None and state.checkpoint is not None:
            shutil.rmtree(state.checkpoint.directory, ignore_errors=True)  # the same input fails the same way
        raise


def _report(state: CompileState, out_model: Path) -> dict[str, Any]:
    simulated = state.emit == "simulated"
    all_sizes = reports.layer_sizes(state.model)
    sizes = [s for s in all_sizes if s.role == "linear"]
    tables = [s for s in all_sizes if s.role != "linear"]
    file_bytes = reports.model_file_bytes(out_model)
    params = reports.model_parameters(state.float_model)
    return {
        "format": state.format_name, "emit": state.emit, "model": state.cfg.model, "options": state.options,
        "device": state.device, "layer_options": state.override_texts,
        "bits_per_weight": reports.overall_bits(sizes, packed=simulated),
        "bits_per_weight_in_file": reports.overall_bits(sizes),
        "quantized_params": sum(s.params for s in sizes), "quantized_layers": len(sizes),
        "embeddings": {"mode": state.cfg.embeddings,
                       "format": tables[0].format if tables else "float",
                       "bits_per_weight": reports.overall_bits(tables, packed=simulated) if tables else None,
                       "params": sum(s.params for s in tables)},
        "parameters": params,
        "bits_per_parameter": 8.0 * file_bytes / params if params else None,
        "file_bytes": file_bytes,
        "float_file_bytes": reports.model_file_bytes(state.float_path),
        "source_bytes": state.source.size_bytes(),
        "calib_tokens": int(state.calib.size), "calib_samples": state.cfg.calib_samples,
        "seq_len": state.cfg.seq_len, "seed": state.cfg.seed,
        "runtime": _runtime(state),
    }


def _runtime(state: CompileState) -> str:
    """What the file needs to run: every op its layers' formats emit natively, else stock onnxruntime."""
    if state.emit != "native":
        return "stock onnxruntime"
    used = {f.name: f for f in state.layer_formats.values()}
    return "; ".join(sorted({f.runtime for f in used.values()}))


def _evaluate(state: CompileState, out_model: Path) -> dict[str, Any]:
    """Perplexity of the float model (cached) and of the compiled one, on the same windows."""
    from qcompile.cache import cache_path
    from qcompile.evaluate import perplexity
    from qcompile.passes.calibrate import file_key

    cfg = state.cfg
    windows = state.eval_windows
    key_path = cache_path("ppl", str(state.float_path), file_key(state.float_path), windows.shape, int(windows.sum()))
    if key_path.exists():
        ref = float(key_path.read_text())
    else:
        ref, _ = perplexity(state.float_path, windows, progress=cfg.progress)
        key_path.write_text(repr(ref))
    q, n_tokens = perplexity(out_model, windows, progress=cfg.progress)
    return {"ppl_reference": ref, "ppl_quantized": q, "ppl_ratio": q / ref, "eval_tokens": n_tokens,
            "eval_samples": cfg.eval_samples, "eval_seq_len": cfg.eval_seq_len,
            "eval_text": str(cfg.eval_text) if cfg.eval_text else "bundled wikipedia eval split"}


def float_onnx(source: Any, dtype: str, verbose: bool = False) -> Path:
    """The float ONNX model of a source: the .onnx itself, or the cached KV-cache decoder built from it.

    An architecture onnxruntime-genai's builder does not know falls back to our full-sequence export: it
    compiles and evaluates the same way, but the result is no onnxruntime-genai folder."""
    import sys

    from qcompile.errors import UnsupportedModelError
    from qcompile.models.decoder import build_decoder
    from qcompile.models.export import export_onnx

    if source.is_onnx:
        return source.path
    try:
        return build_decoder(source, dtype, verbose=verbose)
    except UnsupportedModelError as e:
        print(f"qcompile: {e}\nqcompile: falling back to a full-sequence graph (no KV cache; OUT will not be an "
              "onnxruntime-genai folder)", file=sys.stderr)
        return export_onnx(source, dtype=dtype, verbose=verbose)


def _copy_source_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    have = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in have:
            dst.metadata_props.add(key=p.key, value=p.value)


def _peak_memory_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 1024.0


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
    """Atomically put ``tmp`` at ``out`` (replacing an old OUT only after the new one is complete), with the
    permissions the user's umask gives new files (the temporary folder was private while being written)."""
    _apply_umask(tmp)
    out = Path(out)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def _apply_umask(folder: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.rglob("*"):
        executable = f.is_dir() or f.suffix == ".so"
        os.chmod(f, (0o777 if executable else 0o666) & ~mask)


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
