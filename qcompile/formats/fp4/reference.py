"""Numpy reference for ``qcompile.FP4MatMul`` (see docs/ops.md): the codecs, the packing and the op.

This module is the ground truth the native kernels are tested against and the codec library the FP4
quantization numerics (``qcompile/formats/fp4.py``) build on, so it favours obviously-correct code over
speed. Everything here follows the op contract:

* E2M1 code ``c`` (4 bits): sign ``c >> 3``, magnitude ``E2M1_MAGNITUDES[c & 7]``.
* W is ``uint8[N, Kp/2]`` with ``Kp = ceil(K/G)*G``; element ``2i`` in the LOW nibble, ``2i+1`` in the
  HIGH nibble; codes at ``k >= K`` are 0.
* scales ``uint8[N, Kp/G]`` as E8M0 (``2^(s-127)``, 255 = NaN) or OCP FP8 E4M3FN.
* ``Wdeq[n, k] = e2m1(code[n, k]) * scale(n, k // G) * tensor_scale``.
* ``Y = Hadamard_b(X) @ Wdeqᵀ (+ bias)``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qcompile.formats import act_quant

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: All 16 E2M1 codes decoded (codes 8..15 are the negatives; code 8 is -0.0).
E2M1_VALUES = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES]).astype(np.float32)
E2M1_MAX = 6.0

E4M3_MAX = 448.0
E4M3_NAN = 0x7F
E8M0_NAN = 255
E8M0_BIAS = 127

SCALE_FORMATS = ("e8m0", "e4m3")
GROUP_SIZES = (8, 16, 32, 64, 128, 256)
HADAMARD_BLOCKS = (2, 4, 8, 16, 32, 64, 128, 256)


# ---- E2M1 ---------------------------------------------------------------------------------------


def decode_e2m1(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (0..15) -> float32 values."""
    c = np.asarray(codes)
    if c.size and (c.min() < 0 or c.max() > 15):
        raise ValueError("E2M1 codes must be in 0..15")
    return E2M1_VALUES[c.astype(np.intp)]


