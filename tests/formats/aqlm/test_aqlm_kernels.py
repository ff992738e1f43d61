"""qcompile.CodebookMatMul native kernels (CPU; CUDA when available) against the numpy reference, plus the
validation contract: bad codes, shapes, dtypes and attributes are ORT errors, never crashes."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from cpu_flags import has_amx_bf16, has_avx512bw, has_avx512vbmi
from prefill_variants import pin_prefill_tiles
from qcompile.formats import prefill_amx
from qcompile.formats.aqlm import reference as ref

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def make_case(rows, K, N, M, S, d=8, xdt=np.float32, bias=False, scale_dt=np.float16, lead=None, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, S, (N, K // d, M)).astype(ref.code_dtype(S))
    books = (rng.standard_normal((M, S, d)) * 0.5).astype(np.float16)
    scales = rng.uniform(0.5, 1.5, N).astype(scale_dt)
    b = rng.standard_normal(N).astype(xdt) if bias else None
    shape = (rows, K) if lead is None else (*lead, K)
    x = rng.standard_normal(shape).astype(xdt)
    return x, codes, books, scales, b, dict(K=K, N=N, num_codebooks=M, codebook_size=S, in_group_size=d)


def make_model(x_dtype, codes, books, scales, bias, attrs, *, codes_as_input=False, extra_attrs=None):
    et = F32 if np.dtype(x_dtype) == np.float32 else F16
    inits = [numpy_helper.from_array(books, "codebooks"), numpy_helper.from_array(scales, "scales")]
    graph_inputs = [helper.make_tensor_value_info("x", et, None)]
    if codes_as_input:
        graph_inputs.append(helper.make_tensor_value_info("codes", helper.np_dtype_to_tensor_dtype(codes.dtype), None))
    else:
        inits.append(numpy_helper.from_array(codes, "codes"))
    names = ["x", "codes", "codebooks", "scales"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    node = helper.make_node("CodebookMatMul", names, ["y"], domain="qcompile", **{**attrs, **(extra_attrs or {})})
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", et, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompile", 1)])


@pytest.fixture(autouse=True)
def fp32_prefill(monkeypatch):
    """fp32 prefill kernels everywhere; the AMX prefill has its own bound (test_prefill_amx_*)."""
    monkeypatch.setenv("QCOMPILE_PREFILL_AMX", "0")


def run_case(session_factory, case, threads=None):
    x, codes, books, scales, b, attrs = case
    sess = session_factory(make_model(x.dtype, codes, books, scales, b, attrs), threads=threads)
    return sess.run(None, {"x": x})[0]


def check(y, case):
    x, codes, books, scales, b, attrs = case
    want = ref.codebook_matmul(x, codes, books, scales, b, **attrs).astype(np.float32)
    got = y.astype(np.float32)
    assert y.shape == want.shape and y.dtype == x.dtype
    # fp32 accumulation order differs from numpy's; fp16 outputs add one rounding of the result.
    tol = 2e-3 if x.dtype == np.float16 else 2e-5
    scale = np.abs(want).max() + 1e-6
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max() / scale


CASES = {
    # rows, K, N, M, S, d, x dtype, bias
    "gemv-2x8": (1, 128, 40, 2, 256, 8, np.float32, False),
    "gemv-1x8-f16-bias": (1, 64, 33, 1, 256, 8, np.float16, True),
    "rows7-2x4-bias": (7, 64, 24, 2, 16, 8, np.float32, True),
    "rows7-1x8-f16": (7, 96, 20, 1, 256, 8, np.float16, False),
    "rows64-2x8-bias": (64, 128, 37, 2, 256, 8, np.float32, True),
    "rows64-1x4-f16": (64, 64, 16, 1, 16, 8, np.float16, True),
    "rows3-3cb-size5-d4": (3, 12, 7, 3, 5, 4, np.float32, True),
    "uint16-codes": (2, 32, 9, 1, 300, 8, np.float32, False),
    # byte-code LUT walk (lut_rows_u8): several 256-table super-slices plus a tail of 8 tables, two row
    # tasks (the second partial); one codebook with a table tail; auto-selected at N >= 8*S with one row
    "lut-u8-slices-tail-2tasks": (1, 1120, 600, 2, 256, 8, np.float32, True),
    "lut-u8-1cb-tail-f16": (1, 320, 520, 1, 256, 8, np.float16, False),
    "lut-u8-auto-wide": (1, 64, 2100, 2, 256, 8, np.float32, False),
    # constant codes of a layer the byte walk serves (N >= 8*S) are copied once into its slice order:
    # a table tail (T = 280), five row blocks (the last partial, with an odd row count for the walk's
    # two-rows-at-a-time loop), and S < 256 (codes checked once, not per call)
    "lut-u8-sliced-tail-5blocks": (1, 1120, 2101, 2, 256, 8, np.float32, True),
    "lut-u8-sliced-s250-f16": (1, 128, 2048, 2, 250, 8, np.float16, False),
}


@pytest.mark.parametrize("path", ["auto", "lut", "fused", "gemm"])
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_matches_reference(ops_session, monkeypatch, name, path, simd):
    # fp32 tables on every path here; the fixed-point walk has its own bound (test_fixed_point_walk_*)
    monkeypatch.setenv("QCOMPILE_CODEBOOK_LUT_FP32", "1")
    rows, K, N, M, S, d, xdt, bias = CASES[name]
    if path != "auto":
        monkeypatch.setenv("QCOMPILE_CODEBOOK_PATH", path)
    if not simd:
        monkeypatch.setenv("QCOMPILE_CODEBOOK_NO_AVX2", "1")
    case = make_case(rows, K, N, M, S, d, xdt, bias)
    check(run_case(ops_session, case), case)


@pytest.mark.parametrize("tiles", ["avx2", "passes-16-tiles-3", "avx2-passes-32-tiles-2"])
@pytest.mark.parametrize("name", ["rows7-2x4-bias", "rows64-2x8-bias", "rows64-1x4-f16"])
def test_prefill_avx2_tile_kernel(ops_session, monkeypatch, name, tiles):
    """The prefill path with the AVX2 tile microkernel pinned (test_cpu_matches_reference's "gemm" path runs the
    AVX-512 one where the CPU has it), and either kernel sweeping X in passes of 16 or 32 rows with 3 or 2
    tiles of W per task (as large M and N do)."""
    monkeypatch.setenv("QCOMPILE_CODEBOOK_PATH", "gemm")
    pin_prefill_tiles(monkeypatch, tiles)
    case = make_case(*CASES[name])
    check(run_case(ops_session, case), case)


AMX_CASES = {  # rows of X: 2 to 8 blocks of 16; rows of W: tiles of 32 or fewer
    "rows32-2x8": (32, 128, 30, 2, 256, 8, np.float32, True),     # two blocks, one tile of 17-32 rows
    "rows40-1x8-f16": (40, 200, 70, 1, 256, 8, np.float16, False),  # K % 32 = 8, tiles of 32 + 32 + 6 rows
    "rows56-2x4": (56, 256, 16, 2, 16, 8, np.float32, True),      # 3.5 blocks, one tile of 16 rows
    "rows128-2x8": (128, 512, 100, 2, 256, 8, np.float32, False),  # 8 blocks, tiles of 32 + 4 rows
}


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
@pytest.mark.parametrize("tiles", ["auto", "passes-16-tiles-3"])
@pytest.mark.parametrize("name", list(AMX_CASES))
def test_prefill_amx_within_documented_bound(ops_session, monkeypatch, name, tiles):
    """On AMX the prefill multiplies bf16 splits (qcompile.formats.prefill_amx): within 2^-14 Σ|x·w| of the
    exact result, yet not the fp32 kernels' result (so AMX ran), while accuracy_level=1 gives the fp32
    kernels' result bit for bit."""
    monkeypatch.setenv("QCOMPILE_CODEBOOK_PATH", "gemm")
    pin_prefill_tiles(monkeypatch, tiles)
    x, codes, books, scales, b, attrs = make_case(*AMX_CASES[name], seed=len(name))

    def run(amx: str, level: int = 0):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        model = make_model(x.dtype, codes, books, scales, b, attrs, extra_attrs={"accuracy_level": level})
        return ops_session(model, threads=2).run(None, {"x": x})[0]

    y_amx, y_fp32, y_level1 = run("1"), run("0"), run("1", level=1)
    w = ref.dequantize(codes, books, scales).astype(np.float64)  # [N, K]
    xd = x.astype(np.float64)
    want = xd @ w.T + (0 if b is None else b.astype(np.float64))
    mag = np.abs(xd) @ np.abs(w).T
    tol = (prefill_amx.RELATIVE_BOUND + 2e-6) * mag + (np.abs(want) * 2.0**-10 if x.dtype == np.float16 else 0)
    err = np.abs(y_amx.astype(np.float64) - want)
    assert (err <= tol + 1e-30).all(), (err / mag).max()
    assert not np.array_equal(y_amx, y_fp32)
    np.testing.assert_array_equal(y_level1, y_fp32)


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
def test_prefill_amx_keeps_non_finite_data_on_fp32(ops_session, monkeypatch):
    """A NaN or Inf is never split into bf16: an Inf codeword keeps the tiles that use it on the fp32 kernels
    (their outputs as there), a NaN activation the whole call (then equal to the fp32 kernels' result)."""
    monkeypatch.setenv("QCOMPILE_CODEBOOK_PATH", "gemm")
    x, codes, books, scales, b, attrs = make_case(40, 128, 70, 2, 256, 8, np.float32, True, seed=3)
    books = books.copy()
    books[0, 7, 2] = np.inf
    codes = codes.copy()
    codes[codes[..., 0] == 7, 0] = 8
    codes[45, 3, 0] = 7  # row 45 (second tile of 32 rows) meets the Inf
    model = make_model(x.dtype, codes, books, scales, b, attrs)
    y = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        y[amx] = ops_session(model).run(None, {"x": x})[0]
    assert not np.isfinite(y["1"][:, 45]).any() and np.isfinite(np.delete(y["1"], 45, axis=1)).all()
    np.testing.assert_array_equal(y["1"][:, 32:64], y["0"][:, 32:64])
    assert not np.array_equal(y["1"][:, :32], y["0"][:, :32])  # the first tile on AMX
    x = x.copy()
    x[5, 100] = np.nan
    for amx in ("1", "0"):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        y[amx] = ops_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y["1"], y["0"])


