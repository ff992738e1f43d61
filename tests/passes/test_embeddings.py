"""The embeddings pass: the vocabulary table stored once, quantized, read by the LM head (MatMulNBits) and the
embedding (GatherBlockQuantized) from the same bytes; its size is counted apart from the linears'."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qcompile.api import compile as qcompile_compile
from qcompile.api import inspect_model
from qcompile.evaluate import forward_logits
from qcompile.passes.embeddings import BLOCK, quantize_table
from tiny_model import HIDDEN, VOCAB, random_tokens, save_tiny_hf_dir

SMALL = dict(calib_samples=4, seq_len=32, evaluate=False, progress=False, options={"group_size": 32})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tiny = str(save_tiny_hf_dir())
    root = tmp_path_factory.mktemp("emb")
    return {(mode, emit): (root / f"{mode}-{emit}", qcompile_compile(tiny, "int4-gptq", root / f"{mode}-{emit}",
                                                                     embeddings=mode, emit=emit, **SMALL))
            for mode, emit in (("float", "native"), ("int4", "native"), ("int4", "simulated"), ("int8", "native"))}


def _nodes(path):
    return onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node


def _float_gathers(path) -> list:
    """Gathers of token ids (a float embedding lookup)."""
    return [n for n in _nodes(path) if n.op_type == "Gather" and n.input[1] == "input_ids"]


def test_tied_table_is_stored_once_and_read_by_both_ops(compiled):
    path, rep = compiled[("int4", "native")]
    ops = {n.op_type for n in _nodes(path)}
    assert {"GatherBlockQuantized", "MatMulNBits"} <= ops and not _float_gathers(path)
    model = onnx.load(str(path / "model.onnx"))
    sizes = {t.name: t for t in model.graph.initializer}
    assert "lm_head.weight" not in sizes  # the float table is gone
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("qc.lm_head."))
    reshape = next(n for n in model.graph.node if n.output[0] == gbq.input[0])
    assert reshape.input[0] == head.input[1]  # the same packed codes
    emb = rep["embeddings"]
    assert emb["format"] == "int4-gptq" and emb["params"] == HIDDEN * VOCAB
    # int4 codes, an fp32 scale and a 4-bit zero point per block of 32 along hidden (+ three 2-D shape constants)
    assert emb["bits_per_weight"] == pytest.approx(4 + 32 / BLOCK + 4 / BLOCK, rel=0.01)


def test_quantized_tables_compute_what_the_simulated_emit_stores(compiled):
    """Up to the head's int8 activations (MatMulNBits accuracy level 4), which the simulated emit's float
    MatMul does not round: within 2% of the largest logit, while float tables differ far more."""
    ids = random_tokens(2, 12, seed=9)
    native = forward_logits(compiled[("int4", "native")][0] / "model.onnx", ids)
    simulated = forward_logits(compiled[("int4", "simulated")][0] / "model.onnx", ids)
    scale = float(np.abs(simulated).max())
    assert np.abs(native - simulated).max() < 0.02 * scale
    assert (native.argmax(-1) == simulated.argmax(-1)).mean() > 0.9
    float_emb = forward_logits(compiled[("float", "native")][0] / "model.onnx", ids)
    assert not np.allclose(native, float_emb, atol=1e-4)


def test_sizes_follow_the_table_bits(compiled):
    f, i8, i4 = (compiled[(m, "native")][1] for m in ("float", "int8", "int4"))
    assert f["embeddings"]["format"] == "float" and f["embeddings"]["bits_per_weight"] is None
    assert f["file_bytes"] > i8["file_bytes"] > i4["file_bytes"]
    table_saving = f["file_bytes"] - i4["file_bytes"]
    assert table_saving == pytest.approx(HIDDEN * VOCAB * (4 - i4["embeddings"]["bits_per_weight"] / 8), rel=0.05)
    for rep in (f, i8, i4):  # the linears are counted apart from the tables
        assert rep["bits_per_weight"] == pytest.approx(f["bits_per_weight"])
        assert rep["bits_per_parameter"] == pytest.approx(8 * rep["file_bytes"] / rep["parameters"])


def test_inspect_lists_the_embedding_row(compiled):
    rows, total = inspect_model(compiled[("int4", "native")][0] / "model.onnx")
    (emb,) = [r for r in rows if r["role"] == "embedding"]
    assert emb["name"] == "lm_head" and emb["shape"] == f"{HIDDEN}x{VOCAB}"


def test_gather_block_quantized_reads_the_matmulnbits_layout():
    """Rows that GatherBlockQuantized returns equal the dequantized table's rows, for 4 and 8 bits."""
    from onnx import TensorProto, helper

    from qcompile.passes.embeddings import _gather_block_quantized
    from qcompile.runtime import make_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 40)).astype(np.float32)  # [hidden, vocab]
    for bits in (4, 8):
        qw = quantize_table(w, None, bits)
        nodes, inits = _gather_block_quantized(qw, "t", "ids", "y", "gather", "lm_head")
        inits += [numpy_helper.from_array(a, f"t.{k}") for k, a in qw.packed().items()]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        ids = np.array([3, 0, 39, 3], np.int64)
        got = make_session(model, ["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        np.testing.assert_array_equal(got, qw.dequantize().T[ids])


def test_untied_tables_are_quantized_each(tmp_path):
    tiny = str(save_tiny_hf_dir(tmp_path / "untied", tie_word_embeddings=False))
    rep = qcompile_compile(tiny, "int4-gptq", tmp_path / "out", embeddings="int8", **SMALL)
    rows = {r["name"]: r for r in inspect_model(tmp_path / "out" / "model.onnx")[0] if r["role"] == "embedding"}
    assert set(rows) == {"lm_head", "model.embed_tokens"}
    assert rep["embeddings"]["params"] == 2 * HIDDEN * VOCAB
    ops = [n.op_type for n in _nodes(tmp_path / "out")]
    assert ops.count("GatherBlockQuantized") == 1 and not _float_gathers(tmp_path / "out")


def test_head_uses_its_calibration_hessian():
    """GPTQ on the head's Hessian lowers the head's output error below round-to-nearest."""
    from qcompile.solvers.gptq import relative_output_error

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((256, 64)).astype(np.float32) * np.linspace(0.1, 3, 64, dtype=np.float32)
    h = torch.from_numpy(x.T @ x / len(x))
    errs = [relative_output_error(torch.from_numpy(w.T), torch.from_numpy(quantize_table(w, hess, 4).dequantize().T), h)
            for hess in (h, None)]
    assert errs[0] < errs[1]
