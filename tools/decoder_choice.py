"""Why the compiler starts from onnxruntime-genai's KV-cache decoder: the measurements behind the choice.

For one model (default: the bundled smollm2-135m), side by side in one run, one thread:
- decode cost per new token of our full-sequence export (no KV cache: each step re-runs the whole prefix)
  against the KV-cache decoder run by onnxruntime-genai, as CPU milliseconds of the process per token (robust
  to other load on the machine);
- exactness of the decoder: its prefill logits against transformers' on evaluation text (max relative error,
  argmax agreement).

    python tools/decoder_choice.py [--model smollm2-135m] [--new-tokens 48] [--prompt-tokens 16]
"""
from __future__ import annotations

import argparse
import resource
import sys

import numpy as np


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def full_sequence_ms(path, prompt: list[int], new_tokens: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ids = list(prompt)
    t0 = cpu_seconds()
    for _ in range(new_tokens):
        a = np.array([ids])
        logits = sess.run(["logits"], {"input_ids": a, "attention_mask": np.ones_like(a)})[0]
        ids.append(int(logits[0, -1].argmax()))
    return (cpu_seconds() - t0) * 1000 / new_tokens


def decoder_ms(folder, prompt: list[int], new_tokens: int) -> float:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    best = float("inf")
    for _ in range(3):
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens + 1
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        gen.generate_next_token()  # the prefill
        t0 = cpu_seconds()
        for _ in range(new_tokens):
            gen.generate_next_token()
        best = min(best, (cpu_seconds() - t0) * 1000 / new_tokens)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=16)
    args = p.parse_args(argv)

    import torch

    from qcompile import data as qdata
    from qcompile.evaluate import forward_logits
    from qcompile.models.export import export_onnx
    from qcompile.models.sources import resolve_source
    from qcompile.pipeline import float_onnx

    source = resolve_source(args.model)
    model, tok = source.load_torch()
    decoder = float_onnx(source, "float32")
    windows = qdata.eval_windows(tok, 128, 4)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(windows)).logits.numpy()
    got = forward_logits(decoder, windows)
    prompt = windows[0, : args.prompt_tokens].tolist()
    rows = [
        ("full-sequence export, re-run per token", f"{full_sequence_ms(export_onnx(source), prompt, args.new_tokens):.1f}"),
        ("KV-cache decoder (onnxruntime-genai)", f"{decoder_ms(decoder.parent, prompt, args.new_tokens):.1f}"),
    ]
    print(f"{args.model}: {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, one thread")
    print("| graph | decode CPU-ms/token |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms} |")
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"decoder prefill logits vs transformers on {windows.size} evaluation tokens: max relative error "
          f"{err:.1e}, argmax agreement {agree:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
