"""The integer formats' packed weight, lowered to ONNX Runtime's ``com.microsoft.MatMulNBits`` so the compiled
model runs in stock onnxruntime with no library of ours (layout: :mod:`qcompile.formats.integer.reference`)."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.formats.base import Lowered, QuantizedWeight
from qcompile.formats.integer.reference import dequantize_matmulnbits, pack_codes, pack_zero_points

MATMULNBITS_BITS = (2, 4, 8)  # widths ONNX Runtime's MatMulNBits kernels accept


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
