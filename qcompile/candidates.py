"""Every palette setting of every layer, quantized and measured: what ``-f auto``'s knapsack chooses from.

For each layer and candidate the table holds the exact bytes the file will hold for it (the initializers its
lowering writes, or the packed bytes for ``--emit simulated``; SpQR's depend on its outliers, so they come
from the quantized weight, never from a formula), a digest of each tensor (layers reading one input may store
identical tensors, which the share pass keeps once), and its damage
(:func:`qcompile.solvers.sensitivity.damage`). A slow format is quantized here with its cheaper
``estimate_options`` and its damage scaled by ``estimate_error_ratio``; every other candidate is the final
quantization of that setting, kept in the cache so that the chosen ones are reused, not redone (also by later
compiles of the same model at other budgets).

Layers are quantized in worker processes (one per core, one torch thread each, as the quantize pass does) when
there is enough work to pay for starting them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qcompile.formats import get_format
from qcompile.formats.base import QuantizedWeight
from qcompile.formats.palette import Candidate
from qcompile.layer_checkpoint import LayerCheckpoint
from qcompile.report import tensor_nbytes
from qcompile.solvers.sensitivity import damage_of_rows, row_errors

#: Bump when a candidate's cached result for the same inputs changes meaning.
CANDIDATE_VERSION = "candidates-v1"
#: Below this many weight-candidates (weights x settings) the table is computed in this process: starting
#: workers (importing torch) costs more than it saves on small models.
POOL_MIN_WORK = 20_000_000


@dataclasses.dataclass(frozen=True)
class Entry:
    """One candidate of one layer."""

    candidate: int  # index into the palette
    bytes: int  # what the file holds for the layer (before sharing with its group)
    shared: frozenset[tuple[str, int]]  # (digest, bytes) of every tensor it stores
    damage: float  # estimated KL (nats per token; without a Fisher, the relative output error); a slow format's is
    # its cheap estimate x the measured ratio
    rel_error: float  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of the weight this entry measured
    estimated: bool  # measured on cheaper options: the final quantization is still to do
    seconds: float | None  # quantization time (None: taken from the cache)


@dataclasses.dataclass(frozen=True)
class Job:
    """One layer's missing candidates, for a worker (formats travel by name: the registry is rebuilt there)."""

    layer: str
    weight: np.ndarray  # [K, N]
    hessian: torch.Tensor
    fisher: torch.Tensor | None
    dtype: int  # activation dtype, for the lowering's bytes
    emit: str
    device: str
    todo: tuple[tuple[int, str, tuple[tuple[str, Any], ...], bool, float, str, str], ...]
    # (candidate, format, options, estimated, ratio, cache folder, cache fingerprint)


def cache_for(model_key: tuple, cand: Candidate, estimated: bool) -> LayerCheckpoint:
    """The cache folder of one candidate's layers for one model and calibration (``model_key``)."""
    from qcompile.cache import cache_dir, key_hash

    opts = cand.estimate_options() if estimated else cand.options()
    key = key_hash(CANDIDATE_VERSION, *model_key, cand.fmt.name, {k: v for k, v in opts.items() if k != "progress"})
    return LayerCheckpoint(cache_dir() / "candidates" / key, fingerprint=key)


def stored_tensors(qw: QuantizedWeight, emit: str, dtype: int, prefix: str) -> list[tuple[str, int]]:
    """``(digest, bytes)`` of each tensor the file holds for ``qw``: the native or portable lowering's
    initializers (compared as the share pass compares them), or the packed tensors for ``simulated`` (whose
    file holds floats; its bits per weight are the packed ones, never shared)."""
    if emit == "simulated":
        return [(f"{prefix}.{k}", int(a.nbytes)) for k, a in qw.packed().items()]
    low = qw.lower_native("x", "y", prefix, dtype) if emit == "native" else qw.lower_portable("x", "y", prefix, dtype)
    out = []
    for t in low.initializers:
        h = hashlib.sha256(f"{t.data_type}:{tuple(t.dims)}:".encode())
        h.update(t.raw_data)
        out.append((h.hexdigest()[:32], tensor_nbytes(t)))
    return out


