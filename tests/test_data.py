"""Corpus split (disjoint, deterministic, follows the documented rule) and token windows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile import data
from qcompile.errors import CalibrationError
from tiny_model import private_cache, tiny_tokenizer

EOS = 256  # tiny tokenizer: ids 0..255 are bytes, 256 is <eos>


@pytest.fixture(scope="module")
def articles():
    with private_cache():
        return data.bundled_articles()


def test_split_is_disjoint_deterministic_and_follows_rule(articles):
    with private_cache():
        calib, evals = data.bundled_corpus()
        calib2, evals2 = data.bundled_corpus()
    assert (calib, evals) == (calib2, evals2)
    assert len(calib) + len(evals) == len(articles) > 50
    assert 0.1 < len(evals) / len(articles) < 0.35
    titles = [t for t, _ in articles]
    assert len(set(titles)) == len(titles)
    eval_titles = {t for t, _ in articles if data.is_eval_title(t)}
    assert {x for t, x in articles if t in eval_titles} == set(evals)
    assert not set(calib) & set(evals)
    # no paragraph of an evaluation article appears anywhere in the calibration text
    calib_text = "\n".join(calib)
    paragraphs = [p for e in evals for p in e.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 100
    assert not [p for p in paragraphs if p in calib_text]


def test_articles_are_clean_text(articles):
    for _title, text in articles:
        assert not text.lstrip().upper().startswith("#REDIRECT")
        assert "'''" not in text and "[[" not in text
        assert len(text) >= data.MIN_ARTICLE_CHARS


def test_split_rule_is_pinned(articles):
    """The evaluation set must not change silently: published numbers depend on it."""
    eval_titles = [t for t, _ in articles if data.is_eval_title(t)]
    assert len(articles) == 106
    assert eval_titles == [
        "A", "Animalia (book)", "Anthropology", "Alchemy", "Austroasiatic languages", "Amphibian", "Agriculture",
        "Algae", "Appellate procedure in the United States", "Apollo 8", "Anatomy", "Affirming the consequent",
        "Ambiguity", "Aardvark", "Atlantic Ocean", "Demographics of Angola", "Politics of Angola", "Algorithm",
    ]


def test_token_stream_joins_documents_with_eos():
    tok = tiny_tokenizer()
    with private_cache():
        stream = data.token_stream(tok, ["ab", "", "cde"])
        cached = data.token_stream(tok, ["ab", "", "cde"])
    assert stream.tolist() == [97, 98, EOS, 99, 100, 101]
    assert cached.dtype == np.int64 and cached.tolist() == stream.tolist()


def test_windows_random_and_first():
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    texts = ["".join(chr(c) for c in rng.integers(97, 123, size=300)) for _ in range(4)]
    with private_cache():
        stream = data.token_stream(tok, texts)
        grid = stream[: (len(stream) // 16) * 16].reshape(-1, 16)
        first = data.token_windows(tok, texts, 16, 5, seed=None)
        assert first.dtype == np.int64 and first.shape == (5, 16)
        np.testing.assert_array_equal(first, grid[:5])
        everything = data.token_windows(tok, texts, 16, None, seed=None)
        np.testing.assert_array_equal(everything, grid)
        r0 = data.token_windows(tok, texts, 16, 10, seed=0)
        r0b = data.token_windows(tok, texts, 16, 10, seed=0)
        r1 = data.token_windows(tok, texts, 16, 10, seed=1)
    np.testing.assert_array_equal(r0, r0b)
    assert not np.array_equal(r0, r1)
    rows = {tuple(r) for r in grid.tolist()}
    # every random window is one of the non-overlapping grid windows, and none repeats
    assert all(tuple(r) in rows for r in r0.tolist())
    assert len({tuple(r) for r in r0.tolist()}) == 10


def test_too_short_and_empty_text_errors():
    tok = tiny_tokenizer()
    with private_cache():
        with pytest.raises(CalibrationError, match=r"has 11 tokens, but 2 window\(s\) of 8 need 16 tokens"):
            data.token_windows(tok, ["hello world"], 8, 2, what="calibration text")
        with pytest.raises(CalibrationError, match="empty"):
            data.token_windows(tok, ["", "  "], 8, 1)
        with pytest.raises(CalibrationError, match="at least 2"):
            data.token_windows(tok, ["hello world"], 1, 1)
        with pytest.raises(CalibrationError, match="has 11 tokens"):
            data.token_windows(tok, ["hello world"], 16, None)


def test_load_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n\nmore")
    assert data.load_text_file(tmp_path / "a.txt") == ["some text\n\nmore"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert data.load_text_file(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        data.load_text_file(tmp_path / "empty.txt")
    with pytest.raises(CalibrationError, match="does not exist"):
        data.load_text_file(tmp_path / "nope.txt")
    (tmp_path / "bad.jsonl").write_text("{\"x\": 1}\n")
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: .*\"text\""):
        data.load_text_file(tmp_path / "bad.jsonl")


def test_calibration_and_eval_windows_do_not_overlap():
    tok = tiny_tokenizer()
    with private_cache():
        calib = data.calibration_windows(tok, 64, 128, seed=0)
        ev = data.eval_windows(tok, 128, 64)
    assert calib.shape == ev.shape == (64, 128)
    calib_rows = {tuple(r) for r in calib.tolist()}
    assert not any(tuple(r) in calib_rows for r in ev.tolist())
