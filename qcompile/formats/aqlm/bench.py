"""``qcompile bench`` column for ``qcompile.CodebookMatMul`` (AQLM 2x8: two 256-entry codebooks over groups
of 8, fp16 codebooks and scales).

Codes are random, so the timing is that of a real layer (the kernel's work does not depend on values).
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.bench import BenchOp, one_node_model

NUM_CODEBOOKS = 2
NBITS = 8
IN_GROUP = 8


def build_codebook(K: int, N: int, dtype: np.dtype, rng: np.random.Generator, *, num_codebooks: int = NUM_CODEBOOKS,
                   nbits: int = NBITS, in_group_size: int = IN_GROUP, accuracy_level: int = 0) -> onnx.ModelProto:
    """One CodebookMatMul node ``y[M, N] = x[M, K] @ W`` with random codes, codebooks and scales."""
    size = 2**nbits
    code_dtype = np.uint8 if size <= 256 else np.uint16
    codes = rng.integers(0, size, (N, K // in_group_size, num_codebooks)).astype(code_dtype)
    books = (rng.standard_normal((num_codebooks, size, in_group_size)) * 0.5).astype(np.float16)
    scales = rng.uniform(0.01, 0.03, N).astype(np.float16)
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(books, "codebooks"),
             numpy_helper.from_array(scales, "scales")]
    node = helper.make_node("CodebookMatMul", ["x", "codes", "codebooks", "scales"], ["y"], domain="qcompile",
                            K=K, N=N, num_codebooks=num_codebooks, codebook_size=size, in_group_size=in_group_size,
                            **({"accuracy_level": accuracy_level} if accuracy_level else {}))
    return one_node_model(node, inits, K, N, dtype, {"qcompile": 1})


def codebook_bytes(K: int, N: int, num_codebooks: int = NUM_CODEBOOKS, nbits: int = NBITS,
                   in_group_size: int = IN_GROUP) -> int:
    code_bytes = 1 if nbits <= 8 else 2
    return (N * (K // in_group_size) * num_codebooks * code_bytes + num_codebooks * 2**nbits * in_group_size * 2
            + N * 2)


CODEBOOK_BENCH = BenchOp("CodebookMatMul", build_codebook, codebook_bytes)
#: accuracy_level 4 (the batch-1 walk's table in int8 on CPU)
CODEBOOK_BENCH_A4 = BenchOp("CodebookMatMul-a4", functools.partial(build_codebook, accuracy_level=4), codebook_bytes,
                            providers=("cpu",))
