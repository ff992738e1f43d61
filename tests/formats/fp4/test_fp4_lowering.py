"""FP4 lowering: the native FP4MatMul node follows the op contract, and the portable (standard ONNX)
lowering run in onnxruntime equals the numpy FP4MatMul reference on the packed tensors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.formats import get_format
from qcompile.formats.base import Lowered
from qcompile.formats.fp4 import reference as ref

STANDARD_OPSET = 17


def _quantize(fmt: str, w_kn: np.ndarray, h: torch.Tensor | None = None, **opts):
    f = get_format(fmt)
    return f.quantize(w_kn, h, device="cpu", **f.resolve_options(opts))


def _model(low: Lowered, lead: list, k: int, n: int, dtype: int) -> onnx.ModelProto:
    """One-graph model ``x[*lead, K] -> y[*lead, N]`` around a lowering."""
    x = helper.make_tensor_value_info("x", dtype, lead + [k])
    y = helper.make_tensor_value_info("y", dtype, lead + [n])
    graph = helper.make_graph(list(low.nodes), "fp4", [x], [y], initializer=list(low.initializers))
    opsets = [helper.make_opsetid("", STANDARD_OPSET)] + [helper.make_opsetid(d, v) for d, v in low.opset_imports.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _reference(q, x: np.ndarray) -> np.ndarray:
    p = q.packed()
    return ref.fp4_matmul_reference(x, p["W"], p["scales"], p.get("tensor_scale"), **q.attributes())


CASES = [  # format, K, N, hadamard_block, x shape (leading dims)
    ("mxfp4-rtn", 64, 24, 32, [5]),
    ("mxfp4-rtn", 72, 16, 8, [2, 3]),  # K not a multiple of G: Slice path, 3-D input
    ("nvfp4-rtn", 40, 16, 0, [4]),  # padded NVFP4 without rotation
    ("nvfp4-rtn", 64, 32, 16, [1, 3, 2]),
]


@pytest.mark.parametrize("fmt,k,n,b,lead", CASES)
def test_portable_lowering_in_onnxruntime_matches_reference(fmt, k, n, b, lead):
    rng = np.random.default_rng(k + n + b)
    w = (rng.standard_t(4, size=(k, n)) * 0.05).astype(np.float32)
    q = _quantize(fmt, w, hadamard_block=b)
    assert q.hadamard_block == b
    low = q.lower_portable("x", "y", "qc.l0", TensorProto.FLOAT)
    ops = {nd.op_type for nd in low.nodes}
    assert all(nd.domain in ("", "ai.onnx") for nd in low.nodes) and "FP4MatMul" not in ops
    x = rng.standard_normal(lead + [k]).astype(np.float32)
    got = _run(_model(low, lead, k, n, TensorProto.FLOAT), x)
    want = _reference(q, x)
    assert got.shape == want.shape == tuple(lead + [n])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_portable_lowering_float16_activations():
    rng = np.random.default_rng(12)
    k, n = 64, 8
    q = _quantize("mxfp4-rtn", (rng.standard_normal((k, n)) * 0.1).astype(np.float32), hadamard_block=32)
    low = q.lower_portable("x", "y", "qc.h", TensorProto.FLOAT16)
    x = rng.standard_normal((3, k)).astype(np.float16)
    got = _run(_model(low, [3], k, n, TensorProto.FLOAT16), x)
    assert got.dtype == np.float16
    want = _reference(q, x.astype(np.float32))
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["mxfp4-mr", "nvfp4-mr"])
def test_native_node_follows_the_op_contract(fmt):
    rng = np.random.default_rng(13)
    k, n = 64, 16
    x = rng.standard_normal((256, k)).astype(np.float32)
    q = _quantize(fmt, (rng.standard_normal((k, n)) * 0.05).astype(np.float32), torch.from_numpy(x.T @ x))
    low = q.lower_native("act", "out", "qc.blk0.q", TensorProto.FLOAT)
    assert low.opset_imports == {"qcompile": 1}
    (node,) = low.nodes
    assert (node.op_type, node.domain) == ("FP4MatMul", "qcompile")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    g = 32 if fmt.startswith("mx") else 16
    assert attrs == {"K": k, "N": n, "group_size": g, "scale_format": b"e8m0" if g == 32 else b"e4m3",
                     "hadamard_block": g}
    inits = {t.name: numpy_helper.to_array(t) for t in low.initializers}
    assert list(node.input[:1]) == ["act"] and list(node.output) == ["out"]
    assert [inits[i].dtype for i in node.input[1:3]] == [np.uint8, np.uint8]
    assert inits[node.input[1]].shape == (n, k // 2) and inits[node.input[2]].shape == (n, k // g)
    if g == 16:
        assert len(node.input) == 4 and inits[node.input[3]].dtype == np.float32 and inits[node.input[3]].shape == (1,)
    else:
        assert len(node.input) == 3
    # The stored tensors through the reference op reproduce x @ dequantize() (the unrotated weight).
    xt = rng.standard_normal((4, k)).astype(np.float32)
    y = ref.fp4_matmul_reference(xt, *[inits[i] for i in node.input[1:]], **q.attributes())
    np.testing.assert_allclose(y, xt @ q.dequantize(), rtol=1e-4, atol=1e-5)


def test_fusion_identity_two_layer_model_portable_vs_float_simulated():
    """A 2-layer MLP compiled with MR-GPTQ (rotated weights + online rotation, portable ops) gives the same
    output as the float MLP whose weights are replaced by ``dequantize()`` (the unrotated weights), and
    both stay close to the original float model."""
    rng = np.random.default_rng(14)
    d, hdim = 64, 96
    w1 = (rng.standard_normal((d, hdim)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hdim, d)) * 0.1).astype(np.float32)
    xcal = rng.standard_normal((512, d)).astype(np.float32)
    h1 = torch.from_numpy(xcal.T @ xcal)
    a = np.maximum(xcal @ w1, 0)
    h2 = torch.from_numpy(a.T @ a)
    q1 = _quantize("mxfp4-mr", w1, h1)
    q2 = _quantize("mxfp4-mr", w2, h2)
    assert (q1.hadamard_block, q2.hadamard_block) == (32, 32)
    l1 = q1.lower_portable("x", "h", "qc.l1", TensorProto.FLOAT)
    l2 = q2.lower_portable("hr", "y", "qc.l2", TensorProto.FLOAT)
    relu = helper.make_node("Relu", ["h"], ["hr"])
    both = Lowered(l1.nodes + [relu] + l2.nodes, l1.initializers + l2.initializers, {})
    x = rng.standard_normal((8, d)).astype(np.float32)
    got = _run(_model(both, [8], d, d, TensorProto.FLOAT), x)
    simulated = np.maximum(x @ q1.dequantize(), 0) @ q2.dequantize()
    np.testing.assert_allclose(got, simulated, rtol=1e-4, atol=1e-4 * np.abs(simulated).max())
    exact = np.maximum(x @ w1, 0) @ w2
    assert np.linalg.norm(got - exact) < 0.2 * np.linalg.norm(exact)


@pytest.mark.parametrize("fmt,k,n,b,lead", CASES)
def test_native_op_in_onnxruntime_matches_reference_and_portable(fmt, k, n, b, lead):
    """When the qcompile_ops library is built: the native FP4MatMul on our packed tensors equals the
    reference op and the portable lowering (skips only when the library is absent)."""
    from qcompile.runtime import OpsLibraryNotFoundError, make_session, ops_library_path

    try:
        ops_library_path()
    except OpsLibraryNotFoundError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(k * n + b)
    w = (rng.standard_t(4, size=(k, n)) * 0.05).astype(np.float32)
    q = _quantize(fmt, w, hadamard_block=b)
    x = rng.standard_normal(lead + [k]).astype(np.float32)
    native = _model(q.lower_native("x", "y", "qc.n", TensorProto.FLOAT), lead, k, n, TensorProto.FLOAT)
    sess = make_session(native, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    want = _reference(q, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    portable = _run(_model(q.lower_portable("x", "y", "qc.p", TensorProto.FLOAT), lead, k, n, TensorProto.FLOAT), x)
    np.testing.assert_allclose(got, portable, rtol=1e-4, atol=1e-5 * np.abs(want).max())
