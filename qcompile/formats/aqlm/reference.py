"""Numpy reference for ``qcompile.CodebookMatMul`` (see docs/ops.md): validation, dequantization, the op.

Ground truth for the native kernels and the portable lowering, so it favours obviously-correct code:

* codes ``[N, K/d, M]`` (uint8 when ``codebook_size <= 256``, else uint16), codebooks ``[M, codebook_size, d]``
  (float16), scales ``[N]`` (float16 or float32);
* ``W[n, g*d + j] = scales[n] * Σ_m codebooks[m, codes[n, g, m], j]`` (computed in float32);
* ``Y = X @ Wᵀ (+ bias)`` over the last dimension of X, accumulated in float32, returned in X's dtype.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ACTIVATION_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MAX_CODEBOOK_SIZE = 65536


def code_dtype(codebook_size: int) -> np.dtype:
    """The dtype the op requires for codes: uint8 up to 256 codewords, uint16 up to 65536."""
    if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size must be in 1..{MAX_CODEBOOK_SIZE}, got {codebook_size}")
    return np.dtype(np.uint8) if codebook_size <= 256 else np.dtype(np.uint16)


def validate_attributes(k: int, n: int, num_codebooks: int, codebook_size: int, in_group_size: int) -> None:
    if k <= 0 or n <= 0:
        raise ValueError(f"K and N must be positive, got K={k}, N={n}")
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
    code_dtype(codebook_size)
    if in_group_size < 1:
        raise ValueError(f"in_group_size must be >= 1, got {in_group_size}")
    if k % in_group_size:
        raise ValueError(f"K={k} must be a multiple of in_group_size={in_group_size}")


def validate(x_shape: tuple[int, ...] | None, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
             bias: np.ndarray | None, *, K: int, N: int, num_codebooks: int, codebook_size: int,
             in_group_size: int, x_dtype: Any = np.float32) -> None:
    """Everything the kernels check, with the same wording; raises ValueError naming the problem."""
    validate_attributes(K, N, num_codebooks, codebook_size, in_group_size)
    g = K // in_group_size
    if x_shape is not None:
        if len(x_shape) < 1 or x_shape[-1] != K:
            raise ValueError(f"X last dimension must be K={K}, got shape {tuple(x_shape)}")
        if np.dtype(x_dtype) not in ACTIVATION_DTYPES:
            raise ValueError(f"X dtype must be float32 or float16, got {np.dtype(x_dtype)}")
    want = code_dtype(codebook_size)
    if codes.dtype != want:
        raise ValueError(f"codes must be {want} for codebook_size={codebook_size}, got {codes.dtype}")
    if codes.shape != (N, g, num_codebooks):
        raise ValueError(f"codes shape must be [N, K/in_group_size, num_codebooks]={[N, g, num_codebooks]}, "
                         f"got {list(codes.shape)}")
    if codebooks.dtype != np.float16:
        raise ValueError(f"codebooks must be float16, got {codebooks.dtype}")
    if codebooks.shape != (num_codebooks, codebook_size, in_group_size):
        raise ValueError(f"codebooks shape must be [num_codebooks, codebook_size, in_group_size]="
                         f"{[num_codebooks, codebook_size, in_group_size]}, got {list(codebooks.shape)}")
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be float16 or float32, got {scales.dtype}")
    if scales.shape != (N,):
        raise ValueError(f"scales shape must be [N]=[{N}], got {list(scales.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias shape must be [N]=[{N}], got {list(bias.shape)}")
    if codes.size and int(codes.max()) >= codebook_size:
        bad = np.argwhere(codes >= codebook_size)[0]
        raise ValueError(f"code {int(codes[tuple(bad)])} at {tuple(int(i) for i in bad)} is out of range "
                         f"for codebook_size={codebook_size}")


def dequantize(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[N, G, M]`` codes -> ``[N, G*d]`` float32 weight (torch layout: rows are outputs)."""
    n, g, m = codes.shape
    d = codebooks.shape[-1]
    cb = codebooks.astype(np.float32)
    w = np.zeros((n, g, d), dtype=np.float32)
    for j in range(m):
        w += cb[j][codes[:, :, j].astype(np.intp)]
    return w.reshape(n, g * d) * scales.astype(np.float32)[:, None]


def codebook_matmul(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
                    bias: np.ndarray | None = None, *, K: int, N: int, num_codebooks: int, codebook_size: int,
                    in_group_size: int, accuracy_level: int = 0) -> np.ndarray:
    """The op: validates, then ``Y = X @ Wᵀ + bias`` in float32, returned in X's dtype.

    ``accuracy_level`` does not change the result: level 4 lets the CPU kernel's batch-1 walk round its table to
    int8 (:func:`lut_int8_matmul` is that computation), any kernel may compute exactly as here."""
    x = np.asarray(x)
    validate(x.shape, codes, codebooks, scales, bias, K=K, N=N, num_codebooks=num_codebooks,
             codebook_size=codebook_size, in_group_size=in_group_size, x_dtype=x.dtype)
    w = dequantize(codes, codebooks, scales)
    y = x.astype(np.float32).reshape(-1, K) @ w.T
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.reshape(*x.shape[:-1], N).astype(x.dtype)


