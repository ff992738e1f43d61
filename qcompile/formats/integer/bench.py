"""``qcompile bench`` baselines for the integer formats: onnxruntime's own ``MatMulNBits`` 4-bit (block 32) at
accuracy_level 0 (fp32 activations) and 4 (int8 activations), the kernels our ops are compared with."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.bench import BenchOp, Builder, one_node_model
from qcompile.formats.integer.reference import pack_codes, pack_zero_points

BLOCK = 32


def _build_nbits(accuracy_level: int) -> Builder:
    def build(K: int, N: int, dtype: np.dtype, rng: np.random.Generator) -> onnx.ModelProto:
        nblk = math.ceil(K / BLOCK)
        codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
        zeros = rng.integers(6, 10, (N, nblk), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.01, N * nblk).astype(dtype)
        inits = [numpy_helper.from_array(pack_codes(codes, 4, BLOCK), "b"),
                 numpy_helper.from_array(scales, "scales"),
                 numpy_helper.from_array(pack_zero_points(zeros, 4), "zp")]
        node = helper.make_node("MatMulNBits", ["x", "b", "scales", "zp"], ["y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
        return one_node_model(node, inits, K, N, dtype, {"com.microsoft": 1})

    return build


def _nbits_bytes(K: int, N: int) -> int:
    return N * math.ceil(K / BLOCK) * (BLOCK // 2 + 4 + 1)


NBITS_BENCH = (
    BenchOp("NBits-a0", _build_nbits(0), _nbits_bytes, needs_ops_library=False, baseline=True),
    BenchOp("NBits-a4", _build_nbits(4), _nbits_bytes, needs_ops_library=False, baseline=True, providers=("cpu",)),
)
