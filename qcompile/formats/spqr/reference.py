"""Numpy reference for ``qcompile.SpQRMatMul`` (see docs/ops.md): storage layout, validator and op.

This module is the ground truth the native kernels and the SpQR numerics (``qcompile/spqr.py``) share:
it defines how the packed tensors are laid out, what they mean, and which files are malformed. It favours
obviously-correct code over speed.

Meaning (``p`` is a *stored* position along K; with a permutation, stored position ``p`` holds input
feature ``perm[p]``; without one, ``perm[p] = p``)::

    g = p // group_size,  rb = n // stat_group
    ss, sm, zs, zm = stat_params[rb, :, g]          (float16 -> float32)
    scale = sc[n, g] * ss + sm,  zero = zc[n, g] * zs + zm        (float32, sc/zc the stat codes)
    W[perm[p], n] = scale * (code[n, p] - zero)                  (dense part, ONNX [K, N] layout)
    W[col_indices[o], n] += values[o]   for o in row_offsets[n] .. row_offsets[n+1]-1
    Y = X @ W (+ bias)

Outlier values ADD to the dense value at their position (the kernel then never has to decode the dense
code under an outlier), and their column index names the ORIGINAL input feature (so outliers do not
depend on the permutation).

Layouts ("bitstream" = a row's values laid end to end, value ``i`` of width ``b`` at bits ``[i*b, (i+1)*b)``
counted from bit 0 of int32 word 0, i.e. LSB-first little-endian; word ``j`` holds bits ``[32j, 32j+32)``):

* ``codes`` int32 ``[N, ceil(K/32) * bits]``: row ``n``'s codes in stored order as a ``bits``-wide
  bitstream; positions ``K .. 32*ceil(K/32)-1`` hold code 0. (Any 8 consecutive codes starting at a
  multiple of 8 sit in one unaligned 32-bit load at byte ``bits*j``: the CPU decodes them with one
  broadcast, one variable shift and one mask.)
* ``stat_codes`` int32 ``[N, 2*SW]``, ``SW = ceil(G*stat_bits/32)``, ``G = ceil(K/group_size)``: words
  ``[0, SW)`` are the scale codes of groups ``0..G-1`` as a ``stat_bits``-wide bitstream, words
  ``[SW, 2SW)`` the zero codes likewise.
* ``stat_params`` float16 ``[ceil(N/stat_group), 4, G]``: for row block ``rb`` the rows ``scale_step``,
  ``scale_min``, ``zero_step``, ``zero_min`` over the groups (structure of arrays, so 8 groups convert
  with one vector instruction).
* ``row_offsets`` int16 or int32 ``[N+1]``, ``col_indices`` int16 or int32 ``[nnz]``, ``values`` float16
  ``[nnz]``: CSR over output rows.
* ``perm`` int16 or int32 ``[K]`` (optional), ``bias`` ``[N]`` in the activation type (optional).

Every index tensor may be int16 or int32; qcompile writes the narrowest that holds its largest value
(:func:`index_dtype`), because at ~4 bits/weight int32 offsets and permutations alone cost ~0.05 bits/weight.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qcompile.formats import act_quant

CHUNK = 32  # stored positions per packing chunk
BITS = (3, 4)
MAX_STAT_BITS = 8


class SpQRLayoutError(ValueError):
    """A packed SpQR weight that breaks the op contract (the native op answers with an ORT error)."""


INDEX_DTYPES = (np.dtype(np.int16), np.dtype(np.int32))


# ---- sizes --------------------------------------------------------------------------------------


def index_dtype(max_value: int) -> np.dtype:
    """The index type qcompile stores for values in ``[0, max_value]``: int16 when they fit, else int32."""
    return np.dtype(np.int16) if max_value <= np.iinfo(np.int16).max else np.dtype(np.int32)


def row_offsets_from_counts(counts: np.ndarray, dtype: Any = None) -> np.ndarray:
    """CSR row pointer ``[N+1]`` for per-row outlier counts, in ``dtype`` or else qcompile's choice."""
    ro = np.zeros(len(counts) + 1, dtype=np.int64)
    ro[1:] = np.cumsum(counts)
    return ro.astype(index_dtype(int(ro[-1])) if dtype is None else dtype)


def num_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


def code_words(k: int, bits: int) -> int:
    return math.ceil(k / CHUNK) * bits


def stat_words(k: int, group_size: int, stat_bits: int) -> int:
    """SW: int32 words of ONE stat-code bitstream (scale or zero) per row; stat_codes has 2*SW per row."""
    return math.ceil(num_groups(k, group_size) * stat_bits / 32)


