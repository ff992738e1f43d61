"""End to end with our op library: compile the bundled default model with ``mxfp4-mr`` (MR-GPTQ: block
Hadamard fused into the weights, applied online by the op), run the artifact in onnxruntime with
qcompile_ops registered, and hold it to the float model (small calibration/eval to fit CI)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from e2e_helpers import compile_default_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, ops_library):
    return compile_default_model(tmp_path_factory.mktemp("e2e") / "mxfp4-mr", "mxfp4-mr")


def test_every_linear_became_an_fp4_op_with_a_rotation(compiled):
    graph = onnx.load(str(compiled / "model.onnx"), load_external_data=False).graph
    fp4 = [n for n in graph.node if n.op_type == "FP4MatMul" and n.domain == "qcompile"]
    assert len(fp4) == 210
    weights = {init.name for init in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    blocks = {onnx.helper.get_node_attr_value(n, "hadamard_block") for n in fp4}
    assert blocks == {32}, blocks


def test_report_bits_and_perplexity(compiled):
    rep = json.loads((compiled / "report.json").read_text())
    assert rep["format"] == "mxfp4-mr" and rep["emit"] == "native" and len(rep["layers"]) == 210
    # E2M1 codes (4 bits) + one E8M0 byte per 32 weights; every K of this model is a multiple of 32
    assert rep["bits_per_weight"] == pytest.approx(4.25, abs=1e-6)
    assert rep["ppl_reference"] > 1 and rep["ppl_quantized"] < 1.3 * rep["ppl_reference"]


def test_artifact_runs_with_the_ops_library_and_tracks_float_logits(compiled):
    from qcompile.data import eval_windows
    from qcompile.evaluate import forward_logits
    from qcompile.models.sources import resolve_source
    from qcompile.pipeline import float_onnx

    source = resolve_source("smollm2-135m")
    ids = eval_windows(source.load_tokenizer(), 64, 2)
    q = forward_logits(compiled / "model.onnx", ids)
    f = forward_logits(float_onnx(source, "float32"), ids)
    assert q.shape == f.shape and np.isfinite(q).all()
    agree = (q.argmax(-1) == f.argmax(-1)).mean()
    assert agree > 0.6, agree
    assert not np.allclose(q, f, atol=1e-3)


def test_stock_onnxruntime_without_the_library_refuses_the_artifact(compiled):
    with pytest.raises(Exception, match="FP4MatMul|qcompile"):
        ort.InferenceSession(str(compiled / "model.onnx"), providers=["CPUExecutionProvider"])
