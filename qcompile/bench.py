"""Per-layer latency of qcompile's native ops side by side with onnxruntime's own: fp32 MatMul (fp16 on
CUDA) and MatMulNBits 4-bit at accuracy_level 0 and 4, at the default model's shapes and two 7B-class
shapes, for M = 1 (decode) and M = 128 (prefill), all in one run.

Every candidate is a one-node ONNX model with ``x: [M, K]`` as the only graph input and its weights as
initializers (so onnxruntime may pre-pack them, as it would in a real model). CPU latency is the node's
kernel time from onnxruntime's profiler (no Python or session overhead), median over ``repeats`` runs;
with ``cold_cache`` (default) a buffer twice the last-level cache (at least 64 MiB) is read before every run
so weights stream from DRAM, as they do in a model far larger than the caches, where the layers before this
one left the caches full of their own weights: clean lines (``flush="write"`` rewrites the buffer instead, which leaves dirty lines whose
write-back shares the memory bus with the op's reads). CUDA latency is wall time around an I/O-bound run
(device-resident input and output), and the table adds the weight bandwidth achieved as a fraction of
the device's peak.

Columns come from the format registry: each :class:`~qcompile.formats.base.Format` names its bench cases
(a :class:`BenchOp` that builds a one-node model of its op), so a new format's op shows up here without an
edit to this file. The fp32 MatMul baseline is this module's own.

Ratios in the table are ``baseline / op`` for the first registered op (higher = op faster).

``roofline`` (CPU): each op's effective GB/s over the bytes its format stores (``BenchOp.weight_bytes``) and
that as a fraction of this machine's streaming-read bandwidth, measured in the same run by a probe: numpy's
max over a buffer of at least 256 MiB and twice the last-level cache (a vectorised sequential read that
reaches the memory's rate; onnxruntime's ReduceSum reads at about half of it), with one thread (the run's
clock) and with every thread (wall time, each thread reading its share), so every op figure says how far it
is from the memory limit.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (576, 576), (576, 192), (576, 1536), (1536, 576),  # SmolLM2-135M: q/o, k/v, gate/up, down
    (4096, 4096), (4096, 11008),                        # 7B-class attention and MLP
)
DEFAULT_MS: tuple[int, ...] = (1, 128)

Builder = Callable[[int, int, np.dtype, np.random.Generator], onnx.ModelProto]


@dataclasses.dataclass(frozen=True)
class BenchOp:
    """One benchmark column. ``build(K, N, dtype, rng)`` returns a model ``y = f(x)`` with x ``[M, K]``."""

    name: str
    build: Builder
    weight_bytes: Callable[[int, int], int]
    needs_ops_library: bool = True
    providers: tuple[str, ...] = ("cpu", "cuda")
    baseline: bool = False


def registered_ops() -> dict[str, BenchOp]:
    """Every bench column: the formats' op cases (registry order), then the fp32 MatMul baseline."""
    from qcompile.formats import bench_cases

    return {op.name: op for op in (*bench_cases(), MATMUL)}


# ---- model builders -------------------------------------------------------------------------------------


def one_node_model(node: onnx.NodeProto, inits: list[onnx.TensorProto], K: int, N: int, dtype: np.dtype,
                   domains: dict[str, int]) -> onnx.ModelProto:
    """A model ``y[M, N] = node(x[M, K])`` with the node's weights as initializers (for bench builders)."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("x", et, ["M", K])],
                              [helper.make_tensor_value_info("y", et, ["M", N])], initializer=inits)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
    return helper.make_model(graph, opset_imports=opsets)


def build_matmul(K: int, N: int, dtype: np.dtype, rng: np.random.Generator) -> onnx.ModelProto:
    w = (rng.standard_normal((K, N), dtype=np.float32) * 0.02).astype(dtype)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return one_node_model(node, [numpy_helper.from_array(w, "w")], K, N, dtype, {})


MATMUL = BenchOp("MatMul", build_matmul, lambda K, N: K * N * 4, needs_ops_library=False, baseline=True)

# ---- timing ------------------------------------------------------------------------------------------------


def last_level_cache_bytes() -> int:
    """Size of this CPU's largest cache from sysfs (0 where it is not reported). Why: a flush or probe buffer
    must exceed it, and server CPUs' L3 (hundreds of MB) dwarfs a fixed 64 MB, which would leave the weights
    in L3 and time the ops against a cache, not memory."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best


def default_flush_mb() -> int:
    """MiB read between runs: twice the last-level cache, at least 64."""
    return max(64, 2 * last_level_cache_bytes() >> 20)


