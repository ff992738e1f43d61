"""`qcompile generate` and `qcompile bench --decode` on a tiny onnxruntime-genai folder: built once per module
from the tiny random Llama by onnxruntime-genai's own model builder (the layout the compiler writes)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile.cli import main
from tiny_model import private_cache, save_tiny_hf_dir

PROMPT = "Hello world, this is"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def folder(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a genai folder (fp32, CPU); read-only for tests, copy it to change it."""
    out = tmp_path_factory.mktemp("genai") / "tiny-fp32"
    res = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                          "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "cache")], capture_output=True, text=True)
    if res.returncode != 0 or not (out / "genai_config.json").is_file():
        pytest.fail(f"the genai model builder failed:\n{(res.stdout + res.stderr)[-3000:]}", pytrace=False)
    return out


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _with_ops_domain(folder: Path, dest: Path, library: Path | None, name: str = "libqcompile_ops.so") -> Path:
    """A copy whose graph imports the qcompile op domain and whose genai config names ``name`` as its op
    library, with ``library`` copied in as ``name`` (or nothing copied when None)."""
    import onnx
    from onnx import helper

    out = _copy(folder, dest)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    model.opset_import.append(helper.make_opsetid("qcompile", 1))
    onnx.save(model, str(out / "model.onnx"))
    cfg = json.loads((out / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["custom_ops_library"] = name
    (out / "genai_config.json").write_text(json.dumps(cfg))
    if library is not None:
        shutil.copy(library, out / name)
    return out


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


# ---- generate ---------------------------------------------------------------------------------------------


def test_stream_is_transformers_greedy(folder: Path, hf_dir: Path) -> None:
    import qcompile
    from transformers import AutoTokenizer, LlamaForCausalLM

    stream = qcompile.generate_stream(folder, PROMPT, max_new_tokens=12)
    pieces = list(stream)
    result = stream.result
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert result.prompt_tokens == ids.shape[1]
    assert result.token_ids == ref
    assert len(pieces) > 1 and "".join(pieces) == result.text
    # the decoded tokens, less a trailing incomplete UTF-8 character the stream holds back
    assert tok.decode(ref, skip_special_tokens=True).startswith(result.text) and result.text
    assert result.finish_reason in ("length", "eos") and result.first_token_s > 0 and result.decode_s > 0


def test_seeded_sampling_is_reproducible(folder: Path) -> None:
    from qcompile.generation import GenaiModel, generate

    model = GenaiModel(folder)
    kw = dict(max_new_tokens=16, temperature=1.0)
    a, b = (generate(model, PROMPT, seed=7, **kw).token_ids for _ in range(2))
    other = generate(model, PROMPT, seed=8, **kw).token_ids
    greedy = generate(model, PROMPT, max_new_tokens=16).token_ids
    assert a == b and a != other and a != greedy


def test_cli_prints_the_text_then_the_speeds(capsys: pytest.CaptureFixture, folder: Path) -> None:
    import qcompile

    rc, out, err = _cli(capsys, "generate", folder, "--prompt", PROMPT, "--max-new-tokens", "6")
    assert rc == 0 and out == qcompile.generate(folder, PROMPT, max_new_tokens=6).text + "\n"
    # one token per byte: the prompt's length in tokens; 6 new tokens = the first + 5 decoded
    assert err.startswith("prefill ") and f"tokens/s ({len(PROMPT)} tokens," in err and "tokens/s (5 tokens)" in err


def test_chat_renders_the_folder_template(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                          folder: Path, tmp_path: Path) -> None:
    from qcompile.generation import GenaiModel, generate

    chat = _copy(folder, tmp_path / "chat")
    (chat / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    model = GenaiModel(chat)
    first = generate(model, "<user>hi\n<assistant>", max_new_tokens=5).text
    second = generate(model, f"<user>hi\n<assistant>{first}\n<user>again\n<assistant>", max_new_tokens=5).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nagain\n"))
    rc, out, err = _cli(capsys, "generate", chat, "--chat", "--max-new-tokens", "5")
    assert rc == 0 and out == f"{first}\n{second}\n"
    assert err.count("prefill ") == 2


def test_folder_library_is_loaded(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path,
                                  ops_library: Path) -> None:
    ops = _with_ops_domain(folder, tmp_path / "ops", ops_library)
    rc, out, err = _cli(capsys, "generate", ops, "--prompt", PROMPT, "--max-new-tokens", "3")
    assert rc == 0 and "prefill" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "  \n"], "the prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens must be a whole number of at least 1"),
    (["--prompt", "x", "--temperature", "-0.5"], "temperature must be 0 (greedy) or more"),
    (["--prompt", "x", "--temperature", "nan"], "temperature must be 0 (greedy) or more"),
    (["--prompt", "x", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-k", "-1"], "top-k must be a whole number, 0 (no limit) or more"),
    (["--prompt", "x" * 1100], "the prompt has 1100 tokens but the model's context holds 1024"),
    (["--prompt", "x", "--threads", "0"], "threads must be at least 1"),
])
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture, folder: Path, argv: list[str], message: str) -> None:
    rc, out, err = _cli(capsys, "generate", folder, *argv)
    assert rc != 0 and out == "" and len(err.splitlines()) == 1 and message in err, err


