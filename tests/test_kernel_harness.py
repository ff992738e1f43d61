"""The CPU kernels on aarch64: custom_ops/tests/kernel_harness.cpp and the kernel sources cross-built with
Debian's aarch64-linux-gnu-g++ (static) and run under qemu-aarch64, against the numpy references. On ARM the
kernels take their portable paths (no NEON code yet): every op, batch 1 and prefill, accuracy_level 0 and 4
(int8 activations there are quantized by the portable code, which must agree with the reference bit for
bit), two threads. Skipped where the cross compiler or qemu-user is missing (apt-get install
g++-aarch64-linux-gnu qemu-user)."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qcompile.formats.aqlm import reference as cb_ref
from qcompile.formats.fp4 import reference as fp4_ref
from qcompile.formats.spqr import reference as spqr_ref

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "custom_ops"
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"

pytestmark = pytest.mark.skipif(not (OPS / "tests" / "kernel_harness.cpp").is_file() or not shutil.which(CXX)
                                or not shutil.which(QEMU), reason=f"needs the source tree, {CXX} and {QEMU}")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aarch64") / "kernel_harness"
    sources = [OPS / "tests" / "kernel_harness.cpp", *sorted((OPS / "kernels" / "common").glob("*.cpp")),
               *sorted((OPS / "kernels" / "cpu").glob("*.cpp"))]
    cmd = [CXX, "-O2", "-std=c++17", "-static", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
           f"-I{OPS / 'include'}", f"-I{OPS}", "-DQCOMPILE_WITH_CUDA=0", "-o", str(out), *map(str, sources)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


_KINDS = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.uint16): 3, np.dtype(np.int16): 4,
          np.dtype(np.int32): 5, np.dtype(np.float16): 3}


def _entry(name: str, value) -> bytes:
    head = struct.pack("<I", len(name)) + name.encode()
    if isinstance(value, str):
        return head + struct.pack("<IQ", 6, len(value)) + value.encode()
    if isinstance(value, (int, np.integer)):
        return head + struct.pack("<IQq", 0, 1, int(value))
    a = np.ascontiguousarray(value)
    if a.dtype == np.float16:
        a = a.view(np.uint16)
    if a.dtype == np.uint32:
        a = a.view(np.int32)
    return head + struct.pack("<IQ", _KINDS[a.dtype], a.size) + a.tobytes()


def run(harness: Path, tmp_path: Path, op: str, x: np.ndarray, n: int, **fields) -> np.ndarray:
    case, out = tmp_path / "case.bin", tmp_path / "y.bin"
    body = b"QCKH" + _entry("op", op) + _entry("X", x.astype(np.float32)) + _entry("M", x.shape[0])
    body += b"".join(_entry(k, v) for k, v in fields.items() if v is not None)
    case.write_bytes(body)
    res = subprocess.run([QEMU, str(harness), str(case), str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return np.fromfile(out, np.float32).reshape(x.shape[0], n)


def close(y: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * float(np.abs(want).max()))


FP4_CASES = [  # M, K, N, G, scale format, Hadamard block, tensor_scale, bias
    (1, 200, 37, 32, "e8m0", 0, True, True),
    (3, 256, 40, 16, "e4m3", 16, True, False),
    (1, 512, 70, 32, "e8m0", 32, False, False),
]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("case", FP4_CASES, ids=str)
def test_fp4(harness, tmp_path, case, level):
    M, K, N, G, fmt, hb, ts, bias = case
    rng = np.random.default_rng(K + N)
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    w = fp4_ref.pack_fp4(codes, G)
    ng = fp4_ref.padded_k(K, G) // G
    s = rng.integers(118, 132, (N, ng), dtype=np.uint8) if fmt == "e8m0" else fp4_ref.encode_e4m3(
        rng.uniform(0.01, 3.0, (N, ng)))
    tsv = np.array([0.625], np.float32) if ts else None
    b = rng.normal(size=N).astype(np.float32) if bias else None
    x = rng.normal(size=(M, K)).astype(np.float32)
    x[:, 3::41] *= 30
    y = run(harness, tmp_path, "FP4MatMul", x, N, K=K, N=N, group_size=G, scale_format=fmt, hadamard_block=hb,
            accuracy_level=level, W=w, scales=s, tensor_scale=tsv, bias=b, threads=2)
    close(y, fp4_ref.fp4_matmul_reference(x, w, s, tsv, b, K=K, N=N, group_size=G, scale_format=fmt,
                                          hadamard_block=hb, accuracy_level=level))


SPQR_CASES = [  # M, K, N, bits, group_size, stat_bits, stat_group, perm
    (1, 577, 70, 3, 16, 3, 16, True),
    (5, 200, 37, 4, 32, 2, 7, True),
    (1, 256, 48, 4, 16, 3, 16, False),
]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("case", SPQR_CASES, ids=str)
def test_spqr(harness, tmp_path, case, level):
    M, K, N, bits, gs, sb, sg, perm = case
    packed = spqr_ref.random_packed(K, N, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg, outlier_rate=0.03,
                                    with_perm=perm, seed=K + N)
    rng = np.random.default_rng(N)
    b = rng.normal(size=N).astype(np.float32)
    x = rng.normal(size=(M, K)).astype(np.float32)
    x[:, 3::41] *= 30
    attrs = dict(K=K, N=N, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg)
    y = run(harness, tmp_path, "SpQRMatMul", x, N, **attrs, accuracy_level=level, bias=b, threads=2,
            **{k: packed.get(k) for k in ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices",
                                          "values", "perm")})
    names = ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm")
    close(y, spqr_ref.spqr_matmul_reference(x, *(packed.get(k) for k in names), b, **attrs, accuracy_level=level))


CODEBOOK_CASES = [  # M, K, N, codebooks, codebook size
    (1, 256, 2100, 2, 256),  # the batch-1 byte walk
    (3, 64, 24, 2, 16),      # lookup tables, codes checked per read
    (9, 128, 37, 2, 256),    # prefill
    (2, 32, 9, 1, 300),      # uint16 codes
]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("case", CODEBOOK_CASES, ids=str)
def test_codebook(harness, tmp_path, case, level):
    M, K, N, m, S = case
    rng = np.random.default_rng(K + N)
    codes = rng.integers(0, S, (N, K // 8, m)).astype(cb_ref.code_dtype(S))
    books = (rng.standard_normal((m, S, 8)) * 0.5).astype(np.float16)
    scales = rng.uniform(0.5, 1.5, N).astype(np.float16)
    x = rng.normal(size=(M, K)).astype(np.float32)
    attrs = dict(K=K, N=N, num_codebooks=m, codebook_size=S, in_group_size=8)
    y = run(harness, tmp_path, "CodebookMatMul", x, N, **attrs, accuracy_level=level, codes=codes, codebooks=books,
            scales=scales, threads=2)
    close(y, cb_ref.codebook_matmul(x, codes, books, scales, **attrs))  # (no int8 table without AVX-512 VBMI)


def test_malformed_index_is_an_error_not_a_crash(harness, tmp_path):
    packed = spqr_ref.random_packed(64, 16, seed=1)
    bad = packed["col_indices"].copy()
    bad[0] = 64  # past K
    with pytest.raises(AssertionError, match="col_indices|column"):
        run(harness, tmp_path, "SpQRMatMul", np.ones((1, 64), np.float32), 16, K=64, N=16, bits=3,
            **{**{k: packed.get(k) for k in ("codes", "stat_codes", "stat_params", "row_offsets", "values",
                                              "perm")}, "col_indices": bad})