def test_leading_batch_dims_fp32_scales_and_threads(ops_session):
    case = make_case(None, 64, 48, 2, 256, lead=(2, 3), scale_dt=np.float32, bias=True)
    y = run_case(ops_session, case, threads=2)
    assert y.shape == (2, 3, 48)
    check(y, case)


def test_empty_batch(ops_session):
    case = make_case(None, 64, 8, 1, 256, lead=(0,))
    assert run_case(ops_session, case).shape == (0, 8)


@pytest.mark.parametrize("path", ["lut", "fused", "gemm"])
@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("S", [16, 300])
@pytest.mark.parametrize("codes_as_input", [False, True], ids=["initializer", "graph-input"])
def test_out_of_range_code_is_an_error(ops_session, monkeypatch, path, rows, S, codes_as_input):
    # constant codes are checked once when the session is created; codes fed at run time by the kernel
    monkeypatch.setenv("QCOMPILE_CODEBOOK_PATH", path)
    x, codes, books, scales, b, attrs = make_case(rows, 64, 40, 2, S)
    codes[17, 3, 1] = S  # one past the end of codebook 1
    feeds = {"x": x, "codes": codes} if codes_as_input else {"x": x}
    with pytest.raises(InvalidArgument, match=rf"code {S} at \[17, 3, 1\] is out of range"):
        sess = ops_session(make_model(x.dtype, codes, books, scales, b, attrs, codes_as_input=codes_as_input))
        sess.run(None, feeds)


