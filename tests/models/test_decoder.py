"""The KV-cache decoder the compiler starts from: built by onnxruntime-genai's model builder from a transformers
model (tiny Llama and Gemma here), exact against transformers, decoding step by step exactly as a full-sequence
pass computes, with transformers' parameter names, and fed by calibration and evaluation like the full-sequence
graph they were written for."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.evaluate import decode_perplexity, forward_logits, perplexity
from qcompile.models.decoder import GENAI_CONFIG, DecoderInfo
from qcompile.models.sources import resolve_source
from qcompile.pipeline import float_onnx
from qcompile.runtime import make_session
from tiny_model import HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB, random_tokens, save_tiny_hf_dir, tiny_tokenizer
from genai_helpers import genai_greedy

TOL = 1e-4  # relative to the largest logit: float32 graphs computing the same function


def _tiny_gemma_dir(path):
    from transformers import GemmaConfig, GemmaForCausalLM

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // 4, vocab_size=VOCAB,
                          max_position_embeddings=1024, bos_token_id=257, eos_token_id=256, pad_token_id=258,
                          initializer_range=0.1)
        GemmaForCausalLM(cfg).eval().save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "gemma"])
def decoder(request, tmp_path_factory):
    """(transformers model, float decoder model.onnx) of a tiny random model of each architecture."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_hf_dir() if request.param == "llama" else _tiny_gemma_dir(tmp_path_factory.mktemp("gemma"))
    source = resolve_source(str(folder))
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), float_onnx(source, "float32")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_prefill_logits_equal_transformers(decoder):
    hf, path = decoder
    ids = random_tokens(3, 19, seed=4)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert _rel(forward_logits(path, ids), ref) < TOL


