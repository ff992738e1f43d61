"""End-to-end fine-tuning of AQLM codebooks and scales (codes fixed) against the float model.

Why: layer-by-layer AQLM minimises each linear's own output error, but at 2 bits those errors compound
through 30 blocks. AQLM's remedy is to tune the continuous parameters (codebooks, per-channel scales) on
calibration data against the float model while the discrete codes stay fixed. We do it for the whole
model at once (knowledge distillation): the student is the float transformers model with every quantized
linear replaced by a :class:`CodebookLinear` (weight decoded from codes on the fly, so gradients reach the
codebooks and scales); the loss is KL(float next-token distribution || student's) on the calibration
windows. On a 135M model this costs about as much as a few forward+backward passes over the calibration
set, and it targets perplexity directly rather than a per-block proxy.

What it does not change: codes, embeddings, the LM head, the file layout; the RMSNorm weights only when
``norm_lr > 0`` (they are then returned as float overrides for the graph's initializers of the same name).
Codebooks and scales are rounded to fp16 by the caller, exactly as the op stores them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclasses.dataclass
class FinetuneConfig:
    epochs: float = 1.0  # passes over the calibration windows (fractions allowed)
    batch_windows: int = 4  # windows per optimizer step
    lr: float = 1e-3  # Adam learning rate of the codebook entries (normalized weights, magnitude ~1)
    scale_lr: float = 1e-3  # Adam learning rate of the log scales (a relative step per channel)
    norm_lr: float = 0.0  # > 0: also tune the RMSNorm weights (float parameters the compiled graph holds too)
    tunable_floats: set[str] | None = None  # if given, only norm weights named here are tuned
    seed: int = 0
    progress: bool = False


class CodebookLinear(torch.nn.Module):
    """``y = x Wᵀ (+ b)`` with ``W[n, g*d:(g+1)*d] = exp(log_s[n]) * Σ_m C[m, codes[n, g, m]]``.

    Scales are trained in log space so the step is relative to each channel's magnitude.
    """

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        n, g, m = codes.shape
        m2, size, d = codebooks.shape
        offsets = torch.arange(m, dtype=torch.long) * size
        self.register_buffer("index", codes.long() + offsets, persistent=False)  # rows of the flat codebook
        self.codebooks = torch.nn.Parameter(codebooks.detach().float().reshape(m * size, d).clone())
        sign = torch.where(scales < 0, -1.0, 1.0)
        self.register_buffer("sign", sign.float(), persistent=False)
        self.log_scales = torch.nn.Parameter(scales.detach().float().abs().clamp(min=1e-12).log().clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.shape = (m, size, d)

    def scales(self) -> torch.Tensor:
        return self.sign * self.log_scales.exp()

    def weight(self) -> torch.Tensor:
        n, g, _ = self.index.shape
        w = F.embedding(self.index, self.codebooks).sum(2)  # [N, G, d]
        return w.reshape(n, -1) * self.scales()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """(codebooks [M, 2^B, d], scales [N]) as float32 arrays (rounded to fp16 by the caller)."""
        return (self.codebooks.detach().reshape(self.shape).numpy().copy(), self.scales().detach().numpy().copy())


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    s = F.log_softmax(student_logits.float(), -1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean()


def finetune_codebooks(model: torch.nn.Module, layers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                       windows: np.ndarray, cfg: FinetuneConfig,
                       log: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray], dict[str, Any]]:
    """Tune ``layers`` = ``{module name: (codes [N,G,M], codebooks [M,2^B,d], scales [N])}`` of ``model``.

    ``model`` is the float transformers causal LM (left unchanged: the student is a deep copy). Returns
    ``{name: (codebooks, scales)}`` as float32 (round to fp16 before storing), ``{parameter name: tuned
    norm weight}`` (empty unless ``norm_lr > 0``) and a summary dict (KL of the first/last steps, seconds).
    """
    t0 = time.perf_counter()
    windows = np.asarray(windows, dtype=np.int64)
    teacher = model
    teacher.eval()
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(False)
    mods: dict[str, CodebookLinear] = {}
    for name, (codes, books, scales) in layers.items():
        lin = student.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear):
            raise TypeError(f"finetune: {name} is a {type(lin).__name__}, expected torch.nn.Linear")
        cl = CodebookLinear(torch.from_numpy(np.asarray(codes).astype(np.int64)), torch.from_numpy(books.astype(np.float32)),
                            torch.from_numpy(scales.astype(np.float32)), lin.bias)
        if tuple(cl.weight().shape) != tuple(lin.weight.shape):
            raise ValueError(f"finetune: {name} decodes to {tuple(cl.weight().shape)}, the model has {tuple(lin.weight.shape)}")
        _set_module(student, name, cl)
        mods[name] = cl
    student.train(False)  # no dropout; gradients still flow
    groups = [{"params": [m.codebooks for m in mods.values()], "lr": cfg.lr},
              {"params": [m.log_scales for m in mods.values()], "lr": cfg.scale_lr}]
    norms = {n: p for n, p in student.named_parameters()
             if cfg.norm_lr > 0 and n.endswith(".weight") and "norm" in n.split(".")[-2]
             and (cfg.tunable_floats is None or n in cfg.tunable_floats)}
    if norms:
        for p in norms.values():
            p.requires_grad_(True)
        groups.append({"params": list(norms.values()), "lr": cfg.norm_lr})
    opt = torch.optim.Adam(groups)
    gen = np.random.default_rng(cfg.seed)
    bw = max(1, min(cfg.batch_windows, len(windows)))
    steps = max(1, int(math.ceil(cfg.epochs * len(windows) / bw)))
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(steps), desc="aqlm finetune", unit="step", leave=False, disable=not cfg.progress)
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
        losses.append(float(loss.detach()))
        bar.set_postfix_str(f"kl={losses[-1]:.4f}")
        if log is not None and (step == 0 or step == steps - 1):
            log(f"aqlm finetune step {step + 1}/{steps}: kl {losses[-1]:.4f}")
    bar.close()
    out = {name: m.stored() for name, m in mods.items()}
    floats = {n: p.detach().numpy().copy() for n, p in norms.items()}
    k = max(1, len(losses) // 4)
    summary = {"steps": steps, "windows_per_step": bw, "lr": cfg.lr, "scale_lr": cfg.scale_lr,
               "norm_lr": cfg.norm_lr, "tuned_norms": len(norms),
               "kl_first": losses[0], "kl_last_quarter_mean": float(np.mean(losses[-k:])),
               "kl_first_quarter_mean": float(np.mean(losses[:k])), "seconds": time.perf_counter() - t0}
    return out, floats, summary


__all__ = ["FinetuneConfig", "CodebookLinear", "finetune_codebooks", "kl_to_teacher"]
