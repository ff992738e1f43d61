"""End to end on the bundled default model: compile with int4-gptq, run the artifact in stock
onnxruntime, and hold its perplexity to the float model's (small calibration/eval to fit CI)."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from e2e_helpers import compile_default_model
from qcompile.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_default_model(tmp_path_factory.mktemp("e2e") / "int4", "int4-gptq")


def test_report_has_the_promised_fields_and_a_bounded_perplexity(compiled):
    rep = json.loads((compiled / "report.json").read_text())
    for key in ("format", "model", "bits_per_weight", "quantized_params", "file_bytes", "ppl_reference",
                "ppl_quantized", "eval_tokens", "calib_tokens", "compile_seconds", "layers"):
        assert key in rep, key
    assert rep["format"] == "int4-gptq" and len(rep["layers"]) == 210
    # 4-bit codes + fp32 scale + 4-bit zero per 128 weights, and K=576 pads to 640 (5 blocks) as
    # MatMulNBits requires: 343 bytes per 576-row, 822 per 1536-row -> 4.643 overall
    assert rep["bits_per_weight"] == pytest.approx(4.6432, abs=1e-3)
    assert rep["ppl_reference"] > 1 and rep["ppl_quantized"] < 1.35 * rep["ppl_reference"]
    assert rep["eval_tokens"] == 8 * 255 and rep["calib_tokens"] == 16 * 256
    # the tied vocabulary table is stored once, at 8 bits, and the whole folder is smaller than the GGUF
    assert rep["embeddings"]["format"] == "int8-gptq" and rep["embeddings"]["params"] == 576 * 49152
    assert rep["file_bytes"] < rep["source_bytes"]
    assert rep["bits_per_parameter"] == pytest.approx(8 * rep["file_bytes"] / rep["parameters"])
    assert all(0 <= layer["rel_output_error"] < 0.2 for layer in rep["layers"])
    assert (compiled / "report.md").read_text().startswith("# qcompile report")


def test_artifact_runs_in_stock_onnxruntime_and_tracks_float_logits(compiled):
    from qcompile.data import eval_windows
    from qcompile.evaluate import forward_logits
    from qcompile.models.sources import resolve_source
    from qcompile.pipeline import float_onnx

    # real text: on random ids top-1 agreement means little (measured 0.40 there, 0.71 on text)
    source = resolve_source("smollm2-135m")
    ids = eval_windows(source.load_tokenizer(), 64, 2)
    q = forward_logits(ort.InferenceSession(str(compiled / "model.onnx"), providers=["CPUExecutionProvider"]), ids)
    f = forward_logits(float_onnx(source, "float32"), ids)
    assert q.shape == f.shape and np.isfinite(q).all()
    agree = (q.argmax(-1) == f.argmax(-1)).mean()
    assert agree > 0.6, agree
    assert not np.allclose(q, f, atol=1e-3)


def test_inspect_reads_the_same_bits_from_the_file(compiled, capsys):
    assert main(["inspect", str(compiled / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rep = json.loads((compiled / "report.json").read_text())
    assert info["bits_per_weight"] == pytest.approx(rep["bits_per_weight"])
    assert info["params"] == rep["quantized_params"]
    assert all(layer["format"] == "int4-gptq" for layer in info["layers"] if layer["role"] == "linear")
    emb = rep["embeddings"]
    assert info["embedding_params"] == emb["params"]
    assert 8.0 * info["embedding_bytes"] / info["embedding_params"] == pytest.approx(emb["bits_per_weight"])


def test_eval_command_reproduces_the_report(compiled, capsys):
    rep = json.loads((compiled / "report.json").read_text())
    assert main(["eval", str(compiled / "model.onnx"), "--samples", "8", "--seq-len", "256", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"{rep['ppl_quantized']:.4f}" in out
