"""What the compile passes hand to one another.

Each pass in :data:`qcompile.passes.PIPELINE` is a function ``CompileState -> CompileState``: it reads the
fields earlier passes filled in and returns a state with its own results added (the graph passes return a
new ``model``; the others add data such as Hessians or quantized weights). The state never holds files:
the pipeline reads the source before the first pass and writes OUT after the last.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from qcompile.formats.base import Format, LayerOverride, QuantizedWeight

if TYPE_CHECKING:
    import torch

    from qcompile.formats.palette import Budget, Candidate
    from qcompile.layer_checkpoint import LayerCheckpoint
    from qcompile.passes.allocate import Allocation
    from qcompile.models.sources import ModelSource
    from qcompile.passes.discover import LinearMatch
    from qcompile.passes.embeddings import EmbeddingMatch
    from qcompile.pipeline import CompileConfig


@dataclasses.dataclass(frozen=True)
class CompileState:
    cfg: "CompileConfig"
    fmt: Format | None  # the format of every layer; None with ``-f auto`` (each layer's is in ``layer_formats``)
    options: dict[str, Any]  # the format's options, resolved over its defaults (-f auto: the whole-model ones)
    overrides: tuple[LayerOverride, ...]  # the user's per-layer overrides, in order (the format's own come first)
    emit: str
    device: str
    source: "ModelSource"
    float_path: Path  # the float ONNX model the passes start from
    model: onnx.ModelProto  # the current graph: float until ``lower`` rewrites it
    tokenizer: Any
    eval_windows: np.ndarray | None = None  # the evaluation text, tokenized up front (None: no evaluation)
    float_model: onnx.ModelProto | None = None  # discover: the float graph, kept for the report's errors
    matches: tuple["LinearMatch", ...] = ()  # discover
    layer_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # discover/allocate: per layer
    layer_formats: dict[str, Format] = dataclasses.field(default_factory=dict)  # discover/allocate: per layer
    palette: tuple["Candidate", ...] = ()  # -f auto: the settings each layer may take
    budget: "Budget | None" = None  # -f auto: what the layers' bytes must fit in
    allocation: "Allocation | None" = None  # allocate: each layer's choice, predicted bytes and damage
    embedding: "EmbeddingMatch | None" = None  # discover: the vocabulary tables, when --embeddings quantizes them
    calib: np.ndarray | None = None  # calibrate: token windows [n, seq]
    hessians: dict[str, "torch.Tensor"] = dataclasses.field(default_factory=dict)  # calibrate
    checkpoint: "LayerCheckpoint | None" = None  # quantize: finished layers of an interrupted compile
    quantized: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)  # quantize, tune
    layer_seconds: dict[str, float | None] = dataclasses.field(default_factory=dict)  # quantize
    resumed: frozenset[str] = frozenset()  # quantize: layers taken from the checkpoint
    layerwise: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)  # tune: tuned layers as quantized
    tune_summary: dict[str, Any] | None = None  # tune
    embedding_weights: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)  # embeddings
    layers: tuple[dict[str, Any], ...] = ()  # report: one row per quantized layer

    def replace(self, **changes: Any) -> "CompileState":
        return dataclasses.replace(self, **changes)

    @property
    def format_name(self) -> str:
        """What report.json's ``format`` says: the format, or ``auto`` for a per-layer mix."""
        from qcompile.formats.palette import AUTO

        return AUTO if self.fmt is None else self.fmt.name

    @property
    def override_texts(self) -> list[str]:
        """Every per-layer override in the order it applies: the format's own, then the user's."""
        own = self.fmt.layer_options if self.fmt is not None else ()
        return [str(o) for o in (*own, *self.overrides)]
