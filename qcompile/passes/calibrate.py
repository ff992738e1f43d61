"""Calibrate pass (model → data): token windows of calibration text and the Hessian ``XᵀX`` of every
linear's input, measured on the float graph with onnxruntime (:mod:`qcompile.calibration`).

Formats calibrate even when their numerics need no data (RTN): the Hessians give every layer's output error
in the report, and they are cached. In ``--sequential`` mode Hessians are measured block by block on the
already-quantized model instead, by the quantize pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcompile.passes.discover import LinearMatch
from qcompile.passes.state import CompileState


def file_key(path: Path) -> tuple:
    """A cheap identity of a file for cache keys: size and modification time."""
    st = Path(path).stat()
    return (st.st_size, int(st.st_mtime))


def hessians(float_path: Path, matches: tuple[LinearMatch, ...], calib: np.ndarray, seed: int,
             progress: bool) -> dict[str, torch.Tensor]:
    """``{layer name: H [K, K]}`` over ``calib`` (cached by model file, windows and seed)."""
    from qcompile.calibration import collect_hessians

    key = (str(float_path), file_key(float_path), calib.shape, int(np.asarray(calib).sum()), seed)
    return collect_hessians(float_path, {m.name: m.input for m in matches}, calib, cache_key=key, progress=progress)


def step(state: CompileState) -> CompileState:
    from qcompile import data as qdata

    cfg = state.cfg
    calib = qdata.calibration_windows(state.tokenizer, cfg.calib_samples, cfg.seq_len, seed=cfg.seed)
    if cfg.sequential:
        return state.replace(calib=calib)
    head = (state.embedding.head,) if state.embedding is not None and state.embedding.head is not None else ()
    return state.replace(calib=calib, hessians=hessians(state.float_path, (*state.matches, *head), calib, cfg.seed,
                                                        cfg.progress))
