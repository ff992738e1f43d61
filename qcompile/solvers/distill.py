"""Whole-model fine-tuning of a format's continuous parameters (discrete codes fixed) against the float model.

Why: layer-by-layer quantization minimises each linear's own output error, but the errors compound through
the blocks. AQLM's remedy, which works for any format whose file holds float side parameters (codebooks,
scales, statistics, outlier values), is to tune those parameters on calibration text against the float
model while the codes stay fixed. We do it for the whole model at once (knowledge distillation): the
student is the float transformers model with every quantized linear replaced by a format-specific
:class:`TunableLinear` (weight decoded from codes on the fly, so gradients reach the side parameters); the
loss is KL(float next-token distribution || student's). It targets perplexity directly.

A format plugs in with one module class per layer (decode + ``param_groups`` + ``stored``) and its
``Format.to_module`` / ``from_module`` factories; the tune pass builds the modules of every layer, whatever its
format, and calls :func:`tune_modules` once. The options (``finetune_epochs`` ...) are shared
(:func:`qcompile.formats.base.finetune_options`).

What it never changes: codes, embeddings, the LM head, the file layout; the RMSNorm weights only when
``norm_lr > 0`` (returned as float overrides for the graph's initializers of the same name).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclasses.dataclass
class FinetuneConfig:
    epochs: float = 1.0  # passes over the tuning windows (fractions allowed)
    batch_windows: int = 4  # windows per optimizer step
    lr: float = 1e-3  # Adam learning rate of each module's "main" group (values in normalized units)
    scale_lr: float = 1e-3  # Adam learning rate of each module's "scale" group (relative steps)
    norm_lr: float = 0.0  # > 0: also tune the RMSNorm weights (float parameters the compiled graph holds too)
    tunable_floats: set[str] | None = None  # if given, only norm weights named here are tuned
    seed: int = 0
    progress: bool = False
    desc: str = "finetune"
    warmup: float = 0.1  # fraction of the steps over which the learning rates ramp up from 0 (then cosine to 0)


class TunableLinear(torch.nn.Module):
    """A quantized linear whose side parameters can be tuned: ``forward`` decodes and multiplies,
    ``param_groups`` says which parameters take ``lr`` ("main") and which ``scale_lr`` ("scale"),
    ``weight()`` is the decoded ``[N, K]`` weight (tests compare it with the numpy reference)."""

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        raise NotImplementedError


def warmup_cosine(step: int, steps: int, warmup: float) -> float:
    """Learning-rate factor at ``step``: linear ramp over the first ``warmup`` of the steps, then cosine to 0.

    Why: Adam's first updates move every side parameter by about the full learning rate at once, which
    measurably raised the KL for the first steps; the decay lets the last steps settle instead of jitter."""
    ramp = max(1, int(round(warmup * steps)))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    s = F.log_softmax(student_logits.float(), -1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean()


def distill(model: torch.nn.Module, modules: Mapping[str, TunableLinear], windows: np.ndarray, cfg: FinetuneConfig,
            log: Callable[[str], None] | None = None
            ) -> tuple[dict[str, TunableLinear], dict[str, np.ndarray], dict[str, Any]]:
    """Tune ``modules`` (``{linear name in model: replacement}``) inside a copy of ``model`` on ``windows``.

    ``model`` (the float teacher) is left unchanged. Returns the tuned modules, ``{parameter name: tuned norm
    weight}`` (empty unless ``norm_lr > 0``) and a summary (KL of the first and last steps, seconds).
    """
    t0 = time.perf_counter()
    windows = np.asarray(windows, dtype=np.int64)
    teacher = model
    teacher.eval()
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(False)
    for name, mod in modules.items():
        lin = student.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear):
            raise TypeError(f"finetune: {name} is a {type(lin).__name__}, expected torch.nn.Linear")
        if tuple(mod.weight().shape) != tuple(lin.weight.shape):
            raise ValueError(f"finetune: {name} decodes to {tuple(mod.weight().shape)}, the model has "
                             f"{tuple(lin.weight.shape)}")
        set_module(student, name, mod)
    student.train(False)  # no dropout; gradients still flow
    by_role: dict[str, list[torch.nn.Parameter]] = {"main": [], "scale": []}
    for mod in modules.values():
        for role, params in mod.param_groups().items():
            by_role[role].extend(params)
    for p in (p for ps in by_role.values() for p in ps):
        p.requires_grad_(True)
    groups = [{"params": by_role["main"], "lr": cfg.lr}, {"params": by_role["scale"], "lr": cfg.scale_lr}]
    norms = {n: p for n, p in student.named_parameters()
             if cfg.norm_lr > 0 and n.endswith(".weight") and "norm" in n.split(".")[-2]
             and (cfg.tunable_floats is None or n in cfg.tunable_floats)}
    if norms:
        for p in norms.values():
            p.requires_grad_(True)
        groups.append({"params": list(norms.values()), "lr": cfg.norm_lr})
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    gen = np.random.default_rng(cfg.seed)
    bw = max(1, min(cfg.batch_windows, len(windows)))
    steps = max(1, int(math.ceil(cfg.epochs * len(windows) / bw)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, steps, cfg.warmup))
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(steps), desc=cfg.desc, unit="step", leave=False, disable=not cfg.progress)
    for step in bar:
        if len(order) < bw:
            order += list(gen.permutation(len(windows)))
        idx, order = order[:bw], order[bw:]
        ids = torch.from_numpy(windows[idx])
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        loss = kl_to_teacher(student(input_ids=ids).logits, t_logp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix_str(f"kl={losses[-1]:.4f}")
        if log is not None and (step == 0 or step == steps - 1):
            log(f"{cfg.desc} step {step + 1}/{steps}: kl {losses[-1]:.4f}")
    bar.close()
    for mod in modules.values():
        mod.requires_grad_(False)
    floats = {n: p.detach().numpy().copy() for n, p in norms.items()}
    k = max(1, len(losses) // 4)
    summary = {"steps": steps, "windows": int(len(windows)), "windows_per_step": bw, "lr": cfg.lr, "warmup": cfg.warmup,
               "scale_lr": cfg.scale_lr, "norm_lr": cfg.norm_lr, "tuned_norms": len(norms),
               "kl_first": losses[0], "kl_last_quarter_mean": float(np.mean(losses[-k:])),
               "kl_first_quarter_mean": float(np.mean(losses[:k])), "seconds": time.perf_counter() - t0}
    return dict(modules), floats, summary


#: Preset defaults: one pass over 256 windows of 256 calibration-split tokens (64 steps of 4 windows), RMSNorm
#: weights tuned too: on the default model this recovers most of what the layer-wise methods lose, for minutes
#: of CPU time (docs/results.md). ``-O finetune_epochs=0`` turns it off (the papers' layer-wise methods alone).
DEFAULT_EPOCHS, DEFAULT_WINDOWS, DEFAULT_NORM_LR = 1.0, 256, 1e-3


def tune_modules(source: Any, calib: np.ndarray, opts: dict[str, Any], progress: bool, float_names: set[str] | None,
                 modules: Mapping[str, TunableLinear], desc: str = "finetune"
                 ) -> tuple[dict[str, TunableLinear], dict[str, np.ndarray], dict[str, Any]] | None:
    """The tune pass's body: read the ``finetune_*`` options, load the float model, choose the windows and
    :func:`distill` every module of ``modules`` (``{linear name: module}``, layers of any formats) at once.
    Returns the tuned modules, the tuned norm weights and the summary; ``None`` when ``finetune_epochs`` is 0.

    Skipped (no modules returned, the reason in the summary) when the source has no transformers model (a bare
    .onnx). Norm weights are tuned only when they are in ``float_names`` (graph initializers of that name, private
    to one node), so what is tuned is exactly what the graph can hold.
    """
    epochs = float(opts.get("finetune_epochs", 0.0))
    if epochs <= 0 or not modules:
        return None
    try:
        model = source.load_model("float32")
    except Exception as e:  # noqa: BLE001 - e.g. an .onnx source: compile still succeeds, untuned
        print(f"qcompile: {desc} skipped: {e}", file=sys.stderr)
        return {}, {}, {"skipped": str(e)}
    windows = np.asarray(calib)
    extra = int(opts.get("finetune_windows", 0))
    if extra > 0:
        from qcompile import data as qdata

        windows = qdata.calibration_windows(source.load_tokenizer(), extra, int(windows.shape[1]),
                                            seed=int(opts.get("seed", 0)) + 1)
    lr = float(opts.get("finetune_lr", 1e-3))
    cfg = FinetuneConfig(epochs=epochs, batch_windows=int(opts.get("finetune_batch", 4)), lr=lr,
                         scale_lr=float(opts.get("finetune_scale_lr", lr)),
                         norm_lr=float(opts.get("finetune_norm_lr", 0.0)), seed=int(opts.get("seed", 0)),
                         tunable_floats=float_names, progress=progress, desc=desc)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("QCOMPILE_TUNE_THREADS", str(os.cpu_count() or 1))))
    try:
        return distill(model, dict(modules), windows, cfg)
    finally:
        torch.set_num_threads(threads)


__all__ = ["FinetuneConfig", "TunableLinear", "distill", "kl_to_teacher", "set_module",
           "tune_modules"]
