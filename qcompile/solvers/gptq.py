"""GPTQ (Frantar et al.) with a pluggable quantization grid, plus RTN over the same grid.

Conventions: here weights are in the *torch* layout ``[N, K]`` (rows = output channels, columns = input
features), because GPTQ walks input columns. Formats transpose from/to the ONNX ``[K, N]`` layout.

A :class:`Grid` decides what one group of columns may look like:
``fit(w[N, g]) -> params`` computes per-row statistics for a group; ``quantize(col[N], params, j)``
rounds column ``j`` of that group and returns ``(dequantized[N], codes[N])``. Integer, FP4 and SpQR grids
all plug into the same loop; groups that do not divide K simply make the last group shorter.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import torch


class Grid(Protocol):
    def fit(self, w: torch.Tensor) -> Any:
        """Statistics for one group of columns ``w[N, g]`` (e.g. per-row scale and zero)."""

    def quantize(self, col: torch.Tensor, params: Any, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round column ``j`` of the group: returns ``(dequantized[N] float, codes[N] int)``."""


@dataclasses.dataclass
class QuantResult:
    """Outcome of RTN/GPTQ over one weight, in original column order."""

    dequantized: torch.Tensor  # [N, K] float32
    codes: torch.Tensor  # [N, K] int
    group_params: list[Any]  # one entry per group of ``group_size`` columns, in K order
    group_size: int


def _num_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


def rtn(weight: torch.Tensor, grid: Grid, group_size: int) -> QuantResult:
    """Round-to-nearest, group by group: the baseline every other method is compared with."""
    w = weight.float()
    n, k = w.shape
    deq = torch.empty_like(w)
    codes = torch.empty((n, k), dtype=torch.int32)
    params: list[Any] = []
    for g in range(_num_groups(k, group_size)):
        lo, hi = g * group_size, min(k, (g + 1) * group_size)
        p = grid.fit(w[:, lo:hi])
        params.append(p)
        for j in range(hi - lo):
            d, c = grid.quantize(w[:, lo + j], p, j)
            deq[:, lo + j] = d
            codes[:, lo + j] = c.to(torch.int32)
    return QuantResult(deq, codes, params, group_size)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after damping; retries with more damping if H is not PD."""
    k = h.shape[0]
    mean_diag = torch.mean(torch.diag(h)).item()
    scale = damp
    for _ in range(6):
        hd = h.clone()
        hd.diagonal().add_(scale * mean_diag + 1e-10)
        try:
            chol = torch.linalg.cholesky(hd)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:
            scale *= 10
    raise RuntimeError(f"Hessian of size {k} is not positive definite even with damping {scale}")


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    group_size: int,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> QuantResult:
    """GPTQ with lazy-batched blocks, damping and optional act-order.

    With act-order, group statistics are fitted once on the original weight before the sweep
    ("static groups"), so groups stay contiguous in K and runtimes need no group index.
    """
    w = weight.detach().clone().float()
    n, k = w.shape
    h = hessian.detach().clone().to(w.device, torch.float32)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    ngroups = _num_groups(k, group_size)
    params: list[Any] = [None] * ngroups
    if act_order:
        for g in range(ngroups):
            params[g] = grid.fit(w[:, g * group_size : min(k, (g + 1) * group_size)])
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, damp)

    # Block boundaries are multiples of group_size when not permuting, so every group fits in one block.
    if not act_order:
        block_size = max(group_size, (block_size // group_size) * group_size)
    q_perm = torch.zeros_like(w)
    codes_perm = torch.zeros((n, k), dtype=torch.int32, device=w.device)
    perm_list = perm.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm_list[i1 + i]
            g, j = divmod(col, group_size)
            if params[g] is None:  # no act-order: the group starts here and lies inside this block
                params[g] = grid.fit(w1[:, i : i + min(group_size, k - col)])
            d = hinv1[i, i]
            q, c = grid.quantize(w1[:, i], params[g], j)
            q_perm[:, i1 + i] = q
            codes_perm[:, i1 + i] = c.to(torch.int32)
            e = (w1[:, i] - q) / d
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return QuantResult(q_perm[:, inv].cpu(), codes_perm[:, inv].cpu(), params, group_size)


def hessian_weighted_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W−Ŵ) H (W−Ŵ)ᵀ): the layer-output squared error the calibration data would see."""
    d = (weight.double() - approx.double())
    return float(torch.sum((d @ hessian.double()) * d))


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Output error relative to the output energy: tr(ΔHΔᵀ)/tr(WHWᵀ)."""
    num = hessian_weighted_error(weight, approx, hessian)
    den = float(torch.sum((weight.double() @ hessian.double()) * weight.double()))
    return num / max(den, 1e-30)
