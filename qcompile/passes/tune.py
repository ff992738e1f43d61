"""Tune pass (model → model): one whole-model distillation of the float side parameters of every tunable layer,
whatever its format (SpQR statistics and outliers, AQLM codebooks and scales), against the float model
(:mod:`qcompile.solvers.distill`). Each format contributes a module per layer (``Format.to_module``) and takes the
tuned values back (``Format.from_module``); a file mixing formats is tuned jointly, in one loop.

It may change only the packed tensors each layer's format names as ``tunable`` and float initializers private to
one node (norm weights); every other tensor, and so the file layout and size, is checked to stay byte for byte.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.errors import QCompileError
from qcompile.formats.base import Format, QuantizedWeight
from qcompile.passes.state import CompileState
from qcompile.solvers.distill import tune_modules

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def private_initializers(model: onnx.ModelProto) -> set[str]:
    """Float initializers read by exactly one node: safe to retune (the exporter merges equal constants, e.g.
    norm weights that are all ones, into one shared initializer, which must then stay as it is)."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i in set(node.input):
            uses[i] = uses.get(i, 0) + 1
    return {t.name for t in model.graph.initializer if uses.get(t.name) == 1 and t.data_type in FLOAT_TYPES}


def override_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with float initializers replaced, each keeping its dtype and shape."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    protos = {t.name: t for t in out.graph.initializer}
    for name, value in values.items():
        if name not in protos:
            raise QCompileError(f"tune step returned {name!r}, which is not an initializer of the model")
        t = protos[name]
        arr = np.asarray(value).astype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if list(arr.shape) != list(t.dims):
            raise QCompileError(f"tune step returned {name} with shape {list(arr.shape)}, expected {list(t.dims)}")
        t.CopyFrom(numpy_helper.from_array(arr, name))
    return out


def check_tunable(formats: dict[str, Format], before: dict[str, QuantizedWeight],
                  after: dict[str, QuantizedWeight]) -> None:
    """Fine-tuning keeps codes, positions and sizes: only each layer's ``Format.tunable`` tensors may differ."""
    for name, new in after.items():
        fmt = formats[name]
        old_p, new_p = before[name].packed(), new.packed()
        for key, arr in old_p.items():
            same = key in new_p and new_p[key].dtype == arr.dtype and new_p[key].shape == arr.shape
            if not same or (key not in fmt.tunable and not np.array_equal(new_p[key], arr)):
                raise QCompileError(f"{fmt.name} tune step changed {name}.{key}, which it may not "
                                    f"(tunable: {', '.join(fmt.tunable) or 'none'})")


def tunable_layers(state: CompileState) -> dict[str, QuantizedWeight]:
    """The quantized layers whose format can be tuned, in graph order."""
    return {m.name: state.quantized[m.name] for m in state.matches
            if state.layer_formats[m.name].to_module is not None and m.name in state.quantized}


def step(state: CompileState) -> CompileState:
    layers = tunable_layers(state)
    if not layers:
        return state
    formats = {n: state.layer_formats[n] for n in layers}
    modules = {n: formats[n].to_module(q) for n, q in layers.items()}  # type: ignore[misc]
    tuned = tune_modules(state.source, state.calib, state.options, state.cfg.progress,
                         private_initializers(state.model), modules, desc=f"{state.format_name} finetune")
    if tuned is None:
        return state
    mods, floats, summary = tuned
    new = {n: formats[n].from_module(layers[n], mod) for n, mod in mods.items()}  # type: ignore[misc]
    check_tunable(formats, layers, new)
    return state.replace(quantized={**state.quantized, **new}, model=override_initializers(state.model, floats),
                         layerwise={n: layers[n] for n in new}, tune_summary=summary)
