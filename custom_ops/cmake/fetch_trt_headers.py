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

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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
    base = os.environ.get("QCOMPILE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcompile")
    return Path(base) / f"trt-headers-{TRT_VERSION}-{PACKAGE}-{VERSION}"


def find_include(root: Path) -> Path | None:
    cand = root / "include" / "tensorrt"
    return cand if (cand / HEADER).is_file() else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def fetch(dest: Path, wheel: Path | None) -> Path:
    found = find_include(dest)
    if found:
        return found
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qcompile-trt-") as tmp:
        work = Path(tmp)
        if wheel is None:
            wheel = download_wheel(work)
        digest = sha256(wheel)
        if digest != SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the pinned {SHA256}")
        log(f"verified {wheel.name} (sha256 {digest[:16]}...)")
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        n = extract_headers(wheel, partial)
        if find_include(partial) is None:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"{wheel.name} holds no {MEMBER_DIR}{HEADER}")
        log(f"extracted {n} headers")
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)  # atomic publish: a concurrent build never sees half a tree
    found = find_include(dest)
    if found is None:
        raise RuntimeError(f"{dest} holds no include/tensorrt/{HEADER} after extraction")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=default_cache(), help="cache directory (default: %(default)s)")
    ap.add_argument("--wheel", type=Path, default=None, help="use this already-downloaded wheel (still verified)")
    args = ap.parse_args()
    try:
        inc = fetch(args.dest.expanduser().resolve(), args.wheel)
    except Exception as exc:  # noqa: BLE001  -- one clear line for CMake's message
        log(f"FAILED: {exc}")
        return 1
    print(inc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
