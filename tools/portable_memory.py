#!/usr/bin/env python
"""Resident memory of one linear layer in onnxruntime: fp32 MatMul vs a format's native op vs its
portable lowering (standard ONNX ops only).

Why: `--emit portable` keeps the file small, but onnxruntime constant-folds the dequantize subgraph at
session creation, so what a user saves on disk is not what the process holds. This prints both.

    python tools/portable_memory.py                      # 4096x4096, mxfp4-mr spqr-w3 aqlm-2x8
    python tools/portable_memory.py --shape 1024x1024 --format mxfp4-mr

Each session is measured in a fresh process that loads the model from a file (inside one process freed
memory is reused unseen). The weight is random and the calibration Hessian the identity: this measures
memory, not accuracy.
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


def one_layer_models(fmt_name: str, k: int, n: int) -> dict[str, bytes]:
    """Serialized one-layer models: ``{"native": ..., "portable": ...}``, or ``{"float": ...}`` for "-"."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    from qcompile.formats import get_format

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])]
    y = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])]

    def model(nodes, inits, domains) -> bytes:
        opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, v) for d, v in domains.items() if d]
        return helper.make_model(helper.make_graph(nodes, "one_layer", x, y, inits), opset_imports=opsets).SerializeToString()

    if fmt_name == "-":
        return {"float": model([helper.make_node("MatMul", ["x", "W"], ["y"])], [onnx.numpy_helper.from_array(w, "W")], {})}
    fmt = get_format(fmt_name)
    opts = fmt.resolve_options({})
    if fmt_name.startswith("aqlm"):
        opts.update(rounds=0, kmeans_iters=1, cg_iters=1, beam_size=1)  # memory only: the cheapest fit
    qw = fmt.quantize(w, torch.eye(k), device="cpu", **opts)
    out = {}
    for mode, lower in (("native", qw.lower_native), ("portable", qw.lower_portable)):
        low = lower("x", "y", "layer", TensorProto.FLOAT)
        out[mode] = model(low.nodes, low.initializers, low.opset_imports)
    return out


def session_rss(path: str, k: int) -> float:
    """Resident MiB added by creating a session for the model file ``path`` and running it once
    (run in a fresh process, which holds nothing else: freed memory would otherwise be reused unseen)."""
    import numpy as np

    from qcompile.runtime import make_session

    before = _rss_mib()
    session = make_session(path, ["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((1, k), np.float32)})
    return _rss_mib() - before  # while the session is alive


def main(argv: list[str] | None = None) -> int:
    import tempfile
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x4096", help="KxN of the layer")
    p.add_argument("--format", action="append", dest="formats", help="repeatable; default mxfp4-mr spqr-w3 aqlm-2x8")
    p.add_argument("--session-rss", metavar="MODEL", help=argparse.SUPPRESS)  # the child process's job
    args = p.parse_args(argv)
    k, n = (int(v) for v in args.shape.lower().split("x"))
    if args.session_rss:
        print(session_rss(args.session_rss, k))
        return 0
    print(f"| one {k} x {n} layer | emit | file MiB | resident MiB |\n|---|---|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ["-"] + (args.formats or ["mxfp4-mr", "spqr-w3", "aqlm-2x8"]):
            for mode, data in one_layer_models(fmt, k, n).items():
                path = Path(tmp) / f"{fmt}-{mode}.onnx"
                path.write_bytes(data)
                res = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--session-rss", str(path)], capture_output=True, text=True)
                label = "fp32 MatMul" if fmt == "-" else fmt
                if res.returncode != 0:
                    print(f"| {label} | {mode} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1]} | |", flush=True)
                    continue
                print(f"| {label} | {'-' if fmt == '-' else mode} | {len(data) / 2**20:.1f} | {float(res.stdout):.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
