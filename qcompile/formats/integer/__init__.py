"""Integer formats ``int{2,3,4,8}-{rtn,gptq}``: asymmetric integer grids grouped along K, RTN or GPTQ with
act-order, stored as ONNX Runtime's ``MatMulNBits`` (3-bit codes in 4-bit containers)."""
from __future__ import annotations

from qcompile.formats.base import Format, OpSpec, Option, at_least, power_of_two
from qcompile.formats.integer.bench import NBITS_BENCH
from qcompile.formats.integer.numerics import quantize_int
from qcompile.formats.integer.reference import matmulnbits_reference
from qcompile.formats.integer.weight import MATMULNBITS_BITS, IntQuantizedWeight

OP = OpSpec("com.microsoft", "MatMulNBits", matmulnbits_reference, needs_library=False,
            inputs=("B", "scales", "zero_points", "g_idx", "bias"))


def _options(group_size: int, gptq_opts: bool) -> dict[str, Option]:
    opts = {
        "group_size": Option(int, group_size, "weights per scale/zero group along K (MatMulNBits' block)",
                             rule=power_of_two(16)),
        "mse": Option(bool, gptq_opts, "search a clipping range that minimises the rounding error"),
        # 4 (int8 activations): onnxruntime's fast kernels; on the default model twice the decode speed of 0 for
        # +0.6% perplexity (docs/results.md). 0 keeps float activations.
        "accuracy_level": Option(int, 4, "MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                                 "activations)", choices=(0, 1, 2, 3, 4)),
    }
    if gptq_opts:
        opts["act_order"] = Option(bool, True, "quantize columns in order of decreasing Hessian diagonal")
        opts["damp"] = Option(float, 0.01, "damping added to the Hessian diagonal, relative to its mean",
                              rule=at_least(0))
    return opts


def _int_format(bits: int, method: str, group_size: int) -> Format:
    name = f"int{bits}-{method}"
    storage = bits if bits in MATMULNBITS_BITS else 4

    def quantize(weight_kn, hessian, **opts):
        opts.setdefault("act_order", False)
        opts.setdefault("damp", 0.01)
        return quantize_int(weight_kn, hessian, name=name, bits=bits, method=method, **opts)

    note = "" if storage == bits else f" (stored in {storage}-bit MatMulNBits containers natively)"
    return Format(
        name=name,
        description=f"{bits}-bit asymmetric integer, {method.upper()}, grouped along K{note}",
        quantize=quantize,
        options=_options(group_size, method == "gptq"),
        needs_calibration=method == "gptq",
        weight=IntQuantizedWeight,
        op=OP,
        emits=("native", "simulated"),
        default_emit="native" if storage == bits else "simulated",
        bench=NBITS_BENCH,
        # -f auto: 4-bit GPTQ at groups of 128 and 64 (64 pads less when K is not a multiple of 128)
        palette=({}, {"group_size": 64}) if (bits, method) == (4, "gptq") else (),
    )


FORMATS = tuple(_int_format(bits, method, gs) for bits, gs in ((8, 128), (4, 128), (3, 128), (2, 64))
                for method in ("rtn", "gptq"))
