"""Report pass (model → data): one row per quantized layer, its size counted from the lowered graph's bytes
(:func:`qcompile.report.layer_sizes`) and its output error on the calibration activations,
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``. With ``-f auto`` each row also holds the layer's palette entry and what the
allocation predicted next to what came out: bytes (from the file) and damage (the same estimator on the layer as
quantized, before fine-tuning, and after it)."""
from __future__ import annotations

from typing import Any

import torch

from qcompile import report as reports
from qcompile.passes.discover import initializer_map
from qcompile.passes.lower import own_options
from qcompile.passes.state import CompileState
from qcompile.solvers.gptq import relative_output_error
from qcompile.solvers.sensitivity import damage


def layer_rows(state: CompileState) -> list[dict[str, Any]]:
    """Rows for report.json's ``layers``: sizes from the lowered ``state.model``, errors against the float weights
    of ``state.float_model``."""
    inits = initializer_map(state.float_model)
    sizes = {s.name: s for s in reports.layer_sizes(state.model)}
    simulated = state.emit == "simulated"
    own_by_layer = own_options(state)
    alloc = state.allocation
    rows = []
    for m in state.matches:
        qw = state.quantized[m.name]
        h = state.hessians.get(m.name)
        err = None
        w = m.weight(inits)
        if h is not None:
            err = relative_output_error(torch.from_numpy(w.T), torch.from_numpy(qw.dequantize().T), h)
        size = sizes[m.name]
        own = own_by_layer[m.name]
        row = {"name": m.name, "shape": list(m.shape), "format": state.layer_formats[m.name].name,
               # size truth: what the file holds (simulated: what native storage would hold)
               "bits_per_weight": size.packed_bits_per_weight if simulated else size.bits_per_weight,
               "rel_output_error": err, "quantize_seconds": state.layer_seconds.get(m.name),
               "resumed": m.name in state.resumed, **({"layer_options": own} if own else {}),
               **qw.extra_report()}
        if alloc is not None:
            choice = alloc.choices[m.name]
            fisher = None if alloc.fisher is None else alloc.fisher[m.name]
            before = state.layerwise.get(m.name, qw)

            def measured(q):
                if fisher is None:
                    return relative_output_error(torch.from_numpy(w.T), torch.from_numpy(q.dequantize().T), h)
                return damage(w, q.dequantize(), h, fisher)

            row.update({"candidate": choice.candidate, "predicted_bytes": choice.bytes,
                        "bytes": size.stored_bytes if not simulated else qw.stored_bytes(),
                        "predicted_damage": choice.damage, "damage": measured(before),
                        "damage_tuned": measured(qw) if m.name in state.layerwise else None,
                        "damage_estimated": choice.estimated})
        rows.append(row)
    return rows


def step(state: CompileState) -> CompileState:
    return state.replace(layers=tuple(layer_rows(state)))
