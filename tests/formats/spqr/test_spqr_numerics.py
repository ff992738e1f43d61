"""SpQR numerics and format: it beats GPTQ int3 on a synthetic layer with outliers at fewer bits, finds
planted outliers, stores exactly what it rounded with, counts every stored byte, and its native and
portable lowerings compute the reference in onnxruntime."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qcompile.errors import FormatError
from qcompile.formats import get_format
from qcompile.formats.spqr.weight import SpQRQuantizedWeight
from qcompile.solvers.gptq import hessian_weighted_error
from qcompile.formats.spqr import reference as ref
from qcompile.formats.spqr.numerics import SpQRConfig, spqr_quantize

KEYS = ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_layer(k: int, n: int, seed: int = 0):
    """Heavy-tailed weights with 0.5% planted outliers, and correlated activations of uneven scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(5.0).sample((n, k)) * 0.02
    mask = torch.rand(n, k, generator=g) < 0.005
    w[mask] *= 8
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    x = (torch.randn(2048, k, generator=g) * (0.2 + 2 * torch.rand(k, generator=g))) @ mix
    return w, x.T @ x


def quantize(fmt: str, w_nk: torch.Tensor, h, **opts):
    f = get_format(fmt)
    return f.quantize(w_nk.T.numpy().copy(), h, device="cpu", **f.resolve_options(opts))


def h_error(w_nk, q, h) -> float:
    return hessian_weighted_error(w_nk, torch.from_numpy(q.dequantize().T), h)


def test_spqr_w3_beats_gptq_int3_with_fewer_bits():
    w, h = synthetic_layer(256, 128)
    spqr = quantize("spqr-w3", w, h, outlier_threshold=1.0)  # this layer is outlier-heavy: a stricter threshold
    int3 = quantize("int3-gptq", w, h)
    assert spqr.bits_per_weight() < int3.bits_per_weight()
    assert 0.001 < spqr.extra_report()["outlier_rate"] < 0.01
    e_spqr, e_int3 = h_error(w, spqr, h), h_error(w, int3, h)
    assert e_spqr < 0.5 * e_int3, (e_spqr, e_int3)
    no_outliers = quantize("spqr-w3", w, h, outlier_threshold=float("inf"))
    assert no_outliers.nnz == 0 and h_error(w, no_outliers, h) > e_spqr  # the outliers pay for themselves


def test_w4_more_accurate_than_w3_and_act_order_helps():
    w, h = synthetic_layer(128, 64, seed=1)
    e3 = h_error(w, quantize("spqr-w3", w, h), h)
    e4 = h_error(w, quantize("spqr-w4", w, h), h)
    e3_plain = h_error(w, quantize("spqr-w3", w, h, act_order=False), h)
    assert e4 < 0.5 * e3
    assert e3 < e3_plain


def test_planted_outliers_are_kept():
    """Without calibration (H = I) a few huge weights among small ones must land in the outlier table."""
    rng = np.random.default_rng(3)
    k, n = 96, 48
    w = rng.normal(0, 0.01, (k, n)).astype(np.float32)
    rows, cols = rng.integers(0, n, 20), rng.integers(0, k, 20)
    w[cols, rows] = rng.choice([-1, 1], 20) * 0.5
    f = get_format("spqr-w3")
    q = f.quantize(w, None, device="cpu", **f.resolve_options({}))
    p = q.packed()
    stored_rows = np.repeat(np.arange(n), np.diff(p["row_offsets"]))
    table = set(zip(p["col_indices"].tolist(), stored_rows.tolist()))
    assert sum((c, r) in table for c, r in zip(cols, rows)) >= 18
    np.testing.assert_allclose(q.dequantize()[cols, rows], w[cols, rows], rtol=1e-3)  # kept to fp16 precision


def test_stored_tensors_reproduce_what_the_quantizer_rounded_to():
    w, h = synthetic_layer(80, 40, seed=2)  # K not a multiple of 32, N not a multiple of 16
    cfg = SpQRConfig(bits=3, outlier_threshold=0.3)
    res = spqr_quantize(w, h, cfg)
    q = SpQRQuantizedWeight.from_result("spqr-w3", res, cfg)
    np.testing.assert_allclose(q.dequantize(), res.dequantized.numpy().T, rtol=0, atol=1e-6)
    assert sorted(q.packed()["perm"].tolist()) == list(range(80))
    assert "perm" not in SpQRQuantizedWeight.from_result(
        "x", spqr_quantize(w, h, SpQRConfig(act_order=False)), SpQRConfig(act_order=False)).packed()


