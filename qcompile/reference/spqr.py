"""Numpy reference for ``qcompile.SpQRMatMul`` (see docs/ops.md): storage layout, validator and op.

This module is the ground truth the native kernels and the SpQR numerics (``qcompile/spqr.py``) share:
it defines how the packed tensors are laid out, what they mean, and which files are malformed. It favours
obviously-correct code over speed.

Meaning (``p`` is a *stored* position along K; with a permutation, stored position ``p`` holds input
feature ``perm[p]``; without one, ``perm[p] = p``)::

    g = p // group_size,  rb = n // stat_group
    ss, sm, zs, zm = stat_params[rb, g, :]          (float16 -> float32)
    scale = sc[n, g] * ss + sm,  zero = zc[n, g] * zs + zm        (float32, sc/zc the stat codes)
    W[perm[p], n] = scale * (code[n, p] - zero)                  (dense part, ONNX [K, N] layout)
    W[col_indices[o], n] += values[o]   for o in row_offsets[n] .. row_offsets[n+1]-1
    Y = X @ W (+ bias)

Outlier values ADD to the dense value at their position (the kernel then never has to decode the dense
code under an outlier), and their column index names the ORIGINAL input feature (so outliers do not
depend on the permutation).

Layouts (all little-endian bit order, "bit 0" = least significant):

* ``codes`` int32 ``[N, ceil(K/32) * bits]``: each row is cut into chunks of 32 stored positions; chunk
  ``c`` owns words ``[c*bits, (c+1)*bits)``. For ``bits=4`` position ``32c+i`` sits in word
  ``c*4 + i//8`` at bits ``4*(i%8)``. For ``bits=3`` the chunk is bit-planed so it decodes with fixed
  shifts: word ``c*3`` holds the low 2 bits of positions ``i=0..15`` at bits ``2i``, word ``c*3+1``
  the low 2 bits of ``i=16..31`` at bits ``2(i-16)``, word ``c*3+2`` the high bit of position ``i``
  at bit ``i``. Positions ``>= K`` hold code 0.
* ``stat_codes`` int32 ``[N, ceil(G/P)]``, ``G = ceil(K/group_size)``, ``P = 32 // (2*stat_bits)``:
  group ``g`` of row ``n`` sits in word ``g // P`` at bit offset ``o = 2*stat_bits*(g % P)``: the
  scale code in bits ``[o, o+stat_bits)``, the zero code in ``[o+stat_bits, o+2*stat_bits)``.
* ``stat_params`` float16 ``[ceil(N/stat_group), G, 4]``: ``(scale_step, scale_min, zero_step,
  zero_min)`` for row block ``rb`` and group ``g``.
* ``row_offsets`` int32 ``[N+1]``, ``col_indices`` int16 or int32 ``[nnz]``, ``values`` float16
  ``[nnz]``: CSR over output rows.
* ``perm`` int32 ``[K]`` (optional), ``bias`` ``[N]`` in the activation type (optional).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

CHUNK = 32  # stored positions per packing chunk
BITS = (3, 4)
MAX_STAT_BITS = 8


class SpQRLayoutError(ValueError):
    """A packed SpQR weight that breaks the op contract (the native op answers with an ORT error)."""


# ---- sizes --------------------------------------------------------------------------------------


def num_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


def stats_per_word(stat_bits: int) -> int:
    return 32 // (2 * stat_bits)


def code_words(k: int, bits: int) -> int:
    return math.ceil(k / CHUNK) * bits


def stat_words(k: int, group_size: int, stat_bits: int) -> int:
    return math.ceil(num_groups(k, group_size) / stats_per_word(stat_bits))


def row_blocks(n: int, stat_group: int) -> int:
    return math.ceil(n / stat_group)


# ---- packing ------------------------------------------------------------------------------------


def _as_i32(u: np.ndarray) -> np.ndarray:
    return u.astype(np.uint32).view(np.int32)


def pack_codes(codes_np: np.ndarray, bits: int) -> np.ndarray:
    """codes ``[N, K]`` (0..2^bits-1, stored order) -> int32 ``[N, ceil(K/32)*bits]``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    c = np.asarray(codes_np).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    n, k = c.shape
    nch = math.ceil(k / CHUNK)
    pad = np.zeros((n, nch * CHUNK), dtype=np.uint64)
    pad[:, :k] = c
    ch = pad.reshape(n, nch, CHUNK)
    out = np.zeros((n, nch, bits), dtype=np.uint64)
    if bits == 4:
        for i in range(CHUNK):
            out[:, :, i // 8] |= ch[:, :, i] << np.uint64(4 * (i % 8))
    else:
        for i in range(CHUNK):
            low, high = ch[:, :, i] & np.uint64(3), ch[:, :, i] >> np.uint64(2)
            out[:, :, i // 16] |= low << np.uint64(2 * (i % 16))
            out[:, :, 2] |= high << np.uint64(i)
    return _as_i32(out.reshape(n, nch * bits))


def unpack_codes(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int32 ``[N, ceil(K/32)*bits]`` -> uint8 codes ``[N, K]``."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    n = w.shape[0]
    nch = w.shape[1] // bits
    ch = w.reshape(n, nch, bits)
    out = np.zeros((n, nch, CHUNK), dtype=np.uint64)
    for i in range(CHUNK):
        if bits == 4:
            out[:, :, i] = (ch[:, :, i // 8] >> np.uint64(4 * (i % 8))) & np.uint64(15)
        else:
            low = (ch[:, :, i // 16] >> np.uint64(2 * (i % 16))) & np.uint64(3)
            high = (ch[:, :, 2] >> np.uint64(i)) & np.uint64(1)
            out[:, :, i] = low | (high << np.uint64(2))
    return out.reshape(n, nch * CHUNK)[:, :k].astype(np.uint8)


def pack_stat_codes(scale_codes: np.ndarray, zero_codes: np.ndarray, stat_bits: int) -> np.ndarray:
    """scale/zero codes ``[N, G]`` -> int32 ``[N, ceil(G/P)]`` (see module docstring)."""
    sc = np.asarray(scale_codes).astype(np.int64)
    zc = np.asarray(zero_codes).astype(np.int64)
    top = 1 << stat_bits
    for name, a in (("scale", sc), ("zero", zc)):
        if a.size and (a.min() < 0 or a.max() >= top):
            raise ValueError(f"{name} codes out of range for {stat_bits} bits")
    n, g = sc.shape
    per = stats_per_word(stat_bits)
    nw = math.ceil(g / per)
    out = np.zeros((n, nw), dtype=np.uint64)
    for j in range(g):
        off = 2 * stat_bits * (j % per)
        out[:, j // per] |= (sc[:, j].astype(np.uint64) << np.uint64(off)) | (
            zc[:, j].astype(np.uint64) << np.uint64(off + stat_bits))
    return _as_i32(out)


def unpack_stat_codes(words: np.ndarray, stat_bits: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_stat_codes`: returns ``(scale_codes, zero_codes)`` uint8 ``[N, G]``."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    per = stats_per_word(stat_bits)
    mask = np.uint64((1 << stat_bits) - 1)
    sc = np.zeros((w.shape[0], groups), dtype=np.uint8)
    zc = np.zeros_like(sc)
    for j in range(groups):
        off = 2 * stat_bits * (j % per)
        sc[:, j] = (w[:, j // per] >> np.uint64(off)) & mask
        zc[:, j] = (w[:, j // per] >> np.uint64(off + stat_bits)) & mask
    return sc, zc


# ---- validation ---------------------------------------------------------------------------------


def _shape(a: Any) -> tuple[int, ...] | None:
    return None if a is None else tuple(np.shape(a))


def validate_attributes(*, K: int, N: int, bits: int, group_size: int, stat_bits: int, stat_group: int) -> None:
    if K <= 0 or N <= 0:
        raise SpQRLayoutError(f"K and N must be positive, got K={K} N={N}")
    if bits not in BITS:
        raise SpQRLayoutError(f"bits must be 3 or 4, got {bits}")
    if group_size <= 0 or group_size % 16:
        raise SpQRLayoutError(f"group_size must be a positive multiple of 16, got {group_size}")
    if not 1 <= stat_bits <= MAX_STAT_BITS:
        raise SpQRLayoutError(f"stat_bits must be in 1..{MAX_STAT_BITS}, got {stat_bits}")
    if stat_group <= 0:
        raise SpQRLayoutError(f"stat_group must be positive, got {stat_group}")


def validate_csr(row_offsets: np.ndarray, col_indices: np.ndarray, values: np.ndarray, *, K: int, N: int) -> None:
    """The CSR rules every SpQR outlier table obeys (the native op checks the same list)."""
    ro = np.asarray(row_offsets)
    ci = np.asarray(col_indices)
    va = np.asarray(values)
    if ro.dtype != np.int32:
        raise SpQRLayoutError(f"row_offsets must be int32, got {ro.dtype}")
    if ci.dtype not in (np.int16, np.int32):
        raise SpQRLayoutError(f"col_indices must be int16 or int32, got {ci.dtype}")
    if va.dtype != np.float16:
        raise SpQRLayoutError(f"values must be float16, got {va.dtype}")
    if ro.shape != (N + 1,):
        raise SpQRLayoutError(f"row_offsets shape {ro.shape} != (N+1,) = ({N + 1},)")
    if ci.ndim != 1 or va.ndim != 1:
        raise SpQRLayoutError("col_indices and values must be 1-D")
    nnz = ci.shape[0]
    if va.shape[0] != nnz:
        raise SpQRLayoutError(f"values has {va.shape[0]} entries but col_indices has {nnz}")
    if ro[0] != 0:
        raise SpQRLayoutError(f"row_offsets[0] must be 0, got {ro[0]}")
    if np.any(np.diff(ro.astype(np.int64)) < 0):
        bad = int(np.argmax(np.diff(ro.astype(np.int64)) < 0))
        raise SpQRLayoutError(f"row_offsets must be non-decreasing (row {bad}: {ro[bad]} > {ro[bad + 1]})")
    if ro[-1] != nnz:
        raise SpQRLayoutError(f"row_offsets[N] = {ro[-1]} but there are {nnz} outliers")
    if nnz and (ci.min() < 0 or ci.max() >= K):
        raise SpQRLayoutError(f"col_indices must lie in [0, K={K}), got range [{ci.min()}, {ci.max()}]")


def validate_perm(perm: np.ndarray, *, K: int) -> None:
    p = np.asarray(perm)
    if p.dtype != np.int32:
        raise SpQRLayoutError(f"perm must be int32, got {p.dtype}")
    if p.shape != (K,):
        raise SpQRLayoutError(f"perm shape {p.shape} != (K,) = ({K},)")
    if K and (p.min() < 0 or p.max() >= K):
        raise SpQRLayoutError(f"perm entries must lie in [0, K={K})")
    if np.unique(p).size != K:
        raise SpQRLayoutError("perm is not a permutation of 0..K-1 (repeated entries)")


def validate_inputs(x: Any, codes: Any, stat_codes: Any, stat_params: Any, row_offsets: Any, col_indices: Any,
                    values: Any, perm: Any = None, bias: Any = None, *, K: int, N: int, bits: int, group_size: int,
                    stat_bits: int, stat_group: int) -> None:
    """Every check the native op performs before it reads a single index."""
    validate_attributes(K=K, N=N, bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
    if x is not None:
        xs = _shape(x)
        if not xs or xs[-1] != K:
            raise SpQRLayoutError(f"X last dim must be K={K}, got shape {xs}")
    g = num_groups(K, group_size)
    want = {
        "codes": ((N, code_words(K, bits)), np.int32, codes),
        "stat_codes": ((N, stat_words(K, group_size, stat_bits)), np.int32, stat_codes),
        "stat_params": ((row_blocks(N, stat_group), g, 4), np.float16, stat_params),
    }
    for name, (shape, dtype, arr) in want.items():
        if _shape(arr) != shape:
            raise SpQRLayoutError(f"{name} shape {_shape(arr)} != {shape}")
        if np.asarray(arr).dtype != dtype:
            raise SpQRLayoutError(f"{name} must be {np.dtype(dtype).name}, got {np.asarray(arr).dtype}")
    validate_csr(row_offsets, col_indices, values, K=K, N=N)
    if perm is not None:
        validate_perm(perm, K=K)
    if bias is not None and _shape(bias) != (N,):
        raise SpQRLayoutError(f"bias shape {_shape(bias)} != ({N},)")


# ---- the op -------------------------------------------------------------------------------------


def dequantize_dense_stored(codes: np.ndarray, stat_codes: np.ndarray, stat_params: np.ndarray, *, K: int, N: int,
                            bits: int, group_size: int, stat_bits: int, stat_group: int) -> np.ndarray:
    """Dense part in STORED order, torch layout ``[N, K]`` float32 (no outliers, no permutation)."""
    g = num_groups(K, group_size)
    q = unpack_codes(codes, bits, K).astype(np.float32)
    sc, zc = unpack_stat_codes(stat_codes, stat_bits, g)
    sp = np.asarray(stat_params).astype(np.float32)[np.arange(N) // stat_group]  # [N, G, 4]
    scale = sc.astype(np.float32) * sp[:, :, 0] + sp[:, :, 1]
    zero = zc.astype(np.float32) * sp[:, :, 2] + sp[:, :, 3]
    gi = np.arange(K) // group_size
    return (scale[:, gi] * (q - zero[:, gi])).astype(np.float32)


def dequantize(codes: np.ndarray, stat_codes: np.ndarray, stat_params: np.ndarray, row_offsets: np.ndarray,
               col_indices: np.ndarray, values: np.ndarray, perm: np.ndarray | None = None, *, K: int, N: int,
               bits: int, group_size: int, stat_bits: int, stat_group: int) -> np.ndarray:
    """The weight the packed tensors represent: ``[K, N]`` float32, ONNX MatMul layout."""
    validate_inputs(None, codes, stat_codes, stat_params, row_offsets, col_indices, values, perm, K=K, N=N,
                    bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
    dense = dequantize_dense_stored(codes, stat_codes, stat_params, K=K, N=N, bits=bits, group_size=group_size,
                                    stat_bits=stat_bits, stat_group=stat_group)
    w = np.zeros((K, N), dtype=np.float32)
    p = np.arange(K) if perm is None else np.asarray(perm, dtype=np.int64)
    w[p, :] = dense.T
    rows = np.repeat(np.arange(N), np.diff(np.asarray(row_offsets, dtype=np.int64)))
    np.add.at(w, (np.asarray(col_indices, dtype=np.int64), rows), np.asarray(values).astype(np.float32))
    return w


def spqr_matmul_reference(x: np.ndarray, codes: np.ndarray, stat_codes: np.ndarray, stat_params: np.ndarray,
                          row_offsets: np.ndarray, col_indices: np.ndarray, values: np.ndarray,
                          perm: np.ndarray | None = None, bias: np.ndarray | None = None, *, K: int, N: int,
                          bits: int, group_size: int, stat_bits: int, stat_group: int) -> np.ndarray:
    """``Y = X @ W (+ bias)`` in float64 accumulation, returned in X's dtype (float32 or float16)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise SpQRLayoutError(f"X must be float32 or float16, got {x.dtype}")
    validate_inputs(x, codes, stat_codes, stat_params, row_offsets, col_indices, values, perm, bias, K=K, N=N,
                    bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
    w = dequantize(codes, stat_codes, stat_params, row_offsets, col_indices, values, perm, K=K, N=N, bits=bits,
                   group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
    y = x.astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)
    return y.astype(x.dtype)


def random_packed(k: int, n: int, *, bits: int = 3, group_size: int = 16, stat_bits: int = 3, stat_group: int = 16,
                  outlier_rate: float = 0.01, with_perm: bool = False, col_dtype: Any = np.int16,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """A well-formed random SpQR weight (random codes and plausible statistics) for kernel tests/benches."""
    rng = np.random.default_rng(seed)
    g = num_groups(k, group_size)
    codes = rng.integers(0, 1 << bits, size=(n, k))
    sc = rng.integers(0, 1 << stat_bits, size=(n, g))
    zc = rng.integers(0, 1 << stat_bits, size=(n, g))
    nb = row_blocks(n, stat_group)
    sp = np.empty((nb, g, 4), dtype=np.float16)
    sp[..., 0] = rng.uniform(1e-3, 3e-3, size=(nb, g))
    sp[..., 1] = rng.uniform(2e-3, 1e-2, size=(nb, g))
    sp[..., 2] = rng.uniform(0.1, 0.6, size=(nb, g))
    sp[..., 3] = rng.uniform(0.0, 2.0, size=(nb, g))
    counts = rng.binomial(k, outlier_rate, size=n)
    cols = [np.sort(rng.choice(k, size=c, replace=False)) for c in counts]
    ro = np.zeros(n + 1, dtype=np.int32)
    ro[1:] = np.cumsum(counts)
    ci = np.concatenate(cols).astype(col_dtype) if n else np.zeros(0, col_dtype)
    vals = rng.normal(0, 0.1, size=ci.shape[0]).astype(np.float16)
    out = {
        "codes": pack_codes(codes, bits),
        "stat_codes": pack_stat_codes(sc, zc, stat_bits),
        "stat_params": sp,
        "row_offsets": ro,
        "col_indices": ci,
        "values": vals,
    }
    if with_perm:
        out["perm"] = rng.permutation(k).astype(np.int32)
    return out