@pytest.mark.parametrize("S", [250, 256])
def test_constant_codes_prepared_once_match_codes_fed_at_run_time(ops_session, monkeypatch, S):
    # the same weight through the prepared (slice-ordered, checked once) and the per-call path, fp32 tables
    monkeypatch.setenv("QCOMPILE_CODEBOOK_LUT_FP32", "1")
    x, codes, books, scales, b, attrs = make_case(1, 192, 2048, 2, S, bias=True, seed=3)
    const = ops_session(make_model(x.dtype, codes, books, scales, b, attrs)).run(None, {"x": x})[0]
    fed = ops_session(make_model(x.dtype, codes, books, scales, b, attrs, codes_as_input=True)).run(
        None, {"x": x, "codes": codes})[0]
    check(const, (x, codes, books, scales, b, attrs))
    check(fed, (x, codes, books, scales, b, attrs))  # S < 256: fed codes take another path (checked per call)
    if S == 256:  # same walk, same summation order
        np.testing.assert_array_equal(const, fed)


# one X row over constant byte codes of a wide layer: the fixed-point walk on AVX-512BW CPUs. A 32-row
# group tail (N % 32), a partial last block of 512 rows, a table tail (T % 16 = 8), S < 256, fp16 X
FIXED_POINT_CASES = {
    "4096x4096-2x8": (4096, 4096, 2, 256, np.float32, False),
    "tails-bias": (1120, 2101, 2, 256, np.float32, True),
    "s250-f16": (128, 2048, 2, 250, np.float16, False),
    "4cb": (256, 2080, 4, 256, np.float32, True),
}


