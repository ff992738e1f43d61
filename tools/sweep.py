#!/usr/bin/env python
"""The accuracy/size curve: compile one model with several formats at identical settings, then one table
(perplexity vs bits per weight counted from each file's bytes), a JSON file and a plot.

Why: a format is only better than another at a given size, so every comparison we quote is a point on
this curve, produced by one command with one calibration set and one evaluation set for all rows.

    python tools/sweep.py --out runs/sweep                                   # the default row list
    python tools/sweep.py --out runs/sweep --row mxfp4-mr --row int2-gptq:simulated,group_size=64
    python tools/sweep.py --out runs/sweep --reuse                           # only compile what is missing
    python tools/sweep.py --out runs/sweep --auto-budgets 2.25,2.5,3,3.5,4,4.5   # plus the -f auto curve
    python tools/sweep.py --out runs/sweep --points docs/sweep-points.json --auto-budgets 3.5

A row is ``FORMAT[:EMIT][,KEY=VALUE...][,--FLAG...]`` (options as ``qcompile compile -O``, flags such as
``--sequential`` or ``--budget=3`` as they are; a ``--palette=`` flag separates its entries with ``+``). ``--auto-budgets`` adds one ``auto,--budget=B`` row per budget;
the plot draws those as one curve over the single-format points. Each row is compiled by the
CLI in its own process (a crash or bad option fails that row only, with its log kept in OUT/<row>.log).
``--reuse`` takes a row from OUT/<row>/report.json when that run used the same model and settings.
``--points FILE`` adds rows measured by earlier runs (a sweep.json, or the same schema with a ``source`` per
row) to the table and the plot, so a curve can be finished without recompiling every point; the file's
settings must be this sweep's, and with ``--points`` only the ``--row`` rows given are compiled.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The README's table: the integer baselines, then each family's methods at its size.
DEFAULT_ROWS = ["int4-rtn", "int4-gptq", "mxfp4-rtn", "mxfp4-gptq", "mxfp4-mr", "nvfp4-rtn", "nvfp4-mr",
                "spqr-w3", "spqr-w3,finetune_epochs=0", "spqr-w3,finetune_epochs=0,--sequential",
                "spqr-w4", "spqr-w4,finetune_epochs=0", "aqlm-2x8", "aqlm-2x8,finetune_epochs=0",
                "int2-gptq:simulated,group_size=64"]
SETTINGS = ("calib_samples", "seq_len", "eval_samples", "eval_seq_len", "seed")


@dataclass
class Row:
    """One point of the sweep: a format, its emit mode and options."""

    spec: str
    format: str
    emit: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: str) -> "Row":
        head, *opts = spec.split(",")
        fmt, _, emit = head.partition(":")
        options, flags = {}, []
        for opt in opts:
            if opt.startswith("--"):
                flags.append(opt)
                continue
            key, eq, value = opt.partition("=")
            if not eq or not key:
                raise SystemExit(f"sweep: bad option {opt!r} in row {spec!r} (expected KEY=VALUE)")
            options[key] = value
        return cls(spec, fmt, emit or None, options, flags)

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.spec)

    def cli_args(self) -> list[str]:
        args = ["-f", self.format]
        if self.emit:
            args += ["--emit", self.emit]
        for key, value in self.options.items():
            args += ["-O", f"{key}={value}"]
        return args + [f.replace("+", ",") if f.startswith("--palette=") else f for f in self.flags]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--row", action="append", dest="rows", metavar="FORMAT[:EMIT][,K=V...][,--FLAG...]",
                   help=f"a row (repeatable); default: {' '.join(DEFAULT_ROWS)}")
    p.add_argument("--auto-budgets", default="", metavar="BITS[,BITS...]",
                   help="also compile -f auto at these budgets (bits per weight), drawn as a curve")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: each format's own)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for the models, sweep.json, sweep.md, sweep.png")
    p.add_argument("--reuse", action="store_true", help="keep rows whose OUT/<row>/report.json has the same settings")
    p.add_argument("--points", type=Path, action="append", default=[], metavar="FILE",
                   help="rows measured earlier (sweep.json schema) to table and plot beside this run's (repeatable)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, **{k: getattr(args, k) for k in SETTINGS}}


def _row_settings(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """The settings a row compiles with: the sweep's, the calibration size resolved to the format's default."""
    settings = _settings(args)
    if settings["calib_samples"] is None:
        from qcompile.formats import get_format
        from qcompile.formats.palette import AUTO, parse_palette

        if row.format == AUTO:  # the largest any palette format asks for, as the compile plans it
            palettes = [f.split("=", 1)[1].replace("+", ",") for f in row.flags if f.startswith("--palette=")]
            settings["calib_samples"] = max(c.fmt.calib_samples for c in parse_palette(palettes or None))
        else:
            settings["calib_samples"] = get_format(row.format).calib_samples
    return settings


def _report_settings(rep: dict[str, Any]) -> dict[str, Any]:
    return {"model": rep.get("model"), "calib_samples": rep.get("calib_samples"), "seq_len": rep.get("seq_len"),
            "eval_samples": rep.get("eval_samples"), "eval_seq_len": rep.get("eval_seq_len"), "seed": rep.get("seed")}


def compile_row(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """Compile one row (or reuse it); returns its report, or ``{"error": ...}``."""
    out = args.out / row.name
    report_path = out / "report.json"
    if args.reuse and report_path.is_file():
        rep = json.loads(report_path.read_text())
        if _report_settings(rep) == _row_settings(row, args):
            return rep
    cmd = [sys.executable, "-m", "qcompile.cli", "compile", args.model, *row.cli_args(), "-o", str(out), "--force",
           "--calib-samples", str(_row_settings(row, args)["calib_samples"]), "--seq-len", str(args.seq_len),
           "--eval-samples", str(args.eval_samples), "--eval-seq-len", str(args.eval_seq_len), "--seed", str(args.seed)]
    log = args.out / f"{row.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {rc}: {tail[0]} (log: {log})"}
    rep = json.loads(report_path.read_text())
    rep.setdefault("wall_seconds", time.perf_counter() - t0)
    return rep


POINT_SETTINGS = ("model", "seq_len", "eval_samples", "eval_seq_len", "seed")


def load_points(paths: list[Path], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows from earlier runs; refused when they were evaluated on other text, since their perplexities would
    not be comparable with this run's."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"sweep: cannot read points file {path}: {exc}") from None
        theirs = data.get("settings", {})
        differ = {k: (theirs.get(k), settings[k]) for k in POINT_SETTINGS if theirs.get(k) != settings[k]}
        if differ:
            raise SystemExit(f"sweep: points file {path} was measured with other settings (theirs, ours): {differ}")
        for r in data.get("rows", []):
            if not {"row", "bits_per_weight", "ppl"} <= r.keys():
                raise SystemExit(f"sweep: points file {path}: a row needs row, bits_per_weight and ppl: {r}")
            rows.append({**r, "source": r.get("source") or path.name})
    return rows


def merge_points(table: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's rows, then the earlier points it did not recompute; float from this run where it has one."""
    have = {r["row"] for r in table}
    ref = next((r["ppl"] for r in table + points if r["row"] == "float"), None)
    merged = list(table)
    for r in points:
        if r["row"] in have:
            continue
        have.add(r["row"])
        row = {"emit": "-", **r}
        if r["row"] != "float" and ref:
            row["vs_float"] = r["ppl"] / ref - 1
        merged.append(row)
    first = [r for r in merged if r["row"] == "float"][:1]
    return first + sorted((r for r in merged if r["row"] != "float"), key=_by_size)


