"""TensorRT engines from compiled models (``qcompile engine OUT``), with qcompile's plugins.

TensorRT's ONNX parser imports a node it has no importer for as a plugin when a plugin creator of the
node's op type is registered; it looks the creator up by the node's ``plugin_version`` attribute
(default ``"1"``) and ``plugin_namespace`` attribute (default ``""``), and passes the plugin only the
node's *attributes* as fields, while its inputs stay network tensors. The qcompile ops take their packed
weights as inputs, and TensorRT plugins get constant weights as fields. So :func:`to_tensorrt_onnx`
rewrites each qcompile op node for TensorRT: every stored-tensor input becomes a TENSOR attribute of the
same name (docs/ops.md names the inputs), X stays the only input, and ``plugin_namespace`` names the
plugins' namespace. The parser turns a TENSOR attribute into a field only for int8, int32, float16,
float32 (and a few more) weights: it has no unsigned field types and converts no int16 weights. So uint8
tensors travel as int8 (same bytes) and int16 / uint16 tensors (SpQR index tensors, 16-bit codebook
codes) are widened to int32 (same values); the plugins accept both. The plugins themselves are
``libqcompile_trt_plugins.so`` (``custom_ops/trt``), which :func:`build_engine` loads into TensorRT's
plugin registry.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.errors import QCompileError

PLUGIN_NAMESPACE = "qcompile"
PLUGIN_VERSION = "1"
OPS_DOMAIN = "qcompile"


def weight_inputs() -> dict[str, tuple[str, ...]]:
    """The stored-tensor inputs of each of our ops, in input order after X (from the format registry's op
    specs, as docs/ops.md names them): the plugins' field names."""
    from qcompile.formats import all_formats

    return {f.op.type: f.op.inputs for f in all_formats() if f.op.domain == OPS_DOMAIN}

# What the ONNX parser passes on as plugin fields: uint8 as int8 (same bytes), 16-bit integers widened.
_FIELD_VIEW = {np.dtype(np.uint8): np.int8}
_FIELD_WIDEN = {np.dtype(np.int16): np.int32, np.dtype(np.uint16): np.int32}
_FIELD_DTYPES = {np.dtype(t) for t in (np.int8, np.int32, np.float16, np.float32)}


class EngineError(QCompileError):
    """The engine cannot be built: no TensorRT, no plugin library, or a graph TensorRT cannot take."""


def field_array(arr: np.ndarray, what: str = "tensor") -> np.ndarray:
    """``arr`` in a dtype TensorRT's ONNX parser passes to a plugin as a field: uint8 -> int8 (the bytes
    unchanged), int16 and uint16 -> int32 (the values unchanged), int8 / int32 / float16 / float32 as
    they are."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype in _FIELD_VIEW:
        return arr.view(_FIELD_VIEW[arr.dtype])
    if arr.dtype in _FIELD_WIDEN:
        return arr.astype(_FIELD_WIDEN[arr.dtype])
    if arr.dtype not in _FIELD_DTYPES:
        raise EngineError(f"{what}: dtype {arr.dtype} cannot travel as a TensorRT plugin field")
    return arr


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and outputs of Constant nodes (value attribute) by name."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    return out


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:  # subgraphs (If/Loop/Scan) read outer names too
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _used_names(g)
    return used


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    ops = weight_inputs()
    return [n for n in model.graph.node if n.domain == OPS_DOMAIN and n.op_type in ops]


def to_tensorrt_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every qcompile op node carries its stored tensors as TENSOR attributes
    (its TensorRT plugin's fields) and reads only X; initializers no longer read are dropped.

    Raises :class:`EngineError` when a stored-tensor input is not a constant (an initializer or a Constant
    node): a TensorRT plugin cannot take it as a field."""
    model = copy.deepcopy(model)
    graph = model.graph
    consts = _constants(graph)
    ops = weight_inputs()
    for node in plugin_nodes(model):
        names = ops[node.op_type]
        who = f"{node.op_type} node {node.name or node.output[0]!r}"
        if len(node.input) < 1 or not node.input[0]:
            raise EngineError(f"{who} has no X input")
        if len(node.input) - 1 > len(names):
            raise EngineError(f"{who} has {len(node.input)} inputs; the op takes at most {len(names) + 1}")
        taken = {a.name for a in node.attribute}
        for field, inp in zip(names, node.input[1:]):
            if not inp:
                continue  # an absent optional input
            if inp not in consts:
                raise EngineError(f"{who}: input {field} ({inp!r}) is not a constant; TensorRT plugins take the "
                                  "weights as plugin fields, so they must be initializers")
            if field in taken:
                raise EngineError(f"{who} already has an attribute named {field}")
            arr = field_array(numpy_helper.to_array(consts[inp]), f"{who} input {field}")
            node.attribute.append(helper.make_attribute(field, numpy_helper.from_array(arr, field)))
        del node.input[1:]
        for key, value in (("plugin_namespace", PLUGIN_NAMESPACE), ("plugin_version", PLUGIN_VERSION)):
            if key not in taken:
                node.attribute.append(helper.make_attribute(key, value))
    used = _used_names(graph)
    dropped = {t.name for t in graph.initializer if t.name not in used}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # old-style graphs also list initializers as inputs; TensorRT would take such a leftover for a network input
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def _model_path(out: Path) -> Path:
    out = Path(out)
    path = out / "model.onnx" if out.is_dir() else out
    if not path.is_file():
        raise EngineError(f"{path}: no such file (expected a compiled folder OUT holding model.onnx, or an .onnx)")
    return path


