#!/usr/bin/env python3
"""Fetch the TensorRT 10.14 C++ API headers for building the qcompile TensorRT plugins.

The plugin interfaces (IPluginV3 and friends) are header-only virtual classes, so the plugin library
builds without TensorRT installed and never links libnvinfer. NVIDIA's own wheels ship no headers; the
PyPI package ``kernel-lens`` 2.0.1 carries an unmodified copy of the TensorRT 10.14 headers (Apache-2.0,
under ``kernel_lens/include/tensorrt/``). The wheel is downloaded with ``pip download --no-deps`` (so the
user's pip configuration and index apply), checked against a pinned SHA-256, and only the ``.h`` files of
that folder are extracted into a cache, so rebuilds do not refetch.

Prints the include directory (the one holding ``NvInferRuntime.h``) on stdout; diagnostics go to stderr.
Exit status is non-zero on failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by CMake, or loaded by path in tests
import fetch_common  # noqa: E402

PACKAGE = "kernel-lens"
VERSION = "2.0.1"
WHEEL = "kernel_lens-2.0.1-py3-none-any.whl"
SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
MEMBER_DIR = "kernel_lens/include/tensorrt/"
TRT_VERSION = "10.14"
HEADER = "NvInferRuntime.h"


def log(msg: str) -> None:
    print(f"[fetch_trt_headers] {msg}", file=sys.stderr)


def default_cache() -> Path:
    return fetch_common.cache_root() / f"trt-headers-{TRT_VERSION}-{PACKAGE}-{VERSION}"


def find_include(root: Path) -> Path | None:
    cand = root / "include" / "tensorrt"
    return cand if (cand / HEADER).is_file() else None


def pip_commands() -> list[tuple[list[str], dict[str, str]]]:
    """Ways to run pip, best first. Inside `pip install .` the build runs in an isolated environment whose
    PYTHONPATH hides the interpreter's own site-packages (and so pip); without that override the same
    interpreter finds its pip again."""
    env = dict(os.environ)
    plain = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    out = [([sys.executable, "-m", "pip"], env), ([sys.executable, "-m", "pip"], plain)]
    base = getattr(sys, "_base_executable", None)
    if base and base != sys.executable:
        out.append(([base, "-m", "pip"], plain))
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            out.append(([exe], plain))
    return out


def download_wheel(work: Path) -> Path:
    args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(work),
            f"{PACKAGE}=={VERSION}"]
    failures = []
    for pip, env in pip_commands():
        cmd = pip + args
        log("$ " + " ".join(cmd))
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if res.returncode == 0:
            break
        failures.append(f"{' '.join(pip)}: exit {res.returncode}: {res.stdout.strip()[-1500:]}")
    else:
        raise RuntimeError("pip download failed:\n" + "\n".join(failures))
    wheel = work / WHEEL
    if not wheel.is_file():
        raise RuntimeError(f"pip download produced no {WHEEL} (got {sorted(p.name for p in work.iterdir())})")
    return wheel


def extract_headers(wheel: Path, dest: Path) -> int:
    """Copies the wheel's TensorRT headers (plain file names only) into dest/include/tensorrt; returns the count."""
    out = dest / "include" / "tensorrt"
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.startswith(MEMBER_DIR) or info.is_dir():
                continue
            base = name[len(MEMBER_DIR):]
            if "/" in base or not base.endswith(".h"):
                continue  # never write outside the folder, and only headers
            (out / base).write_bytes(zf.read(info))
            n += 1
    return n


def _unpack(wheel: Path, work: Path, partial: Path) -> None:
    log(f"extracted {extract_headers(wheel, partial)} headers")


def fetch(dest: Path, wheel: Path | None) -> Path:
    return fetch_common.fetch_pinned(dest, find_include, wheel, download_wheel, SHA256, _unpack, log, "qcompile-trt-")


if __name__ == "__main__":
    sys.exit(fetch_common.main(__doc__.splitlines()[0], default_cache(), "--wheel",
                               "use this already-downloaded wheel (still verified)", fetch, log))
