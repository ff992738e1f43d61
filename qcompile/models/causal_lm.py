"""Export recipe for Hugging Face decoder-only causal LMs (Llama, Mistral, Qwen2, ... all share it).

Why a wrapper: the exported graph must have a fixed, simple signature that the rest of qcompile relies on
— inputs ``input_ids`` ``[batch, seq]`` int64 and (optionally) ``attention_mask`` ``[batch, seq]``
int64, one output ``logits`` ``[batch, seq, vocab]`` — with no KV cache and no other outputs.
An architecture that needs special handling would get its own recipe module beside this one.
"""
from __future__ import annotations

import torch

WRAPPER_PREFIX = "lm."  # parameter names inside the wrapper start with this; export strips it


class CausalLMLogits(torch.nn.Module):
    """``logits = lm(input_ids, attention_mask)`` with caching disabled."""

    def __init__(self, lm: torch.nn.Module, with_attention_mask: bool = True):
        super().__init__()
        self.lm = lm
        self.with_attention_mask = with_attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.with_attention_mask:
            attention_mask = None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.logits


def example_inputs(vocab_size: int, with_attention_mask: bool) -> tuple[torch.Tensor, ...]:
    """Export example: batch 2 and seq 8 — sizes of 1 would be frozen into the graph by the exporter."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 8), generator=g, dtype=torch.int64)
    if with_attention_mask:
        return ids, torch.ones_like(ids)
    return (ids,)
