"""Allocate pass (model → data), ``-f auto`` only: each linear's palette setting, the least estimated damage
whose bytes fit the budget.

1. Sensitivity: each linear's output Fisher, from one backward pass of the float model over calibration
   windows (:func:`qcompile.solvers.sensitivity.output_fisher`; cached).
2. Candidates: every palette setting of every layer quantized, its exact bytes and its damage measured
   (:mod:`qcompile.candidates`; the final quantizations are kept for reuse).
3. The budget in bytes: ``--budget`` bits times the quantized weights; ``--budget-mb`` less the bytes of
   everything else in the file, measured by writing the graph the later passes write (the vocabulary tables as
   ``--embeddings`` stores them, norms, node records) with the chosen layers, and solved again if it is over.
4. A multiple-choice knapsack over groups of layers that read one input (:mod:`qcompile.solvers.knapsack`): each
   member its own entry, identical tensors counted once, or with ``--tie`` one entry for the whole group.

The quantize pass then quantizes only the layers whose setting was estimated with cheaper options.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompile import candidates as cands
from qcompile.errors import QCompileError
from qcompile.formats.palette import Candidate
from qcompile.passes.calibrate import file_key
from qcompile.passes.discover import LinearMatch, initializer_map
from qcompile.passes.state import CompileState
from qcompile.solvers import knapsack

#: Calibration windows the output Fisher is averaged over (x the sequence length in tokens).
FISHER_WINDOWS = 8
#: Rounds of solving again when a ``--budget-mb`` file came out over the budget (node records and padding).
MB_ROUNDS = 6
ESTIMATOR = "fisher"


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """The setting chosen for one layer, and what the allocation predicted for it."""

    candidate: str  # palette entry, e.g. spqr-w3:bits=4
    format: str
    bytes: int  # predicted bytes in the file (a tensor shared with an earlier layer of its group counts there)
    damage: float  # predicted KL contribution (nats per token)
    estimated: bool  # predicted from cheaper options (quantized afresh by the quantize pass)


@dataclasses.dataclass(frozen=True)
class Allocation:
    budget: str  # as asked, e.g. "3 bits/weight" or "40 MB"
    tie: bool  # layers reading one input took one entry
    budget_bytes: int  # for the quantized linears
    bytes: int  # predicted for the quantized linears
    damage: float  # predicted KL to the float model (sum over layers)
    estimator: str  # "fisher", or "relative output error" where the float model cannot be loaded in torch
    palette: tuple[str, ...]
    choices: dict[str, LayerChoice]
    table: dict[str, list[dict[str, Any]]]  # every layer's candidates: bytes, damage, relative error
    seconds: dict[str, float]
    file_bytes: int | None = None  # predicted whole file (--budget-mb)
    fisher: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)


def model_key(state: CompileState) -> tuple:
    """What a layer's quantization depends on besides its format and options: model, calibration, device."""
    from qcompile.cache import digest_array

    return (getattr(state.source, "fingerprint", None), str(state.float_path), file_key(state.float_path),
            digest_array(np.asarray(state.calib)), state.device)


def fisher_weights(state: CompileState) -> dict[str, torch.Tensor] | None:
    """Each linear's output Fisher (cached), or None when the source has no transformers model."""
    from qcompile.cache import atomic_write, cache_path, digest_array
    from qcompile.solvers.sensitivity import output_fisher

    windows = np.asarray(state.calib)[:FISHER_WINDOWS]
    names = [m.name for m in state.matches]
    path = cache_path("fisher", *model_key(state)[:3], digest_array(windows), state.cfg.seed, names, suffix=".pt")
    if path.exists():
        return torch.load(path)
    try:
        model = state.source.load_model("float32")
        for n in names:
            model.get_submodule(n)
    except Exception as e:  # noqa: BLE001 - a bare .onnx, or names the torch model does not have
        print(f"qcompile: auto: no torch model for the sensitivity ({e}); damage = relative output error",
              file=sys.stderr)
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, __import__("os").cpu_count() or 1))
    try:
        fisher = output_fisher(model, names, windows, seed=state.cfg.seed, progress=state.cfg.progress)
    finally:
        torch.set_num_threads(threads)
    with atomic_write(path) as tmp:
        torch.save(fisher, tmp)
    return fisher


