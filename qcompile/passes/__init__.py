"""The compile passes, in the order :func:`qcompile.pipeline.compile_model` runs them.

One file per step. A graph pass rewrites the model (ModelProto in, ModelProto out), a data pass derives
something from it (matches, Hessians, quantized weights, report rows); each module keeps its matching or
computing function apart from its ``step``, the adapter that reads and extends the
:class:`~qcompile.passes.state.CompileState`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from qcompile.passes import allocate, calibrate, discover, embeddings, lower, quantize, report, share, tune
from qcompile.passes.state import CompileState


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[CompileState], CompileState]


PIPELINE: tuple[Pass, ...] = (
    Pass("discover", discover.step),    # the linears with constant weights, and each one's options
    Pass("calibrate", calibrate.step),  # calibration windows and each linear's input Hessian
    Pass("allocate", allocate.step),    # -f auto: each linear's palette setting under the budget
    Pass("quantize", quantize.step),    # each weight through its format's numerics (checkpointed)
    Pass("tune", tune.step),            # one whole-model fine-tuning of every tunable layer, if any
    Pass("embeddings", embeddings.step),  # the vocabulary tables quantized and stored once (--embeddings)
    Pass("lower", lower.step),          # MatMuls rewritten to the format's op (or portable / simulated)
    Pass("share", share.step),          # byte-identical quantized tensors stored once
    Pass("report", report.step),        # per-layer size and error rows
)

__all__ = ["PIPELINE", "CompileState", "Pass"]
