"""qcompile.FP4MatMul kernels (CPU, and CUDA where available) against the numpy reference, plus the error
behaviour on malformed models: every bad input must come back as an ORT exception, never a crash."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from cpu_flags import has_amx_bf16, has_avx2, has_avx512vnni
from prefill_variants import pin_prefill_tiles
from qcompile.formats import act_quant, prefill_amx
from qcompile.formats.fp4 import reference as fp4

F32, F16 = np.float32, np.float16


def fp4_model(*, K: int, N: int, G: int, fmt: str, hb: int = 0, dtype=F32, ts: bool = False, bias: bool = False,
              x_shape: list | None = None, extra_attrs: dict | None = None, drop_attrs: tuple = (),
              follow_with_add: bool = False):
    """One FP4MatMul node with graph inputs x, w, s[, ts][, b]; absent optional inputs use the "" name."""
    et = TensorProto.FLOAT16 if dtype == F16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", et, x_shape),
              helper.make_tensor_value_info("w", TensorProto.UINT8, None),
              helper.make_tensor_value_info("s", TensorProto.UINT8, None)]
    names = ["x", "w", "s", "ts" if ts else "", "b" if bias else ""]
    if ts:
        inputs.append(helper.make_tensor_value_info("ts", TensorProto.FLOAT, None))
    if bias:
        inputs.append(helper.make_tensor_value_info("b", et, None))
    while names[-1] == "":
        names.pop()
    attrs = dict(K=K, N=N, group_size=G, scale_format=fmt, hadamard_block=hb) | (extra_attrs or {})
    for a in drop_attrs:
        attrs.pop(a)
    out = "t" if follow_with_add else "y"
    nodes = [helper.make_node("FP4MatMul", names, [out], domain="qcompile", **attrs)]
    if follow_with_add:  # the op's output is an intermediate: its type must be inferred, not declared
        nodes.append(helper.make_node("Add", ["t", "t"], ["y"]))
    graph = helper.make_graph(nodes, "fp4", inputs, [helper.make_tensor_value_info("y", et, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompile", 1)])


def random_weights(rng, K: int, N: int, G: int, fmt: str, nan_row: int | None = None):
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    w = fp4.pack_fp4(codes, G)
    ng = fp4.padded_k(K, G) // G
    if fmt == "e8m0":
        s = rng.integers(118, 132, (N, ng), dtype=np.uint8)
        if nan_row is not None:
            s[nan_row, 0] = 255
    else:
        s = fp4.encode_e4m3(rng.uniform(0.005, 3.0, (N, ng)))
    return w, s


def check_close(y: np.ndarray, ref: np.ndarray, x, w, s, ts, K, N, G, fmt, hb, dtype, level: int = 0) -> None:
    """Elementwise bound: fp32 accumulation error relative to sum |terms|, plus fp16 output rounding."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    xd = np.asarray(x, np.float64).reshape(-1, K)
    if hb:
        xd = fp4.hadamard_transform(xd, hb)
    if level == act_quant.INT8:
        xd = act_quant.quantize_activations(xd.astype(np.float32)).astype(np.float64)
    wd = np.abs(fp4.dequantize_fp4(w, s, ts, K, G, fmt).astype(np.float64))
    mag = (np.abs(xd) @ wd.T).reshape(ref.shape)
    ref64 = ref.astype(np.float64)
    tol = 2e-6 * mag + 1e-30 + (np.abs(ref64) * 2 ** -10 if dtype == F16 else 0)
    err = np.abs(y.astype(np.float64) - ref64)
    bad = ~(err <= tol) & ~(np.isnan(ref64) & np.isnan(y))
    assert not bad.any(), f"{bad.sum()} mismatches, worst err {np.nanmax(err - tol)}"


CASES = [
    # M-shape, K, N, G, fmt, hb, dtype, ts, bias
    ((1,), 64, 8, 32, "e8m0", 0, F32, False, False),
    ((1,), 200, 37, 32, "e8m0", 0, F32, True, True),        # K not a multiple of G (padded), ragged 64-block
    ((1,), 512, 300, 16, "e4m3", 64, F32, True, False),     # NVFP4-like with rotation, many row tasks
    ((7,), 256, 40, 16, "e4m3", 16, F32, True, True),
    ((64,), 136, 33, 8, "e4m3", 8, F16, False, True),       # bias without tensor_scale ("" input)
    ((2, 3), 96, 20, 32, "e8m0", 32, F16, True, True),      # leading batch dims
    ((64,), 320, 70, 64, "e8m0", 0, F32, False, False),
    ((5,), 40, 3, 256, "e8m0", 8, F32, False, True),        # group larger than K
    ((2, 1, 4), 1000, 52, 128, "e4m3", 0, F16, True, False),
]


