"""``-f auto`` on the tiny model: bad requests fail before any model is loaded; a mixed artifact holds every op kind
in one graph, runs in onnxruntime and equals its simulated emit; the budget is never exceeded, counted from the
file's bytes, for several budgets in bits per weight and in megabytes; the report predicts the file's bytes."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from qcompile import candidates
from qcompile.api import compile as qcompile_compile
from qcompile.api import inspect_model
from qcompile.errors import QCompileError
from qcompile.evaluate import forward_logits
from tiny_model import TINY_LINEARS, random_tokens, save_tiny_hf_dir

SMALL = dict(calib_samples=8, seq_len=64, evaluate=False, progress=False)
CHEAP_AQLM = "aqlm-2x8:nbits=6:rounds=1:kmeans_iters=2"  # 2 KiB codebooks: the tiny layers' sizes make sense
PALETTE = f"int4-gptq:group_size=32,mxfp4-mr,nvfp4-mr,spqr-w3:bits=3,spqr-w3:bits=4,{CHEAP_AQLM}"
OPS = ("MatMulNBits", "FP4MatMul", "SpQRMatMul", "CodebookMatMul")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """The candidate and Fisher caches of these compiles stay out of the user's cache (shared by the module)."""
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "auto-cache"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs one budget"),
    (dict(budget=3.0, budget_mb=40.0), "needs one budget"),
    (dict(budget=0.0), "--budget 0.0: expected a positive number"),
    (dict(budget=float("nan")), "expected a positive number"),
    (dict(budget_mb=-5.0), "--budget-mb -5.0: expected a positive number"),
    (dict(budget=40.0), "more bits per weight than float32"),
    (dict(budget=3.0, palette=["spqr-w9"]), "palette entry 'spqr-w9': unknown format"),
    (dict(budget=3.0, palette=["spqr-w3:bits=5"]), "palette entry 'spqr-w3:bits=5': option bits=5: expected one of"),
    (dict(budget=3.0, palette=["spqr-w3:bitz=4"]), "format spqr-w3 has no option bitz"),
    (dict(budget=3.0, palette=["spqr-w3:bits"]), "expected FORMAT"),
    (dict(budget=3.0, palette=["mxfp4-mr,,aqlm-2x8"]), "an empty entry"),
    (dict(budget=3.0, palette=["int4-gptq,int4-gptq:group_size=128"]), "are the same setting"),
    (dict(budget=3.0, palette=["aqlm-2x8:finetune_epochs=0"]), "acts on the whole model"),
    (dict(budget=3.0, palette=["auto"]), "not 'auto'"),
    (dict(budget=3.0, layer_options=["*.v_proj:bits=4"]), "-L does not apply"),
    (dict(budget=3.0, sequential=True), "--sequential does not apply"),
    (dict(budget=3.0, options={"group_size": 64}), "group_size belongs in a --palette entry"),
    (dict(budget=3.0, emit="portable"), "int4-gptq, int4-gptq:group_size=64 do not"),
    (dict(tie=True, budget=3.0, palette=["mxfp4-mr"], sequential=True), "--sequential does not apply"),
])
def test_bad_requests_fail_before_any_model_is_loaded(tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(QCompileError, match=message.replace("(", r"\(").replace("[", r"\[")):
        qcompile_compile("no-such-model-dir", "auto", out, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [dict(budget=3.0), dict(budget_mb=40.0), dict(palette=["mxfp4-mr"]), dict(tie=True)])
def test_budget_palette_and_tie_belong_to_auto(tmp_path, kwargs):
    with pytest.raises(QCompileError, match="go with -f auto"):
        qcompile_compile("no-such-model-dir", "int4-gptq", tmp_path / "o", **kwargs)


def test_cli_prints_one_line_and_writes_nothing(tmp_path, capsys):
    from qcompile.cli import main

    rc = main(["compile", "no-such-model-dir", "-f", "auto", "--budget", "3", "--palette", "spqr-w3:bits=5",
               "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "palette entry 'spqr-w3:bits=5'" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def mixed(tiny, tmp_path_factory):
    """One compile per emit in which layer i is steered to palette entry i mod 4 (every other entry is given a high
    damage), so that one graph holds all four op kinds; everything after the choice is the real pipeline,
    including one joint fine-tuning of the SpQR and AQLM layers."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QCOMPILE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "auto-cache"))
    real = candidates._measure

    def steered(job, index, *args):
        entry = real(job, index, *args)
        return dataclasses.replace(entry, damage=0.0 if index == TINY_LINEARS.index(job.layer) % 4 else 1.0)

    mp.setattr(candidates, "_measure", steered)
    root = tmp_path_factory.mktemp("mixed")
    # fp32 activations everywhere (accuracy_level=1, float vocabulary tables): native equals simulated to rounding
    palette = f"int4-gptq:group_size=32:accuracy_level=1,mxfp4-mr,spqr-w3:bits=4,{CHEAP_AQLM}"
    out = {}
    try:
        for emit in ("native", "simulated"):
            out[emit] = root / emit, qcompile_compile(
                tiny, "auto", root / emit, emit=emit, budget=16.0, palette=[palette], embeddings="float",
                options={"finetune_epochs": 1, "finetune_windows": 8}, **SMALL)
    finally:
        mp.undo()
    return out


def test_mixed_artifact_holds_every_op_kind_and_equals_its_simulated_emit(mixed, ops_session):
    path, rep = mixed["native"]
    model = onnx.load(str(path / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert all(ops.count(op) >= 3 for op in OPS), {op: ops.count(op) for op in OPS}
    assert [layer["candidate"].split(":")[0] for layer in rep["layers"]] == [
        ("int4-gptq", "mxfp4-mr", "spqr-w3", "aqlm-2x8")[i % 4] for i in range(len(TINY_LINEARS))]
    assert rep["format"] == "auto" and "qcompile_ops" in rep["runtime"] and "stock onnxruntime" in rep["runtime"]
    tune = rep["tune"]  # one distillation over the SpQR and AQLM layers together
    assert tune["steps"] == 2 and {l["name"] for l in rep["layers"] if l["damage_tuned"] is not None} == {
        l["name"] for l in rep["layers"] if l["format"] in ("spqr-w3", "aqlm-2x8")}
    ids = random_tokens(2, 16, seed=3)
    native = forward_logits(ops_session(model), ids)
    simulated = forward_logits(mixed["simulated"][0] / "model.onnx", ids)
    np.testing.assert_allclose(native, simulated, rtol=1e-3, atol=1e-3 * float(np.abs(simulated).max()))


def test_report_predicts_the_files_bytes_and_inspect_shows_the_mix(mixed):
    path, rep = mixed["native"]
    for layer in rep["layers"]:
        assert layer["predicted_bytes"] == layer["bytes"] == round(layer["bits_per_weight"] * np.prod(layer["shape"]) / 8)
    alloc = rep["allocation"]
    assert alloc["predicted_bytes"] == alloc["bytes"] and sum(m["layers"] for m in alloc["mix"].values()) == 14
    assert json.loads((path / "report.json").read_text())["allocation"]["mix"] == alloc["mix"]
    md = (path / "report.md").read_text()
    assert "## Mix" in md and "| spqr-w3:bits=4 |" in md
    rows = {r["name"]: r for r in inspect_model(path / "model.onnx")[0]}
    assert rows["model.layers.0.self_attn.v_proj"]["format"] == "spqr-w3 bits=4"
    assert rows["model.layers.0.self_attn.q_proj"]["format"] == "int4-gptq group_size=32,accuracy_level=1"
    assert rows["model.layers.0.self_attn.k_proj"]["format"] == "mxfp4-mr"


def test_budget_is_never_exceeded_counted_from_the_file(tiny, tmp_path):
    reports = {}
    for bits in (4.3, 4.8, 5.4, 7.0):
        rep = qcompile_compile(tiny, "auto", tmp_path / f"b{bits}", budget=bits, palette=[PALETTE],
                               options={"finetune_epochs": 0}, **SMALL)
        assert rep["bits_per_weight"] <= bits
        assert rep["allocation"]["predicted_bytes"] == rep["allocation"]["bytes"]
        assert rep["bits_per_weight"] == pytest.approx(8 * rep["allocation"]["bytes"] / rep["quantized_params"])
        for layer in rep["layers"]:  # reused quantizations: the prediction is the measurement
            assert layer["damage"] == pytest.approx(layer["predicted_damage"]) or layer["damage_estimated"]
        reports[bits] = rep
    damages = [reports[b]["allocation"]["predicted_damage"] for b in sorted(reports)]
    assert all(a >= b for a, b in zip(damages, damages[1:])) and damages[0] > damages[-1]
    assert len({tuple(sorted(r["allocation"]["mix"])) for r in reports.values()}) > 1  # really mixes
    with pytest.raises(QCompileError, match="below the smallest this palette can store"):
        qcompile_compile(tiny, "auto", tmp_path / "tiny-budget", budget=2.0, palette=[PALETTE], **SMALL)


def test_tie_gives_layers_of_one_input_one_entry(tiny, tmp_path):
    free = qcompile_compile(tiny, "auto", tmp_path / "free", budget=4.8, palette=[PALETTE],
                            options={"finetune_epochs": 0}, **SMALL)
    tied = qcompile_compile(tiny, "auto", tmp_path / "tied", budget=4.8, palette=[PALETTE], tie=True,
                            options={"finetune_epochs": 0}, **SMALL)
    entry = {layer["name"]: layer["candidate"] for layer in tied["layers"]}
    for b in (0, 1):
        p = f"model.layers.{b}."
        assert entry[p + "self_attn.q_proj"] == entry[p + "self_attn.k_proj"] == entry[p + "self_attn.v_proj"]
        assert entry[p + "mlp.gate_proj"] == entry[p + "mlp.up_proj"]
    assert tied["bits_per_weight"] <= 4.8 and tied["allocation"]["tie"]
    assert tied["allocation"]["predicted_damage"] >= free["allocation"]["predicted_damage"]  # a constraint costs


@pytest.mark.parametrize("embeddings", [None, "float"])
def test_budget_mb_counts_the_whole_file(tiny, tmp_path, embeddings):
    ref = qcompile_compile(tiny, "auto", tmp_path / "ref", budget=5.0, palette=[PALETTE], embeddings=embeddings,
                           options={"finetune_epochs": 0}, **SMALL)
    target = ref["file_bytes"] + 1500
    rep = qcompile_compile(tiny, "auto", tmp_path / "mb", budget_mb=target / 1e6, palette=[PALETTE],
                           embeddings=embeddings, options={"finetune_epochs": 0}, **SMALL)
    assert rep["file_bytes"] <= target and rep["file_bytes"] == rep["allocation"]["predicted_file_bytes"]
    assert rep["bits_per_weight"] >= ref["bits_per_weight"]  # the 1500 bytes go to the linears
    assert rep["embeddings"]["mode"] == (embeddings or "int8")