def test_bad_folders_are_one_line(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    cases = {tmp_path / "nowhere": "no such folder"}
    (tmp_path / "plain").mkdir()
    cases[tmp_path / "plain"] = "is not an onnxruntime-genai model folder (no genai_config.json)"
    lost = _with_ops_domain(folder, tmp_path / "lost", None)
    cases[lost] = "the folder uses qcompile ops but libqcompile_ops.so is missing; recompile or copy it from"
    unnamed = _with_ops_domain(folder, tmp_path / "unnamed", None)
    cfg = json.loads((unnamed / "genai_config.json").read_text())
    del cfg["model"]["decoder"]["session_options"]["custom_ops_library"]
    (unnamed / "genai_config.json").write_text(json.dumps(cfg))
    cases[unnamed] = "the folder uses qcompile ops but genai_config.json names no custom_ops_library"
    outside = _with_ops_domain(folder, tmp_path / "outside", None, name="../plain/libqcompile_ops.so")
    cases[outside] = "must be a path inside the model folder"
    notemplate = _copy(folder, tmp_path / "notemplate")
    for path, message in cases.items():
        rc, out, err = _cli(capsys, "generate", path, "--prompt", PROMPT)
        assert rc != 0 and len(err.splitlines()) == 1 and message in err, (path, err)
    rc, out, err = _cli(capsys, "generate", notemplate, "--chat")
    assert rc != 0 and len(err.splitlines()) == 1 and "has no chat template" in err


# ---- decode benchmark -------------------------------------------------------------------------------------


def test_decode_bench_rows_for_two_folders(capsys: pytest.CaptureFixture, folder: Path, tmp_path: Path) -> None:
    second = _copy(folder, tmp_path / "second")
    out = tmp_path / "bench" / "decode.json"
    with private_cache():
        rc, table, err = _cli(capsys, "bench", "--decode", folder, second, "--repeats", "1", "--threads", "1",
                              "-o", out)
    assert rc == 0, err
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["tiny-fp32", "second"]
    for r in rows:
        for key in ("model_mb", "folder_mb", "prefill_64_ms", "prefill_512_ms", "decode_ms_per_token",
                    "decode_tokens_per_s", "peak_rss_mb"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
        assert r["agreement"] == 1.0 and r["prefix_agreement"] == 1.0
        assert r["folder_mb"] > r["model_mb"]  # the tokenizer and configs count towards the folder only
    assert result["settings"]["agreement_prompts"] == 16 and result["machine"]["threads"] == 1
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert (out.with_suffix(".md")).read_text().strip() == table.strip()
    assert out.with_suffix(".png").is_file() or "matplotlib is not installed" in err
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3  # header, one line per folder


@pytest.mark.parametrize("extra, message", [
    (["--threads", "0"], "threads must be at least 1"),
    (["--repeats", "0"], "repeats must be at least 1"),
    (["--reference", "/nonexistent/ref"], "/nonexistent/ref: no such folder"),
])
def test_decode_bench_bad_input_is_one_line(capsys: pytest.CaptureFixture, folder: Path, extra: list[str],
                                            message: str) -> None:
    rc, out, err = _cli(capsys, "bench", "--decode", folder, *extra)
    assert rc != 0 and out == "" and len(err.splitlines()) == 1 and message in err, err


def test_agreement_counts_equal_positions() -> None:
    from qcompile.bench_decode import _agreement

    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert _agreement(ref, ref, 4) == (1.0, 1.0)
    assert _agreement([[1, 2, 9, 4], [0, 6, 7, 8]], ref, 4) == (6 / 8, 2 / 8)


def test_default_reference_prefers_a_float_folder(tmp_path: Path) -> None:
    from qcompile.bench_decode import default_reference

    a, b = tmp_path / "int4", tmp_path / "smollm-fp32"
    assert default_reference([a, b]) == b and default_reference([a]) == a
