"""On-disk cache for expensive, reproducible artifacts (exported ONNX, token streams, Hessians).

Why: exporting the default model takes minutes and calibration tens of seconds on a small CPU, so a
second compile with the same inputs should reuse them.  Entries are keyed by a hash of everything that
determines their content (the caller passes those parts), and written atomically (temp file, then
rename) so an interrupted run or a concurrent reader never sees a half-written file.

Location: ``$QCOMPILE_CACHE_DIR`` if set, else ``~/.cache/qcompile``.  Deleting the folder is always safe.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def cache_dir() -> Path:
    """Root of the cache (created on first use)."""
    root = os.environ.get("QCOMPILE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qcompile")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _canonical(part: Any) -> Any:
    """JSON-friendly, order-stable form of one key part."""
    if isinstance(part, (str, int, float, bool)) or part is None:
        return part
    if isinstance(part, Path):
        return str(part)
    if isinstance(part, dict):
        return {str(k): _canonical(v) for k, v in sorted(part.items(), key=lambda kv: str(kv[0]))}
    if isinstance(part, (list, tuple)):
        return [_canonical(p) for p in part]
    if isinstance(part, np.ndarray):
        return {"ndarray": digest_array(part)}
    return repr(part)


def key_hash(*key_parts: Any) -> str:
    """A 24-hex-digit hash of the key parts (strings, numbers, dicts, lists, arrays)."""
    blob = json.dumps([_canonical(p) for p in key_parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def digest_array(a: np.ndarray) -> str:
    """Content hash of an array (dtype, shape and bytes)."""
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


def cache_path(kind: str, *key_parts: Any, suffix: str = "") -> Path:
    """Path of the cache entry ``<cache>/<kind>/<hash(key_parts)><suffix>`` (parent folder created).

    The entry may not exist yet; check ``.exists()`` and write it with :func:`atomic_write` or
    :func:`atomic_dir`.
    """
    folder = cache_dir() / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (key_hash(*key_parts) + suffix)


@contextlib.contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; cache entries are shared with other tools
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it onto ``path``.

    For multi-file entries (an ``.onnx`` with its external ``.data`` file).  If another process
    finished the same entry first, ours is discarded and theirs kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def entry_lock(path: Path | str) -> Iterator[None]:
    """Hold an exclusive lock for building the cache entry ``path``, so concurrent compiles build it once (the
    second waits, then finds it done). The lock file sits beside the entry and stays (it is empty)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- what the cache holds, and keeping it bounded ------------------------------------------------------------

#: Layer checkpoints (for resuming a killed compile) older than this are abandoned: removed at the next compile.
CHECKPOINT_MAX_AGE_S = 7 * 24 * 3600
#: Together the checkpoints stay under this many bytes (oldest removed first); $QCOMPILE_CHECKPOINT_MAX_GB.
CHECKPOINT_MAX_BYTES = int(float(os.environ.get("QCOMPILE_CHECKPOINT_MAX_GB", "2")) * 2**30)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _tree_mtime(path: Path) -> float:
    """The newest modification time inside ``path`` (a checkpoint is touched by every finished layer)."""
    times = [path.stat().st_mtime] + [f.stat().st_mtime for f in path.rglob("*")]
    return max(times)


def entries() -> list[dict[str, Any]]:
    """Every cache entry: ``{kind, path, bytes, modified}`` (kinds: onnx, decoder, hf, hessians, layers, ...)."""
    root = cache_dir()
    out = []
    for kind_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sorted(kind_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            out.append({"kind": kind_dir.name, "path": entry, "bytes": _tree_bytes(entry), "modified": _tree_mtime(entry)})
    return out


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)


def clear(kinds: set[str] | None = None) -> int:
    """Remove every entry (or those of ``kinds``); returns the bytes freed."""
    freed = 0
    for e in entries():
        if kinds is None or e["kind"] in kinds:
            freed += e["bytes"]
            remove(e["path"])
    return freed


def prune_checkpoints(keep: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove abandoned layer checkpoints: older than :data:`CHECKPOINT_MAX_AGE_S`, then the oldest until the
    rest fit in :data:`CHECKPOINT_MAX_BYTES`. ``keep`` (the running compile's own) is never removed."""
    import time

    now = time.time() if now is None else now
    ckpts = sorted((e for e in entries() if e["kind"] == "layers" and e["path"] != keep), key=lambda e: e["modified"])
    removed = []
    total = sum(e["bytes"] for e in ckpts)
    for e in ckpts:
        if now - e["modified"] > CHECKPOINT_MAX_AGE_S or total > CHECKPOINT_MAX_BYTES:
            remove(e["path"])
            total -= e["bytes"]
            removed.append(e["path"])
    return removed
