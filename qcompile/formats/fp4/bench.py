"""``qcompile bench`` columns for ``qcompile.FP4MatMul``: MXFP4 with a 32-block Hadamard and NVFP4 with a
16-block one, as mxfp4-mr / nvfp4-mr write them, with random codes (the kernel's work does not depend on
values)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.bench import BenchOp, Builder, one_node_model
from qcompile.formats.fp4.reference import encode_e4m3, padded_k


def _build_fp4(group_size: int, scale_format: str, hadamard_block: int, tensor_scale: bool,
               accuracy_level: int = 0) -> Builder:
    def build(K: int, N: int, dtype: np.dtype, rng: np.random.Generator) -> onnx.ModelProto:
        kp = padded_k(K, group_size)
        w = rng.integers(0, 256, (N, kp // 2), dtype=np.uint8)
        if scale_format == "e8m0":
            s = rng.integers(118, 124, (N, kp // group_size), dtype=np.uint8)
        else:
            s = encode_e4m3(rng.uniform(0.5, 4.0, (N, kp // group_size)))
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")]
        inputs = ["x", "w", "s"]
        if tensor_scale:
            inits.append(numpy_helper.from_array(np.array([0.01], np.float32), "ts"))
            inputs.append("ts")
        hb = hadamard_block if K % hadamard_block == 0 else 0
        node = helper.make_node("FP4MatMul", inputs, ["y"], domain="qcompile", K=K, N=N, group_size=group_size,
                                scale_format=scale_format, hadamard_block=hb,
                                **({"accuracy_level": accuracy_level} if accuracy_level else {}))
        return one_node_model(node, inits, K, N, dtype, {"qcompile": 1})

    return build


def _fp4_bytes(group_size: int) -> Callable[[int, int], int]:
    return lambda K, N: N * (math.ceil(K / group_size) * group_size) * (4 + 8 / group_size) // 8


FP4_BENCH = {
    "mxfp4": BenchOp("FP4MatMul", _build_fp4(32, "e8m0", 32, False), _fp4_bytes(32)),
    "nvfp4": BenchOp("FP4MatMul-nv", _build_fp4(16, "e4m3", 16, True), _fp4_bytes(16)),
    # accuracy_level 4 (int8 activations on CPU)
    "mxfp4-a4": BenchOp("FP4MatMul-a4", _build_fp4(32, "e8m0", 32, False, 4), _fp4_bytes(32), providers=("cpu",)),
    "nvfp4-a4": BenchOp("FP4MatMul-nv-a4", _build_fp4(16, "e4m3", 16, True, 4), _fp4_bytes(16), providers=("cpu",)),
}