class _CacheFlusher:
    """Evicts the weights of the last run: reads (``mode="read"``) or rewrites (``"write"``) a buffer larger
    than the last-level cache.

    Why read by default: in decode the layers before this one read their weights, they write next to nothing,
    so the caches hold clean lines. A rewritten buffer leaves dirty ones, and writing them back competes with
    the op's own reads (about 2x the memory traffic), which no real model run has."""

    MODES = ("read", "write")

    def __init__(self, megabytes: int, mode: str = "read"):
        if mode not in self.MODES:
            raise ValueError(f"flush mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.buf = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64) if megabytes > 0 else None
        self.sink = 0.0

    def __call__(self) -> None:
        if self.buf is None:
            return
        if self.mode == "write":
            self.buf += 1.0
        else:
            self.sink += float(self.buf.max())  # kept, so the read is never dead


def _kernel_times_us(profile_path: str, node_op: str) -> list[float]:
    with open(profile_path) as f:
        events = json.load(f)
    out = []
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and args.get("op_name") == node_op:
            out.append(float(e["dur"]))
    return out


class _CpuTimer:
    """One op's CPU session and its timings: ``clock="profile"`` reads onnxruntime's profiler (wall time of the
    node alone); ``clock="thread_cpu"`` (single-threaded sessions only) is the CPU time of the calling thread
    around ``run``: immune to other processes preempting us, but includes run overhead."""

    def __init__(self, model: onnx.ModelProto, threads: int | None, clock: str, tmp: str):
        from qcompile.runtime import session_options

        self.node_op = model.graph.node[0].op_type
        so = ort.SessionOptions()
        if any(n.domain == "qcompile" for n in model.graph.node):
            session_options(so)
        if threads:
            so.intra_op_num_threads = threads
        self.profile = clock == "profile"
        so.enable_profiling = self.profile
        so.profile_file_prefix = os.path.join(tmp, f"prof-{id(self)}")
        self.sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                         providers=["CPUExecutionProvider"])
        self.warmup = 0
        self.cpu_us: list[float] = []

    def warm(self, x: np.ndarray, runs: int) -> None:
        for _ in range(runs):
            self.sess.run(None, {"x": x})
        self.warmup += runs

    def time_once(self, x: np.ndarray) -> None:
        t0 = time.thread_time_ns()
        self.sess.run(None, {"x": x})
        self.cpu_us.append((time.thread_time_ns() - t0) / 1000.0)

    def result_ms(self, stat: Callable[[list[float]], float]) -> float:
        times = _kernel_times_us(self.sess.end_profiling(), self.node_op)[self.warmup:] if self.profile \
            else self.cpu_us
        if not times:
            raise RuntimeError(f"profiler recorded no {self.node_op} kernel events")
        return stat(times) / 1000.0


def _time_cpu(model: onnx.ModelProto, x: np.ndarray, repeats: int, threads: int | None, flush: _CacheFlusher,
              warmup: int, clock: str = "profile", stat: Callable[[list[float]], float] = statistics.median) -> float:
    """Kernel time (ms) of the model's single node over ``repeats`` runs, each after ``flush()`` (see
    :class:`_CpuTimer` for ``clock``)."""
    return _time_cpu_interleaved([model], x, repeats, threads, flush, warmup, clock, stat)[0]


def _time_cpu_interleaved(models: Sequence[onnx.ModelProto], x: np.ndarray, repeats: int, threads: int | None,
                          flush: Callable[[], None], warmup: int, clock: str = "profile",
                          stat: Callable[[list[float]], float] = statistics.median) -> list[float]:
    """Kernel times (ms) of several one-node models timed in rounds: every round runs each model once (after
    ``flush()``), so a slow spell of a noisy machine falls on all of them instead of on whichever ran then."""
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as tmp:
        timers = [_CpuTimer(m, threads, clock, tmp) for m in models]
        for t in timers:
            t.warm(x, warmup)
        for _ in range(repeats):
            for t in timers:
                flush()
                t.time_once(x)
        return [t.result_ms(stat) for t in timers]


