#!/usr/bin/env python
"""Resident memory of one linear layer in onnxruntime: fp32 MatMul vs a format's native op vs its
portable lowering (standard ONNX ops only).

Why: `--emit portable` keeps the file small, but onnxruntime constant-folds the dequantize subgraph at
session creation, so what a user saves on disk is not what the process holds. This prints both.

    python tools/portable_memory.py                      # 4096x4096, mxfp4-mr spqr-w3 aqlm-2x8
    python tools/portable_memory.py --shape 1024x1024 --format mxfp4-mr

Each measurement runs in a fresh process (resident memory only ever grows inside one). The weight is
random and the calibration Hessian the identity: this measures memory, not accuracy.
"""
from __future__ import annotations

import argparse
import subprocess
import sys


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def measure(fmt_name: str, mode: str, k: int, n: int) -> tuple[int, float]:
    """(serialized model bytes, resident MiB added by creating a session and running it once)."""
    import gc

    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    from qcompile.formats import get_format
    from qcompile.runtime import make_session

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    if mode == "float":
        nodes, inits, domains = [helper.make_node("MatMul", ["x", "W"], ["y"])], [onnx.numpy_helper.from_array(w, "W")], {}
    else:
        fmt = get_format(fmt_name)
        opts = fmt.resolve_options({})
        if fmt_name.startswith("aqlm"):
            opts.update(rounds=0, kmeans_iters=1, cg_iters=1, beam_size=1)  # memory only: the cheapest fit
        qw = fmt.quantize(w, torch.eye(k), device="cpu", **opts)
        lower = qw.lower_native if mode == "native" else qw.lower_portable
        low = lower("x", "y", "layer", TensorProto.FLOAT)
        nodes, inits, domains = low.nodes, low.initializers, low.opset_imports
    graph = helper.make_graph(nodes, "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, v) for d, v in domains.items() if d]
    data = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    del w, nodes, inits, graph
    gc.collect()
    before = _rss_mib()
    make_session(data, ["CPUExecutionProvider"]).run(None, {"x": np.ones((1, k), np.float32)})
    return len(data), _rss_mib() - before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x4096", help="KxN of the layer")
    p.add_argument("--format", action="append", dest="formats", help="repeatable; default mxfp4-mr spqr-w3 aqlm-2x8")
    p.add_argument("--one", nargs=2, metavar=("FORMAT", "MODE"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    k, n = (int(v) for v in args.shape.lower().split("x"))
    if args.one:
        size, rss = measure(args.one[0], args.one[1], k, n)
        print(f"{size} {rss}")
        return 0
    rows = [("fp32 MatMul", "-", "float")]
    for fmt in args.formats or ["mxfp4-mr", "spqr-w3", "aqlm-2x8"]:
        rows += [(fmt, fmt, "native"), (fmt, fmt, "portable")]
    print(f"| one {k} x {n} layer | emit | file MiB | resident MiB |\n|---|---|---:|---:|", flush=True)
    for label, fmt, mode in rows:
        res = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--one", fmt, mode],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| {label} | {mode} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1]} | |", flush=True)
            continue
        size, rss = res.stdout.split()
        print(f"| {label} | {mode if mode != 'float' else '-'} | {int(size) / 2**20:.1f} | {float(rss):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
