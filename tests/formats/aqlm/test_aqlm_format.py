"""AQLM codebook format: numpy reference + validator, the QuantizedWeight contract (packed bytes = stored
tensors, dequantize), portable and native lowering in onnxruntime, registry, and the layer checkpoint."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qcompile.errors import FormatError
from qcompile.formats import get_format
from qcompile.formats.aqlm.weight import CodebookQuantizedWeight
from qcompile.layer_checkpoint import LayerCheckpoint
from qcompile.formats.aqlm import reference as ref


def random_weight(K=64, N=24, M=2, S=256, d=8, seed=0) -> CodebookQuantizedWeight:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, S, (N, K // d, M)).astype(ref.code_dtype(S))
    books = rng.standard_normal((M, S, d)).astype(np.float16)
    scales = rng.uniform(0.01, 0.1, N).astype(np.float16)
    return CodebookQuantizedWeight("aqlm-test", codes, books, scales)


# ---- reference ----------------------------------------------------------------------------------------


def test_reference_dequantize_matches_definition():
    qw = random_weight(K=16, N=3, M=2, S=4)
    w = ref.dequantize(qw.codes, qw.codebooks, qw.scales)
    n, g, j = 2, 1, 5
    want = float(qw.scales[n]) * sum(float(qw.codebooks[m, qw.codes[n, g, m], j]) for m in range(2))
    assert w.shape == (3, 16) and w[n, g * 8 + j] == pytest.approx(want, rel=1e-6)


def test_reference_validator_names_the_problem():
    qw = random_weight(K=16, N=3, M=1, S=16)
    attrs = qw.attributes()
    bad = qw.codes.copy()
    bad[2, 1, 0] = 16
    with pytest.raises(ValueError, match=r"code 16 at \(2, 1, 0\) is out of range for codebook_size=16"):
        ref.validate(None, bad, qw.codebooks, qw.scales, None, **attrs)
    with pytest.raises(ValueError, match="X last dimension"):
        ref.validate((1, 8), qw.codes, qw.codebooks, qw.scales, None, **attrs)
    with pytest.raises(ValueError, match="multiple of in_group_size"):
        ref.validate(None, qw.codes, qw.codebooks, qw.scales, None, **{**attrs, "K": 12})
    with pytest.raises(ValueError, match="codes must be uint8"):
        ref.validate(None, qw.codes.astype(np.uint16), qw.codebooks, qw.scales, None, **attrs)
    with pytest.raises(ValueError, match="scales shape"):
        ref.validate(None, qw.codes, qw.codebooks, qw.scales[:2], None, **attrs)
    assert ref.code_dtype(256) == np.uint8 and ref.code_dtype(257) == np.uint16


# ---- QuantizedWeight contract ----------------------------------------------------------------------------


def test_packed_is_exactly_the_stored_tensors_and_bits_include_codebooks():
    qw = random_weight(K=64, N=24, M=2, S=256)
    p = qw.packed()
    assert set(p) == {"codes", "codebooks", "scales"}
    assert p["codes"].dtype == np.uint8 and p["codebooks"].dtype == np.float16 and p["scales"].dtype == np.float16
    expected_bytes = 24 * 8 * 2 + 2 * 256 * 8 * 2 + 24 * 2
    assert qw.stored_bytes() == expected_bytes
    assert qw.bits_per_weight() == pytest.approx(8 * expected_bytes / (64 * 24))
    rep = qw.extra_report()
    assert rep["code_bits_per_weight"] == 2.0 and rep["codebook_bytes"] == 8192
    assert rep["codebook_share"] == pytest.approx(8192 / expected_bytes)


def test_dequantize_is_kn_layout():
    qw = random_weight()
    w = qw.dequantize()
    assert w.shape == qw.shape == (64, 24)
    np.testing.assert_array_equal(w, ref.dequantize(qw.codes, qw.codebooks, qw.scales).T)


def _run_lowered(low, K, N, x, dtype, native_lib=None):
    graph = helper.make_graph(low.nodes, "g", [helper.make_tensor_value_info("x", dtype, [None, K])],
                              [helper.make_tensor_value_info("y", dtype, [None, N])], low.initializers)
    opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, v) for d, v in low.opset_imports.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    if native_lib is not None:
        so.register_custom_ops_library(str(native_lib))
    else:
        onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("M,S", [(2, 256), (1, 16), (1, 300)])
def test_portable_lowering_equals_reference(dtype, M, S):
    qw = random_weight(K=64, N=24, M=M, S=S)
    npdt = np.float32 if dtype == TensorProto.FLOAT else np.float16
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(npdt)
    low = qw.lower_portable("x", "y", "layer", dtype)
    assert all(n.domain in ("", "ai.onnx") for n in low.nodes), "portable must be standard ONNX only"
    y = _run_lowered(low, 64, 24, x, dtype)
    want = ref.codebook_matmul(x, **qw.packed(), **qw.attributes()).astype(np.float32)
    tol = 2e-3 if npdt == np.float16 else 1e-5
    assert np.abs(y.astype(np.float32) - want).max() <= tol * np.abs(want).max()


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_native_lowering_runs_the_op(ops_library, dtype):
    qw = random_weight(K=64, N=24, M=2, S=256)
    npdt = np.float32 if dtype == TensorProto.FLOAT else np.float16
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(npdt)
    low = qw.lower_native("x", "y", "layer", dtype)
    assert [n.op_type for n in low.nodes] == ["CodebookMatMul"] and low.opset_imports == {"qcompile": 1}
    y = _run_lowered(low, 64, 24, x, dtype, native_lib=ops_library)
    want = (x.astype(np.float32) @ qw.dequantize())
    tol = 2e-3 if npdt == np.float16 else 1e-5
    assert np.abs(y.astype(np.float32) - want).max() <= tol * np.abs(want).max()


def test_lowering_rejects_other_activation_dtypes():
    with pytest.raises(FormatError, match="float32/float16"):
        random_weight().lower_native("x", "y", "p", TensorProto.DOUBLE)


# ---- registry and options --------------------------------------------------------------------------------


def test_presets_registered_with_their_geometry():
    for name, m, b in (("aqlm-2x8", 2, 8), ("aqlm-1x8", 1, 8), ("aqlm-1x16", 1, 16)):
        fmt = get_format(name)
        opts = fmt.resolve_options({})
        assert (opts["num_codebooks"], opts["nbits"], opts["in_group_size"]) == (m, b, 8)
        assert fmt.needs_calibration and "portable" in fmt.emits
    with pytest.raises(FormatError, match="no option"):
        get_format("aqlm-2x8").resolve_options({"group_size": 8})


def test_quantize_rejects_k_not_multiple_of_group():
    fmt = get_format("aqlm-1x8")
    with pytest.raises(FormatError, match="multiple of in_group_size"):
        fmt.quantize(np.zeros((12, 4), np.float32), None, **fmt.resolve_options({}), device="cpu")


def test_quantize_small_layer_end_to_end_uint16_codes():
    """1x10 (1024 codewords) needs uint16 codes; the stored weight must equal what quantize reported."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    fmt = get_format("aqlm-1x16")
    qw = fmt.quantize(w, None, **fmt.resolve_options({"nbits": 10, "rounds": 1, "kmeans_iters": 2}), device="cpu")
    assert qw.codes.dtype == np.uint16 and qw.codebooks.shape == (1, 1024, 8)
    rel = np.linalg.norm(qw.dequantize() - w) / np.linalg.norm(w)
    # 64 groups and 1024 codewords: every group can get its own codeword, only fp16 rounding remains.
    assert rel < 1e-3


