"""Discovery and lowering passes on a small synthetic graph with every weight path exporters emit."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.formats import get_format
from qcompile.passes.discover import discover_linears, ensure_node_names
from qcompile.passes.lower import lower_weights
from qcompile.models.export import save_onnx
from qcompile.report import layer_sizes

K, H, N = 64, 96, 48
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((K, H)).astype(np.float32)  # direct [K, N]
W2 = RNG.standard_normal((N, H)).astype(np.float32)  # stored [N, K] behind Transpose
W3 = RNG.standard_normal((N, N)).astype(np.float16)  # fp16 behind Cast
W4 = RNG.standard_normal((N, N)).astype(np.float32)  # Gemm transB=1
W5 = RNG.standard_normal((N, 10)).astype(np.float32)  # "LM head": produces the graph output


def synthetic_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (W1, "blocks.0.fc1.weight"), (W2, "blocks.0.fc2.weight"), (W3, "blocks.1.proj.weight"),
        (W4, "blocks.1.gemm.weight"), (W5, "lm_head.weight")]]
    nodes = [
        helper.make_node("MatMul", ["x", "blocks.0.fc1.weight"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h1r"]),
        helper.make_node("Transpose", ["blocks.0.fc2.weight"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1r", "w2t"], ["h2"]),
        helper.make_node("Cast", ["blocks.1.proj.weight"], ["w3f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h2", "w3f"], ["h3"]),
        helper.make_node("Gemm", ["h3", "blocks.1.gemm.weight"], ["h4"], transB=1),
        helper.make_node("MatMul", ["h4", "lm_head.weight"], ["logits"]),
        helper.make_node("MatMul", ["h4", "h4t"], ["not_a_linear"]),  # activation x activation: ignored
        helper.make_node("Transpose", ["h4"], ["h4t"], perm=[1, 0]),
    ]
    nodes = nodes[:8] + [nodes[9], nodes[8]]
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["M", 10]),
                               helper.make_tensor_value_info("not_a_linear", TensorProto.FLOAT, ["M", "M"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ensure_node_names(model)


def float_forward(x, w=None):
    w = w or {"blocks.0.fc1": W1, "blocks.0.fc2": W2.T, "blocks.1.proj": W3.astype(np.float32),
              "blocks.1.gemm": W4.T, "lm_head": W5}
    h = np.maximum(x @ w["blocks.0.fc1"], 0) @ w["blocks.0.fc2"]
    h = (h @ w["blocks.1.proj"]) @ w["blocks.1.gemm"]
    return h @ w["lm_head"]


def test_discovery_finds_each_weight_path_and_names_it_by_module():
    model = synthetic_model()
    found = {m.name: m for m in discover_linears(model)}
    assert sorted(found) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.gemm", "blocks.1.proj"]
    assert found["blocks.0.fc2"].transposed and found["blocks.0.fc2"].chain
    assert found["blocks.1.gemm"].transposed
    assert found["blocks.1.proj"].dtype == TensorProto.FLOAT
    np.testing.assert_array_equal(found["blocks.0.fc2"].weight(model), W2.T)
    np.testing.assert_array_equal(found["blocks.1.gemm"].weight(model), W4.T)
    assert found["blocks.0.fc1"].shape == (K, H)


def test_lm_head_only_by_option():
    names = [m.name for m in discover_linears(synthetic_model(), include_lm_head=True)]
    assert "lm_head" in names and len(names) == 5


def _quantize_all(model, fmt_name, **opts):
    fmt = get_format(fmt_name)
    matches = discover_linears(model)
    q = {m.name: fmt.quantize(m.weight(model), None, **fmt.resolve_options(opts)) for m in matches}
    return matches, q


@pytest.mark.parametrize("emit", ["native", "simulated"])
def test_lowered_model_computes_with_the_dequantized_weights(emit, tmp_path):
    model = synthetic_model()
    matches, q = _quantize_all(model, "int4-rtn", group_size=32, accuracy_level=0)  # float activations
    lowered = lower_weights(model, matches, q, emit)
    onnx.checker.check_model(lowered)
    x = RNG.standard_normal((5, K)).astype(np.float32)
    sess = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(["logits"], {"x": x})[0]
    deq = {name: qw.dequantize() for name, qw in q.items()}
    deq["lm_head"] = W5
    np.testing.assert_allclose(y, float_forward(x, deq), rtol=1e-3, atol=1e-2)
    assert not np.allclose(y, float_forward(x), atol=1e-3)  # it really is quantized
    # old weights and their Transpose/Cast are gone, except the untouched LM head
    names = {t.name for t in lowered.graph.initializer}
    assert "blocks.0.fc2.weight" not in names and "lm_head.weight" in names
    assert not any(n.op_type == "Cast" for n in lowered.graph.node)


def test_size_truth_is_counted_from_the_saved_file(tmp_path):
    model = synthetic_model()
    matches, q = _quantize_all(model, "int4-rtn", group_size=32)
    save_onnx(lower_weights(model, matches, q, "native"), tmp_path / "m.onnx")
    sizes = {s.name: s for s in layer_sizes(onnx.load(str(tmp_path / "m.onnx")))}
    assert set(sizes) == set(q)
    for name, qw in q.items():
        k, n = qw.shape
        expected = n * (-(-k // 32)) * (16 + 4 + 1)  # 32 codes in 16 bytes, fp32 scale, one zero nibble pair
        assert sizes[name].stored_bytes == pytest.approx(expected, abs=n)
        assert sizes[name].bits_per_weight == pytest.approx(qw.bits_per_weight())


def test_simulated_emit_records_the_packed_size():
    model = synthetic_model()
    matches, q = _quantize_all(model, "int4-rtn", group_size=32)
    sizes = layer_sizes(lower_weights(model, matches, q, "simulated"))
    for s in sizes:
        assert s.bits_per_weight == pytest.approx(32.0)
        assert s.packed_bits_per_weight == pytest.approx(q[s.name].bits_per_weight(), rel=1e-5)


def _two_heads_model() -> onnx.ModelProto:
    """x @ Wa + x @ Wb: two linears that read the same input, so act-order gives them the same permutation."""
    wa, wb = (RNG.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    ones = np.ones(N, np.float32)
    inits = [numpy_helper.from_array(wa, "a.weight"), numpy_helper.from_array(wb, "b.weight"),
             numpy_helper.from_array(ones, "ones1"), numpy_helper.from_array(ones.copy(), "ones2")]
    nodes = [helper.make_node("MatMul", ["x", "a.weight"], ["ya"]), helper.make_node("MatMul", ["x", "b.weight"], ["yb"]),
             helper.make_node("Mul", ["ya", "ones1"], ["ya1"]), helper.make_node("Mul", ["yb", "ones2"], ["yb1"]),
             helper.make_node("Add", ["ya1", "yb1"], ["y"])]
    graph = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], inits)
    return ensure_node_names(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_identical_permutations_are_stored_once(ops_session):
    import torch

    from qcompile.passes.share import share_initializers

    model = _two_heads_model()
    fmt = get_format("spqr-w3")
    opts = fmt.resolve_options({"act_order": True})
    x_cal = RNG.standard_normal((256, K)) * np.linspace(0.2, 3.0, K)  # uneven diagonal: a non-trivial order
    h = torch.from_numpy(2.0 * x_cal.T @ x_cal / len(x_cal)).float()
    matches = discover_linears(model)
    q = {m.name: fmt.quantize(m.weight(model), h, **opts) for m in matches}
    lowered = lower_weights(model, matches, q, "native")
    shared = share_initializers(lowered)

    perm_a, perm_b = (f"qc.{m.name}.perm" for m in matches)
    inits = {t.name: t for t in lowered.graph.initializer}
    assert numpy_helper.to_array(inits[perm_a]).tolist() != list(range(K))  # really permuted
    names = {t.name for t in shared.graph.initializer}
    assert perm_a in names and perm_b not in names
    assert "ones1" in names and "ones2" in names  # the float model's own tensors are never merged
    assert len(lowered.graph.initializer) - len(shared.graph.initializer) == 1
    onnx.checker.check_model(shared)

    x = RNG.standard_normal((3, K)).astype(np.float32)
    y_before = ops_session(lowered).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(ops_session(shared).run(["y"], {"x": x})[0], y_before)
    # the file's size truth counts the shared tensor once, for the layer whose name it carries
    before = {s.name: s.stored_bytes for s in layer_sizes(lowered)}
    after = {s.name: s.stored_bytes for s in layer_sizes(shared)}
    perm_bytes = numpy_helper.to_array(inits[perm_b]).nbytes
    a, b = (m.name for m in matches)
    assert after[a] == before[a] and after[b] == before[b] - perm_bytes
