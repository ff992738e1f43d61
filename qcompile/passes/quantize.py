"""Quantize pass (model → data): every matched linear's weight through its format's numerics.

Each finished layer is checkpointed under the cache (:class:`~qcompile.layer_checkpoint.LayerCheckpoint`,
keyed by everything that determines a layer's result), so a killed compile of a slow format resumes from the
last finished layer; the pipeline removes the checkpoint once OUT is complete. With ``-f auto`` the layers the
allocate pass already quantized with their chosen settings are kept as they are.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from qcompile.errors import QCompileError
from qcompile.formats.base import QuantizedWeight, is_whole_model_option
from qcompile.layer_checkpoint import LayerCheckpoint
from qcompile.passes.calibrate import file_key
from qcompile.passes.discover import LinearMatch, initializer_map
from qcompile.passes.lower import dequantized_weights
from qcompile.passes.state import CompileState

#: Bump when a layer's quantized result for the same inputs changes meaning (e.g. a packed tensor's dtype).
CHECKPOINT_VERSION = "layers-v3"

QuantizeLayer = Callable[[LinearMatch, "torch.Tensor | None"], QuantizedWeight]


@contextlib.contextmanager
def quantization_threads(device: str) -> Iterator[None]:
    """GPTQ's column sweep is many small tensor ops: on CPU one thread beats several (measured 10x under
    load on 2 cores), so quantize single-threaded unless QCOMPILE_QUANT_THREADS says otherwise."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("QCOMPILE_QUANT_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer_checkpoint(state: CompileState, calib: np.ndarray) -> LayerCheckpoint:
    """Checkpoint folder for this exact compile: every input that determines a layer's result is in the key
    (model file, format, options and per-layer overrides, calibration tokens, sequential mode, device);
    progress bars and the whole-model ``finetune*`` options (they act after every layer is done) are not."""
    from qcompile.cache import cache_dir, digest_array, key_hash

    cfg = state.cfg
    layer_opts = {k: v for k, v in state.options.items() if k != "progress" and not is_whole_model_option(k)}
    parts = [CHECKPOINT_VERSION, getattr(state.source, "fingerprint", None), str(state.float_path),
             file_key(state.float_path), state.format_name, layer_opts, state.override_texts,
             digest_array(np.asarray(calib)), cfg.sequential, cfg.include_lm_head, state.device]
    if state.fmt is None:  # -f auto: each layer's own format and options
        parts.append({n: (f.name, {k: v for k, v in state.layer_options[n].items() if k != "progress"})
                      for n, f in sorted(state.layer_formats.items())})
    key = key_hash(*parts)
    return LayerCheckpoint(cache_dir() / "layers" / key, fingerprint=key)


def step(state: CompileState) -> CompileState:
    from qcompile.cache import prune_checkpoints

    cfg = state.cfg
    ckpt = layer_checkpoint(state, state.calib)
    prune_checkpoints(keep=ckpt.directory)  # abandoned checkpoints of other compiles
    names = {m.name for m in state.matches}
    done_before = set(ckpt.names()) & names if cfg.resume else set()
    if done_before:
        print(f"qcompile: resuming: {len(done_before)} of {len(names)} layers already quantized "
              f"({ckpt.directory})", file=sys.stderr)
    inits = initializer_map(state.model)
    seconds: dict[str, float | None] = {}
    resumed: set[str] = set()

    def quantize_layer(m: LinearMatch, h: torch.Tensor | None) -> QuantizedWeight:
        hit = ckpt.get_entry(m.name) if m.name in done_before else None
        if hit is not None:
            resumed.add(m.name)
            secs = hit[1].get("seconds")
            seconds[m.name] = float(secs) if isinstance(secs, (int, float)) else None
            return hit[0]
        fmt = state.layer_formats[m.name]
        t0 = time.perf_counter()
        with quantization_threads(state.device):
            qw = fmt.quantize(m.weight(inits), h if fmt.needs_calibration else None, device=state.device,
                              **state.layer_options[m.name])
        seconds[m.name] = time.perf_counter() - t0
        ckpt.put(m.name, qw, {"seconds": seconds[m.name]})
        return qw

    hessians = dict(state.hessians)
    try:
        if cfg.sequential:
            quantized = _sequential(state, quantize_layer, hessians)
        else:
            quantized = dict(state.quantized)  # -f auto: the allocation's own quantizations of the chosen settings
            todo = [m for m in state.matches if m.name not in quantized]
            bar = tqdm(todo, desc=f"quantize {state.format_name}", unit="layer", disable=not cfg.progress or not todo)
            for m in bar:
                bar.set_postfix_str(m.name[-32:])
                quantized[m.name] = quantize_layer(m, hessians.get(m.name))
    except QCompileError:  # the same input fails the same way: nothing worth resuming
        shutil.rmtree(ckpt.directory, ignore_errors=True)
        raise
    return state.replace(checkpoint=ckpt, quantized=quantized, hessians=hessians, layer_seconds=seconds,
                         resumed=frozenset(resumed))


def _sequential(state: CompileState, quantize_layer: QuantizeLayer,
                hessians: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """Calibrate block by block on the outputs of the already-quantized blocks (fills ``hessians``)."""
    from qcompile.calibration import collect_hessians_sequential

    groups: list[list[LinearMatch]] = []
    for m in state.matches:
        if not groups or block_of(groups[-1][0].name) != block_of(m.name):
            groups.append([])
        groups[-1].append(m)
    quantized: dict[str, QuantizedWeight] = {}

    def quantize_group(hs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        group = [m for g in groups for m in g if m.name in hs]
        for m in group:
            quantized[m.name] = quantize_layer(m, hs[m.name])
            hessians[m.name] = hs[m.name]
        return dequantized_weights(group, quantized)

    collect_hessians_sequential(state.float_path, [{m.name: m.input for m in g} for g in groups], state.calib,
                                quantize_group, progress=state.cfg.progress)
    return quantized


def block_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the transformer block a linear belongs to)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name
