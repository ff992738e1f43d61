"""Decode benchmark: onnxruntime-genai model folders side by side, at batch 1, in one run
(``qcompile bench --decode OUT [OUT ...]``, or :func:`run_decode_bench` from Python).

Per folder:

- prefill ms at 64 and 512 prompt tokens: time to the first new token (the prompt's forward pass and
  picking one token);
- decode ms/token: greedy, 128 new tokens after a 64-token prompt (end of sequence suppressed so every
  folder makes all 128), the time of tokens 2..128 over 127;
- peak RSS of the timing process, the highest over repeats (Python, onnxruntime-genai and the model;
  ``rss_before_load_mb`` in the JSON is the part before the model loads);
- model MB (model.onnx plus the data files it references) and folder MB (every file), MB = 10^6 bytes;
- greedy agreement with a reference folder: the share of positions among the first 64 greedy tokens where
  the folder's token equals the reference's, over 16 prompts (the opening 64 tokens of the first 16
  articles of the bundled evaluation split that have 64 tokens). Positions after a first mismatch usually
  differ too, since each model continues its own text; ``prefix_agreement`` is the mean share before it.

Every measurement runs in a fresh process per folder, so memory and caches of one folder do not reach
another, and the repeats are interleaved (A B, then B A, ...) so machine noise falls on all folders alike.
Each process warms up on both prompt lengths, then measures once; the table shows the **median over the
repeats** (the raw values are in the JSON). Prompts come from the bundled evaluation split, tokenized by
each folder's own tokenizer; agreement is left empty for a folder whose prompts tokenize differently from
the reference's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from qcompile.errors import QCompileError

PREFILL_LENGTHS: tuple[int, ...] = (64, 512)
DECODE_PROMPT_TOKENS = 64
DECODE_TOKENS = 128
AGREEMENT_PROMPTS = 16
AGREEMENT_TOKENS = 64
REPEATS = 3
_PROMPT_CHARS = 2000  # of each article: enough for 64 tokens of any tokenizer
_LONG_CHARS = 16000  # of the joined articles: enough for 512 tokens


# ---- inputs ----------------------------------------------------------------------------------------------


def bench_texts(n_articles: int = 2 * AGREEMENT_PROMPTS) -> tuple[str, list[str]]:
    """``(long_text, article_openings)`` from the bundled evaluation split: the long text gives the prefill
    and decode prompts, the openings the agreement prompts (twice as many as needed, for short articles)."""
    from qcompile.data import bundled_corpus

    articles = bundled_corpus()[1]
    return "\n\n".join(articles)[:_LONG_CHARS], [a[:_PROMPT_CHARS] for a in articles[:n_articles]]


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores and library versions, so a row can be read against the machine it came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    try:
        import onnxruntime_genai as og

        og_version = og.__version__
    except ImportError:
        og_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": _usable_cores(), "threads": threads,
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og_version}


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def folder_sizes(folder: Path) -> tuple[int, int]:
    """``(model_bytes, folder_bytes)``: model.onnx plus the data files it references; every file."""
    from qcompile.generation import check_folder
    from qcompile.report import model_file_bytes

    onnx_name = check_folder(folder)["model"]["decoder"].get("filename", "model.onnx")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return model_file_bytes(folder / onnx_name), total


def default_reference(folders: Sequence[Path]) -> Path:
    """The first folder whose name says float (float, fp32, fp16, bf16), else the first folder."""
    for f in folders:
        if re.search(r"float|fp32|fp16|bf16", f.resolve().name, re.IGNORECASE):
            return f
    return folders[0]


# ---- the measuring process -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _measure(task: dict[str, Any]) -> dict[str, Any]:
    """One folder in this process: the timings, or the agreement tokens (``task["kind"]``)."""
    from qcompile.generation import GenaiModel, GenerationOptions, GenerationStream

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    model = GenaiModel(task["folder"], threads=task["threads"])
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_before_load": rss0}

    def run(ids: list[int], new: int):
        return GenerationStream(model, ids, GenerationOptions(max_new_tokens=new), force_length=True).run()

    if task["kind"] == "timing":
        ids = model.encode(task["long_text"])
        lengths = list(task["prefill_lengths"])
        need = max(lengths + [task["decode_prompt_tokens"]])
        if len(ids) < need:
            raise QCompileError(f"the benchmark text has {len(ids)} tokens, fewer than {need}")
        if need + task["decode_tokens"] > model.context_length:
            raise QCompileError(f"{task['folder']}: context {model.context_length} is too short for the benchmark")
        for n in lengths:  # warm-up: first runs allocate buffers and pick kernels
            run(ids[:n], 4)
        out["prefill_ms"] = {str(n): 1000 * run(ids[:n], 1).first_token_s for n in lengths}
        res = run(ids[:task["decode_prompt_tokens"]], task["decode_tokens"])
        out["decode_ms_per_token"] = 1000 * res.decode_s / (res.new_tokens - 1)
        out["decode_new_tokens"] = res.new_tokens
    else:
        prompts: list[list[int]] = []
        for text in task["prompt_texts"]:
            ids = model.encode(text)
            if len(ids) >= task["prompt_tokens"]:
                prompts.append(ids[:task["prompt_tokens"]])
            if len(prompts) == task["prompts"]:
                break
        out["prompts"] = prompts
        out["tokens"] = [run(p, task["new_tokens"]).token_ids for p in prompts]
    out["peak_rss"] = _peak_rss_bytes()
    return out


def _spawn(task: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`_measure` in a fresh Python process (so RSS and caches are the folder's own)."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="qcompile-decode-") as tmp:
        task_path, result_path = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_path.write_text(json.dumps(task))
        proc = subprocess.run([sys.executable, "-m", "qcompile.bench_decode", "--worker", str(task_path),
                               str(result_path)], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result_path.is_file():
            lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise QCompileError(f"{task['folder']}: the benchmark process failed: {why}")
        return json.loads(result_path.read_text())


def _worker_main(task_path: str, result_path: str) -> int:
    task = json.loads(Path(task_path).read_text())
    try:
        result = _measure(task)
    except QCompileError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 1
    Path(result_path).write_text(json.dumps(result))
    return 0


# ---- the driver ------------------------------------------------------------------------------------------


def _agreement(tokens: list[list[int]], ref: list[list[int]], n: int) -> tuple[float, float]:
    """(share of equal positions, mean share of positions before the first difference) over the prompts."""
    same, prefix = 0, 0
    for a, b in zip(tokens, ref):
        a, b = a[:n], b[:n]
        same += sum(x == y for x, y in zip(a, b))
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k
    total = n * len(ref)
    return same / total, prefix / total


def _labels(folders: Sequence[Path]) -> list[str]:
    names = [f.resolve().name for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def run_decode_bench(folders: Sequence[str | Path], *, reference: str | Path | None = None,
                     threads: int | None = None, repeats: int = REPEATS,
                     prefill_lengths: Sequence[int] = PREFILL_LENGTHS, decode_tokens: int = DECODE_TOKENS,
                     agreement_prompts: int = AGREEMENT_PROMPTS, agreement_tokens: int = AGREEMENT_TOKENS,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The benchmark (see the module doc): ``{"machine", "settings", "rows"}``, one row per folder with
    ``name``, ``folder``, ``model_mb``, ``folder_mb``, ``prefill_{n}_ms``, ``decode_ms_per_token``,
    ``decode_tokens_per_s``, ``peak_rss_mb``, ``agreement``, ``prefix_agreement``, and the raw repeats."""
    from qcompile.generation import check_folder

    paths = [Path(f) for f in folders]
    if not paths:
        raise QCompileError("name at least one model folder to benchmark")
    if repeats < 1:
        raise QCompileError(f"repeats must be at least 1 (got {repeats})")
    if decode_tokens < 2:
        raise QCompileError(f"decode needs at least 2 new tokens (got {decode_tokens})")
    if not prefill_lengths or min(prefill_lengths) < 1:
        raise QCompileError("prefill lengths must be positive")
    ref = Path(reference) if reference is not None else default_reference(paths)
    for f in dict.fromkeys([*paths, ref]):
        check_folder(f)
    threads = _usable_cores() if threads is None else threads
    if threads < 1:
        raise QCompileError(f"threads must be at least 1 (got {threads})")
    say = log or (lambda _m: None)
    long_text, openings = bench_texts(2 * agreement_prompts)
    decode_prompt = min(DECODE_PROMPT_TOKENS, min(prefill_lengths))
    timing_task = {"kind": "timing", "threads": threads, "long_text": long_text,
                   "prefill_lengths": list(prefill_lengths), "decode_prompt_tokens": decode_prompt,
                   "decode_tokens": decode_tokens}
    runs: dict[Path, list[dict[str, Any]]] = {f: [] for f in paths}
    unique = list(dict.fromkeys(paths))
    for r in range(repeats):
        for f in (unique if r % 2 == 0 else unique[::-1]):
            say(f"timing {f} (repeat {r + 1}/{repeats})")
            runs[f].append(_spawn({**timing_task, "folder": str(f)}))
    agree_task = {"kind": "agreement", "threads": threads, "prompt_texts": openings,
                  "prompts": agreement_prompts, "prompt_tokens": AGREEMENT_TOKENS, "new_tokens": agreement_tokens}
    greedy: dict[Path, dict[str, Any]] = {}
    for f in dict.fromkeys([ref, *paths]):
        say(f"greedy tokens of {f}")
        greedy[f] = _spawn({**agree_task, "folder": str(f)})
    if len(greedy[ref]["prompts"]) < agreement_prompts:
        say(f"note: only {len(greedy[ref]['prompts'])} prompts of {AGREEMENT_TOKENS} tokens in the evaluation split")

    rows = []
    for label, f in zip(_labels(paths), paths):
        reps = runs[f]
        model_bytes, folder_bytes = folder_sizes(f)
        decode_ms = statistics.median(x["decode_ms_per_token"] for x in reps)
        row: dict[str, Any] = {"name": label, "folder": str(f.resolve()),
                               "model_mb": model_bytes / 1e6, "folder_mb": folder_bytes / 1e6}
        for n in prefill_lengths:
            row[f"prefill_{n}_ms"] = statistics.median(x["prefill_ms"][str(n)] for x in reps)
        row["decode_ms_per_token"] = decode_ms
        row["decode_tokens_per_s"] = 1000.0 / decode_ms
        row["peak_rss_mb"] = max(x["peak_rss"] for x in reps) / 1e6
        row["rss_before_load_mb"] = statistics.median(x["rss_before_load"] for x in reps) / 1e6
        row["load_s"] = statistics.median(x["load_s"] for x in reps)
        same_prompts = greedy[f]["prompts"] == greedy[ref]["prompts"]
        row["agreement"], row["prefix_agreement"] = (
            _agreement(greedy[f]["tokens"], greedy[ref]["tokens"], agreement_tokens) if same_prompts else (None, None))
        row["reference"] = str(ref.resolve())
        row["repeats"] = {"prefill_ms": {str(n): [x["prefill_ms"][str(n)] for x in reps] for n in prefill_lengths},
                          "decode_ms_per_token": [x["decode_ms_per_token"] for x in reps],
                          "peak_rss_mb": [x["peak_rss"] / 1e6 for x in reps]}
        rows.append(row)
    settings = {"batch": 1, "repeats": repeats, "statistic": "median over repeats, each a fresh process",
                "prefill_lengths": list(prefill_lengths), "decode_prompt_tokens": decode_prompt,
                "decode_tokens": decode_tokens, "decoding": "greedy",
                "agreement_prompts": len(greedy[ref]["prompts"]), "agreement_prompt_tokens": AGREEMENT_TOKENS,
                "agreement_tokens": agreement_tokens, "reference": str(ref.resolve()),
                "text": "bundled evaluation split (qcompile.data.bundled_corpus()[1])"}
    return {"machine": machine_info(threads), "settings": settings, "rows": rows}


