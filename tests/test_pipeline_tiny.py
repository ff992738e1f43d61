"""The whole pipeline on a tiny random Llama (seconds, not minutes): every emit mode runs in onnxruntime,
the report's sizes match the file, and GPTQ's per-layer error beats RTN's on the same Hessians."""
import json

import numpy as np
import pytest

from qcompile.evaluate import forward_logits
from qcompile.api import compile as qcompile_compile
from qcompile.report import layer_sizes
from tiny_model import save_tiny_hf_dir, random_tokens

import onnx

SMALL = dict(calib_samples=8, seq_len=64, eval_samples=4, eval_seq_len=64, progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf"))


@pytest.fixture(scope="module")
def compiled(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    out = {}
    for fmt, emit in (("int4-rtn", "native"), ("int4-gptq", "native"), ("int4-gptq", "simulated")):
        path = root / f"{fmt}-{emit}"
        # float activations and vocabulary tables: native and simulated linears are compared below
        out[(fmt, emit)] = (path, qcompile_compile(tiny_dir, fmt, path, emit=emit,
                                                   options={"group_size": 32, "accuracy_level": 0},
                                                   embeddings="float", **SMALL))
    return out


def test_every_linear_is_found_and_quantized(compiled):
    _, rep = compiled[("int4-gptq", "native")]
    names = [layer["name"] for layer in rep["layers"]]
    assert len(names) == 2 * 7  # q k v o gate up down per block (the vocabulary tables are not linears)
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"


def test_gptq_has_lower_output_error_than_rtn_layer_by_layer(compiled):
    rtn = {l["name"]: l["rel_output_error"] for l in compiled[("int4-rtn", "native")][1]["layers"]}
    gptq = {l["name"]: l["rel_output_error"] for l in compiled[("int4-gptq", "native")][1]["layers"]}
    wins = sum(gptq[n] < rtn[n] for n in rtn)
    assert wins >= 0.8 * len(rtn), (wins, len(rtn))
    assert sum(gptq.values()) < sum(rtn.values())


def test_native_and_simulated_artifacts_compute_the_same_function(compiled):
    ids = random_tokens(2, 16, seed=3)
    outs = [forward_logits(p / "model.onnx", ids) for p, _ in (compiled[("int4-gptq", "native")], compiled[("int4-gptq", "simulated")])]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)


def test_report_bits_are_the_files_bits(compiled):
    path, rep = compiled[("int4-gptq", "native")]
    sizes = {s.name: s for s in layer_sizes(onnx.load(str(path / "model.onnx")))}
    for layer in rep["layers"]:
        assert layer["bits_per_weight"] == pytest.approx(sizes[layer["name"]].bits_per_weight)
    sim_path, sim = compiled[("int4-gptq", "simulated")]
    assert sim["bits_per_weight"] == pytest.approx(rep["bits_per_weight"])
    assert sim["file_bytes"] > rep["file_bytes"]
    assert json.loads((path / "report.json").read_text())["ppl_quantized"] == pytest.approx(rep["ppl_quantized"])


def test_failed_compile_leaves_no_output(tiny_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(Exception):
        qcompile_compile(tiny_dir, "int4-gptq", out, options={"group_size": 24}, **SMALL)  # not a power of two
    assert not out.exists() and not list(tmp_path.iterdir())
