"""Report pass (model → data): one row per quantized layer, its size counted from the lowered graph's bytes
(:func:`qcompile.report.layer_sizes`) and its output error on the calibration activations,
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``."""
from __future__ import annotations

from typing import Any

import torch

from qcompile import report as reports
from qcompile.passes.discover import initializer_map
from qcompile.passes.state import CompileState
from qcompile.solvers.gptq import relative_output_error


def layer_rows(state: CompileState) -> list[dict[str, Any]]:
    """Rows for report.json's ``layers``: sizes from the lowered ``state.model``, errors against the float weights
    of ``state.float_model``."""
    inits = initializer_map(state.float_model)
    sizes = {s.name: s for s in reports.layer_sizes(state.model)}
    simulated = state.emit == "simulated"
    rows = []
    for m in state.matches:
        qw = state.quantized[m.name]
        h = state.hessians.get(m.name)
        err = None
        if h is not None:
            w = torch.from_numpy(m.weight(inits).T)
            err = relative_output_error(w, torch.from_numpy(qw.dequantize().T), h)
        size = sizes[m.name]
        own = {k: v for k, v in state.layer_options[m.name].items() if v != state.options[k]}
        rows.append({"name": m.name, "shape": list(m.shape), "format": state.fmt.name,
                     # size truth: what the file holds (simulated: what native storage would hold)
                     "bits_per_weight": size.packed_bits_per_weight if simulated else size.bits_per_weight,
                     "rel_output_error": err, "quantize_seconds": state.layer_seconds.get(m.name),
                     "resumed": m.name in state.resumed, **({"layer_options": own} if own else {}),
                     **qw.extra_report()})
    return rows


def step(state: CompileState) -> CompileState:
    return state.replace(layers=tuple(layer_rows(state)))
