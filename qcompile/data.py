"""Text for calibration and evaluation, and its cutting into token windows.

Bundled corpus: the shortened English Wikipedia dump that gensim 4.4.0 ships in its test data (~100
articles, ~720k SmolLM2 tokens).  Redirects are dropped, markup is stripped with gensim's
``filter_wiki`` plus a little clean-up (bold/italic quotes, runs of blank lines).

Split rule (stable, order-independent, documented because results depend on it): an article belongs
to the **evaluation** set iff ``sha256(title)[0] % 5 == 0`` (about one article in five), otherwise to
the **calibration** set.  Whole articles are assigned, so no text is shared between the two sets.

Windows: documents are tokenized without special tokens and concatenated with the tokenizer's EOS
between them, then cut into consecutive non-overlapping windows of ``seq_len`` tokens (the tail is
dropped).  Calibration draws ``n`` of those windows at random (seeded); evaluation takes the first ``n``.
Token streams are cached on disk (tokenizing the corpus takes a while on a small CPU).
"""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from qcompile.cache import atomic_write, cache_path
from qcompile.errors import CalibrationError

CORPUS_VERSION = 1  # bump when parsing/cleaning/split changes
EVAL_MODULUS = 5  # one article in EVAL_MODULUS goes to evaluation
MIN_ARTICLE_CHARS = 200
_DUMP_GLOB = "enwiki-latest-pages-articles1.xml-*-shortened.bz2"


def bundled_dump_path() -> Path:
    """The Wikipedia dump inside the installed gensim package."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("the bundled corpus needs gensim==4.4.0 installed (pip install gensim==4.4.0)")
    for loc in spec.submodule_search_locations:
        found = sorted((Path(loc) / "test" / "test_data").glob(_DUMP_GLOB))
        if found:
            return found[0]
    raise CalibrationError(f"gensim is installed but its test data holds no {_DUMP_GLOB}")


def is_eval_title(title: str) -> bool:
    """The split rule: True if the article titled ``title`` belongs to the evaluation set."""
    return hashlib.sha256(title.encode("utf-8")).digest()[0] % EVAL_MODULUS == 0


def bundled_articles() -> list[tuple[str, str]]:
    """``[(title, cleaned text)]`` of every usable article in the bundled dump, in dump order (cached)."""
    dump = bundled_dump_path()
    st = dump.stat()
    entry = cache_path("corpus", CORPUS_VERSION, str(dump), st.st_size, st.st_mtime_ns, suffix=".json")
    if entry.is_file():
        return [tuple(a) for a in json.loads(entry.read_text(encoding="utf-8"))]
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles: list[tuple[str, str]] = []
    with bz2.open(dump, "rb") as f:
        for title, raw, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = _clean(filter_wiki(raw))
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append((title, text))
    with atomic_write(entry) as tmp:
        tmp.write_text(json.dumps(articles, ensure_ascii=False), encoding="utf-8")
    return articles


def _clean(text: str) -> str:
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def bundled_corpus() -> tuple[list[str], list[str]]:
    """``(calibration_articles, evaluation_articles)``: disjoint lists of article texts (see split rule)."""
    calib, evals = [], []
    for title, text in bundled_articles():
        (evals if is_eval_title(title) else calib).append(text)
    return calib, evals


def load_text_file(path: str | os.PathLike) -> list[str]:
    """A user's own text: ``.jsonl`` = one document per line's ``"text"`` field; anything else = one document."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrationError(f"text file {p} does not exist")
    try:
        raw = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"text file {p} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise CalibrationError(f"text file {p} cannot be read: {e.strerror}") from None
    if "\x00" in raw:
        raise CalibrationError(f"text file {p} is not text (it holds NUL bytes)")
    if p.suffix.lower() == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise CalibrationError(f"{p}:{i}: expected a JSON object with a \"text\" field") from None
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"text file {p} is empty")
    return docs


# ------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour (its serialized fast tokenizer, else vocab + class)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(str(_separator_id(tokenizer)).encode())
    return h.hexdigest()[:16]


