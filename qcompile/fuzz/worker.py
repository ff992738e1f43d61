"""The fuzz worker: runs cases in ONNX Runtime, one after another, in a process the runner can afford to lose.

Run as ``python -m qcompile.fuzz.worker`` with ``$QCOMPILE_OPS_LIBRARY`` (and, for the sanitizer build, the
environment :func:`qcompile.fuzz.sanitizer.environment` gives). Requests arrive on stdin, replies leave on the
original stdout; each is a pickled dict framed by an 8-byte little-endian length. The worker first points fd 1
at stderr, so nothing native code prints can corrupt a reply.

Request: ``model`` (bytes), ``feeds``, ``env`` (switches to set; ``clear_env`` to unset first), ``threads``,
``runs``, or ``selftest`` ("segv", "abort", "hang") to prove that the runner survives its worker dying.
Reply: ``stage`` ("ok", "create" or "run": where an ONNX Runtime exception came from), ``error_type``,
``error`` and ``outputs`` (one array per run).
"""
from __future__ import annotations

import os
import pickle
import struct
import sys
import time
from typing import Any, BinaryIO

HEADER = struct.Struct("<Q")


def read_frame(f: BinaryIO) -> Any:
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    data = f.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def write_frame(f: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(HEADER.pack(len(data)) + data)
    f.flush()


def _selftest(what: str) -> None:
    if what == "segv":
        import ctypes
        ctypes.string_at(8)  # read from an unmapped page: the sanitizer (or the kernel) reports SEGV
    elif what == "abort":
        os.abort()
    elif what == "hang":
        time.sleep(3600)


def run_case(ort: Any, lib: str, req: dict[str, Any]) -> dict[str, Any]:
    for k in req.get("clear_env", ()):
        os.environ.pop(k, None)
    os.environ.update(req.get("env", {}))
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = req.get("threads", 1)
    so.log_severity_level = 4
    # every tensor in its own heap block, so the sanitizer sees an out-of-bounds access at the tensor's end
    # (ORT's arena, activation memory patterns and packed initializer buffers would hide it inside a bigger block)
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    try:
        sess = ort.InferenceSession(req["model"], sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any ORT exception is a clean error, which the runner judges
        return {"stage": "create", "error_type": type(e).__name__, "error": str(e), "outputs": []}
    outputs = []
    try:
        for _ in range(req.get("runs", 1)):
            outputs.append(sess.run(None, req["feeds"])[0])
    except Exception as e:  # noqa: BLE001
        return {"stage": "run", "error_type": type(e).__name__, "error": str(e), "outputs": outputs}
    return {"stage": "ok", "error_type": None, "error": None, "outputs": outputs}


def main() -> None:
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    import onnxruntime as ort

    lib = os.environ["QCOMPILE_OPS_LIBRARY"]
    write_frame(replies, {"ready": True, "pid": os.getpid()})
    while (req := read_frame(requests)) is not None:
        if "selftest" in req:
            _selftest(req["selftest"])
            write_frame(replies, {"stage": "ok", "error_type": None, "error": None, "outputs": []})
            continue
        write_frame(replies, run_case(ort, lib, req))


if __name__ == "__main__":
    main()