@pytest.fixture(autouse=True)
def fp32_prefill(monkeypatch):
    """fp32 prefill kernels everywhere; the AMX prefill has its own bound (test_prefill_amx_*)."""
    monkeypatch.setenv("QCOMPILE_PREFILL_AMX", "0")


def _run_case(make_session, case, seed: int, **model_kw):
    mshape, K, N, G, fmt, hb, dtype, ts, bias = case
    rng = np.random.default_rng(seed)
    w, s = random_weights(rng, K, N, G, fmt)
    x = rng.normal(size=(*mshape, K)).astype(dtype)
    tsv = np.array([0.625], np.float32) if ts else None
    b = rng.normal(size=N).astype(dtype) if bias else None
    sess = make_session(fp4_model(K=K, N=N, G=G, fmt=fmt, hb=hb, dtype=dtype, ts=ts, bias=bias, **model_kw))
    feed = {"x": x, "w": w, "s": s} | ({"ts": tsv} if ts else {}) | ({"b": b} if bias else {})
    y = sess.run(None, feed)[0]
    ref = fp4.fp4_matmul_reference(x, w, s, tsv, b, K=K, N=N, group_size=G, scale_format=fmt, hadamard_block=hb)
    if model_kw.get("follow_with_add"):
        ref = (ref.astype(np.float64) * 2).astype(dtype)
    check_close(y, ref, x, w, s, tsv, K, N, G, fmt, hb, dtype)