def test_bits_per_weight_counts_every_stored_tensor():
    w, h = synthetic_layer(160, 48, seed=4)
    q = quantize("spqr-w3", w, h)
    k, n, g = 160, 48, 10
    sw = math.ceil(g * 3 / 32)
    expected_bits = (n * math.ceil(k / 32) * 3 * 32  # codes
                     + n * 2 * sw * 32  # stat codes
                     + math.ceil(n / 16) * 4 * g * 16  # fp16 second-level stats
                     + (n + 1) * 16 + q.nnz * (16 + 16)  # CSR: int16 row_offsets and cols, fp16 values
                     + k * 16)  # int16 perm
    assert q.bits_per_weight() == pytest.approx(expected_bits / (k * n))
    assert {key: q.packed()[key].dtype for key in ("row_offsets", "col_indices", "perm")} == dict.fromkeys(
        ("row_offsets", "col_indices", "perm"), np.dtype(np.int16))
    assert set(q.packed()) == set(KEYS)
    assert q.extra_report()["outlier_rate"] == pytest.approx(q.nnz / (k * n))


def test_bad_options_are_format_errors():
    w = np.zeros((32, 8), np.float32)
    f = get_format("spqr-w3")
    with pytest.raises(FormatError, match="group_size"):
        f.quantize(w, None, device="cpu", **f.resolve_options({"group_size": 24}))
    with pytest.raises(FormatError, match="outlier_threshold"):
        f.quantize(w, None, device="cpu", **f.resolve_options({"outlier_threshold": 0}))
    with pytest.raises(FormatError):
        f.resolve_options({"bits": 5})


# ---- lowerings in onnxruntime ------------------------------------------------------------------------

def _model(low, k: int, n: int, dtype: int, lead=(3,)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", dtype, list(lead) + [k])
    y = helper.make_tensor_value_info("y", dtype, list(lead) + [n])
    graph = helper.make_graph(list(low.nodes), "spqr", [x], [y], initializer=list(low.initializers))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in low.opset_imports.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _reference(q, x):
    p = q.packed()
    return ref.spqr_matmul_reference(x, *(p.get(k) for k in KEYS), **q.attrs)


@pytest.mark.parametrize("k,n,act_order,dtype", [(72, 40, True, TensorProto.FLOAT), (64, 24, False, TensorProto.FLOAT),
                                                 (48, 33, True, TensorProto.FLOAT16)])
def test_portable_lowering_matches_reference(k, n, act_order, dtype):
    w, h = synthetic_layer(k, n, seed=k)
    q = quantize("spqr-w3", w, h, act_order=act_order, outlier_threshold=0.2)
    assert q.nnz > 0
    low = q.lower_portable("x", "y", "qc.l0", dtype)
    assert all(nd.domain in ("", "ai.onnx") for nd in low.nodes)
    npdt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    x = np.random.default_rng(k).standard_normal((3, k)).astype(npdt)
    sess = ort.InferenceSession(_model(low, k, n, dtype).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0].astype(np.float64)
    want = _reference(q, x).astype(np.float64)
    tol = 1e-5 if dtype == TensorProto.FLOAT else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_native_lowering_runs_the_op(ops_session, dtype):
    w, h = synthetic_layer(96, 48, seed=7)
    q = quantize("spqr-w4", w, h, outlier_threshold=0.2)
    low = q.lower_native("x", "y", "qc.l0", dtype)
    assert [nd.op_type for nd in low.nodes] == ["SpQRMatMul"] and low.opset_imports == {"qcompile": 1}
    assert {t.name.split(".")[-1] for t in low.initializers} == set(q.packed())
    npdt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    x = np.random.default_rng(1).standard_normal((2, 5, 96)).astype(npdt)
    got = ops_session(_model(low, 96, 48, dtype, lead=(2, 5))).run(None, {"x": x})[0].astype(np.float64)
    want = _reference(q, x).astype(np.float64)
    tol = 1e-5 if dtype == TensorProto.FLOAT else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
