"""How much a layer's quantization error costs the whole model: an estimate of the KL divergence from the float
model's next-token distribution, per layer and setting, that adds over layers.

Why not the layer's own output error: ``tr(ΔW H ΔWᵀ)`` (H = the layer's input second moment) measures the error
where the layer writes it, but the same error costs the model very differently in different layers (on the
default model a 4-bit v_proj in 3-bit SpQR bought ten times more perplexity per bit than any other layer type).
What converts it into the model's loss is how strongly the output reacts to each output channel.

The estimate is the second-order expansion of the KL in the weight, with the Fisher information in place of
the Hessian (exact for a KL at its minimum) and the usual Kronecker factorisation of a linear layer's block
(inputs independent of output gradients, positions independent, output channels uncorrelated)::

    KL(float ‖ quantized) ≈ ½ Σ_n f_n · ΔW_n H ΔW_nᵀ,   f_n = mean over tokens of (∂ log p(y) / ∂ out_n)²

with ``y`` sampled from the float model's own next-token distribution (so ``f`` is the Fisher's, not the
empirical Fisher's), ``ΔW_n`` the error of output row n and ``H = mean x xᵀ`` the calibration Hessian the
quantizers use. One backward pass over a few calibration windows gives ``f`` for every layer at once; each
candidate's damage is then one ``[K, K] x [K, N]`` product. Summing over layers assumes their errors act
independently (the first-order additivity that mixed-precision allocators such as HAWQ and Q-Palette rely on).
How well it ranks single-layer damage against the measured KL is in docs/results.md.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def _sample_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])


def output_fisher(model: torch.nn.Module, names: Iterable[str], windows: np.ndarray, *, batch: int = 2, seed: int = 0,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """``{linear name: f [N]}``: each output channel's mean squared gradient of the log-likelihood of labels sampled
    from ``model`` itself, over every token of ``windows`` (``[n, seq]`` token ids). ``model`` is left unchanged."""
    names = list(names)
    acc = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    handles = []

    def hook(name: str):
        def backward(g: torch.Tensor) -> None:
            acc[name].add_(g.detach().double().pow(2).sum(dim=tuple(range(g.dim() - 1))))

        def forward(_mod, _inp, out):
            out.register_hook(backward)
        return forward

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
    gen = torch.Generator().manual_seed(seed)
    windows = np.asarray(windows, dtype=np.int64)
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = 0
    try:
        for i in tqdm(range(0, len(windows), batch), desc="sensitivity", unit="batch", leave=False, disable=not progress):
            ids = torch.from_numpy(windows[i:i + batch])
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # so the graph reaches the linears
            logits = model(inputs_embeds=embeds).logits
            labels = _sample_labels(logits, gen)
            logp = F.log_softmax(logits.float(), -1).gather(-1, labels[..., None])
            logp.sum().backward()
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    return {n: (a / max(tokens, 1)).float() for n, a in acc.items()}


def row_errors(weight_kn: np.ndarray, approx_kn: np.ndarray, hessian: torch.Tensor) -> torch.Tensor:
    """``[N]``: each output row's error ``ΔW_n H ΔW_nᵀ`` for a ``[K, N]`` weight and its quantized version (one
    float32 product, summed in float64)."""
    delta = torch.from_numpy(np.asarray(approx_kn, dtype=np.float32) - np.asarray(weight_kn, dtype=np.float32))
    return ((hessian.float() @ delta).double() * delta.double()).sum(0)


def damage_of_rows(rows: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """½ Σ_n f_n · rows_n (``fisher`` None: every f_n = 1, i.e. half the layer's own output error)."""
    return 0.5 * float(rows.sum() if fisher is None else (fisher.double() * rows).sum())


def damage(weight_kn: np.ndarray, approx_kn: np.ndarray, hessian: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """½ Σ_n f_n ΔW_n H ΔW_nᵀ for a ``[K, N]`` weight and its quantized version (``fisher`` None: every f_n = 1,
    i.e. half the layer's own output error)."""
    return damage_of_rows(row_errors(weight_kn, approx_kn, hessian), fisher)
