"""The default model's float KV-cache decoder: greedy generation through onnxruntime-genai equals transformers'
on 3 prompts x 32 tokens."""
import pytest
import torch

from qcompile.models.sources import resolve_source
from qcompile.pipeline import float_onnx
from genai_helpers import genai_greedy

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Quantization of neural network weights",
           "Once upon a time, in a small village,")


def test_greedy_generation_equals_transformers():
    import onnxruntime_genai as og

    source = resolve_source("smollm2-135m")
    folder = float_onnx(source, "float32").parent
    hf, tok = source.load_torch()
    model = og.Model(str(folder))
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              use_cache=True, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        assert genai_greedy(model, ids, 32) == ref, prompt
