"""Integer formats: MatMulNBits packing round-trips, and stock onnxruntime computes what we dequantize."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qcompile.formats import get_format
from qcompile.formats.integer.reference import (dequantize_matmulnbits, pack_codes, pack_zero_points, unpack_codes,
                                      unpack_zero_points)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,block", [(64, 32), (100, 32), (576, 128)])
def test_pack_codes_round_trip(bits, k, block):
    rng = np.random.default_rng(bits + k)
    codes = rng.integers(0, 2**bits, size=(7, k), dtype=np.uint8)
    packed = pack_codes(codes, bits, block)
    assert packed.shape == (7, -(-k // block), block * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, k), codes)


def test_pack_codes_bit_order_low_nibble_first():
    packed = pack_codes(np.array([[1, 2] + [0] * 30]), 4, 32)
    assert packed[0, 0, 0] == 0x21


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_zero_points_round_trip(bits):
    rng = np.random.default_rng(bits)
    z = rng.integers(0, 2**bits, size=(5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_zero_points(pack_zero_points(z, bits), bits, 5, 7), z)


def _run_one_node(lowered, x):
    k = x.shape[-1]
    graph = helper.make_graph(lowered.nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], lowered.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


@pytest.mark.parametrize("name,group", [("int4-rtn", 32), ("int4-gptq", 128), ("int2-gptq", 64), ("int8-rtn", 64)])
@pytest.mark.parametrize("k", [96, 576])
@pytest.mark.parametrize("level", [0, 4])
def test_matmulnbits_in_onnxruntime_equals_numpy_dequantization(name, group, k, level):
    rng = np.random.default_rng(k)
    n = 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((256, k)).astype(np.float32)
    fmt = get_format(name)
    qw = fmt.quantize(w, torch.from_numpy(x.T @ x), **fmt.resolve_options({"group_size": group,
                                                                           "accuracy_level": level}))
    y = _run_one_node(qw.lower_native("X", "Y", "t", TensorProto.FLOAT), x[:9])
    want = x[:9] @ qw.dequantize()
    if level == 0:  # float activations: the dequantized weight's product
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3)
    else:  # int8 activations per block: about 1/254 of each block's largest |x| per element
        assert np.abs(y - want).max() < 0.01 * np.abs(want).max()
        assert np.abs(y - want).max() > 0  # and really rounded: level 4 is not the float path
    # and the independent numpy reference of MatMulNBits agrees with the format's own dequantize
    p = qw.packed()
    ref = dequantize_matmulnbits(p["B"], p["scales"], p["zero_points"], k, n, qw._storage_bits(), group)
    np.testing.assert_array_equal(ref, qw.dequantize())


def test_bits_per_weight_counts_codes_scales_and_zero_points():
    fmt = get_format("int4-rtn")
    qw = fmt.quantize(np.ones((256, 64), np.float32), None, **fmt.resolve_options({"group_size": 128}))
    # 4 bits + fp32 scale/128 + 4-bit zero/128
    assert qw.bits_per_weight() == pytest.approx(4 + 32 / 128 + 4 / 128)


def test_three_bit_is_stored_in_four_bit_containers_and_counted_so():
    fmt = get_format("int3-rtn")
    qw = fmt.quantize(np.ones((256, 64), np.float32), None, **fmt.resolve_options({}))
    assert qw.bits_per_weight() == pytest.approx(4 + 36 / 128)