def _by_size(row: dict[str, Any]) -> tuple:
    """Table order: larger first, then more accurate, then by name (failed rows last)."""
    return -row.get("bits_per_weight", -1), row.get("ppl") or float("inf"), row["row"]


def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows sorted by bits per weight, with the float model first."""
    rows = []
    ref = next((r["ppl_reference"] for r in results.values() if "ppl_reference" in r), None)
    if ref is not None:
        rows.append({"row": "float", "emit": "-", "bits_per_weight": 32.0, "ppl": ref, "vs_float": 0.0})
    for spec, rep in results.items():
        if "error" in rep:
            rows.append({"row": spec, "error": rep["error"]})
            continue
        ppl = rep.get("ppl_quantized")
        rows.append({"row": spec, "emit": rep.get("emit"), "bits_per_weight": rep["bits_per_weight"], "ppl": ppl,
                     "vs_float": (ppl / rep["ppl_reference"] - 1) if ppl and rep.get("ppl_reference") else None,
                     "compile_seconds": rep.get("compile_seconds"), "peak_memory_mib": rep.get("peak_memory_mib"),
                     "calib_samples": rep.get("calib_samples")})
    return sorted(rows, key=_by_size)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    sourced = any("source" in r for r in rows)  # points from earlier runs get a column naming their machine
    lines = [f"# Accuracy/size sweep: {settings['model']}", "",
             f"Calibration {settings['calib_samples'] or 'the format default (column calib)'} x {settings['seq_len']}"
             " tokens, evaluation "
             f"{settings['eval_samples']} x {settings['eval_seq_len']} tokens (bundled Wikipedia split), seed "
             f"{settings['seed']}; {platform.node()} ({platform.machine()}). Bits per weight are counted from the "
             "saved file's bytes (codes, scales, codebooks, outliers) over the quantized linears; the vocabulary "
             "table is not part of that figure.", "",
             "| row | emit | bits/weight | perplexity | vs float | compile s | peak MiB | calib |"
             + (" measured |" if sourced else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---|" if sourced else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | FAILED: {r['error']} | | | | | | |" + (" |" if sourced else ""))
            continue
        change = "-" if r.get("vs_float") is None else f"{r['vs_float']:+.1%}"
        lines.append(f"| {r['row']} | {r['emit']} | {r['bits_per_weight']:.3f} | {_fmt(r['ppl'], '.3f')} | {change} "
                     f"| {_fmt(r.get('compile_seconds'), '.0f')} | {_fmt(r.get('peak_memory_mib'), '.0f')} "
                     f"| {_fmt(r.get('calib_samples'), 'd')} |" + (f" {r.get('source', 'this run')} |" if sourced else ""))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Perplexity vs bits per weight (log y); returns False when matplotlib is not installed or no row has a
    perplexity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    points = [r for r in rows if "error" not in r and r["row"] != "float" and r.get("ppl")]
    curve = sorted((r for r in points if r["row"].startswith("auto,")), key=lambda r: r["bits_per_weight"])
    points = [r for r in points if r not in curve]
    if not points and not curve:  # every row failed: nothing to draw
        return False
    ref = next((r["ppl"] for r in rows if r["row"] == "float"), None)
    near = [r for r in points if ref and r["ppl"] < 2 * ref]  # the crowded region gets its own linear panel
    near_curve = [r for r in curve if ref and r["ppl"] < 2 * ref]
    fig, axes = plt.subplots(1, 2 if near and len(near) < len(points) else 1, figsize=(12, 5), squeeze=False)
    for ax, subset, line, log in zip(axes[0], [points, near], [curve, near_curve], [True, False]):
        for r in subset:
            ax.scatter(r["bits_per_weight"], r["ppl"], s=18)
            ax.annotate(r["row"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if line:
            ax.plot([r["bits_per_weight"] for r in line], [r["ppl"] for r in line], "k.-", linewidth=1.2,
                    label="-f auto (per-layer mix at a budget)")
            for r in line:
                ax.annotate(r["row"].rpartition("=")[2], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(-3, -9),
                            textcoords="offset points", ha="right")
        if ref:
            ax.axhline(ref, color="gray", linestyle="--", linewidth=1, label=f"float ({ref:.2f})")
            ax.legend(loc="best")
        if line and not ref:
            ax.legend(loc="best")
        plain = matplotlib.ticker.FormatStrFormatter("%g")
        if log:
            ax.set_yscale("log")
            ys = [r["ppl"] for r in subset + line] + ([ref] if ref else [])
            # less than a decade shows no major tick on a log axis: label the minor ones then
            ax.yaxis.set_minor_formatter(plain if max(ys) < 10 * min(ys) else matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("bits per weight (from the file)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(title if log else "within 2x of float", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = _settings(args)
    points = load_points(args.points, settings)
    rows = [Row.parse(s) for s in (args.rows or ([] if points else DEFAULT_ROWS))]
    rows += [Row.parse(f"auto,--budget={b.strip()}") for b in args.auto_budgets.split(",") if b.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row.spec} ...", flush=True)
        t0 = time.perf_counter()
        results[row.spec] = rep = compile_row(row, args)
        status = rep["error"] if "error" in rep else f"ppl {rep.get('ppl_quantized', float('nan')):.3f} at " \
                                                     f"{rep['bits_per_weight']:.3f} bits/weight"
        print(f"[{i}/{len(rows)}] {row.spec}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = merge_points(table_rows(results), points)
    _write(args.out / "sweep.json", json.dumps({"settings": settings, "rows": table}, indent=2) + "\n")
    md = markdown(table, settings)
    if plot(table, args.out / "sweep.png", f"{args.model}: perplexity vs bits per weight"):
        md += "\n![perplexity vs bits per weight](sweep.png)\n"
    _write(args.out / "sweep.md", md)
    print(md)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
