"""Rewrite pass: replace each matched linear by its quantized lowering.

Three emit modes share the matcher's output:
- ``native``: the format's own op (MatMulNBits, or our ``qcompile.*`` ops);
- ``portable``: standard ONNX ops only (dequantize in the graph, then MatMul);
- ``simulated``: the dequantized weight written back as floats, a research mode to measure any
  format's accuracy without its runtime (the file is as large as the float model).

Every node a layer's lowering creates is tagged with ``qcompile.layer`` / ``qcompile.format`` metadata,
which is how :mod:`qcompile.report` counts each layer's bytes from the file itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.formats.base import Lowered, QuantizedWeight
from qcompile.passes.discover import LinearMatch
from qcompile.report import FORMAT_KEY, LAYER_KEY, OPTIONS_KEY, PACKED_BITS_KEY, ROLE_KEY, SHAPE_KEY

if TYPE_CHECKING:
    from qcompile.passes.state import CompileState



def tag(node: onnx.NodeProto, layer: str, fmt: str, shape: tuple[int, int], packed_bits: float | None,
        role: str = "linear", options: str = "") -> None:
    """Mark a node as part of ``layer``'s lowering, so the report attributes the bytes it reads to that layer
    (``options``: the layer's own options, shown by ``qcompile inspect``)."""
    for key, value in ((LAYER_KEY, layer), (FORMAT_KEY, fmt), (SHAPE_KEY, f"{shape[0]},{shape[1]}")):
        node.metadata_props.add(key=key, value=value)
    if options:
        node.metadata_props.add(key=OPTIONS_KEY, value=options)
    if packed_bits is not None:
        node.metadata_props.add(key=PACKED_BITS_KEY, value=f"{packed_bits:.6f}")
    if role != "linear":
        node.metadata_props.add(key=ROLE_KEY, value=role)


def _simulated(match: LinearMatch, node: onnx.NodeProto, qw: QuantizedWeight, prefix: str) -> Lowered:
    """Same MatMul, reading a fresh float initializer that holds the dequantized weight."""
    np_dtype = helper.tensor_dtype_to_np_dtype(match.dtype)
    init = numpy_helper.from_array(qw.dequantize().astype(np_dtype), f"{prefix}.weight")
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.metadata_props[:]
    new.input[1] = init.name
    if new.op_type == "Gemm":  # the new weight is already [K, N]
        for a in new.attribute:
            if a.name == "transB":
                a.i = 0
    return Lowered([new], [init])


def lower_weights(model: onnx.ModelProto, matches: list[LinearMatch], quantized: dict[str, QuantizedWeight],
                  emit: str, options: dict[str, str] | None = None) -> onnx.ModelProto:
    """Return a new model where every match named in ``quantized`` is lowered with ``emit`` (``options``: each
    layer's own options as text, recorded on its nodes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_node = {m.node_name: m for m in matches if m.name in quantized}
    new_nodes: list[onnx.NodeProto] = []
    opsets: dict[str, int] = {}
    for node in graph.node:
        match = by_node.get(node.name)
        if match is None:
            new_nodes.append(node)
            continue
        qw = quantized[match.name]
        prefix = f"qc.{match.name}"
        if emit == "native":
            low = qw.lower_native(match.input, match.output, prefix, match.dtype)
        elif emit == "portable":
            low = qw.lower_portable(match.input, match.output, prefix, match.dtype)
        elif emit == "simulated":
            low = _simulated(match, node, qw, prefix)
        else:
            raise ValueError(f"unknown emit mode {emit!r}")
        packed_bits = qw.bits_per_weight() if emit == "simulated" else None
        for n in low.nodes:
            tag(n, match.name, qw.format_name, match.shape, packed_bits, options=(options or {}).get(match.name, ""))
        new_nodes.extend(low.nodes)
        graph.initializer.extend(low.initializers)
        opsets.update(low.opset_imports)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _add_opsets(out, opsets)
    remove_dead(out)
    return out


def _add_opsets(model: onnx.ModelProto, opsets: dict[str, int]) -> None:
    have = {o.domain: o for o in model.opset_import}
    for domain, version in opsets.items():
        if domain not in have:
            model.opset_import.append(helper.make_opsetid(domain, version))


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, including names that subgraphs (If/Loop bodies) capture."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _names_read(sub)
    return used


def remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (e.g. the old Transpose of a weight) and unused initializers."""
    graph = model.graph
    changed = True
    while changed:
        used = _names_read(graph)
        keep = [n for n in graph.node if any(o in used for o in n.output) or not n.output]
        changed = len(keep) != len(graph.node)
        if changed:
            del graph.node[:]
            graph.node.extend(keep)
    used = _names_read(graph)
    keep_inits = [t for t in graph.initializer if t.name in used]
    if len(keep_inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep_inits)


def dequantized_weights(matches: list[LinearMatch], quantized: dict[str, QuantizedWeight]) -> dict[str, np.ndarray]:
    """{initializer name: float weight in its stored layout}, for sequential calibration."""
    out = {}
    for m in matches:
        if m.name in quantized:
            w = quantized[m.name].dequantize()
            out[m.initializer] = w.T if m.transposed else w
    return out


def own_options(state: "CompileState") -> dict[str, dict]:
    """Each layer's options that differ from what its format would use everywhere: the ``-L`` ones, or with
    ``-f auto`` its palette entry's."""
    out = {}
    for m in state.matches:
        fmt, opts = state.layer_formats[m.name], state.layer_options[m.name]
        base = state.options if state.fmt is not None else {k: o.default for k, o in fmt.options.items()}
        out[m.name] = {k: v for k, v in opts.items() if k in base and v != base[k]}
    return out


def step(state: "CompileState") -> "CompileState":
    texts = {n: ",".join(f"{k}={v}" for k, v in o.items()) for n, o in own_options(state).items()}
    model = lower_weights(state.model, list(state.matches), state.quantized, state.emit, texts)
    for key, value in (("qcompile.format", state.format_name), ("qcompile.emit", state.emit)):
        model.metadata_props.add(key=key, value=value)
    return state.replace(model=model)