# The CPU kernel's fixed-point batch-1 walk (docs/ops.md, "Computation"): per slice of this many
# consecutive (group, codebook) tables, entries are rounded to multiples of the slice's max |entry| / LUT_I16_MAX.
LUT_SLICE_TABLES = 16
LUT_I16_MAX = 16383


def lut_fixed_point_error_bound(x_row: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[N]`` bound on |Y - reference| that rounding the one-row lookup table to fixed point may add.

    The table ``lut[g, m, s] = x[g*d:(g+1)*d] . codebooks[m, s]`` is split into slices of 16 consecutive
    ``(g, m)`` tables (the last ``G*M mod 16`` tables stay fp32); each entry is off by at most half its
    slice's step ``max|entry| / 16383``, so each output by at most ``|scales[n]| * Σ_slices 8 * step``.
    """
    m, s, d = codebooks.shape
    x = np.asarray(x_row, dtype=np.float64).reshape(-1, d)  # [G, d]
    lut = np.einsum("gj,msj->gms", x, codebooks.astype(np.float64)).reshape(-1, s)  # [(g, m), s]
    full = lut.shape[0] // LUT_SLICE_TABLES * LUT_SLICE_TABLES
    step = np.abs(lut[:full]).reshape(-1, LUT_SLICE_TABLES * s).max(axis=1) / LUT_I16_MAX
    per_entry = LUT_SLICE_TABLES / 2 * step.sum()
    return np.abs(scales.astype(np.float64)) * per_entry


#: accuracy_level 4: the batch-1 walk's table in int8. Per slice of LUT_SLICE_TABLES tables with largest |entry|
#: m, table t's step is m / (127 * 2^e_t), e_t the largest of 0..LUT_I8_FINER with 2^e_t * max_t <= m.
LUT_I8_MAX = 127
LUT_I8_FINER = 4


def lut_tables(x_row: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """``[G*M, S]`` float32: ``lut[g*M + m, s] = x[g*d:(g+1)*d] . codebooks[m, s]`` (the kernel sums in float32
    with FMAs; this sums in float64 and rounds once, so entries may differ from the kernel's in the last bit)."""
    m, s, d = codebooks.shape
    x = np.asarray(x_row, dtype=np.float64).reshape(-1, d)
    return np.einsum("gj,msj->gms", x, codebooks.astype(np.float64)).reshape(-1, s).astype(np.float32)


def lut_int8_steps(lut: np.ndarray) -> np.ndarray:
    """``[T16]`` float64: each whole slice's table's step (the last ``T mod 16`` tables stay float32)."""
    full = lut.shape[0] // LUT_SLICE_TABLES * LUT_SLICE_TABLES
    tmax = np.abs(lut[:full]).max(axis=1).reshape(-1, LUT_SLICE_TABLES).astype(np.float32)  # [slices, 16]
    m = tmax.max(axis=1, keepdims=True)
    e = np.zeros_like(tmax, dtype=np.int64)
    for _ in range(LUT_I8_FINER):
        e += (m > 0) & (e < LUT_I8_FINER) & (tmax * np.float32(2.0) ** (e + 1) <= m)
    return (m.astype(np.float64) / (LUT_I8_MAX * 2.0 ** e)).reshape(-1), e.reshape(-1)


def lut_int8_matmul(x_row: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
                    bias: np.ndarray | None = None) -> np.ndarray:
    """``[N]`` float32: one row of the op as the accuracy_level 4 batch-1 walk computes it: each table of a
    whole slice rounded to multiples of its step (:func:`lut_int8_steps`; ``rint(entry * (127 * 2^e / m))``
    in float32), the last ``G*M mod 16`` tables kept float32, then
    ``scales[n] * Σ_t lut[t, codes[n, t]] (+ bias)``."""
    lut = lut_tables(x_row, codebooks)
    t_all = lut.shape[0]
    full = t_all // LUT_SLICE_TABLES * LUT_SLICE_TABLES
    step, e = lut_int8_steps(lut)
    m = np.abs(lut[:full]).reshape(-1, LUT_SLICE_TABLES * lut.shape[1]).max(axis=1).astype(np.float32)
    inv = np.where(np.repeat(m, LUT_SLICE_TABLES) > 0,
                   (np.float32(LUT_I8_MAX) * np.float32(2.0) ** e.astype(np.float32))
                   / np.where(np.repeat(m, LUT_SLICE_TABLES) > 0, np.repeat(m, LUT_SLICE_TABLES), 1),
                   0).astype(np.float32)
    q = lut.astype(np.float64).copy()
    q[:full] = np.rint(lut[:full] * inv[:, None]).astype(np.float64) * step[:, None]
    n = codes.shape[0]
    flat = codes.reshape(n, -1).astype(np.intp)
    y = q[np.arange(t_all)[None, :], flat].sum(axis=1) * scales.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(np.float32)


def lut_int8_error_bound(x_row: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[N]`` bound on |Y - reference| of the int8 table: ``|scales[n]| · Σ_t step_t / 2`` (whole slices)."""
    step, _ = lut_int8_steps(lut_tables(x_row, codebooks))
    return np.abs(scales.astype(np.float64)) * (step.sum() / 2)
