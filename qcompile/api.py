"""Python API: the same functions the CLI calls.

    import qcompile
    report = qcompile.compile("smollm2-135m", "int4-gptq", "out/")
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from qcompile.errors import QCompileError
from qcompile.formats import Format, all_formats
from qcompile.pipeline import CompileConfig, compile_model


def compile(model: str, format: str, output: str | Path, **kwargs: Any) -> dict[str, Any]:  # noqa: A001
    """Compile ``model`` with ``format`` into the folder ``output``; kwargs are :class:`CompileConfig` fields
    (``options={"group_size": 64}``, ``emit="simulated"``, ``calib_samples=...``). Returns the report."""
    return compile_model(CompileConfig(model=model, format=format, output=Path(output), **kwargs))


def list_formats() -> list[Format]:
    """Every registered weight format (the rows ``qcompile formats`` prints)."""
    return all_formats()


def export(model: str, output: str | Path, *, dtype: str = "float32", force: bool = False,
           verbose: bool = False) -> Path:
    """Write the float model of ``model`` to ``output``: a folder gets the float KV-cache decoder as an
    onnxruntime-genai folder (what ``compile`` starts from), an ``.onnx`` path the graph alone."""
    from qcompile.models.decoder import is_decoder_folder, write_genai_folder
    from qcompile.models.sources import resolve_source
    from qcompile.pipeline import float_onnx

    output = Path(output)
    target = output if output.suffix == ".onnx" else output / "model.onnx"
    if target.exists() and not force:
        raise QCompileError(f"output {target} already exists (use --force to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    except OSError as e:
        raise QCompileError(f"cannot write {target.parent}: {e.strerror}") from None
    try:
        cached = float_onnx(resolve_source(model), dtype, verbose=verbose)
        from qcompile.models.export import save_onnx

        save_onnx(onnx.load(str(cached)), tmp / target.name)
        if output.suffix != ".onnx" and is_decoder_folder(cached.parent):
            write_genai_folder(cached.parent, tmp, needs_library=False)
        for f in tmp.iterdir():  # model.onnx last, so a reader never sees it without its data
            if f.name != target.name:
                f.replace(target.parent / f.name)
        (tmp / target.name).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_file(path: str | Path) -> Path:
    """The ``.onnx`` file a user means: the file itself, or ``model.onnx`` in a compiled folder; checked to be a
    readable ONNX model whose external data files are all there (one clear error otherwise)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise QCompileError(f"{path} is a folder without a model.onnx (expected a compiled folder or an .onnx file)")
        path = path / "model.onnx"
    elif not path.exists():
        raise QCompileError(f"{path}: no such file or folder")
    elif path.suffix.lower() != ".onnx":
        raise QCompileError(f"{path} is not an .onnx model (expected a compiled folder or an .onnx file; compile "
                            f"a {path.suffix or 'extensionless'} source with `qcompile compile` first)")
    from qcompile.models.sources import external_data_files

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf DecodeError and friends
        raise QCompileError(f"{path} is not a readable ONNX model") from None
    missing = sorted(str(f) for f in external_data_files(proto, path.parent) if not f.is_file())
    if missing:
        raise QCompileError(f"{path}: its external data file is missing: {', '.join(missing)}")
    return path


def evaluate(model_path: str | Path, *, text: str | Path | None = None, samples: int = 32, seq_len: int = 512,
             tokenizer: str | None = None, progress: bool = True, decode: bool = False) -> tuple[float, int]:
    """Perplexity of an ONNX model (or compiled folder) on the bundled evaluation split (or ``text``): the
    report's computation, or with ``decode`` the same windows fed one token per step through the KV cache
    (:func:`qcompile.evaluate.decode_perplexity`)."""
    if samples < 1:
        raise QCompileError(f"--samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise QCompileError(f"--seq-len must be at least 2, got {seq_len}")
    model_path = model_file(model_path)
    from qcompile.evaluate import decode_perplexity, perplexity, text_windows
    from qcompile.models.sources import resolve_source

    tok = resolve_source(model_path, tokenizer=tokenizer).load_tokenizer()
    windows = text_windows(tok, text=text, samples=samples, seq_len=seq_len)
    return (decode_perplexity if decode else perplexity)(model_path, windows, progress=progress)


def inspect_model(model_path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-layer rows and totals (bytes counted from the file)."""
    from qcompile.report import inspect_rows, model_file_bytes

    model_path = model_file(model_path)
    rows = inspect_rows(model_path)

    def count(selected: list[dict[str, Any]]) -> tuple[int, int]:
        params = sum(int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1])
                     for r in selected if not r.get("shared"))
        return params, sum(r["bytes"] for r in selected)

    # bits_per_weight covers the linear layers, as a compile report counts it; the embedding table and head
    # are reported on their own, so the two figures compare across files compiled with different --embeddings.
    params, nbytes = count([r for r in rows if r["role"] == "linear"])
    emb_params, emb_bytes = count([r for r in rows if r["role"] != "linear"])
    return rows, {"params": params, "bytes": nbytes, "bits_per_weight": 8.0 * nbytes / params if params else 0.0,
                  "embedding_params": emb_params, "embedding_bytes": emb_bytes,
                  "file_bytes": model_file_bytes(model_path)}
