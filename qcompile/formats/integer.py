"""Integer formats (RTN and GPTQ, 2-8 bits, asymmetric, grouped along K) lowered to ONNX Runtime's
``com.microsoft.MatMulNBits``, so the compiled model runs in stock onnxruntime with no library of ours.

Storage follows MatMulNBits: codes ``uint8[N, n_blocks, block_size*bits/8]`` (first element in the low
bits), one scale per (row, block) in the activation dtype, and integer zero points packed at ``bits`` per
block. K that is not a multiple of the block is padded with zero codes, exactly as MatMulNBits expects.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.formats.base import Format, Lowered, Option, QuantizedWeight, register
from qcompile.gptq import gptq, rtn

MATMULNBITS_BITS = (2, 4, 8)  # widths ONNX Runtime's MatMulNBits kernels accept


class IntGrid:
    """Asymmetric uniform grid per (row, group) with an integer zero point; optional MSE clipping."""

    def __init__(self, bits: int, mse: bool = False, scale_dtype: torch.dtype = torch.float32):
        self.bits = bits
        self.maxq = 2**bits - 1
        self.mse = mse
        self.scale_dtype = scale_dtype

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (xmax - xmin) / self.maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scale = scale.to(self.scale_dtype).float()  # what the file stores is what we round with
        zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq)
        return scale, zero

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xmin = torch.clamp(w.min(dim=1).values, max=0)
        xmax = torch.clamp(w.max(dim=1).values, min=0)
        scale, zero = self._params(xmin, xmax)
        if self.mse:
            best = self._err(w, scale, zero)
            for shrink in torch.linspace(0.98, 0.5, 25).tolist():
                s, z = self._params(xmin * shrink, xmax * shrink)
                e = self._err(w, s, z)
                better = e < best
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
                best = torch.minimum(best, e)
        return scale, zero

    def _err(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, self.maxq)
        return ((scale[:, None] * (q - zero[:, None]) - w) ** 2).sum(dim=1)

    def quantize(self, col: torch.Tensor, params, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = params
        q = torch.clamp(torch.round(col / scale) + zero, 0, self.maxq)
        return scale * (q - zero), q


# ---- MatMulNBits packing (numpy reference; tests round-trip these) ---------------------------------


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


class IntQuantizedWeight(QuantizedWeight):
    """An integer-grid weight: codes, per-group scales and integer zero points."""

    def __init__(self, name: str, codes_nk: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
                 group_size: int, accuracy_level: int, scale_dtype: np.dtype = np.dtype(np.float32)):
        self.format_name = name
        self.codes = codes_nk.astype(np.uint8)  # [N, K]
        self.scales = scales.astype(np.float32)  # [N, n_groups]
        self.zeros = zeros.astype(np.uint8)  # [N, n_groups]
        self.bits = bits
        self.group_size = group_size
        self.accuracy_level = accuracy_level
        self.scale_dtype = np.dtype(scale_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return k, n

    def _storage_bits(self) -> int:
        """MatMulNBits stores 3-bit codes in 4-bit containers; that cost is real and counted."""
        return self.bits if self.bits in MATMULNBITS_BITS else 4

    def packed(self) -> dict[str, np.ndarray]:
        sb = self._storage_bits()
        return {
            "B": pack_codes(self.codes, sb, self.group_size),
            "scales": self.scales.astype(self.scale_dtype).reshape(-1),
            "zero_points": pack_zero_points(self.zeros, sb),
        }

    def dequantize(self) -> np.ndarray:
        k, n = self.shape
        p = self.packed()
        return dequantize_matmulnbits(p["B"], p["scales"], p["zero_points"], k, n, self._storage_bits(),
                                      self.group_size)

    def lower_native(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise FormatError(f"MatMulNBits needs a power-of-two group size >= 16, got {self.group_size}")
        self.scale_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
        k, n = self.shape
        p = self.packed()
        inits = [numpy_helper.from_array(arr, f"{prefix}.{key}") for key, arr in p.items()]
        node = helper.make_node(
            "MatMulNBits", [x] + [t.name for t in inits], [y], name=f"{prefix}.MatMulNBits",
            domain="com.microsoft", K=k, N=n, bits=self._storage_bits(), block_size=self.group_size,
            accuracy_level=self.accuracy_level,
        )
        return Lowered([node], inits, {"com.microsoft": 1})


def quantize_int(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, bits: int, method: str,
                 group_size: int, act_order: bool, damp: float, mse: bool, accuracy_level: int,
                 device: str = "cpu") -> IntQuantizedWeight:
    """Quantize one ``[K, N]`` weight to ``bits`` with RTN or GPTQ."""
    if group_size < 1:
        raise FormatError(f"group_size must be positive, got {group_size}")
    w = torch.from_numpy(np.ascontiguousarray(weight_kn.T)).float().to(device)
    grid = IntGrid(bits, mse=mse)
    if method == "gptq":
        if hessian is None:
            raise FormatError(f"{name} needs calibration statistics (a Hessian)")
        res = gptq(w, hessian.to(device), grid, group_size, damp=damp, act_order=act_order)
    else:
        res = rtn(w, grid, group_size)
    scales = torch.stack([p[0] for p in res.group_params], dim=1).cpu().numpy()
    zeros = torch.stack([p[1] for p in res.group_params], dim=1).cpu().numpy()
    return IntQuantizedWeight(name, res.codes.numpy(), scales, zeros, bits, group_size, accuracy_level)


def _options(group_size: int, gptq_opts: bool) -> dict[str, Option]:
    opts = {
        "group_size": Option(int, group_size, "weights per scale/zero group along K (power of two >= 16 for native)"),
        "mse": Option(bool, gptq_opts, "search a clipping range that minimises the rounding error"),
        "accuracy_level": Option(int, 0, "MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)",
                                 choices=(0, 1, 2, 3, 4)),
    }
    if gptq_opts:
        opts["act_order"] = Option(bool, True, "quantize columns in order of decreasing Hessian diagonal")
        opts["damp"] = Option(float, 0.01, "damping added to the Hessian diagonal, relative to its mean")
    return opts


def _register_int(bits: int, method: str, group_size: int) -> None:
    name = f"int{bits}-{method}"
    storage = bits if bits in MATMULNBITS_BITS else 4

    def quantize(weight_kn, hessian, **opts):
        opts.setdefault("act_order", False)
        opts.setdefault("damp", 0.01)
        return quantize_int(weight_kn, hessian, name=name, bits=bits, method=method, **opts)

    note = "" if storage == bits else f" (stored in {storage}-bit MatMulNBits containers natively)"
    register(Format(
        name=name,
        description=f"{bits}-bit asymmetric integer, {method.upper()}, grouped along K{note}",
        runtime="stock onnxruntime (com.microsoft.MatMulNBits)",
        quantize=quantize,
        options=_options(group_size, method == "gptq"),
        needs_calibration=method == "gptq",
        emits=("native", "simulated"),
        default_emit="native" if storage == bits else "simulated",
    ))


for _bits, _gs in ((8, 128), (4, 128), (3, 128), (2, 64)):
    for _method in ("rtn", "gptq"):
        _register_int(_bits, _method, _gs)
