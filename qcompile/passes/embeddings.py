"""Embeddings pass (model → model): the token embedding table and the LM head, quantized and stored once.

Why: in a small model the vocabulary table is the largest tensor (SmolLM2-135M: 28M of its 134M parameters)
and, left in float, it dominates both the file and the decode time (the LM head reads all of it for every
token). Tied models read one ``[hidden, vocab]`` table twice: the head multiplies by it, the embedding gathers
rows of its transpose. Here it becomes one ONNX Runtime ``MatMulNBits`` weight (int4 or int8, blocks of 32
along hidden, GPTQ on the head's calibration Hessian) read by the head, and by a ``GatherBlockQuantized`` over
the same bytes for the embedding. An untied embedding table is quantized on its own (no Hessian: RTN with a
clipping search). Both ops are stock onnxruntime (``com.microsoft``), so this holds for every emit mode.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qcompile.formats import get_format
from qcompile.formats.integer.weight import IntQuantizedWeight
from qcompile.passes.discover import LinearMatch, _trace_weight, discover_linears, initializer_map
from qcompile.passes.lower import remove_dead, tag
from qcompile.passes.state import CompileState

#: ``--embeddings`` choices; the number is the bits per stored code.
EMBEDDINGS = {"float": None, "int8": 8, "int4": 4}
BLOCK = 32  # weights per scale along the hidden dimension (GatherBlockQuantized needs it to divide hidden)
ROLE = "embedding"
HEAD_LAYER, EMBED_LAYER = "lm_head", "model.embed_tokens"


@dataclasses.dataclass(frozen=True)
class EmbeddingMatch:
    """The vocabulary tables of a decoder: the LM head (a MatMul by a constant ``[hidden, vocab]``) and the
    embedding Gather, and whether both read the same initializer."""

    head: LinearMatch | None  # None when the head is not a constant MatMul (or is quantized as a linear)
    gather: str  # the Gather node's name
    table: str  # the initializer the Gather reads
    transposed: bool  # the Gather reads Transpose(table): table is [hidden, vocab]

    @property
    def tied(self) -> bool:
        return self.head is not None and self.head.initializer == self.table

    @property
    def inputs(self) -> list[str]:
        """Activation tensors whose Hessian the quantization uses (the head's input)."""
        return [self.head.input] if self.head is not None else []


def match_embeddings(model: onnx.ModelProto, include_lm_head: bool) -> EmbeddingMatch | None:
    """The head and the embedding Gather of ``model`` (the Gather reads a graph input's token ids)."""
    inits = initializer_map(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    heads = [] if include_lm_head else [m for m in discover_linears(model, include_lm_head=True) if m.role == "lm_head"]
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in graph_inputs:
            continue
        table, chain, transposed, ok = _trace_weight(node.input[0], producers, inits)
        if ok and table is not None and len(inits[table].dims) == 2:
            return EmbeddingMatch(heads[0] if len(heads) == 1 else None, node.name, table, transposed)
    return None


def quantize_table(weight_kn: np.ndarray, hessian: torch.Tensor | None, bits: int) -> IntQuantizedWeight:
    """``[hidden, vocab]`` table → integer codes per block of :data:`BLOCK` along hidden; GPTQ when the head's
    Hessian is there, else round-to-nearest with a clipping search. The head multiplies with int8 activations
    (MatMulNBits accuracy level 4): onnxruntime has no fast 8-bit kernel for float activations (measured
    ~150 ms against 1.6 ms for the default model's head, one thread), and the head is the largest matrix of a
    decode step."""
    method = "gptq" if hessian is not None else "rtn"
    fmt = get_format(f"int{bits}-{method}")
    opts = fmt.resolve_options({"group_size": BLOCK, "mse": True, "accuracy_level": 4})
    return fmt.quantize(weight_kn, hessian, device="cpu", **opts)


def _gather_block_quantized(qw: IntQuantizedWeight, prefix: str, ids: str, out: str, name: str,
                            layer: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Rows of ``qw``'s ``[vocab, hidden]`` transpose, read from the initializers ``prefix.{B,scales,zero_points}``
    that MatMulNBits stores (reshaped to the 2-D views GatherBlockQuantized takes: the bytes are the same)."""
    k, n = qw.shape
    bits = qw._storage_bits()
    shapes = {"B": [n, -1], "scales": [n, -1], "zero_points": [n, -1]}
    nodes, inits = [], []
    for key, shape in shapes.items():
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"{prefix}.{key}_2d_shape"))
        nodes.append(helper.make_node("Reshape", [f"{prefix}.{key}", f"{prefix}.{key}_2d_shape"], [f"{prefix}.{key}_2d"],
                                      name=f"{prefix}.{key}.Reshape2d"))
    nodes.append(helper.make_node("GatherBlockQuantized", [f"{prefix}.B_2d", ids, f"{prefix}.scales_2d",
                                                           f"{prefix}.zero_points_2d"], [out], name=name,
                                  domain="com.microsoft", bits=bits, block_size=qw.group_size, gather_axis=0,
                                  quantize_axis=1))
    for nd in nodes:
        tag(nd, layer, qw.format_name, (k, n), None, role=ROLE)
    return nodes, inits


def rewrite(model: onnx.ModelProto, match: EmbeddingMatch, head: IntQuantizedWeight | None,
            table: IntQuantizedWeight | None, emit: str) -> onnx.ModelProto:
    """A copy of ``model`` with the head and the embedding reading the quantized tables.

    ``head`` quantizes the head's weight (for a tied model, also the embedding); ``table`` quantizes an untied
    embedding table (its ``[hidden, vocab]`` transpose). ``simulated`` writes the dequantized values instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = initializer_map(out)
    if emit == "simulated":  # fresh float initializers holding what the quantized tables represent
        for layer, qw, name, stored_nk in ((HEAD_LAYER, head, match.head and match.head.initializer,
                                            bool(match.head and match.head.transposed)),
                                           (EMBED_LAYER, table, match.table, not match.transposed)):
            if qw is None:
                continue
            w = qw.dequantize()  # [hidden, vocab]
            new = f"qc.{layer}.weight"
            dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            graph.initializer.append(numpy_helper.from_array((w.T if stored_nk else w).astype(dtype), new))
            for n in graph.node:
                if name in n.input:
                    n.input[:] = [new if i == name else i for i in n.input]
                    tag(n, layer, qw.format_name, qw.shape, qw.bits_per_weight(), role=ROLE)
        remove_dead(out)
        return out
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    if head is not None:
        prefix = f"qc.{HEAD_LAYER}"
        low = head.lower_native(match.head.input, match.head.output, prefix, match.head.dtype)
        for nd in low.nodes:
            tag(nd, HEAD_LAYER, head.format_name, head.shape, None, role=ROLE)
        graph.initializer.extend(low.initializers)
        new_nodes[match.head.node_name] = list(low.nodes)
    gather = next(n for n in graph.node if n.name == match.gather)
    source, layer = (head, HEAD_LAYER) if match.tied else (table, EMBED_LAYER)
    if source is not None:
        prefix = f"qc.{layer}"
        if source is table:
            graph.initializer.extend(numpy_helper.from_array(a, f"{prefix}.{k}") for k, a in table.packed().items())
        gnodes, ginits = _gather_block_quantized(source, prefix, gather.input[1], gather.output[0], gather.name, layer)
        graph.initializer.extend(ginits)
        new_nodes[gather.name] = gnodes
    rebuilt = [x for n in graph.node for x in new_nodes.get(n.name, [n])]
    del graph.node[:]
    graph.node.extend(rebuilt)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    remove_dead(out)
    return out


def step(state: CompileState) -> CompileState:
    bits = EMBEDDINGS[state.cfg.embeddings]
    match = state.embedding
    if bits is None or match is None:
        return state
    inits = initializer_map(state.model)
    hidden = inits[match.table].dims[0 if match.transposed else 1]
    if hidden % BLOCK:
        print(f"qcompile: embeddings stay float: hidden size {hidden} is not a multiple of {BLOCK}", file=sys.stderr)
        return state
    head = None
    if match.head is not None:
        head = quantize_table(match.head.weight(inits), state.hessians.get(match.head.name), bits)
    table = None
    if not match.tied:
        w = numpy_helper.to_array(inits[match.table]).astype(np.float32)
        table = quantize_table(w if match.transposed else w.T, None, bits)
    return state.replace(model=rewrite(state.model, match, head, table, state.emit),
                         embedding_weights={k: v for k, v in ((HEAD_LAYER, head), (EMBED_LAYER, table)) if v})
