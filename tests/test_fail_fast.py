"""A bad request fails before any work with one clear message; a compile leaves nothing behind that it should
not (no hidden files, no temporary files beside the user's model, no checkpoint of an input that can only fail
again), its output follows the user's umask, and the cache stays bounded."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest

from qcompile import cache
from qcompile.api import compile as qcompile_compile
from qcompile.cli import main
from qcompile.errors import FormatError, QCompileError
from qcompile.formats import get_format, register
from tiny_model import save_tiny_hf_dir

SMALL = dict(calib_samples=4, seq_len=32, evaluate=False, progress=False, options={"group_size": 32})


@pytest.fixture(scope="module")
def tiny():
    return str(save_tiny_hf_dir())


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading any model an error, so a test proves its failure came first."""
    import qcompile.models.sources as sources

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(sources, "resolve_source", refuse)


@pytest.mark.parametrize("fmt,opts,message", [
    ("int4-gptq", {"group_size": 7}, "group_size=7: expected a power of two"),
    ("int4-gptq", {"group_size": 0}, "group_size=0"),
    ("int4-gptq", {"damp": float("nan")}, "not NaN"),
    ("spqr-w3", {"group_size": 24}, "multiple of 16"),
    ("spqr-w3", {"outlier_threshold": 0}, "positive"),
    ("aqlm-2x8", {"nbits": 17}, "in 1..16"),
    ("aqlm-2x8", {"finetune_lr": -1}, "positive"),
])
def test_bad_option_values_fail_before_any_model_is_loaded(fmt, opts, message, tmp_path, no_model_loading):
    with pytest.raises(FormatError, match=message):
        qcompile_compile("smollm2-135m", fmt, tmp_path / "out", options=opts)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_layer_shapes_are_checked_before_calibration(tiny, tmp_path, monkeypatch):
    import qcompile.passes.calibrate as calibrate

    monkeypatch.setattr(calibrate, "step", lambda s: (_ for _ in ()).throw(AssertionError("calibrated")))
    with pytest.raises(FormatError, match="K=64 is not a multiple of in_group_size=48"):
        qcompile_compile(tiny, "aqlm-2x8", tmp_path / "out", **{**SMALL, "options": {"in_group_size": 48}})


@pytest.mark.parametrize("content,message", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe", "not UTF-8 text"),
    (b"plain text\x00with a NUL", "NUL bytes"),
    (b"   \n", "is empty"),
])
def test_bad_eval_text_fails_before_any_model_is_loaded(content, message, tmp_path, no_model_loading):
    text = tmp_path / "eval.txt"
    text.write_bytes(content)
    with pytest.raises(QCompileError, match=message):
        qcompile_compile("smollm2-135m", "int4-gptq", tmp_path / "out", eval_text=text)


def test_short_eval_text_fails_before_the_export(tiny, tmp_path, monkeypatch):
    import qcompile.pipeline as pipeline

    monkeypatch.setattr(pipeline, "float_onnx", lambda *a, **k: (_ for _ in ()).throw(AssertionError("exported")))
    text = tmp_path / "eval.txt"
    text.write_text("too short for one window")
    with pytest.raises(QCompileError, match="evaluation text"):
        qcompile_compile(tiny, "int4-gptq", tmp_path / "out", eval_text=text, eval_seq_len=64,
                         **{k: v for k, v in SMALL.items() if k != "evaluate"})
    assert not (tmp_path / "out").exists()


def test_eval_and_inspect_name_the_problem(tmp_path, capsys):
    cases = [
        (["eval", str(tmp_path), "--samples", "0"], "--samples must be at least 1, got 0"),
        (["eval", str(tmp_path), "--samples", "-3"], "--samples must be at least 1"),
        (["inspect", str(tmp_path)], "is a folder without a model.onnx"),
        (["eval", str(tmp_path / "model.gguf")], "no such file or folder"),
    ]
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cases.append((["eval", str(tmp_path / "m.gguf")], "is not an .onnx model"))
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    cases.append((["inspect", str(tmp_path / "bad.onnx")], "is not a readable ONNX model"))
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_inspect_names_a_missing_data_file(tiny, tmp_path, capsys):
    qcompile_compile(tiny, "int4-rtn", tmp_path / "out", **SMALL)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    (tmp_path / "m.onnx.data").unlink()
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 1
    assert "external data file is missing" in capsys.readouterr().err


