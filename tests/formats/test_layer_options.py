"""Per-layer format options (``--layer-option PATTERN:KEY=VALUE``): parsing, the order overrides apply in,
clear errors before any work, and a compile whose matched layers really carry their own settings."""
import dataclasses

import numpy as np
import onnx
import pytest

from qcompile.evaluate import forward_logits
from qcompile.api import compile as qcompile_compile
from qcompile.errors import FormatError
from qcompile.formats import get_format
from qcompile.formats.base import LayerOverride
from tiny_model import random_tokens, save_tiny_hf_dir

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
         "model.layers.1.mlp.down_proj"]


def test_parse_accepts_several_pairs_and_rejects_malformed_text():
    ov = LayerOverride.parse("*.v_proj:bits=4, outlier_threshold=0.5")
    assert ov.pattern == "*.v_proj" and ov.options == (("bits", "4"), ("outlier_threshold", "0.5"))
    assert str(ov) == "*.v_proj:bits=4,outlier_threshold=0.5"
    for bad in ("*.v_proj", "*.v_proj:", ":bits=4", "*.v_proj:bits", "*.v_proj:bits=4,damp"):
        with pytest.raises(FormatError, match="PATTERN:KEY=VALUE"):
            LayerOverride.parse(bad)


def test_matching_layers_get_the_override_and_a_later_one_wins():
    fmt = get_format("spqr-w3")
    opts = fmt.resolve_options({})
    per = fmt.resolve_layer_options(opts, [LayerOverride.parse("*.v_proj:bits=4"),
                                           LayerOverride.parse("model.layers.1.*:bits=3,group_size=32")], NAMES)
    assert per[NAMES[0]] == opts
    assert per[NAMES[1]]["bits"] == 4 and per[NAMES[1]]["group_size"] == 16
    assert per[NAMES[2]]["bits"] == 3 and per[NAMES[2]]["group_size"] == 32  # the later override wins
    assert per[NAMES[3]]["group_size"] == 32 and per[NAMES[3]]["bits"] == 3
    assert isinstance(per[NAMES[1]]["bits"], int)  # parsed with the option's type


@pytest.mark.parametrize("text, message", [
    ("*.v_proj:bitz=4", "has no option bitz"),
    ("*.v_proj:bits=5", "expected one of"),
    ("*.v_proj:finetune_epochs=2", "acts on the whole model"),
    ("*.w_proj:bits=4", "matches no quantized layer"),
])
def test_bad_overrides_name_the_problem(text, message):
    fmt = get_format("spqr-w3")
    with pytest.raises(FormatError, match=message):
        fmt.resolve_layer_options(fmt.resolve_options({}), [LayerOverride.parse(text)], NAMES)


def test_a_formats_own_layer_options_may_match_nothing_and_come_first():
    own = (LayerOverride.parse("*.v_proj:bits=4"), LayerOverride.parse("*.no_such_layer:bits=4"))
    fmt = dataclasses.replace(get_format("spqr-w3"), layer_options=own)
    per = fmt.resolve_layer_options(fmt.resolve_options({}), [LayerOverride.parse("model.layers.1.*:bits=3")], NAMES)
    assert per[NAMES[1]]["bits"] == 4 and per[NAMES[2]]["bits"] == 3 and per[NAMES[0]]["bits"] == 3


