#!/usr/bin/env python
"""How well ``-f auto``'s damage estimate predicts what quantizing one layer does to the model.

For a sample of layers (every layer type of a few blocks) and palette entries, quantize only that layer (the
setting's final options, as the compiled file would hold it), and measure the KL divergence from the float
model's next-token distribution and the perplexity change on held-out text (the bundled evaluation split).
Then the rank correlation (Spearman) of the measurements with three estimates: the allocation's (the
Fisher-weighted output error, AQLM's from its cheap options x the registry's ratio), the relative output error
``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` and the absolute ``tr(ΔW H ΔWᵀ)``.

    python tools/auto_sensitivity.py --out out/auto-sensitivity
    python tools/auto_sensitivity.py --out out/s --blocks 0,15,29 --palette spqr-w3:bits=3,aqlm-2x8

It uses the compile's caches (float decoder, Hessians, output Fisher, candidate quantizations) and fills them
where they are missing. Writes OUT/sensitivity.json and OUT/sensitivity.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


class _Skip(torch.nn.Module):
    """A decoder block that passes its input through (the blocks before the perturbed one: their output is cached)."""

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return hidden_states


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", default="2,9,16,23,29", help="blocks whose seven linears are sampled")
    p.add_argument("--palette", default="spqr-w3:bits=3,aqlm-2x8,mxfp4-mr",
                   help="entries measured on every sampled layer (default: one per family's size class)")
    p.add_argument("--windows", type=int, default=4, help="held-out windows (x --seq-len tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from qcompile import candidates as cands
    from qcompile import data as qdata
    from qcompile.models.sources import resolve_source
    from qcompile.passes import allocate, calibrate, discover
    from qcompile.passes.state import CompileState
    from qcompile.pipeline import CompileConfig, float_onnx, plan

    args.out.mkdir(parents=True, exist_ok=True)
    pl = plan(CompileConfig(model=args.model, format="auto", output=args.out / "unused", budget=4.0,
                            palette=[args.palette], progress=False))
    source = resolve_source(args.model)
    float_path = float_onnx(source, "float32")
    state = CompileState(cfg=pl.cfg, fmt=None, options=pl.options, overrides=(), emit="native", device=pl.device,
                         palette=pl.palette, budget=pl.budget, source=source, float_path=float_path,
                         model=onnx.load(str(float_path)), tokenizer=source.load_tokenizer())
    state = calibrate.step(discover.step(state))
    blocks = [int(b) for b in args.blocks.split(",")]
    sample = [m for m in state.matches for b in blocks for t in TYPES if m.name == f"model.layers.{b}.{t}"]
    t0 = time.perf_counter()
    fisher = allocate.fisher_weights(state)
    key = allocate.model_key(state)
    inits = {t.name: t for t in state.model.graph.initializer}
    weights = {m.name: m.weight(inits) for m in sample}
    table = cands.evaluate([(m.name, weights[m.name], m.dtype) for m in sample], state.palette, state.hessians,
                           fisher, model_key=key, emit="native", device=state.device, workers=1)
    print(f"estimates: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    model = source.load_model("float32")
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    ids = torch.from_numpy(qdata.eval_windows(state.tokenizer, args.seq_len, args.windows))
    decoder = model.model
    inputs: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        hooks = [decoder.layers[b].register_forward_pre_hook(
            lambda _m, a, kw, b=b: inputs.__setitem__(b, (a[0] if a else kw["hidden_states"]).detach()),
            with_kwargs=True) for b in blocks]
        ref_logp = F.log_softmax(model(input_ids=ids).logits.double(), -1)
        for h in hooks:
            h.remove()
    ref_nll = -ref_logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()

    rows = []
    for m in sample:
        b = int(m.name.split(".")[2])
        lin = decoder.get_submodule(m.name[len("model."):])
        original = lin.weight.detach().clone()
        for entry in table[m.name]:
            cand = state.palette[entry.candidate]
            qw = cands.cache_for(key, cand, False).get(m.name)
            if qw is None:  # a setting estimated with cheaper options: quantize it as the compile would
                qw = cand.fmt.quantize(weights[m.name], state.hessians[m.name], device="cpu", **cand.options())
            deq = qw.dequantize()
            from qcompile.solvers.sensitivity import damage, row_errors

            out_err = float(row_errors(weights[m.name], deq, state.hessians[m.name]).sum())
            saved = list(decoder.layers[:b])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(deq.T))
                for i in range(b):
                    decoder.layers[i] = _Skip()
                logp = F.log_softmax(model(inputs_embeds=inputs[b]).logits.double(), -1)
                for i, layer in enumerate(saved):
                    decoder.layers[i] = layer
                lin.weight.copy_(original)
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
            rows.append({"layer": m.name, "candidate": cand.text, "bits_per_weight": 8 * entry.bytes / deq.size,
                         "predicted": entry.damage, "fisher_final": damage(weights[m.name], deq,
                                                                           state.hessians[m.name], fisher[m.name]),
                         "rel_output_error": entry.rel_error if not entry.estimated else None,
                         "output_error": out_err, "kl": kl, "ppl_change": float(torch.exp(nll) / torch.exp(ref_nll)) - 1,
                         "estimated": entry.estimated,
                         "estimate_ratio": cand.fmt.estimate_error_ratio if entry.estimated else None})
            print(f"{m.name:36s} {cand.text:20s} predicted {entry.damage:.2e} measured KL {kl:.2e}", file=sys.stderr)

    kl = [r["kl"] for r in rows]
    exact = [r for r in rows if not r["estimated"]]  # quantized with the final options: every estimate exists
    estimated = [r for r in rows if r["estimated"]]
    implied_ratio = [r["estimate_ratio"] * r["fisher_final"] / r["predicted"] for r in estimated]
    summary = {
        "pairs": len(rows), "layers": len(sample), "palette": args.palette, "blocks": blocks,
        "held_out_tokens": int(ids.numel()), "fisher_windows": allocate.FISHER_WINDOWS,
        "spearman_kl": {"fisher (allocation)": spearman([r["predicted"] for r in rows], kl),
                        "fisher on the final weight": spearman([r["fisher_final"] for r in rows], kl),
                        "absolute output error": spearman([r["output_error"] for r in rows], kl)},
        # The relative output error exists only where the setting was quantized with its final options.
        "spearman_kl_exact_pairs": {
            "pairs": len(exact),
            "fisher (allocation)": spearman([r["predicted"] for r in exact], [r["kl"] for r in exact]),
            "relative output error": spearman([r["rel_output_error"] for r in exact], [r["kl"] for r in exact]),
            "absolute output error": spearman([r["output_error"] for r in exact], [r["kl"] for r in exact]),
        } if len(exact) > 1 else None,
        # What the registry's estimate_error_ratio would have to be on this sample: the final quantization's
        # Fisher-weighted error over the cheap options' estimate.
        "estimate_ratio_measured": {
            "pairs": len(estimated),
            "registry": sorted({r["estimate_ratio"] for r in estimated}),
            "median": float(np.median(implied_ratio)), "min": min(implied_ratio), "max": max(implied_ratio),
        } if estimated else None,
        "spearman_ppl": {"fisher (allocation)": spearman([r["predicted"] for r in rows], [r["ppl_change"] for r in rows])},
        "spearman_within_candidate": {c: spearman([r["predicted"] for r in rows if r["candidate"] == c],
                                                  [r["kl"] for r in rows if r["candidate"] == c])
                                      for c in dict.fromkeys(r["candidate"] for r in rows)},
        "median_predicted_over_measured": float(np.median([r["predicted"] / r["kl"] for r in rows if r["kl"] > 0])),
    }
    (args.out / "sensitivity.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    lines = ["| layer | entry | bits/weight | predicted KL | measured KL | ppl change |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['candidate']} | {r['bits_per_weight']:.3f} | {r['predicted']:.2e} | {r['kl']:.2e} "
              f"| {100 * r['ppl_change']:+.2f}% |" for r in rows]
    (args.out / "sensitivity.md").write_text(json.dumps(summary, indent=2) + "\n\n" + "\n".join(lines) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