def test_weights_carry_the_transformers_parameter_names(decoder):
    hf, path = decoder
    names = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    linear = {f"{n}.weight" for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert linear <= names, sorted(linear - names)[:5]
    assert {"model.norm.weight", "model.layers.1.input_layernorm.weight"} <= names
    assert not any(".MatMul." in n or "qkv_proj" in n for n in names)  # q, k and v stay separate layers


def test_step_by_step_decoding_equals_the_full_sequence(decoder):
    """Prefill 5 tokens, then feed one token at a time with the returned cache: every step's logits equal the
    full-sequence pass's at that position (to float32 rounding)."""
    _, path = decoder
    sess = make_session(str(path), ["CPUExecutionProvider"])
    info = DecoderInfo.of_session(sess, path.parent)
    ids = random_tokens(1, 14, seed=5)
    full = forward_logits(sess, ids)[0]
    outputs = [o.name for o in sess.get_outputs()]
    past = {info.past_key % i: np.zeros((1, info.num_kv_heads, 0, info.head_size), np.float32)
            for i in range(info.num_layers)}
    past |= {info.past_value % i: np.zeros((1, info.num_kv_heads, 0, info.head_size), np.float32)
             for i in range(info.num_layers)}
    pos = 0
    for end in [5, *range(6, ids.shape[1] + 1)]:
        step = ids[:, pos:end]
        res = dict(zip(outputs, sess.run(None, {"input_ids": step, "attention_mask": np.ones((1, end), np.int64), **past})))
        assert _rel(res["logits"][0, -1], full[end - 1]) < TOL, end
        past = {info.past_key % i: res[f"present.{i}.key"] for i in range(info.num_layers)}
        past |= {info.past_value % i: res[f"present.{i}.value"] for i in range(info.num_layers)}
        pos = end


def test_greedy_generation_in_onnxruntime_genai_equals_transformers(decoder):
    import onnxruntime_genai as og

    hf, path = decoder
    model = og.Model(str(path.parent))
    for seed in range(3):
        prompt = random_tokens(1, 6, seed=10 + seed)
        with torch.no_grad():
            ref = hf.generate(torch.from_numpy(prompt), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              pad_token_id=258)[0, 6:].tolist()
        assert genai_greedy(model, prompt[0].tolist(), 32) == ref, seed


def test_genai_folder_carries_config_and_tokenizer(decoder):
    _, path = decoder
    config = json.loads((path.parent / GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert (path.parent / "tokenizer.json").is_file()


def test_calibration_and_evaluation_on_the_decoder_equal_the_full_sequence_graph():
    """The same windows give the same perplexity and Hessians through the KV-cache decoder (zero-length past)
    as through our full-sequence export of the same model."""
    from qcompile.calibration import collect_hessians
    from qcompile.models.export import export_onnx
    from qcompile.passes.discover import discover_linears

    source = resolve_source(str(save_tiny_hf_dir()))
    decoder, full = float_onnx(source, "float32"), export_onnx(source)
    windows = random_tokens(4, 24, seed=6)
    (a, n_a), (b, n_b) = perplexity(decoder, windows, progress=False), perplexity(full, windows, progress=False)
    assert n_a == n_b and a == pytest.approx(b, rel=1e-5)
    hd, hf = ({m.name: m.input for m in discover_linears(onnx.load(str(p), load_external_data=False))}
              for p in (decoder, full))
    hd = collect_hessians(decoder, hd, windows, progress=False)
    hf = collect_hessians(full, hf, windows, progress=False)
    assert hd.keys() == hf.keys() and len(hd) == 7 * LAYERS
    for k in hd:
        assert _rel(hd[k].numpy(), hf[k].numpy()) < 1e-4, k


def test_decode_perplexity_equals_the_prefill_one(decoder):
    """One token per step through the KV cache gives the perplexity of one pass over each window (the same
    function, so only float rounding differs), and the token count excludes each window's first token."""
    hf, path = decoder
    windows = random_tokens(2, 13, seed=9)
    (a, n_a), (b, n_b) = decode_perplexity(path, windows, progress=False), perplexity(path, windows, progress=False)
    assert n_a == n_b == 2 * 12
    assert a == pytest.approx(b, rel=1e-5)
    # and it is the model's own: a window with other tokens gives another value
    assert decode_perplexity(path, windows[:, ::-1].copy(), progress=False)[0] != pytest.approx(a, rel=1e-3)


def test_decode_perplexity_needs_a_kv_cache_decoder():
    from qcompile.models.export import export_onnx

    full = export_onnx(resolve_source(str(save_tiny_hf_dir())))
    with pytest.raises(QCompileError, match="KV-cache decoder"):
        decode_perplexity(full, random_tokens(1, 5, seed=1), progress=False)


def test_rotary_tables_are_computed_at_load_not_stored(decoder):
    _, path = decoder
    model = onnx.load(str(path), load_external_data=False)
    assert not {"cos_cache", "sin_cache"} & {t.name for t in model.graph.initializer}
    assert {"cos_cache", "sin_cache"} <= {o for n in model.graph.node for o in n.output}


def test_rotary_tables_stay_stored_unless_reproduced_exactly():
    """A table the few nodes cannot reproduce to one float32 ulp (here one entry off by 1e-4) is kept."""
    from onnx import helper, numpy_helper

    from qcompile.models.decoder import compact_rotary_caches

    freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)  # as the builder makes its tables
    angles = torch.outer(torch.arange(512).float(), freq)
    cos, sin = angles.cos().numpy(), angles.sin().numpy()

    def model(c):
        graph = helper.make_graph([helper.make_node("Add", ["cos_cache", "sin_cache"], ["y"])], "g", [],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(c, "cos_cache"), numpy_helper.from_array(sin, "sin_cache")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    good = model(cos)
    assert compact_rotary_caches(good) and not good.graph.initializer[0].name.endswith("cache")
    bad_cos = cos.copy()
    bad_cos[400, 3] += 1e-4
    bad = model(bad_cos)
    assert not compact_rotary_caches(bad) and {t.name for t in bad.graph.initializer} == {"cos_cache", "sin_cache"}


def test_export_writes_the_float_decoder_folder(tmp_path):
    from qcompile.cli import main

    tiny = str(save_tiny_hf_dir())
    assert main(["export", tiny, "-o", str(tmp_path / "float")]) == 0
    assert {"model.onnx", GENAI_CONFIG, "tokenizer.json"} <= {p.name for p in (tmp_path / "float").iterdir()}
    ids = random_tokens(1, 6, seed=2)
    ref = forward_logits(float_onnx(resolve_source(tiny), "float32"), ids)
    np.testing.assert_array_equal(forward_logits(tmp_path / "float" / "model.onnx", ids), ref)
    assert main(["export", tiny, "-o", str(tmp_path / "alone.onnx")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.onnx", "float"]