@pytest.mark.skipif(not has_avx512bw(), reason="the fixed-point walk needs AVX-512BW")
@pytest.mark.parametrize("name", list(FIXED_POINT_CASES))
def test_fixed_point_walk_within_documented_bound(ops_session, monkeypatch, name):
    K, N, M, S, xdt, bias = FIXED_POINT_CASES[name]
    case = make_case(1, K, N, M, S, 8, xdt, bias, seed=5)
    x, codes, books, scales, b, attrs = case
    # activations with a few large channels, as in real models: their slices get a coarser step
    x[0, 5::397] *= 30
    fixed = run_case(ops_session, case, threads=2).astype(np.float64)  # tables and row blocks on two threads
    np.testing.assert_array_equal(fixed, run_case(ops_session, case, threads=1))
    monkeypatch.setenv("QCOMPILE_CODEBOOK_LUT_FP32", "1")
    fp32 = run_case(ops_session, case).astype(np.float64)
    want = ref.codebook_matmul(x, codes, books, scales, b, **attrs).astype(np.float64)
    bound = ref.lut_fixed_point_error_bound(x[0], books, scales)
    fp32_tol = (2e-3 if xdt == np.float16 else 2e-5) * np.abs(want).max()
    err = np.abs(fixed - want)
    assert (err <= bound + fp32_tol).all(), (err - bound).max()
    assert not np.array_equal(fixed, fp32)  # the fixed-point walk did run
    # and its error is what rounding to ~15 bits predicts, far below an fp16 output's rounding
    if xdt == np.float32:
        assert np.sqrt(np.mean(err ** 2)) < 2e-4 * np.sqrt(np.mean(want ** 2))


@pytest.mark.skipif(not has_avx512bw(), reason="the fixed-point walk needs AVX-512BW")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fixed_point_walk_propagates_nan_and_inf(ops_session, bad):
    case = make_case(1, 256, 2048, 2, 256, seed=6)
    x, codes, books, scales, b, attrs = case
    x[0, 77] = bad
    y = run_case(ops_session, case)
    want = ref.codebook_matmul(x, codes, books, scales, b, **attrs)
    # (an infinite X may come out as NaN where the reference has +-inf: a table sums +inf and -inf entries
    # where the reference first sums the codewords; the fp32 table does the same)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))


