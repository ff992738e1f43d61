#!/usr/bin/env python
"""One table: our int4/int3 RTN and GPTQ against ONNX Runtime's own MatMulNBits quantizer (RTN and GPTQ).

Why: a claim "our GPTQ is good" only means something next to the stock tool people would otherwise use.
Every row is evaluated with the same function (``qcompile.evaluate.perplexity``) on the same evaluation
windows; both GPTQs see the same calibration windows; bits per weight come from the saved file's bytes
(``qcompile.report``), the LM head is left in float on both sides.

    python tools/compare_baselines.py --out runs/compare            # defaults: 64x256 calib, 32x512 eval
    python tools/compare_baselines.py --calib-samples 16 --eval-samples 8 --out /tmp/cmp --skip ort-gptq
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MODEL = "smollm2-135m"
GROUP = 128
EXPECTED_LAYERS = 210
# (row key, our format, emit)
OURS = [("ours-int4-rtn", "int4-rtn", "native"), ("ours-int4-gptq", "int4-gptq", "native"),
        ("ours-int3-rtn", "int3-rtn", "simulated"), ("ours-int3-gptq", "int3-gptq", "simulated")]
ORT_ROWS = ["ort-int4-default", "ort-int4-rtn", "ort-int4-gptq"]
COLUMNS = [("row", "row", "s"), ("method", "method", "s"), ("emit", "emit", "s"), ("layers", "layers", "d"),
           ("bits_per_weight", "bits/weight", ".3f"), ("ppl", "perplexity", ".3f"), ("ppl_change", "vs float", "s"),
           ("seconds", "quantize s", ".0f"), ("note", "note", "s")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (both GPTQs)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, required=True, help="folder for the models, comparison.json and .md")
    p.add_argument("--skip", action="append", default=[], choices=["float"] + [r for r, _, _ in OURS] + ORT_ROWS,
                   help="leave a row out (repeatable)")
    p.add_argument("--reuse", action="store_true",
                   help="take a row from OUT/<row>/row.json when an earlier run with the same settings left one")
    p.add_argument("-q", "--quiet", action="store_true")
    return p.parse_args(argv)


class WindowReader:
    """An onnxruntime ``CalibrationDataReader`` over our calibration windows, one window per batch."""

    def __init__(self, windows: np.ndarray):
        self.windows = np.asarray(windows, dtype=np.int64)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.windows):
            return None
        ids = self.windows[self.i : self.i + 1]
        self.i += 1
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def lm_head_node(float_path: Path) -> str:
    from qcompile.passes.discover import discover_linears, ensure_node_names

    model = ensure_node_names(onnx.load(str(float_path), load_external_data=False))
    heads = [m.node_name for m in discover_linears(model, include_lm_head=True) if m.role == "lm_head"]
    names = {n.name for n in model.graph.node}
    return heads[0] if heads else ("lm_head" if "lm_head" in names else "")


def run_ours(args, fmt: str, emit: str, out: Path) -> dict[str, Any]:
    from qcompile import api
    from qcompile.report import layer_sizes, overall_bits

    t = time.perf_counter()
    api.compile(args.model, fmt, out, options={"group_size": GROUP}, emit=emit, calib_samples=args.calib_samples,
                seq_len=args.seq_len, evaluate=False, force=True, progress=not args.quiet)
    seconds = time.perf_counter() - t
    path = out / "model.onnx"
    sizes = layer_sizes(onnx.load(str(path), load_external_data=False))
    simulated = emit == "simulated"
    opts = _report_options(out)
    note = ", ".join(k for k in ("act_order", "mse") if opts.get(k))
    if simulated:
        note = (note + "; " if note else "") + "bits = native packed storage; file holds floats"
    else:  # the ORT rows are counted by matmulnbits_bits: check it agrees with our tags on our own file
        from qcompile.report import matmulnbits_bits

        cross = overall_bits(matmulnbits_bits(onnx.load(str(path), load_external_data=False)))
        if abs(cross - overall_bits(sizes)) > 1e-9:
            note = (note + "; " if note else "") + f"MatMulNBits byte count says {cross:.3f}"
    return {"path": path, "layers": len(sizes), "bits_per_weight": overall_bits(sizes, packed=simulated),
            "seconds": seconds, "options": opts, "note": note}


def _report_options(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "report.json").read_text()).get("options", {})
    except (OSError, ValueError):
        return {}


def run_ort(args, algo: str, float_path: Path, calib: np.ndarray, out: Path) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig)

    from qcompile.models.export import save_onnx
    from qcompile.report import matmulnbits_bits, overall_bits

    head = lm_head_node(float_path)
    if algo == "default":  # ORT's built-in (C++) blockwise min/max RTN, the quantizer's default algorithm
        cfg = DefaultWeightOnlyQuantConfig(block_size=GROUP, is_symmetric=False, bits=4)
    elif algo == "rtn":  # RTN of ORT's bundled neural-compressor code
        cfg = RTNWeightOnlyQuantConfig()
    else:  # GPTQ's block_size is its lazy-update block; the group size is the quantizer's block_size
        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=WindowReader(calib), percdamp=0.01, block_size=128,
                                        actorder=False)
    t = time.perf_counter()
    # a loaded proto, not the path: ORT's GPTQ serializes the model to bytes for its calibration session, and a
    # session made from bytes refuses external data files ("escapes working directory")
    q = MatMulNBitsQuantizer(onnx.load(str(float_path)), bits=4, block_size=GROUP, is_symmetric=False,
                             nodes_to_exclude=[head] if head else None, algo_config=cfg)
    q.process()
    seconds = time.perf_counter() - t
    model = q.model.model if hasattr(q.model, "model") else q.model
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    save_onnx(model, path)
    sizes = matmulnbits_bits(onnx.load(str(path), load_external_data=False))
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head
            and any(i in {t.name for t in model.graph.initializer} for i in n.input)]
    note = f"{len(left)} constant MatMuls left float" if left else ""
    return {"path": path, "layers": len(sizes), "bits_per_weight": overall_bits(sizes), "seconds": seconds,
            "note": note}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qcompile import data as qdata
    from qcompile.evaluate import perplexity
    from qcompile.models.export import export_onnx
    from qcompile.models.sources import resolve_source
    from qcompile.report import format_table, markdown_table, write_json

    args.out.mkdir(parents=True, exist_ok=True)
    float_path = export_onnx(args.model)
    tok = resolve_source(args.model).load_tokenizer()
    calib = qdata.calibration_windows(tok, args.calib_samples, args.seq_len, seed=0)
    evalw = qdata.eval_windows(tok, args.eval_seq_len, args.eval_samples)
    progress = not args.quiet

    def ppl(path: Path) -> float:
        return perplexity(path, evalw, progress=progress)[0]

    ours = {key: (f"qcompile {fmt}", (lambda f=fmt, e=emit, k=key: run_ours(args, f, e, args.out / k)))
            for key, fmt, emit in OURS}
    ort_ = {f"ort-int4-{a}": (f"ORT MatMulNBitsQuantizer {a.upper() if a != 'default' else 'default (RTN)'}",
                              (lambda a=a: run_ort(args, a, float_path, calib, args.out / f"ort-int4-{a}")))
            for a in ("default", "rtn", "gptq")}
    everything = {"float": ("float32 (reference)", None), **ours, **ort_}
    order = ["float", "ours-int4-rtn", "ort-int4-default", "ort-int4-rtn", "ours-int4-gptq", "ort-int4-gptq", "ours-int3-rtn",
             "ours-int3-gptq"]
    plan = [(k, *everything[k]) for k in order]
    plan = [p for p in plan if p[0] not in args.skip]

    rows: list[dict[str, Any]] = []
    ref = None
    settings = [args.model, args.calib_samples, args.seq_len, args.eval_samples, args.eval_seq_len]
    for key, method, build in plan:
        print(f"== {key}: {method}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"row": key, "method": method}
        saved = args.out / key / "row.json"
        if args.reuse and saved.is_file():
            old = json.loads(saved.read_text())
            if old.get("settings") == settings:
                row = old["row"]
                if key == "float":
                    ref = row.get("ppl")
                if ref and row.get("ppl") is not None:
                    row["ppl_change"] = f"{100 * (row['ppl'] / ref - 1):+.2f}%"
                rows.append(row)
                print(format_table([row], COLUMNS), file=sys.stderr, flush=True)
                continue
        try:
            if build is None:
                t = time.perf_counter()
                row.update(emit="", layers=0, bits_per_weight=32.0, note="")
                row["ppl"] = ref = ppl(float_path)
                row["eval_seconds"] = time.perf_counter() - t
            else:
                info = build()
                row.update({k: v for k, v in info.items() if k != "path"})
                row["emit"] = dict((k, e) for k, _, e in OURS).get(key, "native")
                if key.startswith(("ours-int4", "ort-")) and info["layers"] != EXPECTED_LAYERS:
                    row["note"] = (row.get("note", "") + f"; {info['layers']} layers, expected {EXPECTED_LAYERS}").lstrip("; ")
                t = time.perf_counter()
                row["ppl"] = ppl(info["path"])
                row["eval_seconds"] = time.perf_counter() - t
        except Exception as e:  # keep the other rows: a failing baseline is itself a result
            traceback.print_exc()
            row["note"] = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
        if ref and row.get("ppl") is not None:
            row["ppl_change"] = f"{100 * (row['ppl'] / ref - 1):+.2f}%"
        saved.parent.mkdir(parents=True, exist_ok=True)  # failures too: they are deterministic results
        write_json(saved, {"settings": settings, "row": row})
        rows.append(row)
        print(format_table([row], COLUMNS), file=sys.stderr, flush=True)

    setup = {"model": args.model, "group_size": GROUP, "calib": f"{args.calib_samples} x {args.seq_len} (seed 0)",
             "eval": f"{args.eval_samples} x {args.eval_seq_len} (bundled eval split)",
             "command": " ".join(["python", "tools/compare_baselines.py", *(argv if argv is not None else sys.argv[1:])]),
             "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cpus"}
    table = format_table(rows, COLUMNS)
    print(table)
    write_json(args.out / "comparison.json", {"setup": setup, "rows": rows})
    md = [f"# Baselines: {args.model}, group size {GROUP}", "", *[f"- {k}: {v}" for k, v in setup.items()], "",
          markdown_table(rows, COLUMNS), "",
          "Bits per weight: bytes of the quantized layers' tensors in the saved file over their weight count "
          "(simulated rows: the format's native packed storage). LM head float everywhere.", ""]
    (args.out / "comparison.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