def _measure(job: Job, index: int, qw: QuantizedWeight, estimated: bool, ratio: float, seconds: float | None,
             energy: float) -> Entry:
    """``energy``: tr(W H Wᵀ), for the relative output error."""
    tensors = stored_tensors(qw, job.emit, job.dtype, f"qc.{job.layer}")
    rows = row_errors(job.weight, qw.dequantize(), job.hessian)
    err = float(rows.sum()) / max(energy, 1e-30)
    d = err if job.fisher is None else damage_of_rows(rows, job.fisher)
    d *= ratio if estimated else 1.0
    unique = frozenset(tensors) if job.emit != "simulated" else frozenset()
    return Entry(index, sum(n for _, n in tensors), unique, d, err, estimated, seconds)


def run_job(job: Job) -> list[Entry]:
    """Quantize (or read from the cache) and measure one layer's candidates."""
    out = []
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("QCOMPILE_QUANT_THREADS", "1")))
    try:
        energy = float(row_errors(job.weight, np.zeros_like(job.weight), job.hessian).sum())  # tr(W H Wᵀ)
        for index, fmt_name, opts, estimated, ratio, folder, fingerprint in job.todo:
            ckpt = LayerCheckpoint(folder, fingerprint=fingerprint)
            qw = ckpt.get(job.layer)
            seconds = None
            if qw is None:
                fmt = get_format(fmt_name)
                t0 = time.perf_counter()
                qw = fmt.quantize(job.weight, job.hessian if fmt.needs_calibration else None, device=job.device,
                                  **dict(opts))
                seconds = time.perf_counter() - t0
                ckpt.put(job.layer, qw, {"seconds": seconds})
            out.append(_measure(job, index, qw, estimated, ratio, seconds, energy))
    finally:
        torch.set_num_threads(before)
    return out


def evaluate(layers: Sequence[tuple[str, np.ndarray, int]], palette: Sequence[Candidate],
             hessians: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor] | None, *, model_key: tuple,
             emit: str, device: str, workers: int | None = None, progress: bool = False) -> dict[str, list[Entry]]:
    """``{layer: [Entry per candidate that fits it]}`` for ``layers`` = ``(name, weight [K, N], dtype)``."""
    jobs = []
    for name, w, dtype in layers:
        todo = []
        for i, c in enumerate(palette):
            if not c.fits(*w.shape):
                continue
            estimated = c.estimate_options() is not None
            opts = c.estimate_options() if estimated else c.options()
            ckpt = cache_for(model_key, c, estimated)
            todo.append((i, c.fmt.name, tuple(opts.items()), estimated, c.fmt.estimate_error_ratio,
                         str(ckpt.directory), ckpt.fingerprint))
        jobs.append(Job(name, w, hessians[name], None if fisher is None else fisher[name], dtype, emit, device,
                        tuple(todo)))
    work = sum(j.weight.size * len(j.todo) for j in jobs)
    workers = workers or int(os.environ.get("QCOMPILE_AUTO_WORKERS", str(os.cpu_count() or 1)))
    # the biggest layers first, so that the last jobs are small and the workers finish together
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].weight.size * len(jobs[i].todo))
    results: dict[str, list[Entry]] = {}
    bar = tqdm(total=len(jobs), desc="candidates", unit="layer", disable=not progress)
    if workers <= 1 or work < POOL_MIN_WORK:
        for i in order:
            results[jobs[i].layer] = run_job(jobs[i])
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_job, jobs[i]): jobs[i].layer for i in order}
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    return {name: sorted(results[name], key=lambda e: e.candidate) for name, _, _ in layers}


def load(model_key: tuple, cand: Candidate, layer: str) -> QuantizedWeight:
    """A candidate's cached final quantization of ``layer`` (written by :func:`evaluate`)."""
    qw = cache_for(model_key, cand, False).get(layer)
    if qw is None:
        raise FileNotFoundError(f"{cand.text} of {layer} is not in the candidate cache")
    return qw


def cache_folders(model_key: tuple, palette: Sequence[Candidate]) -> list[Path]:
    """Every cache folder this palette uses for this model (kept by the cache's pruning while compiling)."""
    return [cache_for(model_key, c, c.estimate_options() is not None).directory for c in palette]
