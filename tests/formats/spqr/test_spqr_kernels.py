"""qcompile.SpQRMatMul kernels (CPU SIMD and scalar paths, CUDA where available) against the numpy reference,
and the error behaviour on malformed outlier tables / permutations: an ORT exception, never a crash."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from cpu_flags import has_amx_bf16, has_avx2, has_avx512bw, has_avx512vnni, has_gfni
from prefill_variants import pin_prefill_tiles
from qcompile.formats import prefill_amx
from qcompile.formats.spqr import reference as ref

F32, F16 = np.float32, np.float16
WEIGHT_INPUTS = ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm")


def spqr_model(packed: dict, attrs: dict, *, dtype=F32, bias: np.ndarray | None = None, x_shape=None,
               as_inputs: bool = False):
    """One SpQRMatMul node. Weights are initializers (``as_inputs=False``) or graph inputs fed at run time."""
    et = TensorProto.FLOAT16 if dtype == F16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", et, x_shape)]
    inits = []
    names = ["x"]
    tensors = {k: packed[k] for k in WEIGHT_INPUTS if packed.get(k) is not None}
    if bias is not None:
        tensors["bias"] = bias
    for key in WEIGHT_INPUTS + ("bias",):
        if key not in tensors:
            names.append("")
            continue
        names.append(key)
        arr = tensors[key]
        if as_inputs:
            inputs.append(helper.make_tensor_value_info(key, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
        else:
            inits.append(numpy_helper.from_array(arr, key))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("SpQRMatMul", names, ["y"], domain="qcompile", **attrs)
    graph = helper.make_graph([node], "spqr", inputs, [helper.make_tensor_value_info("y", et, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompile", 1)])


def feeds(x: np.ndarray, packed: dict, bias, as_inputs: bool) -> dict:
    out = {"x": x}
    if as_inputs:
        out.update({k: packed[k] for k in WEIGHT_INPUTS if packed.get(k) is not None})
        if bias is not None:
            out["bias"] = bias
    return out


def reference(x, packed, attrs, bias, level: int = 0):
    args = {k: packed.get(k) for k in WEIGHT_INPUTS}
    w = ref.dequantize(**args, **attrs).astype(np.float64)
    xd = np.asarray(x, np.float64).reshape(-1, attrs["K"])
    if level == 4:  # accuracy_level 4: the op multiplies with X quantized in stored order
        xd = ref.quantize_stored(xd.astype(np.float32), packed.get("perm")).astype(np.float64)
    y = xd @ w + (0 if bias is None else np.asarray(bias, np.float64))
    scale = np.abs(xd) @ np.abs(w) + (0 if bias is None else np.abs(np.asarray(bias, np.float64)))
    return y, scale


def check(y, x, packed, attrs, bias, dtype, level: int = 0):
    want, scale = reference(x, packed, attrs, bias, level)
    got = np.asarray(y, np.float64).reshape(want.shape)
    assert y.dtype == dtype and y.shape == tuple(np.shape(x)[:-1]) + (attrs["N"],)
    if dtype == F32:
        tol = 2e-6 * scale + 1e-6
    else:  # fp16 output rounding (2^-11 relative) plus fp16 activations already exact in the reference
        tol = 2e-6 * scale + np.abs(want) * 2.0**-10 + 1e-3
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"max err {np.abs(got - want).max()} at {np.argwhere(bad)[:3]}"


@pytest.fixture(autouse=True)
def fp32_tables(monkeypatch):
    """fp32 numerics on every path; the fixed-point pair tables (test_pair_tables_*) and the AMX prefill
    (test_prefill_amx_*) have their own bounds."""
    monkeypatch.setenv("QCOMPILE_SPQR_LUT_FP32", "1")
    monkeypatch.setenv("QCOMPILE_PREFILL_AMX", "0")


CASES = [  # K, N, bits, group_size, stat_bits, stat_group, M (x leading shape), perm, bias, dtype, index dtypes
    (64, 48, 3, 16, 3, 16, [1], False, False, F32, np.int16),
    (200, 37, 3, 16, 3, 16, [1], True, True, F32, np.int16),  # K % 16 = 8, N not a multiple of stat_group
    (130, 33, 4, 32, 2, 7, [7], True, False, F32, np.int32),
    (96, 64, 4, 16, 4, 16, [64], False, True, F32, np.int16),
    (100, 20, 3, 48, 5, 3, [2, 3], True, True, F32, np.int16),  # group straddles chunks, scalar stats
    (72, 40, 3, 16, 3, 16, [1], True, True, F16, (np.int16, np.int32, np.int16)),  # mixed index types
    (160, 24, 4, 16, 3, 16, [7], True, False, F16, (np.int32, np.int16, np.int32)),
    (48, 16, 3, 16, 1, 4, [64], False, True, F16, np.int16),
    # M = 1 paths: odd chunk count (2-chunk unroll + tail), 1-bit stats over many row blocks (fused
    # stats + zero-point pass, cached per block), 5-bit stats (per-row fallback) with 4-bit codes
    (136, 29, 3, 16, 1, 4, [1], True, True, F32, np.int16),
    (112, 21, 4, 16, 5, 5, [1], True, False, F32, np.int32),
]


def index_kw(cdt) -> dict:
    """A case's index dtypes: one for col_indices, row_offsets and perm alike, or a (col, offsets, perm) tuple."""
    col, offsets, perm = cdt if isinstance(cdt, tuple) else (cdt,) * 3
    return dict(col_dtype=col, offsets_dtype=offsets, perm_dtype=perm)


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("k,n,bits,gs,sb,sg,lead,perm,with_bias,dtype,cdt", CASES)
def test_cpu_kernel_matches_reference(ops_session, monkeypatch, scalar, k, n, bits, gs, sb, sg, lead, perm, with_bias,
                                      dtype, cdt):
    if scalar:
        monkeypatch.setenv("QCOMPILE_SPQR_SCALAR", "1")
    rng = np.random.default_rng(k * 31 + n)
    attrs = dict(K=k, N=n, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg)
    packed = ref.random_packed(k, n, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg, outlier_rate=0.05,
                               with_perm=perm, seed=k + n, **index_kw(cdt))
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    x = rng.standard_normal(lead + [k]).astype(dtype)
    sess = ops_session(spqr_model(packed, attrs, dtype=dtype, bias=bias), threads=2)
    y = sess.run(None, {"x": x})[0]
    check(y, x, packed, attrs, bias, dtype)