def groups_by_input(matches: tuple[LinearMatch, ...]) -> list[list[LinearMatch]]:
    """Layers reading the same activation (q/k/v, gate/up), in graph order."""
    groups: dict[str, list[LinearMatch]] = {}
    for m in matches:
        groups.setdefault(m.input, []).append(m)
    return list(groups.values())


def _choices(groups: list[list[LinearMatch]], table: dict[str, list[cands.Entry]]) -> list:
    return [[[knapsack.Choice(e.candidate, e.bytes, e.damage, e.shared) for e in table[m.name]] for m in g]
            for g in groups]


def _solve(groups: list[list[LinearMatch]], table: dict[str, list[cands.Entry]], budget: int, tie: bool
           ) -> dict[str, cands.Entry]:
    sol = knapsack.solve(_choices(groups, table), budget, tie=tie)
    return {m.name: table[m.name][i] for g, picks in zip(groups, sol.picks) for m, i in zip(g, picks)}


def _attributed_bytes(groups: list[list[LinearMatch]], chosen: dict[str, cands.Entry]) -> dict[str, int]:
    """Each layer's bytes as the file's report counts them: a tensor identical to one an earlier layer stores is
    that layer's (the share pass keeps the first copy)."""
    seen: set[str] = set()
    out = {}
    for g in groups:
        for m in g:
            e = chosen[m.name]
            fresh = [(d, n) for d, n in e.shared if d not in seen]
            seen.update(d for d, _ in e.shared)
            out[m.name] = e.bytes - sum(n for _, n in e.shared) + sum(n for _, n in fresh)
    return out


def _quantized(state: CompileState, chosen: dict[str, cands.Entry], key: tuple, final_only: bool) -> dict:
    """The chosen layers' cached weights (``final_only``: only those quantized with their final options)."""
    out = {}
    for name, e in chosen.items():
        cand = state.palette[e.candidate]
        if not e.estimated:
            out[name] = cands.load(key, cand, name)
        elif not final_only:
            out[name] = cands.cache_for(key, cand, True).get(name)  # same shapes and bytes as the final one
    return out


def with_tables(state: CompileState, embeddings: str | None) -> CompileState:
    """``state`` after the embeddings pass with this ``--embeddings`` mode (its vocabulary tables stored as the
    compile will store them)."""
    from qcompile.passes import embeddings as emb_pass

    return emb_pass.step(state.replace(cfg=dataclasses.replace(state.cfg, embeddings=embeddings)))


def file_bytes(tabled: CompileState, chosen: dict[str, cands.Entry], key: tuple) -> int:
    """Bytes of model.onnx and its data as the rest of the pipeline would write them with these layers
    (``tabled``: from :func:`with_tables`)."""
    from qcompile.models.export import save_onnx
    from qcompile.passes import lower, share
    from qcompile.pipeline import _copy_source_metadata
    from qcompile.report import model_file_bytes

    picked = {n: tabled.palette[e.candidate] for n, e in chosen.items()}
    s = tabled.replace(quantized=_quantized(tabled, chosen, key, False), layer_formats={n: c.fmt for n, c in picked.items()},
                       layer_options={n: c.options() for n, c in picked.items()})
    s = share.step(lower.step(s))
    _copy_source_metadata(tabled.float_model, s.model)
    with tempfile.TemporaryDirectory(prefix="qcompile-size-") as tmp:
        path = save_onnx(s.model, Path(tmp) / "model.onnx")
        return model_file_bytes(path)


def _budget_bytes(state: CompileState, table: dict[str, list[cands.Entry]], key: tuple
                  ) -> tuple[int, CompileState | None, int | None]:
    """(bytes for the linears, the state with its vocabulary tables for measuring files, the file's bytes or None)
    for the request's budget. ``--budget-mb`` without ``--embeddings``: int8 tables while they leave the linears
    3 bits per weight or more, else int4."""
    params = sum(m.shape[0] * m.shape[1] for m in state.matches)
    if state.budget.bits is not None:
        return int(math.floor(state.budget.bits * params / 8)), None, None
    target = int(math.floor(state.budget.megabytes * 1e6))
    least = {m.name: min(table[m.name], key=lambda e: e.bytes) for m in state.matches}
    modes = [state.cfg.embeddings] if state.cfg.embeddings else ["int8", "int4"]
    for mode in modes:
        tabled = with_tables(state, mode)
        rest = file_bytes(tabled, least, key) - sum(e.bytes for e in least.values())
        if mode == modes[-1] or 8 * (target - rest) / params >= 3.0:
            return target - rest, tabled, target
    raise AssertionError("unreachable")