def _time_cuda(model: onnx.ModelProto, x: np.ndarray, repeats: int, flush: Callable[[], None], warmup: int) -> float:
    """Median wall time (ms) of an I/O-bound run with device-resident input and output."""
    from qcompile.runtime import session_options

    so = ort.SessionOptions()
    if any(n.domain == "qcompile" for n in model.graph.node):
        session_options(so)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output("y", "cuda", 0)
    for _ in range(warmup):
        sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    times = []
    for _ in range(repeats):
        flush()
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _cuda_flusher(megabytes: int) -> Callable[[], None]:
    """Overwrites a device buffer bigger than L2 through a tiny CUDA session (nothing else needed)."""
    if megabytes <= 0:
        return lambda: None
    n = megabytes * (1 << 20) // 4
    graph = helper.make_graph([helper.make_node("Add", ["a", "a"], ["b"])], "flush",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [n])])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CUDAExecutionProvider"])
    binding = sess.io_binding()
    a = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    b = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    binding.bind_ortvalue_input("a", a)
    binding.bind_ortvalue_output("b", b)

    def flush() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return flush


def cuda_peak_bandwidth() -> float | None:
    """Peak DRAM bandwidth of GPU 0 in bytes/s from the driver (memory clock x bus width x 2), or None."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        if cuda.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            return None
        clock_khz, bus_bits = ctypes.c_int(), ctypes.c_int()
        if cuda.cuDeviceGetAttribute(ctypes.byref(clock_khz), 36, dev) != 0:  # MEMORY_CLOCK_RATE
            return None
        if cuda.cuDeviceGetAttribute(ctypes.byref(bus_bits), 37, dev) != 0:  # GLOBAL_MEMORY_BUS_WIDTH
            return None
        return 2.0 * clock_khz.value * 1e3 * bus_bits.value / 8.0
    except OSError:
        return None


# ---- read-bandwidth probe ----------------------------------------------------------------------------------

PROBE_MB = 256


def _read_all(buf: np.ndarray) -> int:
    return int(buf.max())  # numpy releases the GIL here, so threads read their shares at once


def read_bandwidth(threads: int, clock: str, repeats: int = 5, stat: Callable[[list[float]], float] = min,
                   megabytes: int = PROBE_MB) -> float:
    """Streaming-read bandwidth in GB/s: numpy's max over an int64 buffer of ``megabytes`` (raised to twice the
    last-level cache), split among ``threads`` threads. One thread with ``clock="thread_cpu"`` is timed by
    its CPU time, as the ops are; otherwise by wall time from the first thread's start to the last one's end."""
    megabytes = max(megabytes, 2 * last_level_cache_bytes() >> 20)
    buf = np.ones(megabytes * (1 << 20) // 8, np.int64)
    shares = np.array_split(buf, threads)
    times = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass pages the buffer in
            if threads == 1 and clock == "thread_cpu":
                t0 = time.thread_time_ns()
                _read_all(buf)
                times.append((time.thread_time_ns() - t0) / 1e9)
            else:
                t0 = time.perf_counter_ns()
                list(pool.map(_read_all, shares))
                times.append((time.perf_counter_ns() - t0) / 1e9)
    return buf.nbytes / stat(times[1:]) / 1e9


def measure_read_bandwidth(threads: int | None, clock: str, stat: Callable[[list[float]], float],
                           megabytes: int = PROBE_MB) -> dict[str, float]:
    """``{"read_GBps_1t": ..., "read_GBps_<n>t": ...}``: one thread with ``clock``, and ``threads`` (default: every
    core) by wall time."""
    every = threads if threads and threads > 1 else (os.cpu_count() or 1)
    out = {"read_GBps_1t": read_bandwidth(1, clock, stat=stat, megabytes=megabytes)}
    if every > 1:
        out[f"read_GBps_{every}t"] = read_bandwidth(every, "wall", stat=stat, megabytes=megabytes)
    return out


# ---- driver ---------------------------------------------------------------------------------------------------


def run_op_bench(ops: Sequence[str] | None = None, shapes: Sequence[tuple[int, int]] | None = None,
                 ms: Sequence[int] = DEFAULT_MS, repeats: int = 20, provider: str = "cpu", *,
                 threads: int | None = None, cold_cache: bool = True, flush_mb: int | None = None, flush_mode: str = "read",
                 warmup: int = 3, baselines: bool = True, seed: int = 0, verbose: bool = True, clock: str = "profile",
                 stat: str = "median", roofline: bool = False, probe_mb: int = PROBE_MB,
                 interleave: bool = False) -> list[dict[str, Any]]:
    """Latency table rows: one dict per (K, N, M) with ``{op}_ms`` for every op and baseline, ``{op}_GBps``
    on CUDA, ``{baseline}/{op}`` ratios against the first selected op, and the run settings.

    ``ops``: our ops to time (default: all registered non-baseline ops). ``provider``: "cpu" or "cuda".
    ``clock`` (CPU): "profile" (node wall time from the profiler) or "thread_cpu" (CPU time of the calling
    thread; forces ``threads=1``; use it on a loaded machine). ``stat``: "median" or "min" over repeats.
    ``roofline`` (CPU): also ``read_GBps_1t`` / ``read_GBps_<n>t`` (the probe, once per run, in every row),
    ``{op}_GBps`` and ``{op}_bw_frac`` (against the probe at the run's thread count). ``flush_mode`` (CPU, with
    ``cold_cache``): "read" or "write" (see :class:`_CacheFlusher`); ``flush_mb``: its buffer (default
    :func:`default_flush_mb`; smaller than the last-level cache, it times weights read from that cache).
    ``interleave`` (CPU): time the ops of a shape in rounds, one run of each per round, instead of one op's
    repeats after another's (on a machine whose speed drifts, the ratios then compare like with like).
    """
    if provider not in ("cpu", "cuda"):
        raise ValueError(f"provider must be cpu or cuda, got {provider!r}")
    if clock not in ("profile", "thread_cpu"):
        raise ValueError(f"clock must be profile or thread_cpu, got {clock!r}")
    if clock == "thread_cpu":
        threads = 1
    reduce = {"median": statistics.median, "min": min}[stat]
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)")
    table = registered_ops()
    if ops is None:
        chosen = [o for o in table.values() if not o.baseline]
    else:
        lower = {k.lower(): v for k, v in table.items()}
        unknown = [o for o in ops if o.lower() not in lower]
        if unknown:
            raise ValueError(f"unknown bench op(s) {unknown}; registered: {', '.join(table)}")
        chosen = [lower[o.lower()] for o in ops]
    if baselines:  # fp32 MatMul first, then the other baselines
        chosen += sorted((o for o in table.values() if o.baseline and o not in chosen), key=lambda o: o is not MATMUL)
    chosen = [o for o in chosen if provider in o.providers]
    dtype = np.dtype(np.float16 if provider == "cuda" else np.float32)
    shapes = list(shapes or DEFAULT_SHAPES)
    peak = cuda_peak_bandwidth() if provider == "cuda" else None
    probe: dict[str, float] = {}
    if roofline and provider == "cpu":
        probe = measure_read_bandwidth(threads, clock, reduce, probe_mb)
        run_threads = threads or os.cpu_count() or 1
        peak = (probe.get(f"read_GBps_{run_threads}t") or probe["read_GBps_1t"]) * 1e9
    flush: Callable[[], None]
    if provider == "cpu":
        flush_mb = default_flush_mb() if flush_mb is None else flush_mb
        flush = _CacheFlusher(flush_mb if cold_cache else 0, flush_mode)
    else:  # a GPU's L2 is tens of MB whatever the host's caches are
        flush_mb = 64 if flush_mb is None else flush_mb
        flush = _cuda_flusher(4 * flush_mb if cold_cache else 0)
    ours = [o for o in chosen if not o.baseline]
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for K, N in shapes:
        models = {o.name: o.build(K, N, dtype, rng) for o in chosen}
        for M in ms:
            x = rng.standard_normal((M, K)).astype(dtype)
            row: dict[str, Any] = {"provider": provider, "K": K, "N": N, "M": M, "dtype": dtype.name,
                                   "cold_cache": cold_cache,
                                   "flush": flush_mode if cold_cache and provider == "cpu" else None,
                                   "flush_mb": flush_mb if cold_cache else 0,
                                   "interleave": interleave and provider == "cpu", "threads": threads, "clock": clock, "stat": stat, **probe}
            timed: dict[str, float] = {}
            if provider == "cpu" and interleave:
                ts = _time_cpu_interleaved([models[o.name] for o in chosen], x, repeats, threads, flush, warmup,
                                           clock, reduce)
                timed = {o.name: t for o, t in zip(chosen, ts)}
            for o in chosen:
                if o.name in timed:
                    t = timed[o.name]
                elif provider == "cpu":
                    t = _time_cpu(models[o.name], x, repeats, threads, flush, warmup,  # type: ignore[arg-type]
                                  clock, reduce)
                else:
                    t = _time_cuda(models[o.name], x, repeats, flush, warmup)
                row[f"{o.name}_ms"] = t
                if provider == "cuda" or (roofline and not o.baseline):
                    gbps = o.weight_bytes(K, N) / (t / 1000.0) / 1e9
                    row[f"{o.name}_GBps"] = gbps
                    if peak:
                        row[f"{o.name}_bw_frac"] = gbps * 1e9 / peak
            if ours:
                ref = ours[0].name
                for o in chosen:
                    if o.name != ref:
                        row[f"{o.name}/{ref}"] = row[f"{o.name}_ms"] / row[f"{ref}_ms"]
            rows.append(row)
            if verbose:
                print(format_table([row], header=not rows[:-1]), flush=True)
    return rows


def format_table(rows: Sequence[dict[str, Any]], header: bool = True) -> str:
    """Markdown table: shape, M, every ``*_ms`` column, ratios, and GB/s and bandwidth fractions when present
    (then a line above the table gives the read-bandwidth probe)."""
    if not rows:
        return ""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if (k.endswith("_ms") or "/" in k or k.endswith("_bw_frac") or k.endswith("_GBps")) and k not in keys \
                    and not k.startswith("read_GBps"):
                keys.append(k)
    cols = ["K x N", "M"] + keys
    lines = []
    if header:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [f"{r['K']}x{r['N']}", str(r["M"])]
        for k in keys:
            v = r.get(k)
            if v is None:
                cells.append("")
            elif k.endswith("_ms"):
                cells.append(f"{v:.4f}")
            elif k.endswith("_bw_frac"):
                cells.append(f"{100 * v:.0f}%")
            elif k.endswith("_GBps"):
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{v:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    probe = {k: v for k, v in rows[0].items() if k.startswith("read_GBps_")}
    if header and probe:
        where = ", ".join(f"{k.removeprefix('read_GBps_').removesuffix('t')} thread(s) {v:.1f} GB/s"
                          for k, v in probe.items())
        lines.insert(0, f"streaming read (numpy max, >= 2x the last-level cache): {where}\n")
    return "\n".join(lines)


def _parse_shapes(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        k, _, n = part.strip().lower().partition("x")
        out.append((int(k), int(n)))
    return out


def cli_bench(args: argparse.Namespace) -> int:
    """Entry for ``qcompile bench`` (args: ops, shapes, m, repeats, provider, output)."""
    ops = [o.strip() for o in args.ops.split(",")] if getattr(args, "ops", None) else None
    ms = [int(v) for v in str(getattr(args, "m", "1,128")).split(",")]
    rows = run_op_bench(ops=ops, shapes=_parse_shapes(getattr(args, "shapes", None)), ms=ms,
                        repeats=getattr(args, "repeats", 20), provider=getattr(args, "provider", "cpu"),
                        threads=getattr(args, "threads", None), clock=getattr(args, "clock", "profile"),
                        stat=getattr(args, "stat", "median"), cold_cache=not getattr(args, "warm", False),
                        flush_mode=getattr(args, "flush", "read"), flush_mb=getattr(args, "flush_mb", None),
                        interleave=getattr(args, "interleave", False), verbose=False, roofline=getattr(args, "roofline", False))
    text = format_table(rows)
    print(text)
    if getattr(args, "output", None):
        from qcompile.report import write_results

        write_results(args.output, rows, text)
    return 0


def main_bench(argv: Sequence[str] | None = None) -> int:
    """``python -m qcompile.bench [--ops ...] [--shapes 4096x4096,...] [--m 1,128] [--provider cpu]``."""
    p = argparse.ArgumentParser(prog="python -m qcompile.bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=None)
    p.add_argument("--shapes", default=None)
    p.add_argument("--m", default="1,128")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--clock", default="profile", choices=["profile", "thread_cpu"])
    p.add_argument("--stat", default="median", choices=["median", "min"])
    p.add_argument("--warm", action="store_true", help="do not flush the caches between runs")
    p.add_argument("--flush", default="read", choices=list(_CacheFlusher.MODES),
                   help="CPU: evict the weights between runs by reading (clean lines, as in a model's decode) or by "
                        "rewriting a buffer")
    p.add_argument("--flush-mb", type=int, default=None,
                   help="CPU: MiB read between runs (default: twice the last-level cache, at least 64; less than the "
                        "cache times weights read from it)")
    p.add_argument("--roofline", action="store_true",
                   help="CPU: each op's GB/s over its stored bytes against a streaming-read probe of this machine")
    p.add_argument("--interleave", action="store_true",
                   help="CPU: time the ops in rounds (one run of each per round), not one op's repeats after another's")
    p.add_argument("-o", "--output", type=Path, default=None)
    return cli_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main_bench())
