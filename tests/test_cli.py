"""Bad input: one line naming the problem, a non-zero exit, and no OUT left behind."""
import subprocess
import sys
from pathlib import Path

import pytest

from qcompile.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_unknown_format_lists_the_accepted_ones(capsys, tmp_path):
    rc, err = _run(capsys, "compile", "smollm2-135m", "-f", "int5-magic", "-o", str(tmp_path / "out"))
    assert rc != 0 and "unknown format 'int5-magic'" in err and "int4-gptq" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_unknown_option_names_the_accepted_ones(capsys, tmp_path):
    rc, err = _run(capsys, "compile", "smollm2-135m", "-f", "int4-rtn", "-O", "colour=blue", "-o", str(tmp_path / "o"))
    assert rc != 0 and "no option colour" in err and "group_size" in err
    assert not (tmp_path / "o").exists()


def test_bad_option_value(capsys, tmp_path):
    rc, err = _run(capsys, "compile", "smollm2-135m", "-f", "int4-gptq", "-O", "damp=lots", "-o", str(tmp_path / "o"))
    assert rc != 0 and "damp" in err and "float" in err


def test_existing_output_is_not_overwritten_without_force(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run(capsys, "compile", "smollm2-135m", "-f", "int4-rtn", "-o", str(out))
    assert rc != 0 and "already exists" in err and (out / "keep.txt").read_text() == "mine"


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _run(capsys, "compile", "smollm2-135m", "-f", "int4-rtn", "-o", str(blocker / "sub" / "out"))
    assert rc != 0 and "cannot write output folder" in err


def test_a_file_that_is_not_a_model(capsys, tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_bytes(b"this is not protobuf \x00\xff" * 10)
    rc, err = _run(capsys, "compile", str(bogus), "-f", "int4-rtn", "-o", str(tmp_path / "o"))
    assert rc != 0 and len(err.splitlines()) == 1 and str(bogus.name) in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_unknown_model_kind_lists_what_is_accepted(capsys, tmp_path):
    weird = tmp_path / "model.pkl"
    weird.write_bytes(b"123")
    rc, err = _run(capsys, "compile", str(weird), "-f", "int4-rtn", "-o", str(tmp_path / "o"))
    assert rc != 0 and "smollm2-135m" in err and ".onnx" in err and ".gguf" in err


def test_inspect_and_eval_name_a_missing_file(capsys, tmp_path):
    for cmd in ("inspect", "eval"):
        rc, err = _run(capsys, cmd, str(tmp_path / "missing.onnx"))
        assert rc != 0 and "missing.onnx" in err


def test_formats_lists_every_family(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("int4-gptq", "int4-rtn", "int3-gptq", "int2-gptq"):
        assert name in out


def test_console_entry_point_exits_non_zero_on_usage_error():
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", "compile"], capture_output=True, text=True)
    assert proc.returncode == 2 and "required" in proc.stderr
