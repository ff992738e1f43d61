"""An interrupted compile resumes from the last finished layer (tiny random Llama, seconds).

A test format wraps int4-gptq and raises after N layers; the second run must quantize only the remaining
layers, report the reused ones, produce exactly the model an uninterrupted compile produces, and remove
its checkpoint once the output is complete.
"""
import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompile.api import compile as qcompile_compile
from qcompile.cache import cache_dir
from qcompile.formats import get_format
from qcompile.formats import register
from tiny_model import save_tiny_hf_dir

SMALL = dict(calib_samples=4, seq_len=32, evaluate=False, progress=False, options={"group_size": 32})
FMT = "test-resume-int4"
STATE = {"calls": 0, "fail_after": None}


class Interrupted(RuntimeError):
    pass


def _quantize(weight_kn, hessian, **opts):
    if STATE["fail_after"] is not None and STATE["calls"] >= STATE["fail_after"]:
        raise Interrupted("simulated kill")
    STATE["calls"] += 1
    return get_format("int4-gptq").quantize(weight_kn, hessian, **opts)


def _register() -> None:
    try:
        get_format(FMT)
    except Exception:  # noqa: BLE001 - not registered yet
        base = get_format("int4-gptq")
        register(dataclasses.replace(base, name=FMT, description="int4-gptq that can be made to fail (tests)",
                                     quantize=_quantize))


@pytest.fixture(scope="module")
def tiny():
    return str(save_tiny_hf_dir())  # the per-version shared folder: its export is cached across test files


def _layer_dirs() -> set:
    root = cache_dir() / "layers"
    return {p for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def _weights(path) -> dict:
    model = onnx.load(str(path / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_killed_compile_resumes_from_last_finished_layer(tiny, tmp_path):
    _register()
    before = _layer_dirs()

    STATE.update(calls=0, fail_after=5)
    with pytest.raises(Interrupted):
        qcompile_compile(tiny, FMT, tmp_path / "a", **SMALL)
    assert not (tmp_path / "a").exists()
    new = _layer_dirs() - before
    assert len(new) == 1
    ckpt_dir = new.pop()
    assert len(list(ckpt_dir.glob("*.pkl"))) == 5

    STATE.update(calls=0, fail_after=None)
    rep = qcompile_compile(tiny, FMT, tmp_path / "a", **SMALL)
    assert STATE["calls"] == 14 - 5  # 2 blocks x 7 linears, 5 reused
    assert rep["resumed_layers"] == 5
    assert [layer["resumed"] for layer in rep["layers"]] == [True] * 5 + [False] * 9
    assert all(layer["quantize_seconds"] is not None and layer["quantize_seconds"] >= 0 for layer in rep["layers"])
    assert not ckpt_dir.exists()  # removed after the successful compile
    assert "quantize s" in (tmp_path / "a" / "report.md").read_text()

    STATE.update(calls=0)
    fresh = qcompile_compile(tiny, FMT, tmp_path / "b", resume=False, **SMALL)
    assert STATE["calls"] == 14 and fresh["resumed_layers"] == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("qc.") for k in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_other_options_do_not_reuse_checkpoint(tiny, tmp_path):
    """A checkpoint is keyed by the options: a killed group-32 compile is not resumed by a group-64 one."""
    _register()
    STATE.update(calls=0, fail_after=3)
    with pytest.raises(Interrupted):
        qcompile_compile(tiny, FMT, tmp_path / "a", **SMALL)
    STATE.update(calls=0, fail_after=None)
    rep = qcompile_compile(tiny, FMT, tmp_path / "a", **{**SMALL, "options": {"group_size": 64}})
    assert STATE["calls"] == 14 and rep["resumed_layers"] == 0
    STATE.update(calls=0)
    rep = qcompile_compile(tiny, FMT, tmp_path / "c", **SMALL)  # the group-32 checkpoint is still there
    assert STATE["calls"] == 11 and rep["resumed_layers"] == 3