def _separator_id(tokenizer) -> int:
    for attr in ("eos_token_id", "sep_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return tid
    raise CalibrationError("the tokenizer has no EOS/SEP/BOS token to separate documents with")


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def token_stream(tokenizer, texts: Sequence[str], *, use_cache: bool = True) -> np.ndarray:
    """All documents tokenized and joined with EOS between them: 1-D int64 (cached on disk)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError("no text: every document is empty")
    entry = cache_path("tokens", tokenizer_fingerprint(tokenizer), _texts_digest(texts), suffix=".npy")
    if use_cache and entry.is_file():
        return np.load(entry).astype(np.int64)
    sep = _separator_id(tokenizer)
    pieces: list[np.ndarray] = []
    for i, ids in enumerate(_encode(tokenizer, texts)):
        if i:
            pieces.append(np.array([sep], dtype=np.int64))
        pieces.append(np.asarray(ids, dtype=np.int64))
    stream = np.concatenate(pieces)
    with atomic_write(entry) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, stream.astype(np.int32 if stream.max(initial=0) < 2**31 else np.int64))
    return stream


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        # The raw fast tokenizer: no max-length warnings, no special tokens, parallel in Rust.
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def windows_from_stream(
    stream: np.ndarray, seq_len: int, n_windows: int | None = None, seed: int | None = 0, *, what: str = "text"
) -> np.ndarray:
    """Cut ``stream`` into non-overlapping ``seq_len`` windows; ``seed=None`` keeps the first ``n``."""
    if seq_len < 2:
        raise CalibrationError(f"window length {seq_len} is too short (need at least 2 tokens)")
    total = int(stream.shape[0])
    available = total // seq_len
    want = available if n_windows is None else int(n_windows)
    if want < 1 or available < want:
        need = seq_len * max(want, 1)
        raise CalibrationError(
            f"{what} has {total} tokens, but {max(want, 1)} window(s) of {seq_len} need {need} tokens"
        )
    grid = stream[: available * seq_len].reshape(available, seq_len)
    if seed is None:
        return np.ascontiguousarray(grid[:want], dtype=np.int64)
    idx = np.random.default_rng(seed).choice(available, size=want, replace=False)
    return np.ascontiguousarray(grid[np.sort(idx)], dtype=np.int64)


def token_windows(
    tokenizer,
    texts: Sequence[str],
    seq_len: int,
    n_windows: int | None = None,
    seed: int | None = 0,
    *,
    what: str = "text",
) -> np.ndarray:
    """``[n, seq_len]`` int64 token windows from ``texts``.

    ``seed`` (int) draws ``n_windows`` random non-overlapping windows — calibration; ``seed=None``
    takes the first ``n_windows`` contiguous ones — evaluation.  ``n_windows=None`` = every window.
    Raises :class:`CalibrationError` naming found vs needed tokens when the text is too short.
    """
    if not texts or not any(t and t.strip() for t in texts):
        raise CalibrationError(f"{what} is empty")
    return windows_from_stream(token_stream(tokenizer, texts), seq_len, n_windows, seed, what=what)


def calibration_windows(tokenizer, n_windows: int, seq_len: int, *, seed: int = 0,
                        texts: Sequence[str] | None = None) -> np.ndarray:
    """Random calibration windows; ``texts=None`` = the bundled corpus's calibration articles."""
    what = "calibration text"
    if texts is None:
        texts, what = bundled_corpus()[0], "the bundled calibration corpus"
    return token_windows(tokenizer, texts, seq_len, n_windows, seed, what=what)


def eval_windows(tokenizer, seq_len: int, n_windows: int | None = None, *,
                 texts: Sequence[str] | None = None) -> np.ndarray:
    """The first ``n_windows`` evaluation windows; ``texts=None`` = the bundled corpus's evaluation articles."""
    what = "evaluation text"
    if texts is None:
        texts, what = bundled_corpus()[1], "the bundled evaluation corpus"
    return token_windows(tokenizer, texts, seq_len, n_windows, None, what=what)