@pytest.mark.parametrize("tiles", ["auto", "avx2-tiles", "passes-16-tiles-3", "avx2-passes-32-tiles-2"])
@pytest.mark.parametrize("m,n", [(2, 13), (20, 25), (45, 12), (64, 7)])
def test_prefill_tile_kernels(ops_session, monkeypatch, tiles, m, n):
    """Prefill at row counts around the tile kernels' blocks (16 or 32 rows of X per call, 12 rows of W):
    the AVX-512 kernel where the CPU has it ("auto") and the AVX2 one pinned, each also sweeping X in passes
    of 16 or 32 rows, with 3 or 2 tiles of W per task (as large M and N do)."""
    pin_prefill_tiles(monkeypatch, tiles)
    attrs = dict(K=272, N=n, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(272, n, bits=3, group_size=16, stat_bits=3, stat_group=16, outlier_rate=0.03,
                               with_perm=True, seed=m + n)
    bias = np.random.default_rng(n).standard_normal(n).astype(F32)
    x = np.random.default_rng(m).standard_normal((m, 272)).astype(F32)
    y = ops_session(spqr_model(packed, attrs, bias=bias), threads=2).run(None, {"x": x})[0]
    check(y, x, packed, attrs, bias, F32)


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
@pytest.mark.parametrize("tiles", ["auto", "passes-16-tiles-3"])
@pytest.mark.parametrize("m,n", [(32, 30), (40, 70), (56, 16), (128, 100)])
def test_prefill_amx_within_documented_bound(ops_session, monkeypatch, tiles, m, n):
    """On AMX the prefill multiplies bf16 splits (qcompile.formats.prefill_amx): within 2^-14 Σ|x·w| of the
    exact result, yet not the fp32 kernels' result (so AMX ran), while accuracy_level=1 gives the fp32
    kernels' result bit for bit. Rows of X: 2, 2.5, 3.5 and 8 blocks of 16; rows of W: one tile of 17-32,
    tiles of 32 + 32 + 6, one of 16, tiles of 32 + 4."""
    pin_prefill_tiles(monkeypatch, tiles)
    attrs = dict(K=200, N=n, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(200, n, bits=3, group_size=16, stat_bits=3, stat_group=16, outlier_rate=0.03,
                               with_perm=True, seed=m + n)
    bias = np.random.default_rng(n).standard_normal(n).astype(F32)
    x = np.random.default_rng(m).standard_normal((m, 200)).astype(F32)

    def run(amx: str, level: int = 0):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        model = spqr_model(packed, attrs | {"accuracy_level": level}, bias=bias)
        return ops_session(model, threads=2).run(None, {"x": x})[0]

    y_amx, y_fp32, y_level1 = run("1"), run("0"), run("1", level=1)
    want, scale = reference(x, packed, attrs, bias)
    err = np.abs(y_amx.astype(np.float64) - want)
    assert (err <= prefill_amx.RELATIVE_BOUND * scale + 2e-6 * scale + 1e-6).all(), (err / scale).max()
    assert not np.array_equal(y_amx, y_fp32)
    np.testing.assert_array_equal(y_level1, y_fp32)


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
def test_prefill_amx_serves_32_rows_and_more(ops_session, monkeypatch):
    """Below 32 rows of X (tile::amx::kMinRows) the FMA kernels are faster and serve the call."""
    monkeypatch.setenv("QCOMPILE_PREFILL_AMX", "1")
    attrs = dict(K=128, N=40, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(128, 40, outlier_rate=0.03, seed=6)
    sess = ops_session(spqr_model(packed, attrs))
    x = np.random.default_rng(6).standard_normal((32, 128)).astype(F32)
    y_amx = {m: sess.run(None, {"x": x[:m]})[0] for m in (31, 32)}
    monkeypatch.setenv("QCOMPILE_PREFILL_AMX", "0")
    y_fp32 = {m: sess.run(None, {"x": x[:m]})[0] for m in (31, 32)}
    np.testing.assert_array_equal(y_amx[31], y_fp32[31])
    assert not np.array_equal(y_amx[32], y_fp32[32])


@pytest.mark.skipif(not has_amx_bf16(), reason="the AMX prefill needs AMX-BF16")
def test_prefill_amx_keeps_non_finite_activations_on_fp32(ops_session, monkeypatch):
    """A NaN or Inf in X is never split into bf16: the whole call multiplies on the fp32 kernels."""
    attrs = dict(K=200, N=40, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(200, 40, outlier_rate=0.03, with_perm=True, seed=5)
    x = np.random.default_rng(5).standard_normal((40, 200)).astype(F32)
    x[3, 17], x[11, 150] = np.nan, -np.inf
    y = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", amx)
        y[amx] = ops_session(spqr_model(packed, attrs)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y["1"], y["0"])
    assert np.isnan(y["1"][3]).all() and not np.isfinite(y["1"][11]).any() and np.isfinite(y["1"][0]).all()


def test_weights_as_graph_inputs_and_empty_outlier_table(ops_session):
    """Non-constant weights are validated per call; a table with no outliers is legal."""
    rng = np.random.default_rng(3)
    attrs = dict(K=80, N=24, bits=4, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(80, 24, bits=4, outlier_rate=0.0, with_perm=True)
    assert packed["values"].size == 0
    x = rng.standard_normal((5, 80)).astype(F32)
    sess = ops_session(spqr_model(packed, attrs, as_inputs=True))
    y = sess.run(None, feeds(x, packed, None, True))[0]
    check(y, x, packed, attrs, None, F32)


@pytest.mark.parametrize("rows", [1, 7])
def test_outlier_heavy_rows(ops_session, rows):
    """Rows with dozens of outliers each (8-wide gathers plus scalar tails) still match the reference."""
    attrs = dict(K=176, N=40, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(176, 40, outlier_rate=0.4, with_perm=True, seed=5)
    assert np.diff(packed["row_offsets"]).min() > 9
    x = np.random.default_rng(2).standard_normal((rows, 176)).astype(F32)
    y = ops_session(spqr_model(packed, attrs)).run(None, {"x": x})[0]
    check(y, x, packed, attrs, None, F32)


def test_many_threads_same_result(ops_session):
    """Row tasks split over the pool give the same bits as one thread (no task overlaps or gaps)."""
    attrs = dict(K=256, N=300, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(256, 300, outlier_rate=0.02, with_perm=True, seed=9)
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(F32)
    model = spqr_model(packed, attrs)
    y1 = ops_session(model, threads=1).run(None, {"x": x})[0]
    y2 = ops_session(model, threads=2).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y1, y2)
    check(y1, x, packed, attrs, None, F32)


@pytest.mark.parametrize("k,bits", [(400, 3), (1000, 3), (1280, 3), (4096, 3), (1000, 4), (232, 4)])
def test_constant_codes_lane_layout_matches_codes_fed_at_run_time(ops_session, k, bits):
    """Constant codes (and 3-bit stat codes) are copied once into the kernel's lane layout (whole blocks of
    80 | 64 positions, the rest read from the original codes; stat blocks of 80 groups, the last one partial
    or not); codes fed at run time take the original path: both agree."""
    n = 24
    attrs = dict(K=k, N=n, bits=bits, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(k, n, bits=bits, outlier_rate=0.02, with_perm=True, seed=k)
    rng = np.random.default_rng(k)
    bias = rng.standard_normal(n).astype(F32)
    x = rng.standard_normal((1, k)).astype(F32)
    const = ops_session(spqr_model(packed, attrs, bias=bias)).run(None, {"x": x})[0]
    fed = ops_session(spqr_model(packed, attrs, bias=bias, as_inputs=True)).run(None, feeds(x, packed, bias, True))[0]
    check(const, x, packed, attrs, bias, F32)
    check(fed, x, packed, attrs, bias, F32)


PAIR_CASES = {  # K, N, stat_bits, stat_group, perm, bias, x dtype
    "4096x4096": (4096, 4096, 3, 16, False, False, F32),
    # K % 16 = 8 (a half group), 5 slices with a partial last one, N past a 256-row block and a 32-row group
    "tails-perm-bias": (712, 301, 3, 16, True, True, F32),
    "statgroup32-4bit-stats-f16": (256, 96, 4, 32, True, False, F16),
    "statgroup48": (160, 100, 2, 48, False, True, F32),
}


@pytest.mark.skipif(not has_avx512bw(), reason="the fixed-point pair tables need AVX-512BW")
@pytest.mark.parametrize("name", list(PAIR_CASES))
def test_pair_tables_within_documented_bound(ops_session, monkeypatch, name):
    k, n, sb, sg, perm, with_bias, dtype = PAIR_CASES[name]
    attrs = dict(K=k, N=n, bits=3, group_size=16, stat_bits=sb, stat_group=sg)
    packed = ref.random_packed(k, n, bits=3, group_size=16, stat_bits=sb, stat_group=sg, outlier_rate=0.01,
                               with_perm=perm, seed=k + n)
    rng = np.random.default_rng(n)
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    x = rng.standard_normal((1, k)).astype(dtype)
    x[0, 3::251] *= 30  # a few large channels, as in real models: their groups get a coarser step
    model = spqr_model(packed, attrs, dtype=dtype, bias=bias)
    monkeypatch.delenv("QCOMPILE_SPQR_LUT_FP32")
    fixed = ops_session(model, threads=2).run(None, {"x": x})[0]
    np.testing.assert_array_equal(fixed, ops_session(model, threads=1).run(None, {"x": x})[0])
    monkeypatch.setenv("QCOMPILE_SPQR_LUT_FP32", "1")
    fp32 = ops_session(model).run(None, {"x": x})[0]
    assert not np.array_equal(fixed, fp32)  # the fixed-point walk did run
    want, scale = reference(x, packed, attrs, bias)
    bound = ref.pair_table_error_bound(x[0], packed["stat_codes"], packed["stat_params"], packed.get("perm"),
                                       **attrs)
    tol = 2e-6 * scale + 1e-6 if dtype == F32 else 2e-6 * scale + np.abs(want) * 2.0**-10 + 1e-3
    err = np.abs(fixed.astype(np.float64) - want)
    assert (err <= bound + tol).all(), (err - bound - tol).max()
    if dtype == F32:  # rounding to ~13 bits per group: far below the weights' own quantization error
        assert np.sqrt(np.mean(err ** 2)) < 5e-4 * np.sqrt(np.mean(want ** 2))


@pytest.mark.skipif(not has_avx512bw(), reason="the fixed-point pair tables need AVX-512BW")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_pair_tables_propagate_nan_and_inf(ops_session, monkeypatch, bad):
    monkeypatch.delenv("QCOMPILE_SPQR_LUT_FP32")
    attrs = dict(K=256, N=64, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(256, 64, outlier_rate=0.02, seed=4)
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(F32)
    x[0, 100] = bad
    y = ops_session(spqr_model(packed, attrs)).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ ref.dequantize(**{k: packed.get(k) for k in WEIGHT_INPUTS}, **attrs)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))


# ---- accuracy_level 4: int8 activations ------------------------------------------------------------------

# Paths at accuracy_level 4 (X quantized in stored order, then multiplied exactly): one row on the AVX-512
# VNNI int8 walk (3- and 4-bit codes, groups of 16, stat_bits <= 4, stat_group a multiple of 16; its code
# fields extracted with GFNI where the CPU has it, and without), the AVX2 walks, the scalar path; every M > 1
# on the prefill paths.
INT8_PATHS = {
    "int8-walk": {},
    "int8-walk-no-gfni": {"QCOMPILE_SPQR_NO_GFNI": "1"},
    "avx2": {"QCOMPILE_SPQR_NO_AVX512": "1"},
    "scalar": {"QCOMPILE_SPQR_SCALAR": "1"},
}
INT8_CASES = [  # K, N, bits, stat_bits, stat_group, M, perm, bias, dtype
    (4096, 130, 3, 3, 16, [1], True, True, F32),   # two batches of 4 row blocks, the last with 1 block, 2 rows
    (1000, 100, 4, 3, 16, [1], True, False, F32),  # 4-bit codes; K % 16 = 8
    (576, 193, 3, 4, 32, [1], True, True, F16),    # two row blocks share the second-level parameters
    (577, 70, 3, 2, 16, [1], False, False, F32),   # K % 32 = 1
    (200, 37, 3, 3, 16, [5], True, True, F32),     # prefill
    (130, 33, 4, 5, 7, [1], True, False, F32),     # a layout the int8 walk does not serve (fp32 walks)
]


@pytest.mark.parametrize("path", list(INT8_PATHS))
@pytest.mark.parametrize("k,n,bits,sb,sg,lead,perm,with_bias,dtype", INT8_CASES)
def test_int8_activations_match_quantized_reference(ops_session, monkeypatch, path, k, n, bits, sb, sg, lead, perm,
                                                    with_bias, dtype):
    if path.startswith("int8-walk") and not has_avx512vnni():
        pytest.skip("the int8 walk needs AVX-512 VNNI")
    if path == "int8-walk" and not has_gfni():
        pytest.skip("no GFNI: int8-walk-no-gfni is the same path")
    if path == "avx2" and not has_avx2():
        pytest.skip("no AVX2")
    for key, v in INT8_PATHS[path].items():
        monkeypatch.setenv(key, v)
    attrs = dict(K=k, N=n, bits=bits, group_size=16, stat_bits=sb, stat_group=sg)
    packed = ref.random_packed(k, n, bits=bits, group_size=16, stat_bits=sb, stat_group=sg, outlier_rate=0.02,
                               with_perm=perm, seed=k + n)
    rng = np.random.default_rng(n)
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    x = rng.standard_normal(lead + [k]).astype(dtype)
    x[..., 3::41] *= 30  # a few large channels, as real activations have
    model = spqr_model(packed, attrs | {"accuracy_level": 4}, dtype=dtype, bias=bias)
    y = ops_session(model, threads=2).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, ops_session(model, threads=1).run(None, {"x": x})[0])
    check(y, x, packed, attrs, bias, dtype, level=4)
    want = ref.spqr_matmul_reference(x, *(packed.get(key) for key in WEIGHT_INPUTS), bias, **attrs,
                                     accuracy_level=4)
    np.testing.assert_allclose(y, want, rtol=0, atol=(2e-3 if dtype == F16 else 2e-5) * np.abs(want).max())
    # int8 activations are off the fp32 result by about 1% (so the quantized path ran), not more
    exact, _ = reference(x, packed, attrs, bias)
    rel = np.sqrt(np.mean((y.astype(np.float64) - exact) ** 2) / np.mean(exact ** 2))
    assert 1e-4 < rel < 3e-2, rel


@pytest.mark.parametrize("path", list(INT8_PATHS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_int8_activations_non_finite_row(ops_session, monkeypatch, path, bad):
    """A row holding a NaN or an Inf is used unquantized, so it propagates as the reference's does."""
    for key, v in INT8_PATHS[path].items():
        monkeypatch.setenv(key, v)
    attrs = dict(K=256, N=64, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(256, 64, outlier_rate=0.02, seed=4)
    x = np.random.default_rng(4).standard_normal((2, 256)).astype(F32)
    x[1, 100] = bad
    sess = ops_session(spqr_model(packed, attrs | {"accuracy_level": 4}))
    for rows in (x[1:], x):
        y = sess.run(None, {"x": rows})[0]
        want = rows.astype(np.float64) @ ref.dequantize(**{k: packed.get(k) for k in WEIGHT_INPUTS}, **attrs)
        np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))


@pytest.mark.parametrize("level", [-1, 5])
def test_bad_accuracy_level_raises(ops_session, level):
    attrs = dict(K=64, N=16, bits=3, group_size=16, stat_bits=3, stat_group=16, accuracy_level=level)
    with pytest.raises(InvalidArgument, match="SpQRMatMul"):
        ops_session(spqr_model(ref.random_packed(64, 16, seed=1), attrs))


# One row of activations near 4e37: the outputs fit fp32 (as two rows and the reference show), but the
# M == 1 walks sum x·code and x over a group before the group's scale shrinks them, which overflowed to
# NaN. Every CPU path that serves one row: the AVX-512 pair tables, the AVX2 walk over the prepared lanes
# and over codes fed at run time, the scalar path.
HUGE_X_PATHS = ["pair-tables", "avx2-lanes", "avx2-packed", "scalar"]


@pytest.mark.parametrize("path", HUGE_X_PATHS)
def test_one_row_of_huge_activations_matches_reference(ops_session, monkeypatch, path):
    if path == "pair-tables":
        if not has_avx512bw():
            pytest.skip("the fixed-point pair tables need AVX-512BW")
        monkeypatch.delenv("QCOMPILE_SPQR_LUT_FP32")
    if path == "scalar":
        monkeypatch.setenv("QCOMPILE_SPQR_SCALAR", "1")
    attrs = dict(K=256, N=64, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(256, 64, outlier_rate=0.02, with_perm=True, seed=7)
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(64).astype(F32)
    x = (rng.standard_normal((2, 256)) * 4e37).astype(F32)
    as_inputs = path == "avx2-packed"
    model = spqr_model(packed, attrs, bias=bias, as_inputs=as_inputs)
    sess = ops_session(model)
    one = sess.run(None, feeds(x[:1], packed, bias, as_inputs))[0]
    two = sess.run(None, feeds(x, packed, bias, as_inputs))[0]
    want, scale = reference(x, packed, attrs, bias)
    assert np.isfinite(want).all() and np.abs(want).max() > 1e36
    check(two, x, packed, attrs, bias, F32)
    assert np.isfinite(one).all()
    if path != "pair-tables":
        check(one, x[:1], packed, attrs, bias, F32)
        return
    bound = ref.pair_table_error_bound(x[0], packed["stat_codes"], packed["stat_params"], packed.get("perm"), **attrs)
    err = np.abs(one[0].astype(np.float64) - want[0])
    assert (err <= bound + 2e-6 * scale[0] + 1e-6).all(), (err - bound - 2e-6 * scale[0]).max()
    monkeypatch.setenv("QCOMPILE_SPQR_LUT_FP32", "1")
    assert not np.array_equal(one, ops_session(model).run(None, {"x": x[:1]})[0])  # the pair tables did run


def assert_same_non_finite(got, want):
    """NaN where the reference has NaN, an Inf of the same sign where it has one."""
    got = np.asarray(got, np.float64).reshape(want.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))
    np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(want) & (want < 0))


# An Inf in stat_params (scale step or min, zero step or min of one group of one row block): the reference
# dequantizes first, scale · (code − zero) per position, so the group's terms are ±Inf of both signs and
# sum to NaN; the rearranged walks gave ±Inf. Every CPU path: one row on the AVX-512 pair tables, the AVX2
# lane and packed walks and the scalar path; several rows on the AVX2 panels and the scalar path.
STAT_INF_PATHS = ["pair-tables", "avx2-lanes", "avx2-packed", "scalar", "avx2-rows", "amx-rows", "scalar-rows"]


@pytest.mark.parametrize("field", [0, 1, 2, 3], ids=["scale_step", "scale_min", "zero_step", "zero_min"])
@pytest.mark.parametrize("path", STAT_INF_PATHS)
def test_inf_in_stat_params_propagates_as_the_reference(ops_session, monkeypatch, path, field):
    if path == "pair-tables":
        if not has_avx512bw():
            pytest.skip("the fixed-point pair tables need AVX-512BW")
        monkeypatch.delenv("QCOMPILE_SPQR_LUT_FP32")
    if path.startswith("scalar"):
        monkeypatch.setenv("QCOMPILE_SPQR_SCALAR", "1")
    if path == "amx-rows":  # the tiles holding an Inf multiply on the fp32 kernels, the others on AMX
        if not has_amx_bf16():
            pytest.skip("the AMX prefill needs AMX-BF16")
        monkeypatch.setenv("QCOMPILE_PREFILL_AMX", "1")
    attrs = dict(K=256, N=64, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(256, 64, outlier_rate=0.02, with_perm=True, seed=4)
    packed["stat_params"][1, field, 5] = np.inf  # rows 16..31, group 5
    packed["stat_params"][3, field, 9] = -np.inf  # rows 48..63, group 9
    rng = np.random.default_rng(4)
    bias = rng.standard_normal(64).astype(F32)
    x = rng.standard_normal((3 if path.endswith("rows") else 1, 256)).astype(F32)
    as_inputs = path == "avx2-packed"
    y = ops_session(spqr_model(packed, attrs, bias=bias, as_inputs=as_inputs)).run(
        None, feeds(x, packed, bias, as_inputs))[0].astype(np.float64)
    with np.errstate(invalid="ignore"):
        want, scale = reference(x, packed, attrs, bias)
    assert not np.isfinite(want[:, 16:32]).any() and np.isfinite(want[:, :16]).all()
    assert_same_non_finite(y, want)
    finite = np.isfinite(want)
    tol = 2e-6 * scale + 1e-6
    if path == "pair-tables":
        with np.errstate(invalid="ignore"):
            tol = tol + ref.pair_table_error_bound(x[0], packed["stat_codes"], packed["stat_params"],
                                                   packed.get("perm"), **attrs)
    if path == "amx-rows":
        tol = tol + prefill_amx.RELATIVE_BOUND * scale
    assert (np.abs(y - want)[finite] <= tol[finite]).all()


# ---- malformed inputs: always an exception, never a crash ----------------------------------------------

def _corrupt(packed: dict, what: str) -> dict:
    p = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in packed.items()}
    ro = p["row_offsets"]
    if what == "nonmonotone":
        ro[5], ro[6] = ro[6] + 3, ro[5]
    elif what == "first_nonzero":
        ro[0] = 1
    elif what == "last_ne_nnz":
        ro[-1] = ro[-1] - 1
    elif what == "last_past_nnz":
        ro[-1] = ro[-1] + 5
    elif what == "col_ge_k":
        p["col_indices"][3] = 64
    elif what == "col_negative":
        p["col_indices"][0] = -1
    elif what == "values_short":
        p["values"] = p["values"][:-1]
    elif what == "perm_duplicate":
        p["perm"][1] = p["perm"][0]
    elif what == "perm_out_of_range":
        p["perm"][2] = 64
    elif what == "perm_short":
        p["perm"] = p["perm"][:-1]
    elif what == "codes_shape":
        p["codes"] = p["codes"][:, :-1].copy()
    elif what == "stat_codes_shape":
        p["stat_codes"] = p["stat_codes"][:-1].copy()
    elif what == "stat_params_shape":
        p["stat_params"] = p["stat_params"][:, :3].copy()
    elif what == "row_offsets_short":
        p["row_offsets"] = ro[:-1].copy()
    else:
        raise AssertionError(what)
    return p


CORRUPTIONS = ["nonmonotone", "first_nonzero", "last_ne_nnz", "last_past_nnz", "col_ge_k", "col_negative",
               "values_short", "perm_duplicate", "perm_out_of_range", "perm_short", "codes_shape",
               "stat_codes_shape", "stat_params_shape", "row_offsets_short"]


@pytest.mark.parametrize("idx", [np.int16, np.int32])
@pytest.mark.parametrize("as_inputs", [False, True], ids=["initializers", "graph_inputs"])
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_malformed_weights_raise(ops_session, what, as_inputs, idx):
    attrs = dict(K=64, N=32, bits=3, group_size=16, stat_bits=3, stat_group=16)
    good = ref.random_packed(64, 32, outlier_rate=0.1, with_perm=True, seed=4, **index_kw(idx))
    bad = _corrupt(good, what)
    with pytest.raises(ref.SpQRLayoutError):  # the reference rejects it too
        ref.validate_inputs(None, *(bad.get(k) for k in WEIGHT_INPUTS), **attrs)
    x = np.ones((2, 64), F32)
    with pytest.raises(InvalidArgument, match="SpQRMatMul|shape|type"):
        sess = ops_session(spqr_model(bad, attrs, as_inputs=as_inputs))
        sess.run(None, feeds(x, bad, None, as_inputs))


@pytest.mark.parametrize("name,dtype", [("row_offsets", np.int64), ("row_offsets", np.uint16), ("perm", np.int64),
                                        ("perm", np.int8), ("col_indices", np.int64)])
def test_index_tensors_of_other_types_raise(ops_session, name, dtype):
    """int16 and int32 are the only index types: anything else is an ORT error naming the tensor."""
    attrs = dict(K=64, N=32, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(64, 32, outlier_rate=0.1, with_perm=True, seed=6)
    packed[name] = packed[name].astype(dtype)
    with pytest.raises(ref.SpQRLayoutError, match=f"{name} must be int16 or int32"):
        ref.validate_inputs(None, *(packed.get(k) for k in WEIGHT_INPUTS), **attrs)
    with pytest.raises(Exception, match=f"{name} must be int16 or int32"):
        sess = ops_session(spqr_model(packed, attrs))
        sess.run(None, {"x": np.ones((1, 64), F32)})


@pytest.mark.parametrize("change", [dict(bits=5), dict(group_size=24), dict(stat_bits=0), dict(stat_group=0),
                                    dict(K=0), dict(K=65)])
def test_bad_attributes_raise(ops_session, change):
    attrs = dict(K=64, N=32, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(64, 32, seed=1)
    # found when the session is created, reported as ORT_INVALID_ARGUMENT (docs/ops.md), not RuntimeException
    with pytest.raises(InvalidArgument, match="SpQRMatMul"):
        sess = ops_session(spqr_model(packed, attrs | change))
        sess.run(None, {"x": np.ones((1, 64), F32)})


def test_bad_activation_shape_and_bias_raise(ops_session):
    attrs = dict(K=64, N=32, bits=3, group_size=16, stat_bits=3, stat_group=16)
    packed = ref.random_packed(64, 32, seed=2)
    sess = ops_session(spqr_model(packed, attrs))
    with pytest.raises(InvalidArgument, match="K=64"):
        sess.run(None, {"x": np.ones((1, 63), F32)})
    sess = ops_session(spqr_model(packed, attrs, bias=np.ones(31, F32)))
    with pytest.raises(InvalidArgument, match="bias"):
        sess.run(None, {"x": np.ones((1, 64), F32)})


@pytest.mark.cuda
@pytest.mark.parametrize("k,n,bits,gs,sb,sg,lead,perm,with_bias,dtype,cdt", CASES)
def test_cuda_kernel_matches_reference(cuda_session, k, n, bits, gs, sb, sg, lead, perm, with_bias, dtype, cdt):
    rng = np.random.default_rng(k * 31 + n)
    attrs = dict(K=k, N=n, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg)
    packed = ref.random_packed(k, n, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg, outlier_rate=0.05,
                               with_perm=perm, seed=k + n, **index_kw(cdt))
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    x = rng.standard_normal(lead + [k]).astype(dtype)
    y = cuda_session(spqr_model(packed, attrs, dtype=dtype, bias=bias)).run(None, {"x": x})[0]
    check(y, x, packed, attrs, bias, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("idx", [np.int16, np.int32])
@pytest.mark.parametrize("what", ["nonmonotone", "col_ge_k", "perm_duplicate", "last_past_nnz"])
def test_cuda_malformed_weights_raise(cuda_session, what, idx):
    attrs = dict(K=64, N=32, bits=3, group_size=16, stat_bits=3, stat_group=16)
    bad = _corrupt(ref.random_packed(64, 32, outlier_rate=0.1, with_perm=True, seed=4, **index_kw(idx)), what)
    with pytest.raises(Exception, match="SpQRMatMul"):
        cuda_session(spqr_model(bad, attrs)).run(None, {"x": np.ones((2, 64), F32)})