@pytest.mark.parametrize("simd", ["auto", "portable"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-G{c[3]}-{c[4]}-hb{c[5]}-{c[6].__name__}")
def test_cpu_matches_reference(ops_session, monkeypatch, case, simd):
    if simd == "portable":  # the x86-64-v2 fallback path must agree too
        monkeypatch.setenv("QCOMPILE_FP4_NO_AVX2", "1")
    _run_case(ops_session, case, seed=zlib.crc32(repr(case[:6]).encode()))


@pytest.mark.parametrize("simd", ["auto", "portable"])
@pytest.mark.parametrize("fmt", ["e8m0", "e4m3"])
@pytest.mark.parametrize("M", [1, 7])
def test_every_scale_code(ops_session, monkeypatch, fmt, M, simd):
    """All 256 scale codes (subnormal, largest, NaN) in 8-wide runs, as the vectorized scale decoder reads them."""
    if simd == "portable":
        monkeypatch.setenv("QCOMPILE_FP4_NO_AVX2", "1")
    rng = np.random.default_rng(5)
    K, N, G = 320, 26, 32  # 10 groups per row: one 8-wide run plus a 2-code tail
    w, _ = random_weights(rng, K, N, G, fmt)
    s = np.resize(rng.permutation(256).astype(np.uint8), (N, K // G))
    if fmt == "e8m0":  # 6 * 2^126 overflows float32 in the reference's dequantized weights
        s[(s == 253) | (s == 254)] = 252
    x = (rng.normal(size=(M, K)) * 2.0**-32).astype(F32)  # keeps rows with 2^127 scales finite
    y = ops_session(fp4_model(K=K, N=N, G=G, fmt=fmt)).run(None, {"x": x, "w": w, "s": s})[0]
    ref = fp4.fp4_matmul_reference(x, w, s, None, None, K=K, N=N, group_size=G, scale_format=fmt, hadamard_block=0)
    nan_rows = np.isnan(ref).all(axis=0)
    assert 1 <= nan_rows.sum() < N
    check_close(y, ref, x, w, s, None, K, N, G, fmt, 0, F32)


GEMV_TAILS = [  # M = 1 shapes whose W rows end in a partial 64-weight block (or have no whole block)
    ((1,), 136, 9, 8, "e4m3", 0, F32, True, False),
    ((1,), 48, 5, 16, "e4m3", 16, F16, True, True),
    ((1,), 96, 11, 32, "e8m0", 0, F32, False, True),
    ((1,), 512, 9, 32, "e8m0", 256, F32, False, False),   # largest rotation block
]


@pytest.mark.parametrize("simd", ["auto", "portable"])
@pytest.mark.parametrize("case", GEMV_TAILS, ids=lambda c: f"K{c[1]}-N{c[2]}-G{c[3]}")
def test_gemv_partial_last_block(ops_session, monkeypatch, case, simd):
    if simd == "portable":
        monkeypatch.setenv("QCOMPILE_FP4_NO_AVX2", "1")
    _run_case(ops_session, case, seed=17)


PREFILL_TILES = [  # M > 1 shapes around the AVX2 prefill kernel's blocks: 16 + 8 rows of X, 6 and 12 rows of W
    ((6,), 128, 13, 32, "e8m0", 4, F32, False, True),      # rotation block < 8 (scalar transform)
    ((20,), 192, 25, 32, "e8m0", 32, F32, True, False),    # 16-row block + 8-row tail
    ((3, 9), 320, 7, 16, "e4m3", 0, F16, True, True),      # 27 rows: 16 + 8 + 8 (padded), N < 12
    ((40,), 200, 37, 8, "e4m3", 8, F32, False, False),     # ragged K (partial last 64-block), N % 12 = 1
    ((56,), 256, 30, 32, "e8m0", 0, F32, True, False),     # 32 + 16 + 8 rows of X; last tile of 6 W rows
]


# "auto" multiplies the tiles with the AVX-512 microkernel where the CPU has AVX-512 (32 and 16 rows of X per
# call, 8-row tail in AVX2); "avx2-tiles" pins the AVX2 microkernel that other x86 CPUs run; the "passes"
# variants sweep X in passes of 16 or 32 rows with 3 or 2 tiles of W per task (as large M and N do).
@pytest.mark.parametrize("simd", ["auto", "avx2-tiles", "passes-16-tiles-3", "avx2-passes-32-tiles-2", "portable"])
@pytest.mark.parametrize("case", PREFILL_TILES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-G{c[3]}")
def test_prefill_tile_edges(ops_session, monkeypatch, case, simd):
    if simd == "portable":
        monkeypatch.setenv("QCOMPILE_FP4_NO_AVX2", "1")
    pin_prefill_tiles(monkeypatch, simd)
    _run_case(ops_session, case, seed=23)


AMX_CASES = [  # M >= 32 around the AMX kernels: 2 to 8 blocks of 16 rows of X, tiles of 32 or fewer rows of W
    ((32,), 128, 30, 32, "e8m0", 0, F32, False, True),     # two blocks, one tile of 17-32 rows
    ((40,), 200, 70, 8, "e4m3", 8, F32, True, False),      # ragged K, tiles of 32 + 32 + 6 rows, tensor scale
    ((56,), 256, 16, 32, "e8m0", 32, F16, False, True),     # 3.5 blocks, one tile of 16 rows
    ((128,), 512, 100, 16, "e4m3", 0, F32, False, True),    # 8 blocks, tiles of 32 + 4 rows
]


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
@pytest.mark.parametrize("tiles", ["auto", "passes-16-tiles-3"])
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-G{c[3]}-{c[4]}")
def test_prefill_amx_within_documented_bound(ops_session, monkeypatch, case, tiles):
    """On AMX the prefill multiplies bf16 splits (qcompile.formats.prefill_amx): within 2^-14 Σ|x·w| of the
    reference, yet not the fp32 kernels' result (so AMX ran), while accuracy_level=1 gives the fp32 kernels'
    result bit for bit."""
    pin_prefill_tiles(monkeypatch, tiles)
    mshape, K, N, G, fmt, hb, dtype, ts, bias = case
    rng = np.random.default_rng(K + N)
    w, s = random_weights(rng, K, N, G, fmt)
    x = rng.normal(size=(*mshape, K)).astype(dtype)
    tsv = np.array([0.625], np.float32) if ts else None
    b = rng.normal(size=N).astype(dtype) if bias else None
    feed = {"x": x, "w": w, "s": s} | ({"ts": tsv} if ts else {}) | ({"b": b} if bias else {})

    def run(amx: str, level: int = 0):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        model = fp4_model(K=K, N=N, G=G, fmt=fmt, hb=hb, dtype=dtype, ts=ts, bias=bias,
                          extra_attrs={"accuracy_level": level})
        return ops_session(model, threads=2).run(None, feed)[0]

    y_amx, y_fp32, y_level1 = run("1"), run("0"), run("1", level=1)
    ref = fp4.fp4_matmul_reference(x, w, s, tsv, b, K=K, N=N, group_size=G, scale_format=fmt, hadamard_block=hb)
    xd = np.asarray(x, np.float64).reshape(-1, K)
    if hb:
        xd = fp4.hadamard_transform(xd, hb)
    mag = (np.abs(xd) @ np.abs(fp4.dequantize_fp4(w, s, tsv, K, G, fmt).astype(np.float64)).T).reshape(ref.shape)
    ref64 = ref.astype(np.float64)
    tol = (prefill_amx.RELATIVE_BOUND + 2e-6) * mag + 1e-30 + (np.abs(ref64) * 2 ** -10 if dtype == F16 else 0)
    err = np.abs(y_amx.astype(np.float64) - ref64)
    assert (err <= tol).all(), (err / mag).max()
    assert not np.array_equal(y_amx, y_fp32)
    np.testing.assert_array_equal(y_level1, y_fp32)


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
def test_prefill_amx_keeps_non_finite_data_on_fp32(ops_session, monkeypatch):
    """A NaN or Inf is never split into bf16: a NaN scale keeps its tile's slices on the fp32 kernels (its
    row NaN, the others as on AMX), a NaN activation the whole call (then equal to the fp32 kernels' result)."""
    K, N, G = 256, 70, 32
    rng = np.random.default_rng(9)
    w, s = random_weights(rng, K, N, G, "e8m0")
    s[40, 3] = 255  # E8M0 NaN: row 40 (second tile of 32 rows)
    x = rng.normal(size=(40, K)).astype(F32)
    model = fp4_model(K=K, N=N, G=G, fmt="e8m0")
    y = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        y[amx] = ops_session(model).run(None, {"x": x, "w": w, "s": s})[0]
    assert np.isnan(y["1"][:, 40]).all() and np.isfinite(np.delete(y["1"], 40, axis=1)).all()
    assert not np.array_equal(y["1"][:, :32], y["0"][:, :32])  # the first tile on AMX
    x[5, 100] = np.nan
    for amx in ("1", "0"):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        y[amx] = ops_session(model).run(None, {"x": x, "w": w, "s": s})[0]
    np.testing.assert_array_equal(y["1"], y["0"])


def test_cpu_multithreaded_and_intermediate_output(ops_session):
    _run_case(lambda m: ops_session(m, threads=2), ((9,), 384, 130, 32, "e8m0", 128, F32, False, True), seed=3,
              follow_with_add=True)
    _run_case(lambda m: ops_session(m, threads=2), ((1,), 384, 130, 32, "e8m0", 0, F16, True, True), seed=4,
              follow_with_add=True)


def test_nan_scale_propagates_to_its_row_only(ops_session):
    rng = np.random.default_rng(7)
    K, N, G = 64, 6, 32
    w, s = random_weights(rng, K, N, G, "e8m0", nan_row=2)
    x = rng.normal(size=(3, K)).astype(F32)
    y = ops_session(fp4_model(K=K, N=N, G=G, fmt="e8m0")).run(None, {"x": x, "w": w, "s": s})[0]
    assert np.isnan(y[:, 2]).all() and not np.isnan(np.delete(y, 2, axis=1)).any()


def test_zero_rows(ops_session):
    sess = ops_session(fp4_model(K=64, N=5, G=32, fmt="e8m0"))
    w, s = random_weights(np.random.default_rng(0), 64, 5, 32, "e8m0")
    y = sess.run(None, {"x": np.zeros((0, 64), F32), "w": w, "s": s})[0]
    assert y.shape == (0, 5)


# ---- accuracy_level 4: int8 activations -----------------------------------------------------------------------

# Paths at accuracy_level 4: one X row on the AVX-512 VNNI or the AVX2 int8 dot products, or (portable, and
# every M > 1) the fp32 kernels multiplying with the quantized activation. Each must compute the reference's
# quantized product, Q8(Hadamard_b(X)) @ Wdeqᵀ, to fp32 accumulation.
INT8_PATHS = {
    "avx512": {},
    "avx2": {"QCOMPILE_FP4_NO_AVX512": "1"},
    "portable": {"QCOMPILE_FP4_NO_AVX2": "1"},
}
INT8_CASES = CASES + GEMV_TAILS + [
    ((1,), 4096, 70, 32, "e8m0", 32, F32, False, True),    # MXFP4 as mxfp4-mr writes it, many spans
    ((1,), 2000, 33, 64, "e4m3", 16, F16, True, False),    # a group of 4 blocks, ragged last span
    ((1,), 300, 5, 256, "e8m0", 4, F32, False, True),      # one group over several spans
]


def _int8_case(make_session, case, seed: int):
    mshape, K, N, G, fmt, hb, dtype, ts, bias = case
    rng = np.random.default_rng(seed)
    w, s = random_weights(rng, K, N, G, fmt)
    x = rng.normal(size=(*mshape, K)).astype(dtype)
    x[..., 3::41] *= 30  # a few large channels, as real activations have
    tsv = np.array([0.625], np.float32) if ts else None
    b = rng.normal(size=N).astype(dtype) if bias else None
    sess = make_session(fp4_model(K=K, N=N, G=G, fmt=fmt, hb=hb, dtype=dtype, ts=ts, bias=bias,
                                  extra_attrs={"accuracy_level": 4}))
    feed = {"x": x, "w": w, "s": s} | ({"ts": tsv} if ts else {}) | ({"b": b} if bias else {})
    y = sess.run(None, feed)[0]
    kw = dict(K=K, N=N, group_size=G, scale_format=fmt, hadamard_block=hb)
    want = fp4.fp4_matmul_reference(x, w, s, tsv, b, **kw, accuracy_level=4)
    check_close(y, want, x, w, s, tsv, K, N, G, fmt, hb, dtype, level=4)
    return x, w, s, tsv, b, y, kw


@pytest.mark.parametrize("path", list(INT8_PATHS))
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-G{c[3]}-{c[4]}-hb{c[5]}-{c[6].__name__}")
def test_int8_activations_match_quantized_reference(ops_session, monkeypatch, case, path):
    if path == "avx512" and not has_avx512vnni():
        pytest.skip("the AVX-512 int8 path needs AVX-512 VNNI")
    if path == "avx2" and not has_avx2():
        pytest.skip("no AVX2")
    for k, v in INT8_PATHS[path].items():
        monkeypatch.setenv(k, v)
    _int8_case(ops_session, case, seed=zlib.crc32(repr(case[:6]).encode()))


def test_int8_activations_within_documented_bound(ops_session):
    """Against the fp32 reference, the error stays under the quantization bound of docs/ops.md, and it is the
    size int8 predicts (so the int8 path did run: it is not the fp32 result)."""
    x, w, s, tsv, b, y, kw = _int8_case(ops_session, ((1,), 4096, 96, 32, "e8m0", 32, F32, False, False), seed=3)
    exact = fp4.fp4_matmul_reference(x, w, s, tsv, b, **kw).astype(np.float64)
    xr = fp4.fwht_float32(x, 32)
    wabs = np.abs(fp4.dequantize_fp4(w, s, tsv, kw["K"], kw["group_size"], kw["scale_format"]).astype(np.float64)).T
    bound = act_quant.quantization_error_bound(xr, wabs)
    err = np.abs(y.astype(np.float64) - exact)
    assert (err <= bound + 2e-6 * (np.abs(xr) @ wabs)).all()
    rel = np.sqrt(np.mean(err ** 2) / np.mean(exact ** 2))
    assert 1e-4 < rel < 2e-2, rel


@pytest.mark.parametrize("path", list(INT8_PATHS))
def test_int8_activations_huge_scales_and_non_finite_rows(ops_session, monkeypatch, path):
    """One row: group scale x tensor_scale beyond fp32 with tiny activations, finite in the reference (the
    int8 GEMVs recompute sums that overflow its way; the fp32 kernels fold tensor_scale into the scales at
    every accuracy_level and overflow there). Rows with a NaN or an Inf are used unquantized."""
    for k, v in INT8_PATHS[path].items():
        monkeypatch.setenv(k, v)
    rng = np.random.default_rng(9)
    K, N, G = 256, 20, 32
    w, s = random_weights(rng, K, N, G, "e8m0")
    kw = dict(K=K, N=N, group_size=G, scale_format="e8m0", hadamard_block=0, accuracy_level=4)
    sess = ops_session(fp4_model(K=K, N=N, G=G, fmt="e8m0", ts=True, extra_attrs={"accuracy_level": 4}))
    huge = s.copy()
    huge[:4] = 250  # 2^123 * tensor_scale 2^8 = 2^131: infinite in fp32
    tsv = np.array([256.0], np.float32)
    x = (rng.normal(size=(1, K)) * 2.0**-60).astype(F32)
    want = fp4.fp4_matmul_reference(x, w, huge, tsv, None, **kw)
    assert np.isfinite(want).all()
    if path != "portable":
        np.testing.assert_allclose(sess.run(None, {"x": x, "w": w, "s": huge, "ts": tsv})[0], want, rtol=1e-5)
    x = rng.normal(size=(3, K)).astype(F32)
    x[1, 7] = np.nan
    x[2, 9] = np.inf
    tsv = np.array([1.0], np.float32)
    for rows in (x[1:2], x[2:], x):  # the int8 GEMV hands a non-finite row to the fp32 path
        y = sess.run(None, {"x": rows, "w": w, "s": s, "ts": tsv})[0]
        with np.errstate(invalid="ignore"):
            want = fp4.fp4_matmul_reference(rows, w, s, tsv, None, **kw)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
        np.testing.assert_array_equal(np.isposinf(y), np.isposinf(want))
        np.testing.assert_allclose(y[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0][np.isfinite(want[0])]).max(initial=1))


@pytest.mark.parametrize("level", [-1, 5, 2.0])
def test_bad_accuracy_level_raises(ops_session, level):
    with pytest.raises(InvalidArgument, match="FP4MatMul"):
        ops_session(fp4_model(K=64, N=4, G=32, fmt="e8m0", extra_attrs={"accuracy_level": level})).run(None, _feed())


# ---- malformed models / inputs ----------------------------------------------------------------------------


def _feed(K=64, N=4, G=32, fmt="e8m0", M=2, dtype=F32):
    w, s = random_weights(np.random.default_rng(1), K, N, G, fmt)
    return {"x": np.ones((M, K), dtype), "w": w, "s": s}


@pytest.mark.parametrize("bad_attrs", [
    dict(extra_attrs=dict(group_size=12)),
    dict(extra_attrs=dict(group_size=4)),
    dict(extra_attrs=dict(group_size=512)),
    dict(extra_attrs=dict(scale_format="e5m2")),
    dict(extra_attrs=dict(hadamard_block=3)),
    dict(extra_attrs=dict(hadamard_block=512)),
    dict(extra_attrs=dict(hadamard_block=-2)),
    dict(extra_attrs=dict(K=40, hadamard_block=16)),  # does not divide K
    dict(extra_attrs=dict(K=0)),
    dict(extra_attrs=dict(N=-1)),
    dict(drop_attrs=("group_size",)),
    dict(drop_attrs=("scale_format",)),
    dict(extra_attrs=dict(hadamard_block=2.0)),  # wrong type must not fall back to the default
    dict(extra_attrs=dict(group_size="32")),
], ids=str)
def test_bad_attributes_raise(ops_session, bad_attrs):
    model = fp4_model(K=64, N=4, G=32, fmt="e8m0", **bad_attrs)
    # found when the session is created; make_session raises it as InvalidArgument (docs/ops.md)
    with pytest.raises(InvalidArgument, match="FP4MatMul"):
        ops_session(model).run(None, _feed())


@pytest.mark.parametrize("mutate", ["x_last_dim", "w_truncated", "w_rows", "w_1d", "scales_shape", "scales_rows",
                                    "ts_two", "ts_empty", "bias_shape", "bias_2d"])
def test_bad_shapes_raise(ops_session, mutate):
    ts = mutate.startswith("ts")
    bias = mutate.startswith("bias")
    sess = ops_session(fp4_model(K=64, N=4, G=32, fmt="e8m0", ts=ts, bias=bias))
    feed = _feed()
    if ts:
        feed["ts"] = np.ones(2 if mutate == "ts_two" else 0, np.float32)
    if bias:
        feed["b"] = np.ones(5, F32) if mutate == "bias_shape" else np.ones((1, 4), F32)
    if mutate == "x_last_dim":
        feed["x"] = np.ones((2, 63), F32)
    elif mutate == "w_truncated":
        feed["w"] = feed["w"][:, :-1].copy()
    elif mutate == "w_rows":
        feed["w"] = feed["w"][:-1].copy()
    elif mutate == "w_1d":
        feed["w"] = feed["w"].reshape(-1)
    elif mutate == "scales_shape":
        feed["s"] = feed["s"][:, :1].copy()
    elif mutate == "scales_rows":
        feed["s"] = np.concatenate([feed["s"], feed["s"]])
    with pytest.raises(InvalidArgument, match="FP4MatMul"):
        sess.run(None, feed)


def test_bias_dtype_mismatch_is_rejected(ops_session):
    model = fp4_model(K=64, N=4, G=32, fmt="e8m0", bias=True)
    model.graph.input[3].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(Exception):
        ops_session(model).run(None, _feed() | {"b": np.ones(4, F16)})


# ---- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES + [((128,), 4096, 256, 32, "e8m0", 32, F16, False, True),
                                          ((3,), 4096, 512, 16, "e4m3", 128, F16, True, False)],
                         ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-G{c[3]}-{c[4]}-hb{c[5]}-{c[6].__name__}")
def test_cuda_matches_reference(cuda_session, case):
    _run_case(cuda_session, case, seed=11)


@pytest.mark.cuda
def test_cuda_bad_shapes_raise(cuda_session):
    sess = cuda_session(fp4_model(K=64, N=4, G=32, fmt="e8m0"))
    feed = _feed()
    feed["w"] = feed["w"][:, :-1].copy()
    with pytest.raises(Exception):
        sess.run(None, feed)


# ---- benchmark harness (tiny shapes: checks the plumbing, not the speed) ---------------------------------------


def test_bench_rows_and_table(ops_library, monkeypatch):
    from qcompile import bench

    monkeypatch.setenv("QCOMPILE_OPS_LIBRARY", str(ops_library))
    rows = bench.run_op_bench(ops=["fp4matmul"], shapes=[(64, 32)], ms=[1, 3], repeats=2, warmup=1, flush_mb=1,
                              threads=1, verbose=False)
    assert [(r["K"], r["N"], r["M"]) for r in rows] == [(64, 32, 1), (64, 32, 3)]
    for r in rows:
        for name in ("FP4MatMul", "MatMul", "NBits-a0", "NBits-a4"):
            assert r[f"{name}_ms"] > 0
        assert r["MatMul/FP4MatMul"] == pytest.approx(r["MatMul_ms"] / r["FP4MatMul_ms"])
    table = bench.format_table(rows)
    assert table.splitlines()[0].startswith("| K x N | M | FP4MatMul_ms") and "64x32" in table
    with pytest.raises(ValueError, match="unknown bench op"):
        bench.run_op_bench(ops=["nope"], shapes=[(64, 32)], ms=[1], verbose=False)


def test_bench_cli_as_script_sees_plugin_ops(ops_library):
    """``python -m qcompile.bench --ops CodebookMatMul``: the op is registered by a plugin module, which must
    land in the registry the script's entry point reads (regression: run as ``__main__`` it did not)."""
    import os
    import subprocess
    import sys

    env = os.environ | {"QCOMPILE_OPS_LIBRARY": str(ops_library)}
    proc = subprocess.run([sys.executable, "-m", "qcompile.bench", "--ops", "CodebookMatMul", "--shapes", "64x32",
                           "--m", "1", "--repeats", "1", "--warm"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| CodebookMatMul_ms |" in proc.stdout and "| 64x32 | 1 |" in proc.stdout


def test_bench_models_compute_what_they_claim(ops_session):
    """The FP4 bench model is a valid FP4MatMul: its output matches the reference on its own weights."""
    from onnx import numpy_helper

    from qcompile import bench

    model = bench.registered_ops()["FP4MatMul-nv"].build(64, 24, np.dtype(np.float32), np.random.default_rng(0))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(1).normal(size=(2, 64)).astype(F32)
    y = ops_session(model).run(None, {"x": x})[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    ref = fp4.fp4_matmul_reference(x, inits["w"], inits["s"], inits["ts"], None, K=64, N=24, group_size=16,
                                   scale_format="e4m3", hadamard_block=attrs["hadamard_block"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
