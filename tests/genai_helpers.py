"""Greedy generation through onnxruntime-genai, as the tests compare it with transformers and onnxruntime."""
from __future__ import annotations

from typing import Any, Sequence


def genai_greedy(model: Any, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """The ``new_tokens`` greedy tokens ``model`` (an ``onnxruntime_genai.Model``) appends to ``prompt``."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    gen.append_tokens(list(prompt))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