def _import_tensorrt() -> Any:
    try:
        import tensorrt  # noqa: PLC0415  (optional dependency, GPU machines only)
    except Exception as e:  # noqa: BLE001  -- ImportError, or a broken install failing to load libnvinfer
        raise EngineError(
            "TensorRT Python package not found (import tensorrt failed: "
            f"{type(e).__name__}: {e}); building an engine needs TensorRT 10 on a machine with an NVIDIA GPU, "
            "e.g. `pip install tensorrt` matching your CUDA version") from None
    return tensorrt


def _profile_shapes(shape: Iterable[int], max_batch: int, max_seq: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) for one network input: dynamic dim 0 is the batch (1, 1, max_batch), any other
    dynamic dim the sequence (1, max_seq, max_seq)."""
    lo, opt, hi = [], [], []
    for i, d in enumerate(shape):
        if d >= 0:
            lo.append(d), opt.append(d), hi.append(d)
        elif i == 0:
            lo.append(1), opt.append(1), hi.append(max_batch)
        else:
            lo.append(1), opt.append(max_seq), hi.append(max_seq)
    return tuple(lo), tuple(opt), tuple(hi)


def build_engine(out: Path, *, output: Path | None = None, fp16: bool = False, max_batch: int = 1,
                 max_seq: int = 512, plugin_library: Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Build a serialized TensorRT engine from ``out`` (a compiled folder holding model.onnx, or an .onnx
    file) with qcompile's plugins, write it to ``output`` (default ``OUT/model.engine``) and return its path.

    ``fp16`` lets TensorRT run layers (and the plugins) in half precision. Dynamic input dims get the
    optimization profile batch 1..``max_batch`` (dim 0) and 1..``max_seq`` (other dims)."""
    if max_batch < 1 or max_seq < 1:
        raise EngineError(f"max_batch and max_seq must be >= 1, got {max_batch} and {max_seq}")
    path = _model_path(Path(out))
    trt = _import_tensorrt()
    if plugin_library is None:
        from qcompile.runtime import trt_plugins_library_path

        plugin_library = trt_plugins_library_path()
    if output is None:
        output = (Path(out) if Path(out).is_dir() else path.parent) / "model.engine"

    model = to_tensorrt_onnx(onnx.load(str(path)))
    data = model.SerializeToString()  # the weights now live in node attributes: one protobuf (< 2 GiB)
    log(f"[qcompile] {len(plugin_nodes(model))} qcompile plugin layers; plugins from {plugin_library}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    registry = builder.get_plugin_registry()
    if not registry.load_library(str(plugin_library)):
        raise EngineError(f"TensorRT could not load the plugin library {plugin_library}")
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        errors = "; ".join(str(e.desc()) if hasattr(e, "desc") else str(e) for e in errs)
        raise EngineError(f"TensorRT's ONNX parser rejected {path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if any(d < 0 for d in inp.shape):
            profile.set_shape(inp.name, *_profile_shapes(inp.shape, max_batch, max_seq))
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    log(f"[qcompile] building the TensorRT engine ({'fp16' if fp16 else 'fp32'}; takes a while) ...")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineError("TensorRT could not build the engine (its log above says why)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(engine))
    tmp.replace(output)
    return output