def encode_e2m1(x: np.ndarray) -> np.ndarray:
    """float -> nearest E2M1 code (uint8). Saturates at ±6; ties go to the even code (the one whose
    mantissa bit is 0, i.e. IEEE round-half-to-even); magnitudes that round to 0 give code 0 (never -0).
    NaN is rejected: a quantizer must never produce one."""
    a = np.asarray(x, dtype=np.float64)
    if np.isnan(a).any():
        raise ValueError("encode_e2m1: NaN input")
    mag = np.minimum(np.abs(a), E2M1_MAX)
    table = E2M1_MAGNITUDES.astype(np.float64)
    hi = np.clip(np.searchsorted(table, mag, side="left"), 0, 7)  # first table entry >= mag
    lo = np.maximum(hi - 1, 0)
    d_lo = mag - table[lo]
    d_hi = table[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    idx = np.where(pick_hi, hi, lo).astype(np.uint8)
    sign = ((a < 0) & (idx != 0)).astype(np.uint8) << 3
    return (idx | sign).astype(np.uint8)


# ---- E8M0 (power-of-two scale) ----------------------------------------------------------------------


def decode_e8m0(s: np.ndarray) -> np.ndarray:
    """uint8 -> float32 ``2^(s-127)``; 255 decodes to NaN. (2^-127 is a float32 subnormal: exact.)"""
    s = np.asarray(s).astype(np.int64)
    out = np.ldexp(np.float64(1.0), s - E8M0_BIAS)
    return np.where(s == E8M0_NAN, np.nan, out).astype(np.float32)


def encode_e8m0(x: np.ndarray, mode: str = "round") -> np.ndarray:
    """positive float -> uint8 exponent code. ``mode``: "round" (nearest power of two in the log2
    domain), "floor" or "ceil" (largest power <= x / smallest >= x). Results clamp to 0..254; NaN gives
    255; zero/negative inputs give 0 (the smallest scale) since a scale cannot be <= 0."""
    a = np.asarray(x, dtype=np.float64)
    fn = {"round": np.round, "floor": np.floor, "ceil": np.ceil}.get(mode)
    if fn is None:
        raise ValueError(f"encode_e8m0: mode must be round/floor/ceil, got {mode!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        e = fn(np.log2(np.where(a > 0, a, 1.0)))
    e = np.where(a > 0, e, -E8M0_BIAS)
    e = np.where(np.isinf(a) & (a > 0), 254 - E8M0_BIAS, e)
    code = np.clip(e + E8M0_BIAS, 0, 254)
    code = np.where(np.isnan(a), E8M0_NAN, code)
    return code.astype(np.uint8)


# ---- E4M3FN (OCP FP8) -------------------------------------------------------------------------------


def _e4m3_table() -> np.ndarray:
    out = np.empty(256, dtype=np.float32)
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e = (c >> 3) & 0xF
        m = c & 0x7
        if e == 0xF and m == 0x7:
            out[c] = np.nan
        elif e == 0:
            out[c] = sign * (m / 8.0) * 2.0 ** -6
        else:
            out[c] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return out


#: All 256 E4M3FN codes decoded (0x7F / 0xFF are NaN; 0x80 is -0.0).
E4M3_VALUES = _e4m3_table()
_E4M3_POS = E4M3_VALUES[:0x7F].astype(np.float64)  # codes 0..126: finite non-negative, ascending


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """uint8 -> float32 (E4M3FN: bias 7, subnormals, no inf, 0x7F/0xFF NaN)."""
    return E4M3_VALUES[np.asarray(codes).astype(np.uint8).astype(np.intp)]


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float -> uint8 E4M3FN, round to nearest with ties to even, saturating at ±448 (±inf too).
    NaN -> 0x7F. Values that round to zero keep their sign (0x80 = -0.0), as a hardware cast would."""
    a = np.asarray(x, dtype=np.float64)
    mag = np.minimum(np.abs(np.nan_to_num(a, nan=0.0)), E4M3_MAX)
    hi = np.clip(np.searchsorted(_E4M3_POS, mag, side="left"), 0, 126)
    lo = np.maximum(hi - 1, 0)
    d_lo = mag - _E4M3_POS[lo]
    d_hi = _E4M3_POS[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = code | (np.signbit(a).astype(np.uint8) << 7)
    return np.where(np.isnan(a), E4M3_NAN, code).astype(np.uint8)


def decode_scales(scales: np.ndarray, scale_format: str) -> np.ndarray:
    """Per-group scale codes -> float32 according to ``scale_format``."""
    if scale_format == "e8m0":
        return decode_e8m0(scales)
    if scale_format == "e4m3":
        return decode_e4m3(scales)
    raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")


def encode_scales(x: np.ndarray, scale_format: str) -> np.ndarray:
    """float32 scales -> codes (E8M0 rounds in the log2 domain; E4M3 is RNE with saturation)."""
    if scale_format == "e8m0":
        return encode_e8m0(x)
    if scale_format == "e4m3":
        return encode_e4m3(x)
    raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")


# ---- Hadamard -----------------------------------------------------------------------------------------


def hadamard_matrix(b: int) -> np.ndarray:
    """Normalized Sylvester Hadamard ``H_b / sqrt(b)`` (float64, symmetric, orthogonal); b a power of 2."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {b}")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(b)


def hadamard_transform(x: np.ndarray, b: int) -> np.ndarray:
    """Blockwise rotation of the last dim: each contiguous block of ``b`` is multiplied by
    ``H_b/sqrt(b)``. Computed in float64, returned in x's float dtype (float64 for non-float input)."""
    x = np.asarray(x)
    k = x.shape[-1]
    if b < 1 or k % b:
        raise ValueError(f"hadamard block {b} does not divide the last dim {k}")
    h = hadamard_matrix(b)
    y = (x.astype(np.float64).reshape(*x.shape[:-1], k // b, b) @ h).reshape(x.shape)
    return y.astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else y


def fwht_float32(x: np.ndarray, b: int) -> np.ndarray:
    """The rotation as the CPU kernel computes it in float32 (butterflies of strides 1, 2, 4, ... then a
    multiply by ``1/sqrt(b)``): bit-identical to it, so int8 quantization of the result matches the kernel's."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    y = x.reshape(-1, k // b, b).copy()
    h = 1
    while h < b:
        v = y.reshape(y.shape[0], k // b, b // (2 * h), 2, h)
        a, c = v[:, :, :, 0, :], v[:, :, :, 1, :]
        y = np.stack([a + c, a - c], axis=3).reshape(y.shape)
        h *= 2
    norm = np.float32(1) / np.sqrt(np.float32(b))
    return (y * norm).astype(np.float32).reshape(x.shape)


# ---- packing ------------------------------------------------------------------------------------------


def padded_k(k: int, group_size: int) -> int:
    """``Kp = ceil(K/G)*G``: K rounded up to whole groups."""
    return -(-k // group_size) * group_size


def pack_fp4(codes: np.ndarray, group_size: int) -> np.ndarray:
    """codes ``[N, K]`` (0..15) -> uint8 ``[N, Kp/2]``; even k in the low nibble, pad codes are 0."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_fp4 expects codes [N, K], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("pack_fp4: codes must be in 0..15")
    n, k = codes.shape
    kp = padded_k(k, group_size)
    full = np.zeros((n, kp), dtype=np.uint8)
    full[:, :k] = codes
    return (full[:, 0::2] | (full[:, 1::2] << 4)).astype(np.uint8)


def unpack_fp4(w: np.ndarray, k: int) -> np.ndarray:
    """uint8 ``[N, Kp/2]`` -> codes ``[N, K]`` (the first K of the 2*Kp/2 stored codes)."""
    w = np.asarray(w, dtype=np.uint8)
    if w.ndim != 2 or 2 * w.shape[1] < k:
        raise ValueError(f"unpack_fp4: W shape {w.shape} holds fewer than K={k} codes per row")
    out = np.empty((w.shape[0], 2 * w.shape[1]), dtype=np.uint8)
    out[:, 0::2] = w & 0xF
    out[:, 1::2] = w >> 4
    return out[:, :k]


# ---- validation (same rules the kernels enforce) ------------------------------------------------------


def _shape(a: Any) -> tuple[int, ...] | None:
    return None if a is None else tuple(np.shape(a))


def validate_fp4_attributes(*, K: int, N: int, group_size: int, scale_format: str, hadamard_block: int = 0) -> None:
    """Attribute rules of FP4MatMul; raises ValueError naming the problem."""
    if K <= 0 or N <= 0:
        raise ValueError(f"FP4MatMul: K and N must be positive, got K={K} N={N}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"FP4MatMul: group_size must be a power of two in 8..256, got {group_size}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"FP4MatMul: scale_format must be 'e8m0' or 'e4m3', got {scale_format!r}")
    if hadamard_block != 0:
        if hadamard_block not in HADAMARD_BLOCKS:
            raise ValueError(f"FP4MatMul: hadamard_block must be 0 or a power of two in 2..256, got {hadamard_block}")
        if K % hadamard_block:
            raise ValueError(f"FP4MatMul: hadamard_block {hadamard_block} does not divide K={K}")


def validate_fp4_inputs(x: Any, w: Any, scales: Any, tensor_scale: Any = None, bias: Any = None, *, K: int, N: int,
                        group_size: int, scale_format: str, hadamard_block: int = 0) -> None:
    """Shape/attribute rules of FP4MatMul (arrays or anything with a shape; None = absent input)."""
    validate_fp4_attributes(K=K, N=N, group_size=group_size, scale_format=scale_format,
                            hadamard_block=hadamard_block)
    kp = padded_k(K, group_size)
    xs = _shape(x)
    if not xs or xs[-1] != K:
        raise ValueError(f"FP4MatMul: X last dim must be K={K}, got shape {xs}")
    if _shape(w) != (N, kp // 2):
        raise ValueError(f"FP4MatMul: W shape must be [N, Kp/2] = [{N}, {kp // 2}], got {_shape(w)}")
    if _shape(scales) != (N, kp // group_size):
        raise ValueError(f"FP4MatMul: scales shape must be [N, Kp/G] = [{N}, {kp // group_size}], got {_shape(scales)}")
    if tensor_scale is not None and int(np.prod(_shape(tensor_scale))) != 1:
        raise ValueError(f"FP4MatMul: tensor_scale must hold exactly 1 element, got shape {_shape(tensor_scale)}")
    if bias is not None and _shape(bias) != (N,):
        raise ValueError(f"FP4MatMul: bias shape must be [N] = [{N}], got {_shape(bias)}")
    for name, arr in (("W", w), ("scales", scales)):
        if isinstance(arr, np.ndarray) and arr.dtype != np.uint8:
            raise ValueError(f"FP4MatMul: {name} must be uint8, got {arr.dtype}")
    if isinstance(x, np.ndarray) and x.dtype not in (np.float32, np.float16):
        raise ValueError(f"FP4MatMul: X must be float32 or float16, got {x.dtype}")
    if isinstance(x, np.ndarray) and isinstance(bias, np.ndarray) and bias.dtype != x.dtype:
        raise ValueError(f"FP4MatMul: bias dtype {bias.dtype} differs from X dtype {x.dtype}")


# ---- dequantize and the op --------------------------------------------------------------------------------


def dequantize_fp4(w: np.ndarray, scales: np.ndarray, tensor_scale: Any, K: int, group_size: int,
                   scale_format: str) -> np.ndarray:
    """Stored tensors -> ``Wdeq [N, K]`` float32 (still in the rotated basis when Hadamard is used).
    ``tensor_scale``: None (= 1.0), a float, or a 1-element array."""
    codes = unpack_fp4(w, padded_k(K, group_size))
    n = codes.shape[0]
    ngroups = codes.shape[1] // group_size
    sc = decode_scales(np.asarray(scales).reshape(n, ngroups), scale_format).astype(np.float64)
    ts = 1.0 if tensor_scale is None else float(np.asarray(tensor_scale, dtype=np.float32).reshape(-1)[0])
    vals = decode_e2m1(codes).astype(np.float64).reshape(n, ngroups, group_size)
    deq = (vals * sc[:, :, None] * ts).reshape(n, -1)[:, :K]
    return deq.astype(np.float32)


def fp4_matmul_reference(x: np.ndarray, w: np.ndarray, scales: np.ndarray, tensor_scale: Any = None,
                         bias: np.ndarray | None = None, *, K: int, N: int, group_size: int, scale_format: str,
                         hadamard_block: int = 0, accuracy_level: int = 0) -> np.ndarray:
    """``Y = Hadamard_b(X) @ Wdeqᵀ (+ bias)``, computed in float64 and returned in X's dtype.

    The dequantized weight is formed in float64 from the exact decoded parts (product of E2M1 value,
    scale and tensor_scale), so the only roundings are the final cast and the float32 tensor_scale.
    ``accuracy_level=4``: the quantized computation of the CPU kernels, ``Q8(Hadamard_b(X)) @ Wdeqᵀ`` with the
    rotation in float32 as they compute it and :func:`qcompile.formats.act_quant.quantize_activations`."""
    validate_fp4_inputs(x, w, scales, tensor_scale, bias, K=K, N=N, group_size=group_size,
                        scale_format=scale_format, hadamard_block=hadamard_block)
    x = np.asarray(x)
    if accuracy_level == act_quant.INT8:
        xr = x.astype(np.float32)
        if hadamard_block > 1:
            xr = fwht_float32(xr, hadamard_block)
        xd = act_quant.quantize_activations(xr).astype(np.float64)
    else:
        xd = x.astype(np.float64)
        if hadamard_block:
            xd = hadamard_transform(xd, hadamard_block)
    codes = unpack_fp4(w, padded_k(K, group_size))
    ngroups = codes.shape[1] // group_size
    sc = decode_scales(scales, scale_format).astype(np.float64)
    ts = 1.0 if tensor_scale is None else float(np.asarray(tensor_scale, dtype=np.float32).reshape(-1)[0])
    wd = (decode_e2m1(codes).astype(np.float64).reshape(N, ngroups, group_size) * sc[:, :, None] * ts)
    wd = wd.reshape(N, -1)[:, :K]
    y = xd @ wd.T
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)
    return y.astype(x.dtype)
