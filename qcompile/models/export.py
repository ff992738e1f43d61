"""Export a model source to a float ONNX graph (the compiler's input), with an on-disk cache.

Graph contract (what discovery/lowering and calibration rely on):

* inputs ``input_ids`` ``[batch, seq]`` int64 and, unless ``with_attention_mask=False``,
  ``attention_mask`` ``[batch, seq]`` int64 (1 = real token); output ``logits`` ``[batch, seq, vocab]``
  in the export dtype; batch and seq are dynamic; no KV cache.
* every linear layer is a ``MatMul(x, W)`` with ``W`` a ``[K, N]`` initializer (ONNX layout, i.e. the
  transpose of the torch weight).  Where the exporter tells us the module, the MatMul node is named
  after it (``model.layers.0.self_attn.q_proj``) and its weight ``<module>.weight`` (still ``[K, N]``).
  A tied ``lm_head`` reads a ``Transpose`` of the embedding table instead of an initializer.
* metadata_props ``qcompile.source`` / ``qcompile.fingerprint`` / ``qcompile.dtype`` /
  ``qcompile.export_version`` / ``qcompile.with_attention_mask``.
* weights go to ``<name>.data`` beside the ``.onnx`` when they exceed ~100 MB; IR version <= 10.

Exports are cached under ``<cache>/onnx/<key>/model.onnx`` keyed by the source fingerprint, dtype,
options and :data:`EXPORT_VERSION` (bump it whenever the recipe changes the graph).
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from qcompile.cache import atomic_dir, cache_path, entry_lock
from qcompile.errors import QCompileError, UnsupportedModelError
from qcompile.models.causal_lm import WRAPPER_PREFIX, CausalLMLogits, example_inputs
from qcompile.models.sources import (
    META_ATTENTION_MASK,
    META_DTYPE,
    META_EXPORT_VERSION,
    ModelSource,
    resolve_source,
)

EXPORT_VERSION = 1
EXTERNAL_DATA_THRESHOLD = 100 * 2**20  # bytes of initializers above which weights go to a .data file
MAX_IR_VERSION = 10  # onnxruntime 1.2x-1.3x accepts it; onnx 1.23 may write 14
DTYPES = ("float32", "float16")


def export_onnx(
    source: ModelSource | str,
    out_path: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    with_attention_mask: bool = True,
    use_cache: bool = True,
    verify: bool = True,
    verbose: bool = False,
    log=None,
) -> Path:
    """Export ``source`` to ONNX and return the ``.onnx`` path.

    With ``out_path=None`` the cached file itself is returned (treat it as read-only); otherwise the
    cached export is copied to ``out_path`` (its data file becomes ``<out_path name>.data``).
    An ``.onnx`` source is returned as it is (or copied to ``out_path``).
    ``use_cache=False`` forces a fresh export (still stored in the cache).  ``verify`` compares
    onnxruntime logits with torch on a small batch and raises if they disagree.
    ``log`` is a ``print``-like callable for progress lines (default: stderr). The exporter's own warnings
    and output are shown only with ``verbose``.
    """
    log = log or (lambda msg, _err=sys.stderr: print(msg, file=_err, flush=True))  # not the redirected one
    if dtype not in DTYPES:
        raise QCompileError(f"export dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = resolve_source(source) if isinstance(source, (str, os.PathLike)) else source
    if src.is_onnx:  # already a graph: pass it through (dtype and mask options cannot be changed here)
        return src.path if out_path is None else copy_onnx(src.path, Path(out_path))
    cached = cached_export_path(src, dtype=dtype, with_attention_mask=with_attention_mask)
    with entry_lock(cached.parent):  # concurrent compiles of one source export it once
        if not (use_cache and cached.is_file()):
            if cached.parent.exists():
                shutil.rmtree(cached.parent, ignore_errors=True)
            with atomic_dir(cached.parent) as tmp, exporter_output(verbose):
                _export_fresh(src, tmp / cached.name, dtype, with_attention_mask, verify, log)
        else:
            log(f"[qcompile] using cached export {cached}")
    if out_path is None:
        return cached
    return copy_onnx(cached, Path(out_path))


@contextlib.contextmanager
def exporter_output(verbose: bool) -> Iterator[None]:
    """Hide what torch, transformers and onnxscript print while exporting (deprecation warnings, graph
    dumps, per-pass logs, conversion progress bars) unless ``verbose``; qcompile's own progress lines are
    printed before and after."""
    if verbose:
        yield
        return
    import logging

    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxscript", "transformers", "accelerate")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cached_export_path(src: ModelSource, *, dtype: str = "float32", with_attention_mask: bool = True) -> Path:
    """Where the cached export of ``src`` lives (it may not exist yet)."""
    folder = cache_path("onnx", "export", EXPORT_VERSION, src.fingerprint, dtype, bool(with_attention_mask))
    return folder / "model.onnx"


def _export_fresh(src: ModelSource, out: Path, dtype: str, with_mask: bool, verify: bool, log) -> None:
    import torch

    log(f"[qcompile] loading {src.describe()} ...")
    model = src.load_model(dtype)
    wrapper = CausalLMLogits(model, with_attention_mask=with_mask).eval()
    args = example_inputs(int(model.config.vocab_size), with_mask)
    names = ["input_ids", "attention_mask"][: len(args)]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic = {n: {0: batch, 1: seq} for n in names}
    log(f"[qcompile] exporting {src.spec} to ONNX ({dtype}; takes a while for large models) ...")
    t0 = time.time()
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=names, output_names=["logits"],
                dynamic_shapes=dynamic, optimize=True, verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types
        raise UnsupportedModelError(f"torch.onnx export of {src.spec} failed: {type(e).__name__}: {e}") from e
    proto = program.model_proto
    _tidy_names(proto)
    meta = {
        **src.metadata(),
        META_DTYPE: dtype,
        META_EXPORT_VERSION: str(EXPORT_VERSION),
        META_ATTENTION_MASK: "1" if with_mask else "0",
    }
    set_metadata(proto, meta)
    save_onnx(proto, out)
    log(f"[qcompile] exported in {time.time() - t0:.0f} s -> {out}")
    validate_onnx(out)
    if verify:
        _verify(wrapper, out, int(model.config.vocab_size), with_mask, dtype)


def _verify(wrapper, path: Path, vocab: int, with_mask: bool, dtype: str) -> None:
    """onnxruntime vs torch logits on a batch/seq different from the export example."""
    import onnxruntime as ort
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 5), generator=g, dtype=torch.int64)
    feeds = {"input_ids": ids.numpy()}
    args: tuple = (ids,)
    if with_mask:
        mask = torch.ones_like(ids)
        feeds["attention_mask"] = mask.numpy()
        args = (ids, mask)
    with torch.no_grad():
        ref = wrapper(*args).float().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], feeds)[0].astype(np.float32)
    err = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-6))
    tol = 1e-3 if dtype == "float32" else 5e-2
    if not np.isfinite(err) or err > tol:
        raise QCompileError(f"exported {path} disagrees with torch: max relative logit error {err:.2e} > {tol}")


# ------------------------------------------------------------------------------------------------
def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries on ``model``."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for k, v in keep + sorted(values.items()):
        model.metadata_props.add(key=k, value=str(v))


def get_metadata(model_or_path: onnx.ModelProto | str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of a model (a path is read without its external data)."""
    if not isinstance(model_or_path, onnx.ModelProto):
        model_or_path = onnx.load(str(model_or_path), load_external_data=False)
    return {p.key: p.value for p in model_or_path.metadata_props}


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when large (or ``external``).

    Caps the IR version at :data:`MAX_IR_VERSION` and removes a stale data file of the same name.
    ``model`` is not modified (a copy is saved).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    size = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    if external is None:
        external = size > EXTERNAL_DATA_THRESHOLD
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.ir_version = min(out.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    if external:
        onnx.save_model(out, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(out, str(path))
    return path


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0


def validate_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` on the file (by path, so external data and >2 GB models work)."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - ValidationError, DecodeError, OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{path} is not a valid ONNX model: {first}") from e


def copy_onnx(src: Path, dst: Path) -> Path:
    """Copy an ``.onnx`` and its external data to ``dst``.

    Our own layout (one ``<name>.data``) is renamed to ``<dst name>.data``; any other external data
    files keep their relative names beside ``dst``.
    """
    from qcompile.models.sources import external_data_files

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    src_data = src.with_name(src.name + ".data")
    proto = onnx.load(str(src), load_external_data=False)
    files = external_data_files(proto, src.parent)
    if files != {src_data.resolve()}:
        shutil.copyfile(src, dst)
        if not files:
            dst.with_name(dst.name + ".data").unlink(missing_ok=True)
        for f in files:
            target = dst.parent / f.relative_to(src.parent.resolve())
            if target.resolve() != f:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
        return dst
    new_loc = dst.name + ".data"
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(proto):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = new_loc
    shutil.copyfile(src_data, dst.with_name(new_loc))
    onnx.save_model(proto, str(dst))
    return dst


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for coll in (g.initializer, g.input, g.output, g.value_info):
        for item in coll:
            if item.name == old:
                item.name = new


_DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace")


def _tidy_names(model: onnx.ModelProto) -> None:
    """Readable names: strip the wrapper prefix; name linear MatMuls and weights after their module.

    Also drops the exporter's bulky per-node debug metadata (stack traces), keeping the compact
    ``pkg.torch.onnx.name_scopes`` / ``class_hierarchy`` that say which module a node came from.
    """
    g = model.graph
    for node in g.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key not in _DROP_NODE_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            for k, v in keep:
                node.metadata_props.add(key=k, value=v)
    taken = {t.name for t in g.initializer} | {n for node in g.node for n in node.output}
    for t in list(g.initializer):
        if t.name.startswith(WRAPPER_PREFIX):
            new = t.name[len(WRAPPER_PREFIX):]
            if new not in taken:
                rename_tensor(model, t.name, new)
                taken.add(new)
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    node_names = {n.name for n in g.node}
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        module = _module_of(node)
        if not module:
            continue
        constant = node.input[1] in inits and len(inits[node.input[1]].dims) == 2
        if not (constant or _is_linear(node)):
            continue  # e.g. attention score MatMuls inside self_attn
        if module not in node_names:
            node_names.discard(node.name)
            node.name = module
            node_names.add(module)
        if not constant or uses.get(node.input[1], 0) != 1:
            continue  # a tied lm_head reads Transpose(embedding): keep the shared table's name
        weight = module + ".weight"
        if weight not in taken:
            rename_tensor(model, node.input[1], weight)
            taken.add(weight)


def _is_linear(node: onnx.NodeProto) -> bool:
    """True if the exporter says the node comes from a ``torch.nn.Linear``-like module."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.class_hierarchy":
            try:
                classes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return False
            return len(classes) >= 2 and str(classes[-2]).endswith("Linear")
    return False


def _module_of(node: onnx.NodeProto) -> str | None:
    """The torch module path the exporter recorded for a node (``model.layers.0.mlp.up_proj``)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            if len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
                mod = scopes[-2]
                return mod[len(WRAPPER_PREFIX):] if mod.startswith(WRAPPER_PREFIX) else mod
    return None