def assert_same_non_finite(got, want):
    """NaN where the reference has NaN, an Inf of the same sign where it has one."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))
    np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(want) & (want < 0))


def inf_scale_case(rows, K, N, xdt=np.float32, seed=8):
    """+Inf and -Inf scales, and an Inf scale on a row whose codewords sum to zero (the reference: 0 · Inf)."""
    x, codes, books, scales, b, attrs = make_case(rows, K, N, 2, 256, xdt=xdt, bias=True, seed=seed)
    books = books.copy()
    books[0, 0] = 0.0
    books[1, 0] = 0.0
    codes[11] = 0
    scales = scales.copy()
    scales[[3, 11]] = np.inf
    scales[5] = -np.inf
    return x, codes, books, scales, b, attrs


# An Inf scale: the reference scales the weights, W = codeword sum · scale, then X @ Wᵀ, which gives NaN
# (±Inf terms of both signs, or 0 · Inf); the kernels scaled the finished dot product and gave ±Inf. Every
# CPU path (the fixed-point walk: test_fixed_point_walk_inf_scale).
@pytest.mark.parametrize("path", ["lut", "fused", "gemm"])
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("rows", [1, 9])
def test_inf_scale_propagates_as_the_reference(ops_session, monkeypatch, path, simd, rows):
    monkeypatch.setenv("QCOMPILE_CODEBOOK_LUT_FP32", "1")
    monkeypatch.setenv("QCOMPILE_CODEBOOK_PATH", path)
    if not simd:
        monkeypatch.setenv("QCOMPILE_CODEBOOK_NO_AVX2", "1")
    case = inf_scale_case(rows, 128, 40)
    x, codes, books, scales, b, attrs = case
    y = run_case(ops_session, case)
    with np.errstate(invalid="ignore"):
        want = ref.codebook_matmul(x, codes, books, scales, b, **attrs)
    assert np.isnan(want[:, [3, 5, 11]]).all()
    assert_same_non_finite(y, want)
    finite = np.isfinite(want)
    assert np.abs(y - want)[finite].max() <= 2e-5 * np.abs(want[finite]).max()


@pytest.mark.skipif(not has_avx512bw(), reason="the fixed-point walk needs AVX-512BW")
def test_fixed_point_walk_inf_scale(ops_session):
    case = inf_scale_case(1, 256, 2048)
    x, codes, books, scales, b, attrs = case
    y = run_case(ops_session, case).astype(np.float64)
    with np.errstate(invalid="ignore"):
        want = ref.codebook_matmul(x, codes, books, scales, b, **attrs).astype(np.float64)
    assert_same_non_finite(y, want)
    finite = np.isfinite(want)
    bound = ref.lut_fixed_point_error_bound(x[0], books, np.where(np.isfinite(scales), scales, 0))
    assert (np.abs(y - want)[finite] <= (bound + 2e-5 * np.abs(want[finite]).max())[finite[0]]).all()


# ---- accuracy_level 4: the int8 table of the batch-1 walk --------------------------------------------------

# One X row over constant byte codes of a layer with at least 512 rows, AVX-512 VBMI: the table in int8
# (each table's step as fine as its slice allows). A 64-row group tail, a partial last block of 512 rows, a
# table tail (T % 16 = 8), S < 256, fp16 X, four codebooks, the smallest layer it serves.
INT8_CASES = {
    "4096x4096-2x8": (4096, 4096, 2, 256, np.float32, False),
    "tails-bias": (1120, 2101, 2, 256, np.float32, True),
    "s250-f16": (128, 700, 2, 250, np.float16, False),
    "4cb": (256, 2080, 4, 256, np.float32, True),
    "576x512": (576, 512, 2, 256, np.float32, False),
}


@pytest.mark.skipif(not has_avx512vbmi(), reason="the int8 walk needs AVX-512 VBMI")
@pytest.mark.parametrize("name", list(INT8_CASES))
def test_int8_table_matches_its_reference_and_bound(ops_session, monkeypatch, name):
    K, N, M, S, xdt, bias = INT8_CASES[name]
    case = make_case(1, K, N, M, S, 8, xdt, bias, seed=7)
    x, codes, books, scales, b, attrs = case
    x[0, 5::397] *= 30  # a few large channels, as in real models
    level4 = attrs | {"accuracy_level": 4}
    model = make_model(x.dtype, codes, books, scales, b, attrs, extra_attrs={"accuracy_level": 4})
    y = ops_session(model, threads=2).run(None, {"x": x})[0]  # tables and row blocks on two threads
    np.testing.assert_array_equal(y, ops_session(model, threads=1).run(None, {"x": x})[0])
    got = y.astype(np.float64)
    # the quantized computation: equal up to fp32 sums and a few entries the float64 table rounds the other way
    q = ref.lut_int8_matmul(x[0].astype(np.float32), codes, books, scales, b).astype(np.float64)
    step, _ = ref.lut_int8_steps(ref.lut_tables(x[0].astype(np.float32), books))
    tol = (2e-3 if xdt == np.float16 else 2e-5) * np.abs(q).max()
    assert (np.abs(got[0] - q) <= tol + 2 * np.abs(scales.astype(np.float64)) * step.max()).all()
    # against the fp32 op: within the documented bound, and about the error of int8 activations
    want = ref.codebook_matmul(x, codes, books, scales, b, **level4).astype(np.float64)
    bound = ref.lut_int8_error_bound(x[0], books, scales)
    err = np.abs(got - want)
    assert (err <= bound + tol).all(), (err - bound).max()
    if xdt == np.float32:
        rel = np.sqrt(np.mean(err ** 2) / np.mean(want ** 2))
        assert 1e-3 < rel < 2e-2, rel
    # the switches: the 16-bit walk, and fp32 tables
    monkeypatch.setenv("QCOMPILE_CODEBOOK_NO_INT8", "1")
    y16 = ops_session(model).run(None, {"x": x})[0].astype(np.float64)
    assert np.abs(y16 - want).max() <= (ref.lut_fixed_point_error_bound(x[0], books, scales) + tol).max()
    monkeypatch.setenv("QCOMPILE_CODEBOOK_LUT_FP32", "1")
    check(ops_session(model).run(None, {"x": x})[0], case)


@pytest.mark.skipif(not has_avx512vbmi(), reason="the int8 walk needs AVX-512 VBMI")
@pytest.mark.parametrize("bad", ["nan-x", "inf-x", "inf-scale"])
def test_int8_table_non_finite(ops_session, bad):
    """A NaN or Inf in the table takes the fp32 walk, so it propagates; an Inf scale as in the reference."""
    case = inf_scale_case(1, 256, 2048) if bad == "inf-scale" else make_case(1, 256, 2048, 2, 256, seed=6)
    x, codes, books, scales, b, attrs = case
    if bad != "inf-scale":
        x[0, 77] = np.nan if bad == "nan-x" else np.inf
    model = make_model(x.dtype, codes, books, scales, b, attrs, extra_attrs={"accuracy_level": 4})
    y = ops_session(model).run(None, {"x": x})[0]
    with np.errstate(invalid="ignore"):
        want = ref.codebook_matmul(x, codes, books, scales, b, **attrs)
    if bad == "inf-scale":
        assert_same_non_finite(y, want)
    else:
        np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))


def test_accuracy_level_1_keeps_fp32_tables(ops_session):
    case = make_case(1, 256, 2048, 2, 256, seed=2)
    x, codes, books, scales, b, attrs = case
    y = ops_session(make_model(x.dtype, codes, books, scales, b, attrs, extra_attrs={"accuracy_level": 1})).run(
        None, {"x": x})[0]
    check(y, case)


def test_bad_constant_code_fails_the_session_creation(ops_session):
    # checked once when the session is created: the model never loads (InvalidArgument through make_session)
    x, codes, books, scales, b, attrs = make_case(1, 64, 2048, 2, 250)
    codes[2047, 7, 0] = 255
    with pytest.raises(InvalidArgument, match=r"code 255 at \[2047, 7, 0\] is out of range"):
        ops_session(make_model(x.dtype, codes, books, scales, b, attrs))


def test_codes_fed_at_run_time_are_checked_every_call(ops_session):
    x, codes, books, scales, b, attrs = make_case(1, 32, 8, 1, 16)
    sess = ops_session(make_model(x.dtype, codes, books, scales, b, attrs, codes_as_input=True))
    good = sess.run(None, {"x": x, "codes": codes})[0]
    check(good, (x, codes, books, scales, b, attrs))
    bad = codes.copy()
    bad[0, 0, 0] = 255
    with pytest.raises(Exception, match="out of range"):
        sess.run(None, {"x": x, "codes": bad})


def _mutations():
    def wrong_codes_shape(c):
        c["codes"] = c["codes"][:, :-1]

    def wrong_code_dtype(c):
        c["codes"] = c["codes"].astype(np.uint16)

    def wrong_books_shape(c):
        c["books"] = c["books"][:, :-1]

    def wrong_books_dtype(c):
        c["books"] = c["books"].astype(np.float32)

    def wrong_scales_shape(c):
        c["scales"] = c["scales"][:-1]

    def wrong_scales_dtype(c):
        c["scales"] = c["scales"].astype(np.float64)

    def wrong_bias_shape(c):
        c["bias"] = np.zeros(3, np.float32)

    def wrong_x_width(c):
        c["x"] = c["x"][:, :-8]

    return {f.__name__: f for f in (wrong_codes_shape, wrong_code_dtype, wrong_books_shape, wrong_books_dtype,
                                     wrong_scales_shape, wrong_scales_dtype, wrong_bias_shape, wrong_x_width)}


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_bad_shapes_and_dtypes_raise(ops_session, mutation):
    x, codes, books, scales, b, attrs = make_case(2, 64, 16, 2, 256, bias=True)
    c = {"x": x, "codes": codes, "books": books, "scales": scales, "bias": b}
    _mutations()[mutation](c)
    with pytest.raises(Exception, match="CodebookMatMul|Type|type"):
        sess = ops_session(make_model(np.float32, c["codes"], c["books"], c["scales"], c["bias"], attrs))
        sess.run(None, {"x": c["x"]})


@pytest.mark.parametrize("bad", [dict(K=60), dict(in_group_size=7), dict(codebook_size=0), dict(num_codebooks=0),
                                 dict(codebook_size=70000), dict(N=-1), dict(accuracy_level=5),
                                 dict(accuracy_level=-1)])
def test_bad_attributes_raise(ops_session, bad):
    x, codes, books, scales, b, attrs = make_case(1, 64, 16, 1, 256)
    # found when the session is created; make_session raises it as InvalidArgument (docs/ops.md)
    with pytest.raises(InvalidArgument, match="CodebookMatMul"):
        sess = ops_session(make_model(x.dtype, codes, books, scales, b, attrs, extra_attrs=bad))
        sess.run(None, {"x": x})


def test_bias_dtype_mismatch_is_rejected(ops_session):
    x, codes, books, scales, _, attrs = make_case(1, 32, 8, 1, 256)
    with pytest.raises(Exception):
        sess = ops_session(make_model(x.dtype, codes, books, scales, np.zeros(8, np.float16), attrs))
        sess.run(None, {"x": x})


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference(cuda_session, name):
    rows, K, N, M, S, d, xdt, bias = CASES[name]
    case = make_case(rows, K, N, M, S, d, xdt, bias)
    check(run_case(cuda_session, case), case)


@pytest.mark.cuda
def test_cuda_out_of_range_code_is_an_error(cuda_session):
    x, codes, books, scales, b, attrs = make_case(1, 64, 40, 2, 16)
    codes[5, 2, 0] = 16
    sess = cuda_session(make_model(x.dtype, codes, books, scales, b, attrs))
    with pytest.raises(Exception, match="out of range"):
        sess.run(None, {"x": x})


def test_bench_builder_computes_what_it_claims(ops_session):
    from qcompile.formats.aqlm.bench import build_codebook, codebook_bytes

    model = build_codebook(64, 24, np.dtype(np.float32), np.random.default_rng(0))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    y = ops_session(model).run(None, {"x": x})[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    want = ref.codebook_matmul(x, inits["codes"], inits["codebooks"], inits["scales"], **attrs)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert codebook_bytes(64, 24) == sum(a.nbytes for a in inits.values())
