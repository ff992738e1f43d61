"""Numpy reference of ONNX Runtime's ``com.microsoft.MatMulNBits`` weight layout: packing, unpacking,
dequantization and the op itself (ground truth for the integer formats' packed bytes).

Codes ``uint8[N, n_blocks, block_size*bits/8]`` (first element in the low bits), one scale per (row, block),
integer zero points packed at ``bits`` per block; K that is not a multiple of the block is padded with zero
codes, exactly as MatMulNBits expects.
"""
from __future__ import annotations

import math

import numpy as np

def pack_codes(codes_nk: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """codes ``[N, K]`` (0..2^bits-1) -> uint8 ``[N, n_blocks, block_size*bits//8]``, low bits first."""
    n, k = codes_nk.shape
    nblk = math.ceil(k / block_size)
    padded = np.zeros((n, nblk * block_size), dtype=np.uint8)
    padded[:, :k] = codes_nk
    per_byte = 8 // bits
    grouped = padded.reshape(n, -1, per_byte).astype(np.uint8)
    out = np.zeros(grouped.shape[:2], dtype=np.uint8)
    for i in range(per_byte):
        out |= grouped[:, :, i] << (bits * i)
    return out.reshape(n, nblk, block_size * bits // 8)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[N, n_blocks, blob]`` -> codes ``[N, K]``."""
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(flat >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(n, -1)[:, :k]


def pack_zero_points(zeros_ng: np.ndarray, bits: int) -> np.ndarray:
    """zero points ``[N, n_blocks]`` -> uint8 ``[N * ceil(n_blocks*bits/8)]`` (MatMulNBits layout)."""
    n, nblk = zeros_ng.shape
    per_byte = 8 // bits
    cols = math.ceil(nblk / per_byte)
    padded = np.zeros((n, cols * per_byte), dtype=np.uint8)
    padded[:, :nblk] = zeros_ng
    grouped = padded.reshape(n, cols, per_byte)
    out = np.zeros((n, cols), dtype=np.uint8)
    for i in range(per_byte):
        out |= grouped[:, :, i] << (bits * i)
    return out.reshape(-1)


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, nblk: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    rows = packed.reshape(n, -1)
    parts = [(rows >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(n, -1)[:, :nblk]


def dequantize_matmulnbits(
    packed_b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, n: int, bits: int, block_size: int
) -> np.ndarray:
    """Numpy reference of MatMulNBits' weight: returns ``[K, N]`` float32."""
    nblk = math.ceil(k / block_size)
    codes = unpack_codes(packed_b, bits, nblk * block_size).astype(np.float32)
    zeros = unpack_zero_points(zero_points, bits, n, nblk).astype(np.float32)
    sc = scales.reshape(n, nblk).astype(np.float32)
    w = (codes.reshape(n, nblk, block_size) - zeros[:, :, None]) * sc[:, :, None]
    return w.reshape(n, -1)[:, :k].T.copy()


def matmulnbits_reference(x: np.ndarray, packed_b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *,
                          K: int, N: int, bits: int, block_size: int, accuracy_level: int = 0) -> np.ndarray:
    """``Y = X @ W`` with W from :func:`dequantize_matmulnbits`, accumulated in float64, returned in X's dtype
    (``accuracy_level`` selects onnxruntime's arithmetic, not the weight, so the reference ignores it)."""
    x = np.asarray(x)
    w = dequantize_matmulnbits(packed_b, scales, zero_points, K, N, bits, block_size)
    return (x.astype(np.float64) @ w.astype(np.float64)).astype(x.dtype)