def test_truncated_gguf_is_named(tmp_path, capsys):
    from qcompile.models.sources import bundled_gguf_path

    src = bundled_gguf_path()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(src.stat().st_size // 2))
    assert main(["compile", str(cut), "-f", "int4-rtn", "-o", str(tmp_path / "out")]) == 1
    assert "is truncated" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_force_over_a_file_leaves_nothing_hidden(tiny, tmp_path):
    out = tmp_path / "out"
    out.write_text("an old file in the way")
    qcompile_compile(tiny, "int4-rtn", out, force=True, **SMALL)
    assert (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_output_follows_the_umask(tiny, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        qcompile_compile(tiny, "int4-rtn", tmp_path / "out", **SMALL)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == file_mode, f.name


def test_calibration_writes_nothing_beside_a_users_model(tiny, tmp_path):
    """An .onnx input with external data: calibration slices it without a file beside it."""
    from qcompile.models.sources import resolve_source
    from qcompile.pipeline import float_onnx

    user = tmp_path / "user"
    user.mkdir()
    model = onnx.load(str(float_onnx(resolve_source(tiny), "float32")))
    onnx.save_model(model, str(user / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    before = sorted(p.name for p in user.iterdir())
    qcompile_compile(str(user / "model.onnx"), "int4-gptq", tmp_path / "out", tokenizer=tiny,
                     **{**SMALL, "calib_samples": 5})
    assert sorted(p.name for p in user.iterdir()) == before


def _hold(path: str, log: str) -> None:
    with cache.entry_lock(Path(path)):
        with open(log, "a") as f:
            f.write(f"in {time.monotonic()}\n")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"out {time.monotonic()}\n")


def test_entry_lock_lets_one_builder_in_at_a_time(tmp_path):
    log = tmp_path / "log"
    procs = [multiprocessing.Process(target=_hold, args=(str(tmp_path / "entry"), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["in", "out"] * 3  # never two inside at once


def test_abandoned_checkpoints_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    layers = tmp_path / "layers"
    ages = {"old": 8 * 24 * 3600, "a": 3000, "b": 2000, "mine": 10**7}
    for name, age in ages.items():
        d = layers / name
        d.mkdir(parents=True)
        (d / "x.pkl").write_bytes(b"0" * 1000)
        t = time.time() - age
        os.utime(d / "x.pkl", (t, t))
        os.utime(d, (t, t))
    monkeypatch.setattr(cache, "CHECKPOINT_MAX_BYTES", 1500)
    removed = {p.name for p in cache.prune_checkpoints(keep=layers / "mine")}
    assert removed == {"old", "a"}  # too old; then the oldest until the rest fit
    assert sorted(p.name for p in layers.iterdir()) == ["b", "mine"]


def test_a_compile_that_can_only_fail_again_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    base = get_format("int4-gptq")
    calls = {"n": 0}

    def quantize(weight_kn, hessian, **opts):
        calls["n"] += 1
        if calls["n"] > 3:
            raise FormatError("this layer cannot be quantized")
        return base.quantize(weight_kn, hessian, **opts)

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    name = "test-fails-int4"
    try:
        get_format(name)
    except FormatError:
        register(dataclasses.replace(base, name=name, quantize=quantize))
    with pytest.raises(FormatError):
        qcompile_compile(tiny, name, tmp_path / "out", **SMALL)
    layers = tmp_path / "cache" / "layers"
    assert not layers.exists() or not list(layers.iterdir())
    assert not (tmp_path / "out").exists()


def test_cache_command_lists_and_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    for kind in ("layers", "hessians"):
        (tmp_path / kind / "e").mkdir(parents=True)
        (tmp_path / kind / "e" / "f").write_bytes(b"0" * 2000)
    assert main(["cache", "--list"]) == 0
    out = capsys.readouterr().out
    assert "layers" in out and "hessians" in out and "2 entries" in out
    assert main(["cache", "--clear", "layers"]) == 0
    assert not (tmp_path / "layers" / "e").exists() and (tmp_path / "hessians" / "e").exists()
    assert main(["cache", "--clear"]) == 0
    assert not (tmp_path / "hessians" / "e").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