# ---- output ----------------------------------------------------------------------------------------------


def format_decode_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`run_decode_bench`'s rows, with a line naming the machine and settings."""
    rows, s, m = result["rows"], result["settings"], result["machine"]
    cols = [("name", "model", "{}"), ("model_mb", "model MB", "{:.1f}"), ("folder_mb", "folder MB", "{:.1f}")]
    cols += [(f"prefill_{n}_ms", f"prefill {n} ms", "{:.1f}") for n in s["prefill_lengths"]]
    cols += [("decode_ms_per_token", "decode ms/token", "{:.2f}"), ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
             ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("agreement", "greedy agreement", "{:.3f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" if c[0] == "name" else "---:"
                                                                     for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols) + " |")
    ref = Path(s["reference"]).name
    lines.append("")
    lines.append(f"Batch 1, {s['decoding']}; median of {s['repeats']} repeats (a fresh process each). Decode: "
                 f"{s['decode_tokens']} new tokens after a {s['decode_prompt_tokens']}-token prompt. Agreement: "
                 f"share of the first {s['agreement_tokens']} greedy tokens equal to {ref}'s over "
                 f"{s['agreement_prompts']} prompts of {s['agreement_prompt_tokens']} tokens. {m['cpu']}, "
                 f"{m['cores']} cores, {m['threads']} thread{'s' if m['threads'] != 1 else ''}, onnxruntime-genai "
                 f"{m['onnxruntime_genai']}.")
    return "\n".join(lines)


