"""Numpy reference of the ops' int8 activation quantization (``accuracy_level=4``, docs/ops.md "Conventions"):
the last dim of X in blocks of 16 consecutive positions, ``s_b = max_b |x| / 127``,
``q = clip(rint(x / s_b), -127, 127)`` (float32 arithmetic, round half to even; ``s_b = 0`` gives ``q = 0``), and
the op multiplies with ``x̂ = s_b · q``. A row holding a NaN or an Inf is used unquantized."""
from __future__ import annotations

import numpy as np

#: Positions per activation scale.
BLOCK = 16
#: accuracy_level values (MatMulNBits' scale): 1 keeps fp32 arithmetic, 4 lets the CPU kernels use int8.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
INT8 = 4


def quantize_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)`` of the finite float32 rows ``x [..., K]``: int8 codes ``[..., K]`` and float32 scales
    ``[..., ceil(K/16)]`` (the last block zero padded)."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    kp = -(-k // BLOCK) * BLOCK
    xp = np.zeros((*x.shape[:-1], kp), np.float32)
    xp[..., :k] = x
    blocks = xp.reshape(*x.shape[:-1], kp // BLOCK, BLOCK)
    s = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(blocks / np.where(s > 0, s, np.float32(1))), np.float32(0))
    q = np.clip(q, -127, 127).astype(np.int8)
    return q.reshape(*x.shape[:-1], kp)[..., :k], s[..., 0]


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """``x̂`` (float32, same shape) the ops multiply with at ``accuracy_level=4``; non-finite rows unchanged."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    q, s = quantize_blocks(flat)
    xhat = (np.repeat(s, BLOCK, axis=-1)[:, :k] * q.astype(np.float32)).astype(np.float32)
    finite = np.isfinite(flat).all(axis=-1)
    return np.where(finite[:, None], xhat, flat).reshape(x.shape)


def quantization_error_bound(x_rows: np.ndarray, w_abs: np.ndarray) -> np.ndarray:
    """``[M, N]`` bound on ``|X̂ @ W - X @ W|`` for ``x_rows [M, K]`` and ``w_abs = |W| [K, N]``: each x̂ is
    off by at most half its block's step ``s_b``, so an output by ``Σ_b s_b / 2 · Σ_{k∈b} |W[k, n]|``."""
    x = np.asarray(x_rows, np.float32)
    k = x.shape[-1]
    _, s = quantize_blocks(x)
    half_step = np.repeat(s.astype(np.float64) / 2, BLOCK, axis=-1)[:, :k]
    return half_step @ np.asarray(w_abs, np.float64)
