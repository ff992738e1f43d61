"""AQLM codebook formats ``aqlm-2x8`` / ``aqlm-1x8`` / ``aqlm-1x16`` (Egiazarian et al.): groups of 8 weights as
a sum of codewords from learned codebooks, per-channel fp16 scales, stored as ``qcompile.CodebookMatMul``, then
whole-model fine-tuning of codebooks and scales (codes fixed)."""
from __future__ import annotations

from qcompile.formats.aqlm import fuzz
from qcompile.errors import FormatError
from qcompile.formats.aqlm import reference as ref
from qcompile.formats.aqlm.bench import CODEBOOK_BENCH, CODEBOOK_BENCH_A4
from qcompile.formats.aqlm import finetune
from qcompile.formats.aqlm.numerics import quantize_codebook
from qcompile.formats.aqlm.weight import CodebookQuantizedWeight
from qcompile.formats.base import (Format, OpSpec, Option, accuracy_level_option, at_least, between, finetune_options,
                                   set_accuracy_level)

OP = OpSpec("qcompile", "CodebookMatMul", ref.codebook_matmul, needs_library=True, fuzz=fuzz.SPEC,
            inputs=("codes", "codebooks", "scales", "bias"))


def _options(m: int, b: int, beam: int, rounds: int, kmeans_iters: int) -> dict[str, Option]:
    return {
        "num_codebooks": Option(int, m, "M: codebooks summed per group", rule=at_least(1)),
        "nbits": Option(int, b, "B: each codebook has 2^B codewords (codes are uint8 up to 8, uint16 up to 16)",
                        rule=between(1, 16)),
        "in_group_size": Option(int, 8, "consecutive input weights per codeword (K must be a multiple)",
                                rule=at_least(1)),
        "beam_size": Option(int, beam, "hypotheses kept per row while choosing a group's M codes", rule=at_least(1)),
        "rounds": Option(int, rounds, "rounds of (codebooks, scales, codes) updates after k-means init",
                         rule=at_least(0)),
        "cg_iters": Option(int, 8, "conjugate-gradient steps per codebook least-squares update", rule=at_least(0)),
        "kmeans_iters": Option(int, kmeans_iters, "Lloyd iterations per codebook at init", rule=at_least(0)),
        "damp": Option(float, 0.01, "added to the Hessian diagonal, relative to its mean", rule=at_least(0)),
        "seed": Option(int, 0, "seed of k-means sampling and init"),
        "progress": Option(bool, False, "per-layer progress bar with the running error"),
        "accuracy_level": accuracy_level_option(),
        **finetune_options(),  # on by default: see qcompile.solvers.distill
    }


def _check_layer(k: int, n: int, opts: dict) -> None:
    if k % opts["in_group_size"]:
        raise FormatError(f"K={k} is not a multiple of in_group_size={opts['in_group_size']}")


def _aqlm_format(name: str, m: int, b: int, beam: int, rounds: int, kmeans_iters: int, note: str) -> Format:
    def quantize(weight_kn, hessian, accuracy_level: int = 0, **opts):
        return set_accuracy_level(quantize_codebook(weight_kn, hessian, name=name, **opts), accuracy_level)

    return Format(
        name=name,
        description=f"AQLM additive codebooks: {m} codebook(s) x 2^{b} codewords over groups of 8 inputs, "
                    f"per-channel fp16 scale; {note}; then codebooks, scales and norms are fine-tuned against "
                    "the float model (finetune_*)",
        quantize=quantize,
        options=_options(m, b, beam, rounds, kmeans_iters),
        needs_calibration=True,
        weight=CodebookQuantizedWeight,
        op=OP,
        emits=("native", "simulated", "portable"),
        default_emit="native",
        to_module=finetune.to_module,
        from_module=finetune.from_module,
        tunable=("codebooks", "scales"),
        bench=(CODEBOOK_BENCH, CODEBOOK_BENCH_A4) if (m, b) == (2, 8) else (),
        check_layer=_check_layer,
        embeddings="int4",  # int8 tables would be larger than all of a 2-bit model's linears
        palette=({},) if (m, b) in ((2, 8), (1, 8)) else (),  # -f auto: 2 and 1 bits of codes per weight
        # -f auto estimates a layer's damage from one code sweep after a short k-means start: 2-4x faster than the
        # presets; on the default model the presets' output error was 0.59-0.77 (median 0.72) of this estimate's
        # over 21 layers of blocks 0, 15 and 29 (docs/results.md)
        estimate_options={"beam_size": 1, "rounds": 0, "kmeans_iters": 2},
        estimate_error_ratio=0.72,
    )


FORMATS = (
    _aqlm_format("aqlm-2x8", 2, 8, 4, 3, 12, "2 bits/weight of codes + 8 KiB codebooks per layer"),
    _aqlm_format("aqlm-1x8", 1, 8, 1, 3, 12, "1 bit/weight of codes + 4 KiB codebook per layer"),
    _aqlm_format("aqlm-1x16", 1, 16, 1, 2, 4, "2 bits/weight of codes + a 1 MiB codebook per layer (only for wide layers)"),
)