def plot_decode(result: dict[str, Any], path: str | Path) -> str | None:
    """Decode tokens/s against model MB as a PNG at ``path``; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib), so no plot"
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["rows"]:
        ax.scatter(r["model_mb"], r["decode_tokens_per_s"])
        ax.annotate(r["name"], (r["model_mb"], r["decode_tokens_per_s"]), textcoords="offset points", xytext=(5, 5))
    m = result["machine"]
    ax.set_xlabel("model MB (model.onnx + data)")
    ax.set_ylabel("decode tokens/s (batch 1, greedy)")
    ax.set_title(f"{m['cpu']}, {m['cores']} cores, {m['threads']} thread{'s' if m['threads'] != 1 else ''}",
                 fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def cli_decode_bench(args: argparse.Namespace) -> int:
    """``qcompile bench --decode OUT [OUT ...] [--reference F] [--threads N] [--repeats R] [-o FILE.json]``."""
    result = run_decode_bench(args.decode, reference=args.reference, threads=args.threads,
                              repeats=REPEATS if args.repeats is None else args.repeats,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    text = format_decode_table(result)
    print(text)
    out = getattr(args, "output", None)
    if out:
        from qcompile.report import write_results

        out = Path(out)
        written = write_results(out, result, text)
        why = plot_decode(result, out.with_suffix(".png"))
        written += [out.with_suffix(".png")] if why is None else []
        print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
        if why:
            print(f"note: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        raise SystemExit(_worker_main(sys.argv[2], sys.argv[3]))
    raise SystemExit("this module's command line is `qcompile bench --decode OUT [OUT ...]`")
