"""Calibration: Hessians ``H = XᵀX`` of the inputs of linear layers, measured with onnxruntime.

Why onnxruntime and not torch hooks: the compiler's input is an ONNX graph (any source, including a
user's .onnx), so the activations are read from that same graph.  The graph is copied, the wanted
tensors become extra graph outputs, everything not needed to compute them (e.g. the LM head) is pruned,
and the calibration windows are streamed through it ``batch_size`` windows at a time.  Only one batch of
activations is alive at once; ``XᵀX`` is computed in float32 per batch and accumulated in float64.

Returned Hessians are averaged over tokens: ``H = (1/T) Σ_t x_t x_tᵀ`` (``[K, K]`` float32, CPU).  Linears
sharing one input tensor (q/k/v, gate/up) share one Hessian (computed once; the dict holds the same
tensor under each linear's name).

:func:`collect_hessians_sequential` calibrates group after group on a model whose earlier groups are
already quantized (GPTQ's "sequential" mode); it caches the activations at the boundary, so each group
runs only its own slice of the graph.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qcompile.cache import atomic_write, cache_path, digest_array
from qcompile.errors import CalibrationError, QCompileError
from qcompile.models.decoder import DecoderInfo, graph_inputs, session_inputs

HESSIAN_CACHE_VERSION = 1

QuantizeGroupFn = Callable[[dict[str, torch.Tensor]], dict[str, np.ndarray]]


# ------------------------------------------------------------------------------------------------
# graph helpers
def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including names its subgraphs (If/Loop/Scan bodies) read from the outer scope."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = list(attr.g and [attr.g] or []) + list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for sub in g.node:
                defined.update(sub.output)
            for sub in g.node:
                names.extend(n for n in _node_inputs(sub) if n not in defined)
    return names


class _GraphIndex:
    """Producers/consumers of a graph's tensors, for slicing it."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        self.inputs_of = [_node_inputs(n) for n in self.nodes]
        self.producer: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
        self.consumers: dict[str, list[int]] = {}
        for i, ins in enumerate(self.inputs_of):
            for name in ins:
                self.consumers.setdefault(name, []).append(i)
        self.initializers = {t.name for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]

    def check_tensors(self, names: Iterable[str]) -> None:
        missing = sorted({n for n in names if n not in self.producer and n not in self.graph_inputs})
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise QCompileError(f"calibration: no tensor named {shown} in the graph")

    def ancestors(self, targets: Iterable[str], stop: set[str]) -> list[int]:
        """Indices (topological order) of nodes needed to compute ``targets`` given tensors in ``stop``."""
        need: set[int] = set()
        todo = [t for t in targets if t not in stop]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            i = self.producer.get(name)
            if i is None or i in need:
                continue
            need.add(i)
            todo.extend(n for n in self.inputs_of[i] if n not in stop and n not in seen)
        return sorted(need)

    def descendants_of(self, names: Iterable[str]) -> set[int]:
        """Nodes whose value depends on any of ``names``."""
        out: set[int] = set()
        todo = list(names)
        while todo:
            for i in self.consumers.get(todo.pop(), []):
                if i not in out:
                    out.add(i)
                    todo.extend(o for o in self.nodes[i].output if o)
        return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor we can type (value_info, inputs/outputs, shape inference)."""
    types: dict[str, int] = {}
    g = model.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _infer_types(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, int]:
    types = _elem_types(model)
    if any(n not in types for n in names):
        try:  # the graph is loaded without weight data; shape inference only needs dims and types
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            types.update(_elem_types(inferred))
        except Exception:  # noqa: BLE001 - best effort; untyped outputs fall back below
            pass
    return types


def _value_info(name: str, elem_type: int | None) -> onnx.ValueInfoProto:
    if elem_type:
        return helper.make_tensor_value_info(name, elem_type, None)
    return helper.make_empty_tensor_value_info(name)


def _slice_model(
    model: onnx.ModelProto,
    index: _GraphIndex,
    node_ids: Sequence[int],
    inputs: dict[str, int | None],
    outputs: Sequence[str],
    types: dict[str, int],
    overrides: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A model holding only ``node_ids``, fed by ``inputs`` (name -> elem type), producing ``outputs``."""
    overrides = overrides or {}
    used = {n for i in node_ids for n in index.inputs_of[i]}
    inits = []
    for t in model.graph.initializer:
        if t.name in used:
            inits.append(numpy_helper.from_array(overrides[t.name], t.name) if t.name in overrides else t)
    graph = helper.make_graph(
        [index.nodes[i] for i in node_ids],
        "calibration_slice",
        [_value_info(n, t) for n, t in inputs.items()],
        [_value_info(n, types.get(n)) for n in outputs],
        initializer=inits,
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def _default_session(path_or_bytes):
    """Calibration runs on the CPU, so Hessians do not depend on which GPU (if any) the machine has."""
    from qcompile.runtime import make_session

    return make_session(path_or_bytes, ["CPUExecutionProvider"])


def _slice_session(path: Path, sliced: onnx.ModelProto, has_external: bool, with_data: Callable[[], onnx.ModelProto]):
    """Session for a slice whose initializers may point into ``path``'s external data files.

    Nothing is ever written beside a user's model: the slice goes to a temporary folder in our cache, with
    hard links to the data files (onnxruntime refuses data reached through a symbolic link); where hard links
    cannot be made (another file system), the slice is rebuilt with the weights loaded into memory instead.
    """
    if not has_external:
        return _default_session(sliced.SerializeToString())
    from qcompile.cache import cache_dir
    from qcompile.models.sources import external_data_files

    _inline_small_external_tensors(sliced, path.parent)
    tmp = Path(tempfile.mkdtemp(prefix="calib-", dir=cache_dir()))
    try:
        for f in external_data_files(sliced, path.parent):
            target = tmp / f.relative_to(path.parent.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
        onnx.save_model(sliced, str(tmp / "slice.onnx"))
        return _default_session(str(tmp / "slice.onnx"))
    except (OSError, ValueError):  # no hard links here, or data outside the model's folder
        return _default_session(with_data().SerializeToString())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: External tensors up to this size are read into the slice: onnxruntime's shape inference needs the values of
#: small constants (a Range's start, a Reshape's shape) and cannot read them from a data file.
INLINE_EXTERNAL_BYTES = 4096


def _inline_small_external_tensors(model: onnx.ModelProto, base_dir: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        if int(info.get("length", INLINE_EXTERNAL_BYTES + 1)) <= INLINE_EXTERNAL_BYTES:
            load_external_data_for_tensor(t, str(base_dir))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT


def _check_batches(batches: np.ndarray) -> np.ndarray:
    b = np.asarray(batches)
    if b.ndim != 2 or b.shape[0] == 0 or b.shape[1] == 0 or not np.issubdtype(b.dtype, np.integer):
        raise CalibrationError(f"calibration tokens must be a non-empty [n, seq] integer array, got {b.dtype}{list(b.shape)}")
    return b.astype(np.int64, copy=False)


def _feeds(inputs: dict[str, tuple[np.dtype, list]], ids: np.ndarray, info) -> dict[str, np.ndarray]:
    """A forward pass over ``ids`` from the start of the text (zero-length past for a KV-cache decoder)."""
    from qcompile.models.decoder import prefill_feeds

    try:
        return prefill_feeds(inputs, ids, info)
    except QCompileError as e:
        raise CalibrationError(f"calibration: {e}") from None


class _Accumulator:
    """Streaming Σ XᵀX per tensor (float64), from activations of any float dtype.

    numpy's ``x.T @ x`` (float32, BLAS; numpy uses the symmetric rank-k routine for this pattern) was
    measured faster here than torch's; non-finite activations show up on the diagonal, so the check
    costs nothing extra.
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, act: np.ndarray) -> None:
        x = np.ascontiguousarray(act.reshape(-1, act.shape[-1]), dtype=np.float32)
        xtx = x.T @ x
        if not np.isfinite(np.trace(xtx)):
            raise CalibrationError(f"calibration: tensor {name} has non-finite activations")
        if name in self.sums:
            np.add(self.sums[name], xtx, out=self.sums[name])
        else:
            self.sums[name] = xtx.astype(np.float64)
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy((s / self.tokens[n]).astype(np.float32)) for n, s in self.sums.items()}


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _cache_entry(cache_key, kind: str, batches: np.ndarray, spec) -> Path | None:
    if cache_key is None:
        return None
    return cache_path("hessians", HESSIAN_CACHE_VERSION, kind, cache_key, digest_array(batches), spec, suffix=".pt")


def _save_cache(entry: Path | None, payload: dict) -> None:
    if entry is None:
        return
    with atomic_write(entry) as tmp:
        torch.save(payload, tmp)


# ------------------------------------------------------------------------------------------------
def group_by_input(linear_inputs: dict[str, str]) -> list[dict[str, str]]:
    """Groups for :func:`collect_hessians_sequential`: linears sharing an input tensor go together.

    Order follows first appearance in ``linear_inputs``, so pass it in graph (forward) order, e.g.
    ``[{q, k, v}, {o}, {gate, up}, {down}, ...]`` for a Llama layer.
    """
    groups: dict[str, dict[str, str]] = {}
    for name, tensor in linear_inputs.items():
        groups.setdefault(tensor, {})[name] = tensor
    return list(groups.values())


def collect_hessians(
    onnx_path: str | os.PathLike,
    linear_inputs: dict[str, str],
    batches: np.ndarray,
    *,
    batch_size: int = 4,
    cache_key=None,
    progress: bool = True,
    max_outputs_per_run: int | None = None,
) -> dict[str, torch.Tensor]:
    """Hessians of every linear's input over the calibration windows.

    ``linear_inputs`` maps a linear's name (any label, e.g. the MatMul node name) to the name of the
    graph tensor that is its input.  ``batches`` is ``[n, seq]`` int64 token windows (an
    ``attention_mask`` of ones is fed if the model has one).  Returns ``{linear name: H [K, K]}``.

    ``cache_key`` (e.g. the model fingerprint + data parameters) enables the on-disk cache; the batch
    contents and tensor names are always part of the key too.  ``max_outputs_per_run`` splits the
    tensors into several passes over the data to cap memory (default: all tensors in one pass).
    """
    batches = _check_batches(batches)
    if not linear_inputs:
        return {}
    path = Path(onnx_path)
    unique = sorted(set(linear_inputs.values()))
    entry = _cache_entry(cache_key, "all", batches, unique)
    if entry is not None and entry.is_file():
        by_tensor = torch.load(entry, weights_only=True)
        return {lin: by_tensor[t] for lin, t in linear_inputs.items()}

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise QCompileError(f"calibration: cannot read {path} as ONNX ({type(e).__name__}: {e})") from e
    index = _GraphIndex(model.graph)
    index.check_tensors(unique)
    types = _infer_types(model, unique)
    info = DecoderInfo.of_model(model, path.parent)
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    chunk = max_outputs_per_run or len(unique)
    acc = _Accumulator()
    for start in range(0, len(unique), chunk):
        outs = unique[start : start + chunk]
        nodes = index.ancestors(outs, stop=set(index.graph_inputs) | index.initializers)
        feeds_in = {n: types.get(n) for n in index.graph_inputs if any(n in index.inputs_of[i] for i in nodes)}
        sliced = _slice_model(model, index, nodes, feeds_in, outs, types)
        sliced.metadata_props.extend(model.metadata_props)
        sess = _slice_session(path, sliced, has_external, lambda: _slice_model(
            onnx.load(str(path)), index, nodes, feeds_in, outs, types))
        in_types = session_inputs(sess)
        nb = (len(batches) + batch_size - 1) // batch_size
        desc = "calibration" if chunk >= len(unique) else f"calibration {start // chunk + 1}/{-(-len(unique) // chunk)}"
        for b in _progress(range(nb), nb, desc, progress):
            ids = batches[b * batch_size : (b + 1) * batch_size]
            values = sess.run(outs, _feeds(in_types, ids, info))
            for name, v in zip(outs, values):
                acc.add(name, v)
            del values
        del sess
    by_tensor = acc.result()
    _save_cache(entry, by_tensor)
    return {lin: by_tensor[t] for lin, t in linear_inputs.items()}


def collect_hessians_sequential(
    onnx_model: onnx.ModelProto | str | os.PathLike,
    groups: list[dict[str, str]],
    batches: np.ndarray,
    quantize_group: QuantizeGroupFn,
    *,
    batch_size: int = 4,
    cache_key=None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Calibrate ``groups`` in order, each on the model with all earlier groups already quantized.

    ``groups[i]`` maps linear name -> input tensor name, like :func:`collect_hessians`; list groups in
    forward order (e.g. per layer: q/k/v, then o, then gate/up, then down).  After measuring group
    ``i``, ``quantize_group({linear: H})`` is called and must return ``{weight initializer name: new
    float weight [K, N]}`` (the dequantized quantized weights), which replace those initializers for
    every later group.  Returns all Hessians ``{linear: H}``.

    Efficiency: the activations at the boundary of what is already computed are kept per batch (a few
    ``[batch, seq, hidden]`` tensors), so each group runs only the nodes between the boundary and its
    own inputs; a weight change invalidates only what depends on it.  With ``cache_key`` the Hessians
    are cached (the key must then also identify the quantization settings, since they depend on the
    callback); on a cache hit no forward pass runs, but the callback is still called for every group.
    """
    batches = _check_batches(batches)
    spec = [sorted(g.items()) for g in groups]
    entry = _cache_entry(cache_key, "sequential", batches, spec)
    if entry is not None and entry.is_file():
        cached = torch.load(entry, weights_only=True)
        for g in groups:
            quantize_group({lin: cached[lin] for lin in g})
        return cached

    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model))
    folder = None if isinstance(onnx_model, onnx.ModelProto) else Path(onnx_model).parent
    info = DecoderInfo.of_model(model, folder)
    graph_in = graph_inputs(model)
    index = _GraphIndex(model.graph)
    index.check_tensors(t for g in groups for t in g.values())
    types = _infer_types(model, [t for g in groups for t in g.values()])
    init_protos = {t.name: t for t in model.graph.initializer}
    overrides: dict[str, np.ndarray] = {}
    nb = (len(batches) + batch_size - 1) // batch_size
    batch_ids = [batches[b * batch_size : (b + 1) * batch_size] for b in range(nb)]
    # known[b]: tensors already computed for batch b with the final (quantized) upstream weights.
    known: list[dict[str, np.ndarray]] = [{} for _ in range(nb)]
    computed: set[int] = set()
    for b, ids in enumerate(batch_ids):
        known[b].update(_feeds(graph_in, ids, info))
    known_names = set(index.graph_inputs)
    result: dict[str, torch.Tensor] = {}

    group_iter = _progress(range(len(groups)), len(groups), "sequential calibration", progress)
    for gi in group_iter:
        group = groups[gi]
        targets = sorted(set(group.values()))
        nodes = index.ancestors(targets, stop=known_names | index.initializers)
        produced = {o for i in nodes for o in index.nodes[i].output}
        needed_in = sorted({n for i in nodes for n in index.inputs_of[i]} - produced - index.initializers)
        missing = [n for n in needed_in if n not in known_names]
        if missing:
            raise QCompileError(f"sequential calibration: cannot compute {missing[0]} (graph input missing?)")
        done = computed | set(nodes)
        keep = sorted(
            o for o in produced
            if o in targets or any(c not in done for c in index.consumers.get(o, []))
        )
        acc = _Accumulator()
        if nodes or targets:
            in_types = {n: onnx.helper.np_dtype_to_tensor_dtype(known[0][n].dtype) for n in needed_in}
            outs = sorted(set(keep) | (set(targets) - known_names))
            sess = None
            if outs:
                sliced = _slice_model(model, index, nodes, in_types, outs, types, overrides)
                sess = _default_session(sliced.SerializeToString())
            for b in range(nb):
                values = dict(zip(outs, sess.run(outs, {n: known[b][n] for n in needed_in}))) if sess else {}
                for t in targets:
                    acc.add(t, values[t] if t in values else known[b][t])
                known[b].update(values)
            del sess
        computed = done
        known_names |= set(keep)
        hess = acc.result()
        group_h = {lin: hess[t] for lin, t in group.items()}
        result.update(group_h)
        new_weights = quantize_group(group_h) or {}
        changed = _apply_overrides(new_weights, init_protos, overrides)
        # Anything computed from a changed weight must be recomputed with the new value ...
        dirty = index.descendants_of(changed)
        computed -= dirty
        stale = {o for i in dirty for o in index.nodes[i].output if o in known_names}
        # ... and tensors whose consumers have all run are no longer needed.
        stale |= {n for n in known_names if n not in index.graph_inputs
                  and all(c in computed for c in index.consumers.get(n, []))}
        for name in stale:
            known_names.discard(name)
            for kb in known:
                kb.pop(name, None)
    _save_cache(entry, result)
    return result


def _apply_overrides(new: dict[str, np.ndarray], protos: dict[str, onnx.TensorProto],
                     overrides: dict[str, np.ndarray]) -> list[str]:
    changed = []
    for name, w in new.items():
        if name not in protos:
            raise QCompileError(f"sequential calibration: callback returned unknown initializer {name!r}")
        proto = protos[name]
        w = np.asarray(w)
        if tuple(w.shape) != tuple(proto.dims):
            raise QCompileError(f"sequential calibration: new weight {name} has shape {list(w.shape)}, expected {list(proto.dims)}")
        overrides[name] = w.astype(helper.tensor_dtype_to_np_dtype(proto.data_type))
        changed.append(name)
    return changed