def test_a_bad_override_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FormatError, match="has no option bitz"):
        qcompile_compile("no-such-model-dir", "spqr-w3", out, layer_options=["*.v_proj:bitz=4"])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_compile_gives_matched_layers_their_options(tmp_path, ops_library, ops_session):
    """v_proj at 4 bits, the rest at 3: the native nodes say so, v_proj stores more bits and errs less than in
    the all-3-bit compile, every other layer is bit-identical to it, and onnxruntime runs the artifact."""
    tiny = str(save_tiny_hf_dir(tmp_path / "hf"))
    small = dict(calib_samples=8, seq_len=64, evaluate=False, progress=False,
                 options={"outlier_threshold": 0.2, "finetune_epochs": 0})
    uniform = "*:bits=3"  # over the preset's own per-layer bits, if it has any
    plain = qcompile_compile(tiny, "spqr-w3", tmp_path / "plain", layer_options=[uniform], **small)
    mixed = qcompile_compile(tiny, "spqr-w3", tmp_path / "mixed", layer_options=[uniform, "*.v_proj:bits=4"],
                             **small)
    own = [str(o) for o in get_format("spqr-w3").layer_options]
    assert mixed["layer_options"] == own + [uniform, "*.v_proj:bits=4"]
    model = onnx.load(str(tmp_path / "mixed" / "model.onnx"))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "SpQRMatMul"}
    assert bits and all((b == 4) == (".v_proj" in name) for name, b in bits.items())
    before = {layer["name"]: layer for layer in plain["layers"]}
    for layer in mixed["layers"]:
        old = before[layer["name"]]
        if layer["name"].endswith(".v_proj"):
            assert layer["layer_options"] == {"bits": 4} and layer["bits"] == 4
            assert layer["bits_per_weight"] > old["bits_per_weight"]  # (fewer outliers pay back part of it)
            assert layer["rel_output_error"] < old["rel_output_error"]
        else:
            assert "layer_options" not in layer
            assert layer["bits_per_weight"] == old["bits_per_weight"]
            assert layer["rel_output_error"] == pytest.approx(old["rel_output_error"], rel=1e-6)
    md = (tmp_path / "mixed" / "report.md").read_text()
    assert "`*.v_proj:bits=4`" in md and "own options" in md and "| bits=4 |" in md
    ids = random_tokens(2, 16, seed=3)
    logits = forward_logits(ops_session(model), ids)
    assert np.isfinite(logits).all()


def test_cli_passes_layer_options(tmp_path, capsys):
    from qcompile.cli import main

    rc = main(["compile", "no-such-model-dir", "-f", "spqr-w3", "-o", str(tmp_path / "o"), "-L", "*.v_proj:bitz=4"])
    assert rc != 0 and "has no option bitz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_spqr_w3_preset_spends_its_budget_on_value_and_late_mlp_projections(capsys):
    """The preset's own -L defaults (docs/formats/spqr-bit-allocation.md): v_proj everywhere, up_proj of blocks 16-29
    and down_proj of blocks 24-29 at 4 bits on a 30-block Llama; a user's override comes after them;
    `qcompile formats` lists them."""
    from qcompile.cli import main

    fmt = get_format("spqr-w3")
    names = [f"model.layers.{i}.{t}" for i in range(30)
             for t in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
    per = fmt.resolve_layer_options(fmt.resolve_options({}), [], names)
    four = {n for n, o in per.items() if o["bits"] == 4}
    assert four == {n for n in names if n.endswith(".v_proj")} | {f"model.layers.{i}.mlp.up_proj" for i in range(16, 30)} | {
        f"model.layers.{i}.mlp.down_proj" for i in range(24, 30)}
    per = fmt.resolve_layer_options(fmt.resolve_options({}), [LayerOverride.parse("*:bits=3")], names)
    assert {o["bits"] for o in per.values()} == {3}
    assert main(["formats"]) == 0
    assert "-L *.v_proj:bits=4" in capsys.readouterr().out


def test_layer_overrides_are_part_of_the_resume_checkpoint_key(tmp_path, monkeypatch):
    """A killed compile resumed with other per-layer options must not reuse its finished layers."""
    from pathlib import Path

    from qcompile.formats.base import LayerOverride
    from qcompile.passes.quantize import layer_checkpoint
    from qcompile.passes.state import CompileState
    from qcompile.pipeline import CompileConfig

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    fmt = get_format("spqr-w3")
    cfg = CompileConfig(model=str(model), format=fmt.name, output=Path(tmp_path / "o"))
    calib = np.zeros((2, 8), dtype=np.int64)

    def key(overrides, **opts):
        state = CompileState(cfg=cfg, fmt=fmt, options=fmt.resolve_options(opts),
                             overrides=tuple(LayerOverride.parse(o) for o in overrides), emit="native", device="cpu",
                             source=None, float_path=model, model=None, tokenizer=None)
        return layer_checkpoint(state, calib).directory

    assert key([]) == key([])
    assert key(["*.v_proj:bits=4"]) != key([])
    assert key(["*.v_proj:bits=4"]) != key(["*.k_proj:bits=4"])
    assert key([], finetune_epochs=0) == key([])  # whole-model options act after the layers
