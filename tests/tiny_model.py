"""A tiny random Llama-architecture model for fast tests anywhere in the project.

Why: exporting the real default model takes minutes; this one (hidden 64, 2 layers, 4 heads, 2 KV
heads, vocab 260, tied embeddings like SmolLM2) exports in seconds and has the same graph structure.

Typical use::

    from tiny_model import tiny_onnx, tiny_source, tiny_tokenizer
    path = tiny_onnx()                      # float32 .onnx with input_ids + attention_mask -> logits
    path16 = tiny_onnx(dtype="float16")
    src = tiny_source()                     # ModelSource of a saved HF folder (load_torch() works)

Exports are made once into ``<tmp>/qcompile-tiny/<key>/`` (also used as QCOMPILE_CACHE_DIR while
exporting) and reused by later test runs; the key hashes this file, the export code and the
torch/transformers/onnx versions, so a change to any of them exports afresh.  Treat returned paths as
read-only and copy them before editing.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

VOCAB = 260  # 256 byte tokens + 4 specials
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2

_STATE: dict = {}


def _workdir() -> Path:
    """Persistent folder for this version of the tiny model and export recipe."""
    if "dir" not in _STATE:
        import hashlib

        import onnx
        import transformers

        h = hashlib.sha256(f"{torch.__version__}|{transformers.__version__}|{onnx.__version__}".encode())
        here = Path(__file__).resolve()
        models = here.parent.parent / "qcompile" / "models"
        for f in (here, models / "export.py", models / "causal_lm.py", models / "sources.py"):
            h.update(f.read_bytes())
        d = Path(tempfile.gettempdir()) / "qcompile-tiny" / h.hexdigest()[:16]
        d.mkdir(parents=True, exist_ok=True)
        _STATE["dir"] = d
    return _STATE["dir"]


def tiny_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=257, eos_token_id=256, pad_token_id=258,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_model(seed: int = 0, **overrides):
    """A random ``LlamaForCausalLM`` in eval mode (deterministic for a given seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    model.config.use_cache = False
    return model


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes, 256 ``<eos>``, 257 ``<bos>``, 258 ``<pad>``, 259 ``<unk>``."""
    if "tok" not in _STATE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
        vocab = {c: i for i, c in enumerate(byte_chars)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<eos>", "<bos>", "<pad>", "<unk>"])
        _STATE["tok"] = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
        )
    return _STATE["tok"]


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes->unicode map, so token id == byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


def save_tiny_hf_dir(path: Path | None = None, seed: int = 0, **overrides) -> Path:
    """Save the tiny model + tokenizer as a Hugging Face folder (config.json, safetensors, tokenizer);
    ``overrides`` change the config (only with an explicit ``path``)."""
    if path is None:
        assert not overrides, "config overrides need their own folder"
        path = _workdir() / "tiny-llama"
        if not (path / "config.json").is_file():
            from qcompile.cache import atomic_dir

            with atomic_dir(path) as tmp:
                _save_hf(tmp, seed)
        return path
    path = Path(path)
    _save_hf(path, seed, **overrides)
    return path


def _save_hf(path: Path, seed: int, **overrides) -> None:
    build_tiny_model(seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def tiny_source():
    """``ModelSource`` of the (per-process) saved tiny HF folder."""
    from qcompile.models.sources import resolve_source

    return resolve_source(str(save_tiny_hf_dir()))


@contextlib.contextmanager
def private_cache():
    """Point QCOMPILE_CACHE_DIR at this process's temp folder for the duration (tests must not fill ~)."""
    old = os.environ.get("QCOMPILE_CACHE_DIR")
    os.environ["QCOMPILE_CACHE_DIR"] = str(_workdir() / "cache")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QCOMPILE_CACHE_DIR", None)
        else:
            os.environ["QCOMPILE_CACHE_DIR"] = old


def tiny_onnx(dtype: str = "float32", with_attention_mask: bool = True) -> Path:
    """Path of the tiny model exported to ONNX (exported once per process per variant)."""
    key = ("onnx", dtype, with_attention_mask)
    if key not in _STATE:
        from qcompile.models.export import export_onnx

        with private_cache():
            _STATE[key] = export_onnx(tiny_source(), dtype=dtype, with_attention_mask=with_attention_mask,
                                      log=lambda _m: None)
    return _STATE[key]


def random_tokens(n: int, seq: int, seed: int = 0):
    """``[n, seq]`` int64 numpy token ids below 256 (plain bytes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seq), generator=g, dtype=torch.int64).numpy()


#: The tiny model's quantizable linears (both blocks, every projection).
TINY_LINEARS = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def with_modules(model, modules: dict):
    """A copy of ``model`` with the named submodules replaced (the fine-tuning student)."""
    import copy

    from qcompile.solvers.distill import set_module

    student = copy.deepcopy(model)
    for name, module in modules.items():
        set_module(student, name, module)
    return student


@torch.no_grad()
def student_kl(teacher, student, ids) -> float:
    """KL(teacher || student) per token on the token windows ``ids`` (numpy ``[n, seq]``)."""
    from qcompile.solvers.distill import kl_to_teacher

    t = torch.log_softmax(teacher(input_ids=torch.from_numpy(ids)).logits, -1)
    return float(kl_to_teacher(student(input_ids=torch.from_numpy(ids)).logits, t))


def heldout_kl_to_float(hf_dir: str, *models: Path, windows: int = 8, seq: int = 32) -> list[float]:
    """KL(float || compiled) per compiled ``model.onnx`` in stock onnxruntime, on held-out text (the bundled
    evaluation split), with the float reference exported from ``hf_dir``: how far each artifact drifted."""
    import onnxruntime as ort

    from qcompile import data as qdata
    from qcompile.evaluate import forward_logits
    from qcompile.models.sources import resolve_source
    from qcompile.pipeline import float_onnx

    source = resolve_source(hf_dir)
    ids = qdata.eval_windows(source.load_tokenizer(), seq, windows)

    def logp(path):
        out = forward_logits(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ids)
        return torch.log_softmax(torch.from_numpy(out).double(), -1)

    ref = logp(float_onnx(source, "float32"))
    return [float((ref.exp() * (ref - logp(m))).sum(-1).mean()) for m in models]
