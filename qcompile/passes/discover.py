"""Match pass: find every MatMul/Gemm whose weight is a constant initializer.

The weight may reach the MatMul directly, or behind Transpose and/or Cast nodes (what exporters emit
for ``nn.Linear`` and for fp16 models). Each match is named by its module path (taken from the
initializer name, or the exporter's name-scope metadata) so reports read like the torch model.
Embeddings (Gather over an initializer) and the LM head (a MatMul producing a graph output) are
reported but skipped unless asked for.

This pass only *matches*; rewrites live in :mod:`qcompile.passes.lower`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from qcompile.passes.state import CompileState

PASS_THROUGH = ("Transpose", "Cast")


@dataclasses.dataclass
class LinearMatch:
    """One linear layer ``y = x @ W`` found in the graph (W in ONNX layout ``[K, N]``)."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    node_name: str  # the MatMul/Gemm node
    input: str  # activation tensor name
    output: str
    initializer: str  # the initializer holding the weight
    chain: list[str]  # Transpose/Cast nodes between initializer and the MatMul (outermost first)
    transposed: bool  # initializer stored as [N, K]
    role: str  # "linear" or "lm_head"
    shape: tuple[int, int]  # (K, N)
    dtype: int  # onnx element type the MatMul sees

    def weight(self, model_or_inits: onnx.ModelProto | dict[str, onnx.TensorProto]) -> np.ndarray:
        """The weight as float32 ``[K, N]`` (ONNX MatMul layout), whatever the stored layout."""
        inits = model_or_inits if isinstance(model_or_inits, dict) else initializer_map(model_or_inits)
        w = numpy_helper.to_array(inits[self.initializer]).astype(np.float32)
        return np.ascontiguousarray(w.T if self.transposed else w)


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _module_path(init_name: str, node: onnx.NodeProto) -> str:
    """A readable module path: initializer name minus '.weight', else exporter metadata, else node name."""
    if re.fullmatch(r"[A-Za-z_][\w.]*\.weight", init_name):
        return init_name[: -len(".weight")]
    for prop in node.metadata_props:
        if prop.key in ("pkg.torch.onnx.name_scopes", "namespace"):
            parts = re.findall(r"[A-Za-z_][\w.]*", prop.value)
            if parts:
                return parts[-1] if "." in parts[-1] else ".".join(parts)
    return node.name or init_name


def _trace_weight(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]):
    """Follow Transpose/Cast back to an initializer; returns (initializer, chain, transposed, ok)."""
    chain: list[str] = []
    transposed = False
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in PASS_THROUGH:
            return None, chain, transposed, False
        if node.op_type == "Transpose":
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            if perm and list(perm[0]) != [1, 0]:
                return None, chain, transposed, False
            transposed = not transposed
        chain.insert(0, node.name)
        name = node.input[0]
    return name, chain, transposed, True


def discover_linears(model: onnx.ModelProto, *, include_lm_head: bool = False) -> list[LinearMatch]:
    """All eligible linears in graph order. Pure: the model is not modified."""
    graph = model.graph
    inits = initializer_map(model)
    producers = {out: n for n in graph.node for out in n.output}
    graph_outputs = {o.name for o in graph.output}
    matches: list[LinearMatch] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if attrs.get("transA") and attrs["transA"].i:
                continue
            if len(node.input) > 2 and node.input[2]:
                continue  # Gemm with bias: left alone (exporters emit MatMul + Add for LLMs)
        init, chain, transposed, ok = _trace_weight(node.input[1], producers, inits)
        if not ok or init is None:
            continue
        t = inits[init]
        if len(t.dims) != 2 or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                    onnx.TensorProto.BFLOAT16):
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if attrs.get("transB") and attrs["transB"].i:
                transposed = not transposed
            alpha = attrs.get("alpha")
            if alpha is not None and abs(alpha.f - 1.0) > 0:
                continue
        dims = tuple(int(d) for d in t.dims)
        k, n = (dims[1], dims[0]) if transposed else dims
        dtype = t.data_type
        for cname in chain:  # the type the MatMul sees is the last Cast's target
            cnode = next(x for x in graph.node if x.name == cname)
            if cnode.op_type == "Cast":
                dtype = next(a.i for a in cnode.attribute if a.name == "to")
        role = "lm_head" if (node.output[0] in graph_outputs or "lm_head" in init) else "linear"
        if role == "lm_head" and not include_lm_head:
            continue
        matches.append(LinearMatch(
            name=_module_path(init, node) if role == "linear" else (_module_path(init, node)
                                                                    if "lm_head" in init else "lm_head"),
            node_name=node.name, input=node.input[0], output=node.output[0], initializer=init, chain=chain,
            transposed=transposed, role=role, shape=(k, n), dtype=dtype,
        ))
    _dedupe_names(matches)
    return matches


def _dedupe_names(matches: list[LinearMatch]) -> None:
    seen: dict[str, int] = {}
    for m in matches:
        if m.name in seen:
            seen[m.name] += 1
            m.name = f"{m.name}#{seen[m.name]}"
        else:
            seen[m.name] = 0


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (rewrites address nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            cand = f"{n.op_type}_{i}"
            while cand in used:
                cand += "_"
            n.name = cand
            used.add(cand)
    return model


def step(state: "CompileState") -> "CompileState":
    """Pipeline step: the linears to quantize, and each one's format and options (``-L`` overrides applied; with
    ``-f auto`` the allocate pass chooses them)."""
    from qcompile.errors import FormatError, UnsupportedModelError

    model = ensure_node_names(state.model)
    matches = discover_linears(model, include_lm_head=state.cfg.include_lm_head)
    if not matches:
        raise UnsupportedModelError(f"{state.cfg.model}: no MatMul/Gemm with a constant weight to quantize")
    if state.fmt is None:  # -f auto: the allocate pass chooses each layer's format
        per_layer, formats = {}, {}
        for m in matches:
            if not any(c.fits(*m.shape) for c in state.palette):
                raise FormatError(f"no palette entry can quantize {m.name} ({m.shape[0]}x{m.shape[1]}); palette: "
                                  f"{', '.join(c.text for c in state.palette)}")
    else:
        per_layer = state.fmt.resolve_layer_options(state.options, state.overrides, [m.name for m in matches])
        formats = {m.name: state.fmt for m in matches}
    if state.fmt is not None and state.fmt.check_layer is not None:
        for m in matches:
            try:
                state.fmt.check_layer(*m.shape, per_layer[m.name])
            except FormatError as e:
                raise FormatError(f"{state.fmt.name} cannot quantize {m.name} ({m.shape[0]}x{m.shape[1]}): {e}") from None
    embedding = None
    if state.cfg.embeddings != "float":
        from qcompile.passes.embeddings import match_embeddings

        embedding = match_embeddings(model, state.cfg.include_lm_head)
    return state.replace(model=model, float_model=model, matches=tuple(matches), layer_options=per_layer,
                         layer_formats=formats, embedding=embedding)
