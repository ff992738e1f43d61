"""Block-wise Hadamard rotations in torch, for fusing a rotation into weights (MR-GPTQ).

Conventions (see docs/ops.md, FP4MatMul): a linear layer computes ``y = x @ Wᵀ`` with ``W[N, K]`` in the
torch layout. ``R = blockdiag(H_b, ..., H_b)`` (``K/b`` blocks) with ``H_b`` the *normalized* Sylvester
Hadamard matrix, which is symmetric and orthogonal, so ``R = Rᵀ = R⁻¹``. Then

* the op rotates activations online: ``x_rot = x @ R`` (each contiguous block of ``b`` features times H_b);
* the file stores ``W_rot = W @ R`` (each block of ``b`` input columns of every row times H_b);
* ``x_rot @ W_rotᵀ = x R Rᵀ Wᵀ = x @ Wᵀ``: the rotation is exact in real arithmetic;
* the calibration Hessian of the rotated inputs is ``H_rot = X_rotᵀ X_rot = Rᵀ H R`` (= ``R H R``).

Quantizing ``W_rot`` spreads an outlier input channel over its whole block, which is what makes small
power-of-two-scaled FP4 groups behave (MR-GPTQ).
"""
from __future__ import annotations

import torch

from qcompile.errors import FormatError


def is_power_of_two(b: int) -> bool:
    return b >= 1 and (b & (b - 1)) == 0


def hadamard_matrix(b: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard ``H_b / sqrt(b)`` (``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``)."""
    if not is_power_of_two(b):
        raise FormatError(f"Hadamard block size must be a power of two, got {b}")
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / h.shape[0] ** 0.5).to(dtype=dtype, device=device)


def effective_block(k: int, b: int) -> int:
    """The rotation block actually used for ``K = k``: ``b`` when it divides ``k``, else the largest power of
    two that divides both (the op requires ``b | K``); ``0`` (no rotation) when that would be 1."""
    if b == 0:
        return 0
    if not is_power_of_two(b):
        raise FormatError(f"hadamard_block must be a power of two, got {b}")
    low = k & -k  # largest power of two dividing k
    eff = min(b, low)
    return eff if eff >= 2 else 0


def rotate_last_dim(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x @ R``: each contiguous block of ``b`` entries along the last dim times ``H_b`` (b must divide it)."""
    if b == 0:
        return x
    k = x.shape[-1]
    if k % b:
        raise FormatError(f"Hadamard block {b} does not divide the dimension {k}")
    hb = hadamard_matrix(b, dtype=x.dtype, device=x.device)
    return (x.reshape(*x.shape[:-1], k // b, b) @ hb).reshape(x.shape)


def rotate_weight(w_nk: torch.Tensor, b: int) -> torch.Tensor:
    """``W @ R`` for a torch-layout weight ``[N, K]``: what FP4MatMul stores."""
    return rotate_last_dim(w_nk, b)


def unrotate_weight(w_rot_nk: torch.Tensor, b: int) -> torch.Tensor:
    """``W_rot @ Rᵀ``: back to the weight the float model would use (R is its own inverse)."""
    return rotate_last_dim(w_rot_nk, b)


def rotate_hessian(h: torch.Tensor, b: int) -> torch.Tensor:
    """``Rᵀ H R``: the Hessian ``XᵀX`` of the rotated inputs ``X R``."""
    if b == 0:
        return h
    return rotate_last_dim(rotate_last_dim(h, b).transpose(0, 1), b).transpose(0, 1).contiguous()