def row_blocks(n: int, stat_group: int) -> int:
    return math.ceil(n / stat_group)


# ---- packing ------------------------------------------------------------------------------------


def pack_bitstream(values: np.ndarray, width: int, words: int) -> np.ndarray:
    """``values [N, L]`` (each < 2^width) -> int32 ``[N, words]``: value i at bits [i*width, (i+1)*width)."""
    v = np.asarray(values).astype(np.uint64)
    n, length = v.shape
    if length * width > 32 * words:
        raise ValueError(f"{length} values of {width} bits do not fit in {words} words")
    if v.size and v.max() >= 1 << width:
        raise ValueError(f"values out of range for {width} bits")
    bits = ((v[:, :, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    flat = np.zeros((n, 32 * words), dtype=np.uint8)
    flat[:, :length * width] = bits.reshape(n, length * width)
    packed = np.packbits(flat, axis=1, bitorder="little")  # [N, 4*words] bytes, LSB first
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32).view(np.int32).reshape(n, words)


def unpack_bitstream(words: np.ndarray, width: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_bitstream`: int32 ``[N, W]`` -> uint32 ``[N, length]``."""
    w = np.ascontiguousarray(np.asarray(words).astype(np.int32)).astype("<i4")
    n = w.shape[0]
    bits = np.unpackbits(w.view(np.uint8).reshape(n, -1), axis=1, bitorder="little")[:, :length * width]
    bits = bits.reshape(n, length, width).astype(np.uint32)
    return (bits << np.arange(width, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)


def pack_codes(codes_np: np.ndarray, bits: int) -> np.ndarray:
    """codes ``[N, K]`` (0..2^bits-1, stored order) -> int32 ``[N, ceil(K/32)*bits]``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    c = np.asarray(codes_np)
    return pack_bitstream(c, bits, code_words(c.shape[1], bits))


def unpack_codes(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int32 ``[N, ceil(K/32)*bits]`` -> uint8 codes ``[N, K]``."""
    return unpack_bitstream(words, bits, k).astype(np.uint8)


def pack_stat_codes(scale_codes: np.ndarray, zero_codes: np.ndarray, stat_bits: int) -> np.ndarray:
    """scale/zero codes ``[N, G]`` -> int32 ``[N, 2*SW]``: the scale bitstream, then the zero bitstream."""
    g = np.shape(scale_codes)[1]
    sw = math.ceil(g * stat_bits / 32)
    return np.concatenate([pack_bitstream(scale_codes, stat_bits, sw), pack_bitstream(zero_codes, stat_bits, sw)],
                          axis=1)


def unpack_stat_codes(words: np.ndarray, stat_bits: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_stat_codes`: returns ``(scale_codes, zero_codes)`` uint8 ``[N, G]``."""
    sw = math.ceil(groups * stat_bits / 32)
    w = np.asarray(words)
    return (unpack_bitstream(w[:, :sw], stat_bits, groups).astype(np.uint8),
            unpack_bitstream(w[:, sw:], stat_bits, groups).astype(np.uint8))


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
    if ro.dtype not in INDEX_DTYPES:
        raise SpQRLayoutError(f"row_offsets must be int16 or int32, got {ro.dtype}")
    if ci.dtype not in INDEX_DTYPES:
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
    if p.dtype not in INDEX_DTYPES:
        raise SpQRLayoutError(f"perm must be int16 or int32, got {p.dtype}")
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
        "stat_codes": ((N, 2 * stat_words(K, group_size, stat_bits)), np.int32, stat_codes),
        "stat_params": ((row_blocks(N, stat_group), 4, g), np.float16, stat_params),
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
    sp = np.asarray(stat_params).astype(np.float32)[np.arange(N) // stat_group]  # [N, 4, G]
    scale = sc.astype(np.float32) * sp[:, 0] + sp[:, 1]
    zero = zc.astype(np.float32) * sp[:, 2] + sp[:, 3]
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


def quantize_stored(x: np.ndarray, perm: np.ndarray | None = None) -> np.ndarray:
    """``x̂`` (float32, original order) the op multiplies with at ``accuracy_level=4``: each row gathered into
    stored order (``x[perm]``), quantized to int8 in blocks of 16 stored positions
    (:func:`qcompile.formats.act_quant.quantize_activations`), and put back in original order."""
    x = np.asarray(x, np.float32)
    if perm is None:
        return act_quant.quantize_activations(x)
    p = np.asarray(perm, np.int64)
    out = np.empty_like(x)
    out[..., p] = act_quant.quantize_activations(x[..., p])
    return out


def spqr_matmul_reference(x: np.ndarray, codes: np.ndarray, stat_codes: np.ndarray, stat_params: np.ndarray,
                          row_offsets: np.ndarray, col_indices: np.ndarray, values: np.ndarray,
                          perm: np.ndarray | None = None, bias: np.ndarray | None = None, *, K: int, N: int,
                          bits: int, group_size: int, stat_bits: int, stat_group: int,
                          accuracy_level: int = 0) -> np.ndarray:
    """``Y = X @ W (+ bias)`` in float64 accumulation, returned in X's dtype (float32 or float16).
    ``accuracy_level=4``: the CPU kernels' quantized computation, ``X̂ @ W`` with :func:`quantize_stored`."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise SpQRLayoutError(f"X must be float32 or float16, got {x.dtype}")
    validate_inputs(x, codes, stat_codes, stat_params, row_offsets, col_indices, values, perm, bias, K=K, N=N,
                    bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
    w = dequantize(codes, stat_codes, stat_params, row_offsets, col_indices, values, perm, K=K, N=N, bits=bits,
                   group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
    xq = quantize_stored(x, perm) if accuracy_level == act_quant.INT8 else x
    y = xq.astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)
    return y.astype(x.dtype)


def random_packed(k: int, n: int, *, bits: int = 3, group_size: int = 16, stat_bits: int = 3, stat_group: int = 16,
                  outlier_rate: float = 0.01, with_perm: bool = False, col_dtype: Any = None,
                  offsets_dtype: Any = None, perm_dtype: Any = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A well-formed random SpQR weight (random codes and plausible statistics) for kernel tests/benches.
    Index dtypes default to qcompile's choice (:func:`index_dtype`)."""
    rng = np.random.default_rng(seed)
    g = num_groups(k, group_size)
    codes = rng.integers(0, 1 << bits, size=(n, k))
    sc = rng.integers(0, 1 << stat_bits, size=(n, g))
    zc = rng.integers(0, 1 << stat_bits, size=(n, g))
    nb = row_blocks(n, stat_group)
    sp = np.empty((nb, 4, g), dtype=np.float16)
    sp[:, 0] = rng.uniform(1e-3, 3e-3, size=(nb, g))
    sp[:, 1] = rng.uniform(2e-3, 1e-2, size=(nb, g))
    sp[:, 2] = rng.uniform(0.1, 0.6, size=(nb, g))
    sp[:, 3] = rng.uniform(0.0, 2.0, size=(nb, g))
    counts = rng.binomial(k, outlier_rate, size=n)
    cols = [np.sort(rng.choice(k, size=c, replace=False)) for c in counts]
    col_dtype = index_dtype(k - 1) if col_dtype is None else col_dtype
    ro = row_offsets_from_counts(counts, offsets_dtype)
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
        out["perm"] = rng.permutation(k).astype(index_dtype(k - 1) if perm_dtype is None else perm_dtype)
    return out


# ---- the CPU kernel's fixed-point pair tables (docs/ops.md, "Fixed-point pair tables") ---------------

PAIR_TABLE_MAX = 4095


def pair_table_error_bound(x_row: np.ndarray, stat_codes: np.ndarray, stat_params: np.ndarray,
                           perm: np.ndarray | None = None, *, K: int, N: int, bits: int, group_size: int,
                           stat_bits: int, stat_group: int) -> np.ndarray:
    """``[N]`` bound on |Y - reference| that the one-row fixed-point pair tables may add (3-bit codes, groups
    of 16): ``Σ_g |scale[n, g]| · 4 · step_g`` with ``step_g = max over the group's position pairs (a, b) of
    4·(|x_a| + |x_b|) / 4095``, x in stored order."""
    g = num_groups(K, group_size)
    x = np.asarray(x_row, np.float64).reshape(K)
    xs = x if perm is None else x[np.asarray(perm, np.int64)]
    xs = np.concatenate([np.abs(xs), np.zeros(g * group_size - K)]).reshape(g, group_size // 2, 2)
    step = 4 * xs.sum(axis=2).max(axis=1) / PAIR_TABLE_MAX  # [G]
    sc, _ = unpack_stat_codes(stat_codes, stat_bits, g)
    sp = np.asarray(stat_params).astype(np.float64)[np.arange(N) // stat_group]  # [N, 4, G]
    scale = sc.astype(np.float64) * sp[:, 0] + sp[:, 1]
    return np.abs(scale) @ (4 * step)
