"""Command line: ``qcompile compile|export|eval|inspect|formats|bench|generate|engine|cache``.

Each command is a thin wrapper over the Python API; errors the user can fix come out as one line and a
non-zero exit (set QCOMPILE_DEBUG=1 for tracebacks).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from qcompile.errors import QCompileError

EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPT = 2, 1, 130


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip().replace("-", "_"), v.strip()


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="quantize a model into a deployable ONNX artifact",
                       description="Compile MODEL (smollm2-135m, a .gguf, a HF folder or hub id, or an .onnx) "
                                   "with a weight FORMAT into OUT/ (model.onnx, report.json, report.md).")
    p.add_argument("model")
    p.add_argument("-f", "--format", required=True,
                   help="weight format (see `qcompile formats`), or auto: a per-layer mix of the --palette's settings "
                        "with the least estimated damage within --budget or --budget-mb")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--emit", choices=["native", "simulated", "portable"],
                   help="native: the format's op; portable: standard ONNX ops only; simulated: dequantized "
                        "floats (research mode, large file). Default: the format's own default")
    p.add_argument("--budget", type=float, metavar="BITS",
                   help="-f auto: bits per weight over the quantized linears, counted from the file's bytes as "
                        "report.json's bits_per_weight")
    p.add_argument("--budget-mb", type=float, metavar="MB",
                   help="-f auto: the whole file (model.onnx and its data, vocabulary tables included) in MB of 10^6 "
                        "bytes")
    p.add_argument("--palette", action="append", default=[], metavar="FMT[:KEY=VALUE...][,FMT...]",
                   help="-f auto: the settings a layer may take, e.g. 'spqr-w3:bits=3,spqr-w3:bits=4,aqlm-2x8' "
                        "(repeatable; default: the int, FP4, SpQR and AQLM settings `qcompile formats` marks)")
    p.add_argument("--tie", action="store_true",
                   help="-f auto: layers that read the same input (q/k/v, gate/up) take the same palette entry "
                        "(default: each its own, identical tensors stored once)")
    p.add_argument("--group-size", type=int, help="format option group_size")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None, help="format option act_order")
    p.add_argument("--damp", type=float, help="format option damp")
    p.add_argument("-O", "--option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="any other format option (repeatable); `qcompile formats` lists them")
    p.add_argument("-L", "--layer-option", action="append", default=[], metavar="PATTERN:KEY=VALUE[,KEY=VALUE]",
                   help="format options for the layers whose names match PATTERN (shell-style, e.g. "
                        "'*.v_proj:bits=4'); repeatable, a later one wins")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration windows (default: the format's, see `qcompile formats`; 64 for most)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length in tokens (default 256)")
    p.add_argument("--eval-samples", type=int, default=32, help="evaluation windows (default 32)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length (default 512)")
    p.add_argument("--eval-text", type=Path, help="evaluate on this text file instead of the bundled split")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where quantization runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="activation dtype of the model")
    p.add_argument("--include-lm-head", action="store_true",
                   help="quantize the LM head with FORMAT too (default: --embeddings decides)")
    p.add_argument("--embeddings", default=None, choices=["float", "int8", "int4"],
                   help="the token embedding table and LM head (one table when tied), stored as ONNX Runtime "
                        "MatMulNBits + GatherBlockQuantized codes (default: the format's, int8 for most, int4 "
                        "for the 2-bit ones; see `qcompile formats`)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each block on the outputs of the already-quantized ones (slower)")
    p.add_argument("--tokenizer", help="tokenizer source for an .onnx MODEL that does not name one")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-resume", action="store_true",
                   help="quantize every layer afresh, ignoring layers a killed compile already finished")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="show the exporter's own warnings and logs")
    p.set_defaults(func=cmd_compile)


def cmd_compile(args: argparse.Namespace) -> int:
    from qcompile.api import compile as compile_api

    options: dict[str, Any] = dict(args.option)
    for key in ("group_size", "act_order", "damp"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    rep = compile_api(
        args.model, args.format, args.output, emit=args.emit, options=options,
        layer_options=list(args.layer_option),
        calib_samples=args.calib_samples, seq_len=args.seq_len, eval_samples=args.eval_samples,
        eval_seq_len=args.eval_seq_len, eval_text=args.eval_text, evaluate=not args.no_eval, seed=args.seed,
        device=args.device, dtype=args.dtype, include_lm_head=args.include_lm_head, embeddings=args.embeddings,
        budget=args.budget, budget_mb=args.budget_mb, palette=list(args.palette), tie=args.tie,
        sequential=args.sequential,
        force=args.force, resume=not args.no_resume, progress=not args.quiet, verbose=args.verbose,
        tokenizer=args.tokenizer,
    )
    _print_summary(rep, args.output)
    return 0


def _print_summary(rep: dict[str, Any], out: Path) -> None:
    lines = [
        f"format            {rep['format']} (emit {rep['emit']})",
        f"bits per weight   {rep['bits_per_weight']:.3f} over {rep['quantized_params']:,} weights "
        f"in {rep['quantized_layers']} layers",
        f"embeddings        {rep['embeddings']['format']}"
        + (f" ({rep['embeddings']['bits_per_weight']:.3f} bits/weight)" if rep['embeddings']['bits_per_weight'] else ""),
        f"whole file        {rep['file_bytes'] / 1e6:.1f} MB, {rep['bits_per_parameter']:.3f} bits per parameter"
        f" (float: {rep['float_file_bytes'] / 1e6:.1f} MB; source: {rep['source_bytes'] / 1e6:.1f} MB)",
    ]
    alloc = rep.get("allocation")
    if alloc:
        mix = ", ".join(f"{k} x{v['layers']}" for k, v in alloc["mix"].items())
        lines.insert(1, f"budget            {alloc['budget']}: {mix} (allocation {alloc['seconds']['total']:.0f} s)")
    if rep.get("ppl_quantized"):
        lines.append(f"perplexity        {rep['ppl_quantized']:.3f} (float {rep['ppl_reference']:.3f}, "
                     f"{100 * (rep['ppl_ratio'] - 1):+.2f}%) on {rep['eval_tokens']:,} tokens")
    lines.append(f"compile time      {rep['compile_seconds']:.0f} s, peak memory {rep['peak_memory_mib']:.0f} MiB")
    lines.append(f"wrote             {out}/model.onnx, report.json, report.md")
    print("\n".join(lines))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="the float model: a KV-cache decoder folder (or one .onnx), what compile starts from")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="output folder (an onnxruntime-genai model folder) or .onnx path (the graph alone)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--force", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show the exporter's own warnings and logs")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from qcompile.api import export

    path = export(args.model, args.output, dtype=args.dtype, force=args.force, verbose=args.verbose)
    print(f"wrote {path}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of an ONNX model (bundled eval split or your text file)")
    p.add_argument("model", type=Path, help="a compiled folder (OUT) or an .onnx file")
    p.add_argument("--text", type=Path, help="evaluate on this UTF-8 text file")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokenizer", help="tokenizer source when the model does not name one")
    p.add_argument("--decode", action="store_true",
                   help="feed each window one token per step through the KV cache, as generation runs (the ops' "
                        "batch-1 kernels); slower, so use fewer --samples")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from qcompile.api import evaluate

    ppl, n = evaluate(args.model, text=args.text, samples=args.samples, seq_len=args.seq_len,
                      tokenizer=args.tokenizer, progress=not args.quiet, decode=args.decode)
    print(f"perplexity {ppl:.4f} over {n:,} tokens{' (decode, one token per step)' if args.decode else ''}")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-layer format, shape, bytes and bits per weight of an ONNX model")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from qcompile.api import inspect_model
    from qcompile.report import format_table

    rows, total = inspect_model(args.model)
    if args.json:
        print(json.dumps({"layers": rows, **total}, indent=2))
        return 0
    cols = [("name", "layer", "s"), ("format", "format", "s"), ("shape", "K x N", "s"), ("bytes", "bytes", ",d"),
            ("bits_per_weight", "bits/weight", ".3f"), ("packed_bits_per_weight", "packed bits/weight", ".3f")]
    if not any(r.get("packed_bits_per_weight") for r in rows):
        cols = cols[:-1]
    print(format_table(rows, cols))
    print(f"\n{len(rows)} layers; linear: {total['params']:,} weights, {total['bytes']:,} bytes, "
          f"{total['bits_per_weight']:.3f} bits/weight; embeddings: {total['embedding_params']:,} weights, "
          f"{total['embedding_bytes']:,} bytes; file {total['file_bytes']:,} bytes")
    return 0


def _add_formats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="list the weight formats, their options and the runtime each needs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_formats)


def cmd_formats(args: argparse.Namespace) -> int:
    import json

    from qcompile.api import list_formats

    fmts = list_formats()
    if args.json:
        print(json.dumps([{"name": f.name, "description": f.description, "runtime": f.runtime,
                           "emits": list(f.emits), "default_emit": f.default_emit,
                           "needs_calibration": f.needs_calibration, "calib_samples": f.calib_samples,
                           "embeddings": f.embeddings,
                           "options": {k: {"default": o.default, "help": o.help} for k, o in f.options.items()},
                           "layer_options": [str(o) for o in f.layer_options],
                           "palette": [dict(o) for o in f.palette]}
                          for f in fmts], indent=2, default=str))
        return 0
    for f in fmts:
        print(f"{f.name}\n  {f.description}\n  runtime: {f.runtime}; emits: {', '.join(f.emits)} "
              f"(default {f.default_emit}); calibration: "
              f"{f'yes, {f.calib_samples} windows by default' if f.needs_calibration else 'no'}; "
              f"embeddings: {f.embeddings}")
        for k, o in f.options.items():
            print(f"    -O {f'{k}={o.default}':<24} {o.help}")
        for o in f.layer_options:
            print(f"    -L {o}")
        for opts in f.palette:
            print(f"    in -f auto's default palette as {f.name}" + "".join(f":{k}={v}" for k, v in opts.items()))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="per-layer latency of our ops vs onnxruntime MatMul and MatMulNBits; "
                                     "with --decode, whole-model prefill/decode speed, memory and agreement")
    p.add_argument("--ops", default=None, help="comma-separated ops to bench (default: all registered)")
    p.add_argument("--shapes", default=None, help="comma-separated KxN shapes (default: model + 4096 shapes)")
    p.add_argument("--m", default="1,128", help="comma-separated batch rows M (default 1,128)")
    p.add_argument("--repeats", type=int, default=None, help="repeats (default 20; with --decode 3, median reported)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--decode", nargs="+", type=Path, metavar="OUT",
                   help="model folders (genai_config.json) to compare at batch 1: prefill ms at 64 and 512 "
                        "tokens, decode ms/token over 128 tokens, peak RSS, model and folder MB, and greedy-token "
                        "agreement with --reference; each folder runs in a fresh process")
    p.add_argument("--reference", type=Path, metavar="FOLDER",
                   help="with --decode: folder whose greedy tokens the others are compared with "
                        "(default: the first named float/fp32/fp16/bf16, else the first)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op threads (default: all cores with --decode, onnxruntime's otherwise)")
    p.add_argument("--clock", default="profile", choices=["profile", "thread_cpu"],
                   help="CPU op timing: the profiler's node time, or the calling thread's CPU time (one thread)")
    p.add_argument("--stat", default="median", choices=["median", "min"], help="over the repeats")
    p.add_argument("--warm", action="store_true", help="do not flush the caches between runs")
    p.add_argument("--flush", default="read", choices=["read", "write"],
                   help="CPU: evict the weights between runs by reading (clean lines, as in a model's decode) or by "
                        "rewriting a buffer")
    p.add_argument("--flush-mb", type=int, default=None,
                   help="CPU: MiB read between runs (default: twice the last-level cache, at least 64; less than the "
                        "cache times weights read from it)")
    p.add_argument("--roofline", action="store_true",
                   help="CPU: each op's GB/s over its stored bytes against a streaming-read probe of this machine")
    p.add_argument("--interleave", action="store_true",
                   help="CPU: time the ops in rounds (one run of each per round), not one op's repeats after another's")
    p.add_argument("-o", "--output", type=Path,
                   help="write the rows as JSON (and .md beside it; with --decode also a .png plot)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.decode:
        from qcompile.bench_decode import cli_decode_bench

        return cli_decode_bench(args)
    from qcompile.bench import cli_bench

    if args.repeats is None:
        args.repeats = 20
    return cli_bench(args)


def _add_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="build a TensorRT engine from a compiled folder (needs TensorRT and a GPU)",
                       description="Build a TensorRT engine from OUT/model.onnx with qcompile's TensorRT plugins "
                                   "(libqcompile_trt_plugins.so) for the quantized layers.")
    p.add_argument("out", type=Path, help="a compiled folder (holding model.onnx) or an .onnx file")
    p.add_argument("-o", "--output", type=Path, help="engine file (default OUT/model.engine)")
    p.add_argument("--fp16", action="store_true", help="let TensorRT run layers in float16")
    p.add_argument("--max-batch", type=int, default=1, help="largest batch of the optimization profile (default 1)")
    p.add_argument("--max-seq", type=int, default=512, help="longest sequence of the optimization profile (default 512)")
    p.set_defaults(func=cmd_engine)


def cmd_engine(args: argparse.Namespace) -> int:
    from qcompile.engine import build_engine

    path = build_engine(args.out, output=args.output, fp16=args.fp16, max_batch=args.max_batch, max_seq=args.max_seq)
    print(f"wrote {path}")
    return 0


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or clear qcompile's cache (exports, decoders, Hessians, checkpoints)",
                       description="The cache ($QCOMPILE_CACHE_DIR, default ~/.cache/qcompile) holds what a compile "
                                   "can reuse; deleting any of it is always safe.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="one line per entry: kind, size, age, path (default)")
    what.add_argument("--clear", nargs="*", metavar="KIND",
                      help="remove every entry, or only those of the KINDs named (e.g. layers hessians)")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from qcompile import cache

    if args.clear is not None:
        freed = cache.clear(set(args.clear) or None)
        print(f"removed {freed / 1e6:.1f} MB from {cache.cache_dir()}")
        return 0
    rows = cache.entries()
    now = time.time()
    for e in rows:
        age = (now - e["modified"]) / 3600
        print(f"{e['kind']:<10} {e['bytes'] / 1e6:10.1f} MB  {age:7.1f} h  {e['path']}")
    print(f"{len(rows)} entries, {sum(e['bytes'] for e in rows) / 1e6:.1f} MB in {cache.cache_dir()}")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a compiled model folder, streaming the tokens",
                       description="Generate text from OUT, an onnxruntime-genai model folder (what `qcompile "
                                   "compile` writes). The text streams to stdout as it comes; a line of prefill "
                                   "and decode speeds (tokens/s) follows on stderr. Greedy by default, so a "
                                   "prompt always gives the same text; --temperature above 0 samples.")
    p.add_argument("folder", type=Path, metavar="OUT", help="model folder with genai_config.json")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="text to continue (raw, no chat template); runs once")
    mode.add_argument("--chat", action="store_true",
                      help="interactive chat through the folder's chat template (Ctrl-D quits)")
    p.add_argument("--system", help="system message for --chat (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most new tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default): greedy, the most likely token each step; above 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P (default 1: all)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens (default 0: no limit)")
    p.add_argument("--seed", type=int, metavar="S", help="seed for sampling (default: a new one each run)")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads (default: onnxruntime's, one per core)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from qcompile.generation import cli_generate

    return cli_generate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="Quantize transformer weights in ONNX models.")
    from qcompile import __version__

    parser.add_argument("--version", action="version", version=f"qcompile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_compile, _add_export, _add_eval, _add_inspect, _add_formats, _add_bench, _add_generate,
                _add_engine, _add_cache):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QCompileError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("qcompile: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as e:  # unexpected: still one line unless debugging
        if os.environ.get("QCOMPILE_DEBUG"):
            raise
        print(f"qcompile: error: {type(e).__name__}: {e} (set QCOMPILE_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
