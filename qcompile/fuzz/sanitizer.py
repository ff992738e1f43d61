"""The AddressSanitizer + UBSan build of the op library, and the environment a process needs to load it.

``tools/build_ops.sh`` with ``QCOMPILE_SANITIZE=address,undefined`` builds it CPU-only into ``build/ops-asan/``
(``custom_ops/cmake/sanitize.cmake``: UBSan made fatal, -O0). :func:`library` builds it once and reuses it
while the sources are unchanged (a hash of ``custom_ops/`` and the build script, kept next to the library),
so the fuzz test pays the ~30 s build only after a C++ change.

Loading it: Python is not instrumented, so the ASan runtime must be the first library of the process; that
takes ``LD_PRELOAD`` of the very libasan (and libubsan) the library links, found with ``ldd``. Leak checking
is off: CPython and onnxruntime leave allocations alive at exit on purpose, and their reports would bury
real ones. Everything else stays at the sanitizers' defaults: the first report ends the process.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SOURCE_ENV_VAR = "QCOMPILE_SOURCE_DIR"


def _source_tree() -> Path:
    """The source tree the sanitizer build compiles (custom_ops/, tools/build_ops.sh). An installed package
    carries no C++ sources, so after ``pip install .`` it is ``$QCOMPILE_SOURCE_DIR`` or the working directory."""
    candidates = [os.environ.get(SOURCE_ENV_VAR), Path(__file__).resolve().parents[2], Path.cwd()]
    for c in candidates:
        if c and (Path(c) / "custom_ops" / "CMakeLists.txt").is_file() and (Path(c) / "tools" / "build_ops.sh").is_file():
            return Path(c).resolve()
    return Path.cwd().resolve()


REPO = _source_tree()
SANITIZERS = "address,undefined"
BUILD_DIR = REPO / "build" / "ops-asan"
LIBRARY = BUILD_DIR / "libqcompile_ops.so"
STAMP = BUILD_DIR / "fuzz-source-hash"
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


class SanitizerBuildError(RuntimeError):
    """The sanitizer build failed or its runtimes cannot be found (message: the build log's tail)."""


BUILD_INPUTS = (".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh", ".cmake", ".txt", ".py")  # not README.md


def source_hash() -> str:
    """Hash of what the library is built from: the sources and build files under custom_ops/, the build
    script, the compiler."""
    h = hashlib.sha256(SANITIZERS.encode())
    files = sorted(p for p in (REPO / "custom_ops").rglob("*")
                   if p.is_file() and p.suffix in BUILD_INPUTS and "__pycache__" not in p.parts)
    for p in files + [REPO / "tools" / "build_ops.sh"]:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    cxx = subprocess.run(["c++", "--version"], capture_output=True, text=True)
    h.update(cxx.stdout.encode())
    return h.hexdigest()


def library(log=print) -> Path:
    """The sanitizer build, built first if missing or stale. Several processes may call this at once: a lock
    serialises the builds. Returns the path; raises :class:`SanitizerBuildError`."""
    if not (REPO / "tools" / "build_ops.sh").is_file():
        raise SanitizerBuildError(f"no qcompile source tree at {REPO} (custom_ops/, tools/build_ops.sh): run from "
                                  f"a checkout or set ${SOURCE_ENV_VAR}")
    BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR.parent / ".ops-asan.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        want = source_hash()
        if LIBRARY.is_file() and STAMP.is_file() and STAMP.read_text().strip() == want:
            return LIBRARY
        log(f"building the sanitizer library into {BUILD_DIR} (-fsanitize={SANITIZERS}, CPU only) ...")
        t0 = time.monotonic()
        env = dict(os.environ, QCOMPILE_SANITIZE=SANITIZERS, QCOMPILE_BUILD_DIR=str(BUILD_DIR),
                   PYTHON=os.environ.get("PYTHON", sys.executable))
        res = subprocess.run(["bash", str(REPO / "tools" / "build_ops.sh")], cwd=REPO, env=env, capture_output=True,
                             text=True)
        if res.returncode != 0 or not LIBRARY.is_file():
            raise SanitizerBuildError(f"tools/build_ops.sh failed:\n{(res.stdout + res.stderr)[-4000:]}")
        STAMP.write_text(want + "\n")
        log(f"built in {time.monotonic() - t0:.0f} s")
        return LIBRARY


def runtimes(lib: Path) -> list[str]:
    """The sanitizer runtimes ``lib`` links (libasan first: it must come first in the process)."""
    res = subprocess.run(["ldd", str(lib)], capture_output=True, text=True)
    found = dict(re.findall(r"^\s*(lib(?:asan|ubsan)\.so[.\d]*)\s+=>\s+(\S+)", res.stdout, re.M))
    paths = [found[n] for n in sorted(found, key=lambda n: not n.startswith("libasan"))]
    if not paths:
        raise SanitizerBuildError(f"{lib} links no sanitizer runtime (ldd says:\n{res.stdout}{res.stderr})")
    return paths


def environment(lib: Path) -> dict[str, str]:
    """Environment additions for a Python process that loads the sanitizer build ``lib``."""
    user_asan = os.environ.get("ASAN_OPTIONS", "")
    user_ubsan = os.environ.get("UBSAN_OPTIONS", "")
    return {"LD_PRELOAD": ":".join(runtimes(lib)),
            "ASAN_OPTIONS": ASAN_OPTIONS + (":" + user_asan if user_asan else ""),  # the user's settings win
            "UBSAN_OPTIONS": UBSAN_OPTIONS + (":" + user_ubsan if user_ubsan else ""),
            "QCOMPILE_OPS_LIBRARY": str(lib)}


#: lines by which a sanitizer report announces itself on stderr
REPORT_MARKERS = ("ERROR: AddressSanitizer", "AddressSanitizer:DEADLYSIGNAL", "runtime error:",
                  "SUMMARY: UndefinedBehaviorSanitizer", "ERROR: LeakSanitizer")
