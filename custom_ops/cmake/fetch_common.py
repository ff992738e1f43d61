"""What the header fetchers share: the cache location, the pinned-checksum check, publishing a cache entry
atomically, and the command line CMake calls (prints the include folder on stdout, one line of error on stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """``$QCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcompile``, else ``~/.cache/qcompile``."""
    base = os.environ.get("QCOMPILE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcompile")
    return Path(base)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_pinned(dest: Path, find_include: Callable[[Path], Path | None], package: Path | None,
                 download: Callable[[Path], Path], pinned_sha256: str, unpack: Callable[[Path, Path, Path], None],
                 log: Callable[[str], None], prefix: str) -> Path:
    """The include folder under ``dest``, fetched once: ``package`` (or ``download(work)``) is checked against
    the pinned SHA-256, ``unpack(package, work, partial)`` writes the tree, which is then renamed onto ``dest``
    (a concurrent build never sees half a tree)."""
    found = find_include(dest)
    if found:
        return found
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        if package is None:
            package = download(work)
        digest = sha256(package)
        if digest != pinned_sha256:
            raise RuntimeError(f"{package.name}: sha256 {digest} does not match the pinned {pinned_sha256}")
        log(f"verified {package.name} (sha256 {digest[:16]}...)")
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            unpack(package, work, partial)
            if find_include(partial) is None:
                raise RuntimeError(f"{package.name} holds no headers where expected")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    found = find_include(dest)
    if found is None:
        raise RuntimeError(f"{dest} holds no headers after unpacking")
    return found


def main(description: str, default_dest: Path, package_flag: str, package_help: str,
         fetch: Callable[[Path, Path | None], Path], log: Callable[[str], None]) -> int:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dest", type=Path, default=default_dest, help="cache directory (default: %(default)s)")
    ap.add_argument(package_flag, dest="package", type=Path, default=None, help=package_help)
    args = ap.parse_args()
    try:
        inc = fetch(args.dest.expanduser().resolve(), args.package)
    except Exception as exc:  # noqa: BLE001  -- one clear line for CMake's error message
        log(f"FAILED: {exc}")
        return 1
    print(inc)
    return 0
