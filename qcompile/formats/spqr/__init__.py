"""SpQR formats ``spqr-w3`` / ``spqr-w4`` (Dettmers et al.): 3/4-bit codes in groups of 16 with 3-bit bi-level
statistics and fp16 outliers in CSR, stored as ``qcompile.SpQRMatMul``, then whole-model fine-tuning of the fp16
side parameters (codes fixed)."""
from __future__ import annotations

from qcompile.formats.spqr import fuzz
from qcompile.formats.base import (Format, LayerOverride, OpSpec, Option, accuracy_level_option, at_least,
                                   finetune_options, multiple_of, positive, set_accuracy_level)
from qcompile.errors import FormatError
from qcompile.formats.spqr import reference as ref
from qcompile.formats.spqr.bench import SPQR_BENCH, SPQR_BENCH_A4
from qcompile.formats.spqr import finetune
from qcompile.formats.spqr.numerics import quantize_spqr
from qcompile.formats.spqr.weight import SpQRQuantizedWeight

OP = OpSpec("qcompile", "SpQRMatMul", ref.spqr_matmul_reference, needs_library=True, fuzz=fuzz.SPEC,
            inputs=("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm", "bias"))

#: Calibration windows (x 256 tokens) by default, more than the other formats' 64: SpQR's layer-wise method
#: measurably gains from more Hessian data (docs/formats/spqr.md).
CALIB_SAMPLES = 256

#: Paper settings (β1 = β2 = 16, 3-bit statistics, act-order). spqr-w3 spends a 4-bit budget where a bit buys
#: the most accuracy on Llama-style models (attention value projections, then the later MLP up and down
#: projections) and pays for it with fewer outliers (threshold 0.5); the screening behind each choice is in
#: docs/formats/spqr-bit-allocation.md. The patterns name layers of a model with at least 17 blocks; on other
#: models they match fewer layers (or none) and the rest stays 3-bit. spqr-w4 aims at accuracy instead: more
#: outliers (threshold 0.1) and fine-tuning on more text.
W3_LAYER_OPTIONS = tuple(LayerOverride.parse(t) for t in (
    "*.v_proj:bits=4", "model.layers.1[6-9].mlp.up_proj:bits=4", "model.layers.2?.mlp.up_proj:bits=4",
    "model.layers.2[4-9].mlp.down_proj:bits=4"))

PRESETS = {
    "spqr-w3": dict(bits=3, outlier_threshold=0.5, layer_options=W3_LAYER_OPTIONS),
    "spqr-w4": dict(bits=4, outlier_threshold=0.1, finetune_windows=512),
}


def _options(bits: int, outlier_threshold: float, finetune_windows: int = 256) -> dict[str, Option]:
    return {
        "bits": Option(int, bits, "bits per dense weight code", choices=ref.BITS),
        "group_size": Option(int, 16, "β1: weights per first-level scale/zero along K", rule=multiple_of(16)),
        "stat_bits": Option(int, 3, "bits of each quantized first-level scale and zero", choices=tuple(range(1, 9))),
        "stat_group": Option(int, 16, "β2: output rows sharing one fp16 second-level step/min", rule=at_least(1)),
        "outlier_threshold": Option(float, outlier_threshold, rule=positive(), help=
                                    "keep a weight in fp16 when its saliency exceeds this times the layer's "
                                    "typical saliency (inf: no outliers)"),
        "act_order": Option(bool, True, "process and store columns by decreasing Hessian diagonal (op gathers X)"),
        "damp": Option(float, 0.01, "damping added to the Hessian diagonal, relative to its mean", rule=at_least(0)),
        "block_size": Option(int, 128, "columns per lazy GPTQ update block", rule=at_least(1)),
        "loo_outliers": Option(bool, True, "leave-one-out screening keeps likely outliers out of group ranges"),
        "range_search": Option(bool, True, "per row, shrink a group's range when that lowers its weighted error"),
        "accuracy_level": accuracy_level_option(),
        **finetune_options(lr=1e-3, scale_lr=1e-3, windows=finetune_windows),  # on by default: see qcompile.solvers.distill
    }


def _check_layer(k: int, n: int, opts: dict) -> None:
    try:
        ref.validate_attributes(K=k, N=n, bits=opts["bits"], group_size=opts["group_size"],
                                stat_bits=opts["stat_bits"], stat_group=opts["stat_group"])
    except ref.SpQRLayoutError as e:
        raise FormatError(str(e)) from None


def _spqr_format(name: str, bits: int, outlier_threshold: float, finetune_windows: int = 256,
                 layer_options: tuple[LayerOverride, ...] = ()) -> Format:
    def quantize(weight_kn, hessian, accuracy_level: int = 0, **opts):
        return set_accuracy_level(quantize_spqr(weight_kn, hessian, name=name, **opts), accuracy_level)

    return Format(
        name=name,
        description=f"SpQR: {bits}-bit codes in groups of 16"
                    f"{' (4-bit where -L says so)' if layer_options else ''}, 3-bit bi-level statistics, fp16 "
                    "outliers (CSR); then the fp16 side parameters and norms are fine-tuned against the float "
                    "model (finetune_*)",
        quantize=quantize,
        options=_options(bits, outlier_threshold, finetune_windows),
        needs_calibration=True,
        weight=SpQRQuantizedWeight,
        op=OP,
        emits=("native", "simulated", "portable"),
        to_module=finetune.to_module,
        from_module=finetune.from_module,
        tunable=("stat_params", "values"),
        calib_samples=CALIB_SAMPLES,
        layer_options=layer_options,
        bench=(SPQR_BENCH[bits], SPQR_BENCH_A4[bits]),
        check_layer=_check_layer,
        palette=({"bits": 3}, {"bits": 4}) if name == "spqr-w3" else (),  # -f auto: both code widths
    )


FORMATS = tuple(_spqr_format(name, **preset) for name, preset in PRESETS.items())
