"""tools/sweep.py's bookkeeping (no compiles): row parsing, reuse only at identical settings, table order."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parents[2] / "tools" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("qcompile_sweep_tool", SWEEP)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_row_spec_becomes_cli_arguments(sweep):
    row = sweep.Row.parse("int2-gptq:simulated,group_size=64")
    assert (row.format, row.emit, row.options) == ("int2-gptq", "simulated", {"group_size": "64"})
    assert row.cli_args() == ["-f", "int2-gptq", "--emit", "simulated", "-O", "group_size=64"]
    assert row.name == "int2-gptq_simulated_group_size_64"
    assert sweep.Row.parse("spqr-w3,--sequential").cli_args() == ["-f", "spqr-w3", "--sequential"]
    with pytest.raises(SystemExit, match="bad option"):
        sweep.Row.parse("int4-gptq,group_size")


def test_reuse_takes_a_report_only_when_the_settings_match(sweep, tmp_path, monkeypatch):
    args = sweep.parse_args(["--out", str(tmp_path), "--reuse", "--eval-samples", "8"])
    row = sweep.Row.parse("int4-rtn")
    (tmp_path / row.name).mkdir()
    report = {"model": "smollm2-135m", "calib_samples": 64, "seq_len": 256, "eval_samples": 8, "eval_seq_len": 512,
              "seed": 0, "bits_per_weight": 4.5, "ppl_quantized": 30.0, "ppl_reference": 20.0, "emit": "native"}
    (tmp_path / row.name / "report.json").write_text(json.dumps(report))
    compiled = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: compiled.append(cmd) or
                        type("R", (), {"returncode": 3})())
    assert sweep.compile_row(row, args) == report and not compiled
    args.eval_samples = 32  # another evaluation set: the old report is not comparable, so it recompiles
    assert "error" in sweep.compile_row(row, args) and len(compiled) == 1


def test_table_is_ordered_by_size_then_accuracy_with_float_first(sweep):
    results = {
        "a": {"bits_per_weight": 4.25, "ppl_quantized": 30.0, "ppl_reference": 20.0, "emit": "native"},
        "b": {"bits_per_weight": 4.25, "ppl_quantized": 25.0, "ppl_reference": 20.0, "emit": "native"},
        "c": {"bits_per_weight": 2.1, "ppl_quantized": 60.0, "ppl_reference": 20.0, "emit": "native"},
        "d": {"error": "exit 1: boom"},
    }
    rows = sweep.table_rows(results)
    assert [r["row"] for r in rows] == ["float", "b", "a", "c", "d"]
    assert rows[1]["vs_float"] == pytest.approx(0.25)
    md = sweep.markdown(rows, {"model": "m", "calib_samples": 1, "seq_len": 2, "eval_samples": 3, "eval_seq_len": 4,
                               "seed": 0})
    assert "| b | native | 4.250 | 25.000 | +25.0% |" in md and "FAILED: exit 1: boom" in md


def test_auto_budgets_become_rows_planned_like_the_compile(sweep, tmp_path, monkeypatch):
    args = sweep.parse_args(["--out", str(tmp_path), "--auto-budgets", "2.5, 3", "--row", "mxfp4-mr"])
    compiled = []
    monkeypatch.setattr(sweep, "compile_row", lambda row, a: compiled.append(row.cli_args()) or {"error": "skipped"})
    assert sweep.main(["--out", str(tmp_path), "--auto-budgets", "2.5, 3", "--row", "mxfp4-mr"]) == 1
    assert compiled == [["-f", "mxfp4-mr"], ["-f", "auto", "--budget=2.5"], ["-f", "auto", "--budget=3"]]
    auto = sweep.Row.parse("auto,--budget=3")
    assert sweep._row_settings(auto, args)["calib_samples"] == 256  # SpQR's, the largest of the default palette
    own = sweep.Row.parse("auto,--budget=3,--palette=mxfp4-mr+nvfp4-mr")
    assert own.cli_args() == ["-f", "auto", "--budget=3", "--palette=mxfp4-mr,nvfp4-mr"]
    assert sweep._row_settings(own, args)["calib_samples"] == 64


def test_plot_draws_the_auto_curve_over_the_points(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    results = {"mxfp4-mr": {"bits_per_weight": 4.25, "ppl_quantized": 26.0, "ppl_reference": 23.5, "emit": "native"},
               "aqlm-2x8": {"bits_per_weight": 2.15, "ppl_quantized": 44.0, "ppl_reference": 23.5, "emit": "native"},
               "auto,--budget=2.5": {"bits_per_weight": 2.5, "ppl_quantized": 35.0, "ppl_reference": 23.5},
               "auto,--budget=4.25": {"bits_per_weight": 4.25, "ppl_quantized": 24.5, "ppl_reference": 23.5}}
    assert sweep.plot(sweep.table_rows(results), tmp_path / "p.png", "t") and (tmp_path / "p.png").stat().st_size > 0


def _points_file(tmp_path, settings, rows):
    path = tmp_path / "points.json"
    path.write_text(json.dumps({"settings": settings, "rows": rows}))
    return path


def test_points_from_earlier_runs_join_the_table_and_curve_without_recompiling(sweep, tmp_path, monkeypatch):
    settings = {"model": "smollm2-135m", "seq_len": 256, "eval_samples": 32, "eval_seq_len": 512, "seed": 0}
    points = _points_file(tmp_path, settings, [
        {"row": "float", "bits_per_weight": 32, "ppl": 20.0},
        {"row": "aqlm-2x8", "bits_per_weight": 2.15, "ppl": 40.0, "source": "x86 VM"},
        {"row": "auto,--budget=3", "bits_per_weight": 3.0, "ppl": 25.0}])
    compiled = []
    report = {"bits_per_weight": 2.5, "ppl_quantized": 30.0, "ppl_reference": 20.0, "emit": "native"}
    monkeypatch.setattr(sweep, "compile_row", lambda row, a: compiled.append(row.spec) or dict(report))
    out = tmp_path / "out"
    assert sweep.main(["--out", str(out), "--points", str(points), "--auto-budgets", "2.5"]) == 0
    assert compiled == ["auto,--budget=2.5"]  # no default rows: the points stand in for them
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["float", "auto,--budget=3", "auto,--budget=2.5", "aqlm-2x8"]
    assert rows[3]["vs_float"] == pytest.approx(1.0) and rows[3]["source"] == "x86 VM"
    assert rows[1]["source"] == "points.json" and "source" not in rows[2]
    assert "| aqlm-2x8 | - | 2.150 | 40.000 | +100.0% | - | - | - | x86 VM |" in (out / "sweep.md").read_text()


def test_points_measured_on_other_text_are_refused(sweep, tmp_path):
    settings = {"model": "smollm2-135m", "seq_len": 256, "eval_samples": 8, "eval_seq_len": 512, "seed": 0}
    points = _points_file(tmp_path, settings, [{"row": "aqlm-2x8", "bits_per_weight": 2.15, "ppl": 40.0}])
    with pytest.raises(SystemExit, match="other settings.*eval_samples"):
        sweep.main(["--out", str(tmp_path / "out"), "--points", str(points)])
    bad = _points_file(tmp_path, {**settings, "eval_samples": 32}, [{"row": "aqlm-2x8", "ppl": 40.0}])
    with pytest.raises(SystemExit, match="needs row, bits_per_weight and ppl"):
        sweep.main(["--out", str(tmp_path / "out"), "--points", str(bad)])
