"""Per-layer checkpoints so an interrupted compile resumes from the last finished layer.

Slow formats (AQLM: seconds per linear, ~minutes per model) make a killed compile expensive. The pipeline
stores every finished :class:`~qcompile.formats.base.QuantizedWeight` under its layer name and asks for it
before quantizing again::

    ckpt = LayerCheckpoint(out_dir / "layers", fingerprint=key_hash(model_fp, fmt.name, opts, calib_fp))
    qw = ckpt.get(name)
    if qw is None:
        qw = fmt.quantize(...)
        ckpt.put(name, qw)

One pickle per layer, written to a temporary file and renamed (atomic on POSIX), so a crash leaves either
the old complete entry or none. ``fingerprint`` ties entries to everything that determines them (model,
format, options, calibration); an entry with another fingerprint, or an unreadable one, counts as absent.
Pickles are only ever read from a folder this process was told to use: do not point it at untrusted data.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from pathlib import Path

from qcompile.formats.base import QuantizedWeight

_FORMAT_VERSION = 1


class LayerCheckpoint:
    """Folder of finished layers: ``get(name) -> QuantizedWeight | None``, ``put(name, qw)``."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str = ""):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    def _path(self, name: str) -> Path:
        """Readable and collision-free: sanitized name plus a short hash of the exact name."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:]
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        return self.directory / f"{safe}.{digest}.pkl"

    def get(self, name: str) -> QuantizedWeight | None:
        entry = self.get_entry(name)
        return None if entry is None else entry[0]

    def get_entry(self, name: str) -> tuple[QuantizedWeight, dict] | None:
        """The stored weight and the metadata ``put`` was given (e.g. how long the layer took)."""
        path = self._path(name)
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a truncated/foreign file is just a missing entry
            return None
        if (not isinstance(entry, dict) or entry.get("version") != _FORMAT_VERSION
                or entry.get("fingerprint") != self.fingerprint or entry.get("name") != name
                or not isinstance(entry.get("weight"), QuantizedWeight)):
            return None
        meta = entry.get("meta")
        return entry["weight"], dict(meta) if isinstance(meta, dict) else {}

    def put(self, name: str, qw: QuantizedWeight, meta: dict | None = None) -> None:
        path = self._path(name)
        entry = {"version": _FORMAT_VERSION, "fingerprint": self.fingerprint, "name": name, "weight": qw,
                 "meta": dict(meta or {})}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(entry, fh, protocol=pickle.HIGHEST_PROTOCOL)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self) -> list[str]:
        """Names of the complete entries with this fingerprint."""
        out = []
        for path in sorted(self.directory.glob("*.pkl")):
            try:
                with open(path, "rb") as fh:
                    entry = pickle.load(fh)
            except Exception:  # noqa: BLE001
                continue
            if isinstance(entry, dict) and entry.get("fingerprint") == self.fingerprint and "name" in entry:
                out.append(entry["name"])
        return out
