"""Shared fixtures: the native op library (located once, built from the source tree if missing), sessions
that have it registered, and the ``cuda`` marker's skip rule."""
from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import onnxruntime as ort
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA_EP:
        return
    skip = pytest.mark.skip(reason="onnxruntime has no CUDAExecutionProvider (needs an NVIDIA GPU + onnxruntime-gpu)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _build_from_source() -> None:
    """Build with tools/build_ops.sh (serialised by a lock: several test processes may race here)."""
    script = REPO / "tools" / "build_ops.sh"
    lock_path = REPO / "build" / ".ops-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from qcompile.runtime import OpsLibraryNotFoundError, ops_library_path
        try:
            ops_library_path()
            return  # another process built it while we waited
        except OpsLibraryNotFoundError:
            pass
        env = dict(os.environ, PYTHON=os.environ.get("PYTHON", __import__("sys").executable))
        res = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            pytest.fail(f"building the op library failed:\n{(res.stdout + res.stderr)[-4000:]}", pytrace=False)


@pytest.fixture(scope="session")
def ops_library() -> Path:
    """Path of libqcompile_ops.so. Built from the source tree when missing there; skips only when there is
    neither a built library nor a source tree to build it from (e.g. a bare installed package)."""
    from qcompile.runtime import OpsLibraryNotFoundError, ops_library_path

    try:
        return ops_library_path()
    except OpsLibraryNotFoundError as exc:
        if not (REPO / "tools" / "build_ops.sh").is_file() or os.environ.get("QCOMPILE_TEST_NO_BUILD") == "1":
            pytest.skip(f"qcompile_ops is not built: {exc}")
        _build_from_source()
        return ops_library_path()


SessionFactory = Callable[..., ort.InferenceSession]


def _factory(lib: Path, providers: list[str], strict: bool = False) -> SessionFactory:
    """Sessions through qcompile.runtime.make_session (the library registered as users get it, errors found
    at session creation raised as InvalidArgument)."""
    from qcompile.runtime import make_session

    def make(model: Any, *, threads: int | None = None) -> ort.InferenceSession:
        so = ort.SessionOptions()
        if strict:  # a node the first EP cannot run is an error, not a silent CPU fallback
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
        return make_session(data, providers, options=so, intra_op_threads=threads)

    return make


@pytest.fixture(scope="session")
def ops_session(ops_library: Path) -> SessionFactory:
    """``ops_session(model_or_bytes, threads=None)`` -> CPU InferenceSession with qcompile ops registered."""
    return _factory(ops_library, ["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def cuda_session(ops_library: Path) -> SessionFactory:
    """Like ``ops_session`` on the CUDA EP, with CPU fallback disabled so a test cannot silently run the
    CPU kernel; skips without a CUDA EP."""
    if not HAS_CUDA_EP:
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    return _factory(ops_library, ["CUDAExecutionProvider", "CPUExecutionProvider"], strict=True)


@pytest.fixture
def one_torch_thread():
    """Tests of many tiny torch ops (a GPTQ column sweep, a tiny model's fine-tuning): extra intra-op threads
    only add contention on a shared machine (measured 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