def allocate(state: CompileState) -> CompileState:
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    fisher = fisher_weights(state)
    seconds["sensitivity"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    key = model_key(state)
    inits = initializer_map(state.model)
    layers = [(m.name, m.weight(inits), m.dtype) for m in state.matches]
    table = cands.evaluate(layers, state.palette, state.hessians, fisher, model_key=key, emit=state.emit,
                           device=state.device, progress=state.cfg.progress)
    seconds["candidates"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    groups = groups_by_input(state.matches)
    budget, tabled, target = _budget_bytes(state, table, key)
    embeddings = tabled.cfg.embeddings if tabled is not None else state.cfg.embeddings
    params = sum(m.shape[0] * m.shape[1] for m in state.matches)
    predicted_file = None
    for _ in range(MB_ROUNDS if target is not None else 1):
        try:
            chosen = _solve(groups, table, budget, state.cfg.tie)
        except ValueError:
            least = sum(knapsack.group_frontier(g, state.cfg.tie)[0].bytes for g in _choices(groups, table))
            need = (f"{8 * least / params:.3f} bits/weight" if target is None
                    else f"{(target - budget + least) / 1e6:.3f} MB with --embeddings {embeddings}")
            raise QCompileError(f"-f auto: a budget of {state.budget.text} is below the smallest this palette can "
                                f"store: {need}") from None
        if target is None:
            break
        predicted_file = file_bytes(tabled, chosen, key)
        if predicted_file <= target:
            break
        budget -= predicted_file - target
    else:
        raise QCompileError(f"-f auto: could not fit {state.budget.text} (the file came out at {predicted_file:,} bytes)")
    seconds["knapsack"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    attributed = _attributed_bytes(groups, chosen)
    choices = {m.name: LayerChoice(state.palette[chosen[m.name].candidate].text,
                                   state.palette[chosen[m.name].candidate].fmt.name, attributed[m.name],
                                   chosen[m.name].damage, chosen[m.name].estimated) for m in state.matches}
    allocation = Allocation(
        budget=state.budget.text, tie=state.cfg.tie, budget_bytes=budget, bytes=sum(attributed.values()),
        damage=math.fsum(c.damage for c in choices.values()), estimator=ESTIMATOR if fisher else "relative output error",
        palette=tuple(c.text for c in state.palette), choices=choices, seconds=seconds, file_bytes=predicted_file,
        table={n: [{"candidate": state.palette[e.candidate].text, "bytes": e.bytes, "damage": e.damage,
                    "rel_output_error": e.rel_error, "estimated": e.estimated} for e in es] for n, es in table.items()},
        fisher=fisher)
    _print_summary(allocation, params)
    cfg = dataclasses.replace(state.cfg, embeddings=embeddings)
    picked: dict[str, Candidate] = {n: state.palette[e.candidate] for n, e in chosen.items()}
    return state.replace(cfg=cfg, allocation=allocation, quantized=_quantized(state, chosen, key, True),
                         layer_formats={n: c.fmt for n, c in picked.items()},
                         layer_options={n: c.options() for n, c in picked.items()})


def _print_summary(a: Allocation, params: int) -> None:
    mix: dict[str, list[int]] = {}
    for c in a.choices.values():
        mix.setdefault(c.candidate, [0, 0])
        mix[c.candidate][0] += 1
        mix[c.candidate][1] += c.bytes
    parts = ", ".join(f"{k} x{n}" for k, (n, _) in sorted(mix.items(), key=lambda kv: -kv[1][1]))
    s = a.seconds
    print(f"qcompile: auto: {a.budget} -> {8 * a.bytes / params:.3f} bits/weight ({a.bytes:,} of {a.budget_bytes:,} "
          f"bytes), predicted KL {a.damage:.4f}; {parts}; allocation {s['total']:.0f} s (sensitivity "
          f"{s['sensitivity']:.0f} s, candidates {s['candidates']:.0f} s, knapsack {s['knapsack']:.0f} s)",
          file=sys.stderr)


def step(state: CompileState) -> CompileState:
    if state.fmt is not None:
        return state
    return allocate(state)
