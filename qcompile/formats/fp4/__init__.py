"""FP4 formats ``{mxfp4,nvfp4}-{rtn,gptq,mr}``: micro-scaled E2M1 weights (MXFP4: E8M0 scales per 32; NVFP4:
E4M3 scales per 16 and an fp32 tensor scale), rounded by RTN, GPTQ or MR-GPTQ (block Hadamard rotation fused
into the weight, applied online to activations), stored as ``qcompile.FP4MatMul``."""
from __future__ import annotations

from qcompile.formats.fp4 import fuzz
from qcompile.formats.base import Format, OpSpec, Option, accuracy_level_option, at_least, set_accuracy_level
from qcompile.formats.fp4.bench import FP4_BENCH
from qcompile.formats.fp4.numerics import METHODS, quantize_fp4
from qcompile.formats.fp4.reference import fp4_matmul_reference
from qcompile.formats.fp4.weight import MXFP4, NVFP4, FP4QuantizedWeight, FP4Spec

OP = OpSpec("qcompile", "FP4MatMul", fp4_matmul_reference, needs_library=True, fuzz=fuzz.SPEC,
            inputs=("W", "scales", "tensor_scale", "bias"))

_BLOCKS = (0, 2, 4, 8, 16, 32, 64, 128, 256)


def _options(spec: FP4Spec, method: str) -> dict[str, Option]:
    default_block = spec.group_size if method == "mr" else 0
    opts = {
        "hadamard_block": Option(int, default_block, "block-wise Hadamard rotation of the input dim fused into "
                                 "the weight (0 = none); falls back to the largest power of two dividing K",
                                 choices=_BLOCKS),
        "scale_search": Option(bool, True, "per group, keep the representable scale (neighbouring exponents / "
                               "E4M3 codes) with the least squared error instead of the plain amax one"),
        "accuracy_level": accuracy_level_option(),
    }
    if method != "rtn":
        opts["act_order"] = Option(bool, True, "quantize columns by decreasing Hessian diagonal (static groups)")
        opts["damp"] = Option(float, 0.01, "damping added to the Hessian diagonal, relative to its mean",
                              rule=at_least(0))
    return opts


_DESCRIPTIONS = {
    "rtn": "round to nearest",
    "gptq": "GPTQ on the FP4 grid (act-order, static groups)",
    "mr": "MR-GPTQ: block-wise Hadamard rotation fused into the weight + GPTQ (act-order)",
}


def _fp4_format(spec: FP4Spec, method: str) -> Format:
    name = f"{spec.grid}-{method}"

    def quantize(weight_kn, hessian, accuracy_level: int = 0, **opts):
        qw = quantize_fp4(weight_kn, hessian, name=name, spec=spec, method=method, **opts)
        return set_accuracy_level(qw, accuracy_level)

    scale = "E8M0 power-of-two" if spec.scale_format == "e8m0" else "E4M3 + fp32 tensor"
    return Format(
        name=name,
        description=f"{spec.grid.upper()} (E2M1, groups of {spec.group_size}, {scale} scales), {_DESCRIPTIONS[method]}",
        quantize=quantize,
        options=_options(spec, method),
        needs_calibration=method != "rtn",
        weight=FP4QuantizedWeight,
        op=OP,
        emits=("native", "simulated", "portable"),
        default_emit="native",
        bench=(FP4_BENCH[spec.grid], FP4_BENCH[f"{spec.grid}-a4"]),
        palette=({},) if method == "mr" else (),  # -f auto: the most accurate method of each grid
    )


FORMATS = tuple(_fp4_format(spec, method) for spec in (MXFP4, NVFP4) for method in METHODS)
