"""The contract every registered format keeps, checked for each row of the registry:

* the op's numpy reference, fed the packed tensors the native lowering writes, computes the weight that
  ``dequantize`` reports (so reports, simulated emit and the runtime agree);
* bits per weight equal the bytes of the packed tensors, and the size report counts exactly those bytes
  from the lowered graph;
* onnxruntime running the native op agrees with the reference, and the portable lowering with the native one;
* packed data of the wrong size is rejected with an error, never a crash or a silent result.

A new format gets all of this by being registered; no list of formats is written here.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.formats import all_formats, get_format
from qcompile.formats.base import Format, Lowered, QuantizedWeight
from qcompile.report import layer_sizes
from qcompile.runtime import make_session

K, N = 64, 48  # divisible by every format's group, Hadamard block and row block
#: Options that only make the slow numerics fast on a 64 x 48 weight; they do not change the stored layout.
#: Float activations where a format offers int8 ones: the reference computes the float product.
FAST = {"rounds": 1, "kmeans_iters": 2, "beam_size": 1, "finetune_epochs": 0, "accuracy_level": 0}
MAX_CODEBOOK_BITS = 10  # a 2^16-entry codebook on 384 groups only costs time; 2^10 keeps uint16 codes

FORMATS = [f.name for f in all_formats()]


def _quantized(fmt: Format) -> QuantizedWeight:
    rng = np.random.default_rng(sum(map(ord, fmt.name)))
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w[3, 5] = 0.9  # an outlier, for formats that keep them apart
    x = rng.standard_normal((512, K)).astype(np.float32)
    opts = fmt.resolve_options({k: v for k, v in FAST.items() if k in fmt.options})
    if opts.get("nbits", 0) > MAX_CODEBOOK_BITS:
        opts["nbits"] = MAX_CODEBOOK_BITS
    return fmt.quantize(w, torch.from_numpy(x.T @ x / len(x)), device="cpu", **opts)


@pytest.fixture(scope="module", params=FORMATS)
def case(request) -> tuple[Format, QuantizedWeight]:
    fmt = get_format(request.param)
    return fmt, _quantized(fmt)


def _node(lowered: Lowered) -> onnx.NodeProto:
    return next(n for n in lowered.nodes if n.op_type != "Constant")


def _model(lowered: Lowered) -> onnx.ModelProto:
    graph = helper.make_graph(lowered.nodes, "contract", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], lowered.initializers)
    opsets = {"": 21, **lowered.opset_imports}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = 10
    return model


def _reference(fmt: Format, lowered: Lowered, x: np.ndarray) -> np.ndarray:
    node = _node(lowered)
    assert (node.domain, node.op_type) == (fmt.op.domain, fmt.op.type)
    tensors = {t.name: numpy_helper.to_array(t) for t in lowered.initializers}
    inputs = [tensors[i] if i else None for i in node.input[1:]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    return fmt.op.reference(x, *inputs, **attrs)


def test_reference_op_computes_the_dequantized_weight(case):
    fmt, qw = case
    lowered = qw.lower_native("X", "Y", "t", TensorProto.FLOAT)
    eye = np.eye(K, dtype=np.float32)
    np.testing.assert_allclose(_reference(fmt, lowered, eye), qw.dequantize(), rtol=1e-5, atol=1e-6)


def test_bits_per_weight_are_the_packed_bytes(case):
    fmt, qw = case
    packed = qw.packed()
    assert isinstance(qw, fmt.weight)
    assert qw.bits_per_weight() == pytest.approx(8 * sum(a.nbytes for a in packed.values()) / (K * N))
    lowered = qw.lower_native("X", "Y", "qc.layer0", TensorProto.FLOAT)
    for n in lowered.nodes:  # tag as the lower pass does, so the report attributes the bytes to the layer
        n.metadata_props.add(key="qcompile.layer", value="layer0")
        n.metadata_props.add(key="qcompile.shape", value=f"{K},{N}")
    (size,) = layer_sizes(_model(lowered))
    assert size.stored_bytes == sum(a.nbytes for a in packed.values())


def test_native_op_in_onnxruntime_equals_the_reference(case, ops_library):
    fmt, qw = case
    lowered = qw.lower_native("X", "Y", "t", TensorProto.FLOAT)
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    y = make_session(_model(lowered), ["CPUExecutionProvider"]).run(None, {"X": x})[0]
    ref = _reference(fmt, lowered, x)
    np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))


def test_portable_lowering_equals_native(case, ops_library):
    fmt, qw = case
    if "portable" not in fmt.emits:
        pytest.skip(f"{fmt.name} has no portable emit (its native op is stock onnxruntime)")
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
    native = make_session(_model(qw.lower_native("X", "Y", "t", TensorProto.FLOAT)), ["CPUExecutionProvider"])
    portable = _model(qw.lower_portable("X", "Y", "t", TensorProto.FLOAT))
    assert all(o.domain in ("", "ai.onnx") for o in portable.opset_import)
    y_native = native.run(None, {"X": x})[0]
    y_portable = make_session(portable, ["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(y_portable, y_native, rtol=2e-3, atol=2e-3 * float(np.abs(y_native).max()))


def test_truncated_packed_tensor_is_rejected(case, ops_library):
    fmt, qw = case
    lowered = qw.lower_native("X", "Y", "t", TensorProto.FLOAT)
    first = lowered.initializers[0]
    arr = numpy_helper.to_array(first)
    first.CopyFrom(numpy_helper.from_array(arr.reshape(-1)[: arr.size // 2], first.name))
    x = np.ones((2, K), np.float32)
    with pytest.raises(Exception):  # noqa: B017 - any onnxruntime error; a crash would end the test run
        make_session(_model(lowered), ["CPUExecutionProvider"]).run(None, {"X": x})


def test_accuracy_level_option_sets_the_attribute(case, ops_library):
    """Formats whose op takes accuracy_level: the option becomes the node attribute (absent at 0), the weight
    is the same, and the op at level 4 agrees with the reference's quantized computation (one row: the int8
    kernels where the CPU has them)."""
    fmt, qw = case
    if "accuracy_level" not in fmt.options or fmt.op.domain != "qcompile":
        pytest.skip(f"{fmt.name}'s op is not one of ours with accuracy_level (MatMulNBits has its own)")
    node = _node(qw.lower_native("X", "Y", "t", TensorProto.FLOAT))
    assert "accuracy_level" not in {a.name for a in node.attribute}
    qw.accuracy_level = 4
    try:
        lowered = qw.lower_native("X", "Y", "t", TensorProto.FLOAT)
    finally:
        qw.accuracy_level = 0
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(lowered).attribute}
    assert attrs["accuracy_level"] == 4
    x = np.random.default_rng(3).standard_normal((1, K)).astype(np.float32)
    y = make_session(_model(lowered), ["CPUExecutionProvider"]).run(None, {"X": x})[0]
    ref = _reference(fmt, lowered, x)
    np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))