# ---- checkpoint ------------------------------------------------------------------------------------------


def test_layer_checkpoint_roundtrip_fingerprint_and_corruption(tmp_path):
    ck = LayerCheckpoint(tmp_path / "ck", fingerprint="abc")
    assert ck.get("model.layers.0.mlp.up_proj") is None
    qw = random_weight()
    ck.put("model.layers.0.mlp.up_proj", qw)
    back = ck.get("model.layers.0.mlp.up_proj")
    assert isinstance(back, CodebookQuantizedWeight)
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())
    assert ck.names() == ["model.layers.0.mlp.up_proj"]
    assert LayerCheckpoint(tmp_path / "ck", fingerprint="other").get("model.layers.0.mlp.up_proj") is None
    # a truncated file (crash mid-write of a foreign tool) reads as missing, never as an error
    path = next((tmp_path / "ck").glob("*.pkl"))
    path.write_bytes(path.read_bytes()[:20])
    assert ck.get("model.layers.0.mlp.up_proj") is None
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_hessian_none_means_plain_mse():
    """Without calibration the objective is the weight MSE; codebooks still fit a low-rank-ish layer well."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 32))).astype(np.float32)
    fmt = get_format("aqlm-2x8")
    qw = fmt.quantize(w, None, **fmt.resolve_options({"rounds": 1}), device="cpu")
    h = torch.eye(64)
    from qcompile.solvers.gptq import relative_output_error

    assert relative_output_error(torch.from_numpy(w.T), torch.from_numpy(qw.dequantize().T), h) < 0.05
