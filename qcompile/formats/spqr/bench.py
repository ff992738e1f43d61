"""``qcompile bench`` columns for SpQRMatMul: a spqr-w3-shaped weight (3-bit codes, β1 = β2 = 16, 3-bit
statistics, act-order permutation, 1% outliers) and its 4-bit sibling, with random contents (the kernel's
speed does not depend on the values)."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.bench import BenchOp, one_node_model
from qcompile.formats.spqr import reference as ref

OUTLIER_RATE = 0.01
INPUTS = ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm")


def _builder(bits: int, accuracy_level: int = 0):
    def build(K: int, N: int, dtype: np.dtype, rng: np.random.Generator) -> onnx.ModelProto:
        packed = ref.random_packed(K, N, bits=bits, outlier_rate=OUTLIER_RATE, with_perm=True,
                                   seed=int(rng.integers(1 << 31)))
        inits = [numpy_helper.from_array(packed[k], f"spqr.{k}") for k in INPUTS]
        node = helper.make_node("SpQRMatMul", ["x"] + [t.name for t in inits], ["y"], domain="qcompile",
                                K=K, N=N, bits=bits, group_size=16, stat_bits=3, stat_group=16,
                                **({"accuracy_level": accuracy_level} if accuracy_level else {}))
        return one_node_model(node, inits, K, N, dtype, {"qcompile": 1})

    return build


def isize(max_value: int) -> int:
    return ref.index_dtype(max_value).itemsize


def _bytes(bits: int):
    def weight_bytes(K: int, N: int) -> int:
        g = math.ceil(K / 16)
        nnz = round(OUTLIER_RATE * K * N)
        return (N * ref.code_words(K, bits) * 4 + N * 2 * math.ceil(g * 3 / 32) * 4
                + math.ceil(N / 16) * 4 * g * 2 + (N + 1) * isize(nnz) + nnz * (2 + isize(K - 1)) + K * isize(K - 1))

    return weight_bytes


SPQR_BENCH = {3: BenchOp("SpQRMatMul", _builder(3), _bytes(3)), 4: BenchOp("SpQRMatMul-w4", _builder(4), _bytes(4))}
#: accuracy_level 4 (int8 activations on CPU)
SPQR_BENCH_A4 = {3: BenchOp("SpQRMatMul-a4", _builder(3, 4), _bytes(3), providers=("cpu",)),
                 4: BenchOp("SpQRMatMul-w4-a4", _builder(4, 4), _bytes(4), providers=("cpu",))}
