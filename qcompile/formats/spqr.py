"""SpQR formats (``spqr-w3``, ``spqr-w4``): small-group 3/4-bit codes with bi-level 3-bit statistics and
fp16 outliers in CSR, lowered to our ``qcompile.SpQRMatMul`` op (layout: ``qcompile/reference/spqr.py``).

The numerics live in :mod:`qcompile.spqr`; this module packs the result exactly as the op stores it (so
bits per weight count the statistics, the permutation and every byte of the outlier table) and lowers it
natively or with standard ONNX ops only.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.finetune import finetune_options, tune_format_layers
from qcompile.formats.base import (Format, LayerOverride, Lowered, Option, QuantizedWeight, is_whole_model_option,
                                   register)
from qcompile.reference import spqr as ref
from qcompile.spqr import SpQRConfig, spqr_quantize

OP_DOMAIN = "qcompile"
OP_TYPE = "SpQRMatMul"
OP_VERSION = 1


class SpQRQuantizedWeight(QuantizedWeight):
    """A SpQR weight held as the op's packed tensors plus the attributes that describe them."""

    def __init__(self, name: str, *, k: int, n: int, bits: int, group_size: int, stat_bits: int, stat_group: int,
                 tensors: dict[str, np.ndarray]):
        self.format_name = name
        self.k, self.n = k, n
        self.attrs = dict(K=k, N=n, bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)
        ref.validate_inputs(None, tensors["codes"], tensors["stat_codes"], tensors["stat_params"],
                            tensors["row_offsets"], tensors["col_indices"], tensors["values"], tensors.get("perm"),
                            **self.attrs)
        self.tensors = tensors

    @classmethod
    def from_result(cls, name: str, res, cfg: SpQRConfig) -> "SpQRQuantizedWeight":
        n, k = res.codes.shape
        feature_dtype = ref.index_dtype(k - 1)  # columns and permutation index input features
        tensors = {
            "codes": ref.pack_codes(res.codes.numpy(), cfg.bits),
            "stat_codes": ref.pack_stat_codes(res.scale_codes.numpy(), res.zero_codes.numpy(), cfg.stat_bits),
            "stat_params": np.ascontiguousarray(res.stat_params, dtype=np.float16),
            "row_offsets": ref.row_offsets_from_counts(np.bincount(res.outlier_rows, minlength=n)),
            "col_indices": res.outlier_cols.astype(feature_dtype),
            "values": res.outlier_values.astype(np.float16),
        }
        if res.perm is not None:
            tensors["perm"] = res.perm.astype(feature_dtype)
        return cls(name, k=k, n=n, bits=cfg.bits, group_size=cfg.group_size, stat_bits=cfg.stat_bits,
                   stat_group=cfg.stat_group, tensors=tensors)

    @property
    def shape(self) -> tuple[int, int]:
        return self.k, self.n

    @property
    def nnz(self) -> int:
        return int(self.tensors["values"].shape[0])

    def packed(self) -> dict[str, np.ndarray]:
        return dict(self.tensors)

    def dequantize(self) -> np.ndarray:
        t = self.tensors
        return ref.dequantize(t["codes"], t["stat_codes"], t["stat_params"], t["row_offsets"], t["col_indices"],
                              t["values"], t.get("perm"), **self.attrs)

    def extra_report(self) -> dict[str, Any]:
        k, n = self.shape
        return {"outlier_rate": self.nnz / (k * n), "outliers": self.nnz, "act_order": "perm" in self.tensors,
                **{key: v for key, v in self.attrs.items() if key not in ("K", "N")}}

    # ---- lowering -------------------------------------------------------------------------------

    def lower_native(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            raise FormatError(f"SpQRMatMul takes float32 or float16 activations, got {TensorProto.DataType.Name(dtype)}")
        inits = [numpy_helper.from_array(arr, f"{prefix}.{key}") for key, arr in self.tensors.items()]
        names = [f"{prefix}.{key}" for key in ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices",
                                                "values")]
        if "perm" in self.tensors:
            names.append(f"{prefix}.perm")
        node = helper.make_node(OP_TYPE, [x] + names, [y], name=f"{prefix}.{OP_TYPE}", domain=OP_DOMAIN,
                                **self.attrs)
        return Lowered([node], inits, {OP_DOMAIN: OP_VERSION})

    def lower_portable(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        """Standard ONNX (opset 11+): unpack nibbles with Div/Mod, apply bi-level statistics, undo the
        permutation with a Gather, add outliers with GatherND/Add/ScatterND, then MatMul."""
        return _portable(self, x, y, prefix, dtype)


def _portable(qw: SpQRQuantizedWeight, x: str, y: str, prefix: str, dtype: int) -> Lowered:
    a = qw.attrs
    k, n, gs = a["K"], a["N"], a["group_size"]
    t = qw.tensors
    g = ref.num_groups(k, gs)
    kp = g * gs
    codes = np.zeros((n, kp), dtype=np.uint8)
    codes[:, :k] = ref.unpack_codes(t["codes"], a["bits"], k)
    sc, zc = ref.unpack_stat_codes(t["stat_codes"], a["stat_bits"], g)
    nodes: list = []
    inits: list = []

    def const(name: str, arr: np.ndarray) -> str:
        full = f"{prefix}.p.{name}"
        inits.append(numpy_helper.from_array(np.array(arr, order="C"), full))  # keeps 0-d shapes
        return full

    def node(op: str, inputs: list[str], out: str, **kw) -> str:
        full = f"{prefix}.p.{out}"
        nodes.append(helper.make_node(op, inputs, [full], name=full, **kw))
        return full

    F = TensorProto.FLOAT
    nib = const("codes_u4", (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8))  # [N, kp/2]
    c32 = node("Cast", [nib], "c32", to=TensorProto.INT32)
    sixteen = const("sixteen", np.array(16, dtype=np.int32))
    half_shape = const("half_shape", np.array([n, kp // 2, 1], dtype=np.int64))
    lo = node("Reshape", [node("Mod", [c32, sixteen], "lo"), half_shape], "lo3")
    hi = node("Reshape", [node("Div", [c32, sixteen], "hi"), half_shape], "hi3")
    both = node("Concat", [lo, hi], "both", axis=2)  # [N, kp/2, 2]: even positions first
    cf = node("Cast", [node("Reshape", [both, const("grp_shape", np.array([n, g, gs], dtype=np.int64))], "cg")],
              "cf", to=F)

    sp_rows = node("Gather", [const("stat_params", t["stat_params"]),
                              const("row_block", (np.arange(n) // a["stat_group"]).astype(np.int64))], "sp_rows",
                   axis=0)
    sp = node("Cast", [sp_rows], "sp", to=F)  # [N, 4, G]

    def field(i: int) -> str:
        return node("Gather", [sp, const(f"f{i}", np.array(i, dtype=np.int64))], f"sp{i}", axis=1)  # [N, G]

    gshape = const("stat_shape", np.array([n, g, 1], dtype=np.int64))
    scf = node("Cast", [const("scale_codes", sc)], "scf", to=F)
    zcf = node("Cast", [const("zero_codes", zc)], "zcf", to=F)
    scale = node("Add", [node("Mul", [scf, field(0)], "s_mul"), field(1)], "scale")
    zero = node("Add", [node("Mul", [zcf, field(2)], "z_mul"), field(3)], "zero")
    dense = node("Mul", [node("Reshape", [scale, gshape], "scale3"),
                         node("Sub", [cf, node("Reshape", [zero, gshape], "zero3")], "centred")], "dense")
    flat = node("Reshape", [dense, const("flat_shape", np.array([n, kp], dtype=np.int64))], "flat")
    if kp != k:
        flat = node("Slice", [flat, const("s0", np.array([0], np.int64)), const("s1", np.array([k], np.int64)),
                              const("sax", np.array([1], np.int64))], "sliced")
    w = node("Transpose", [flat], "w_stored", perm=[1, 0])  # [K, N], stored order
    if "perm" in t:
        inv = np.argsort(t["perm"].astype(np.int64)).astype(np.int64)
        w = node("Gather", [w, const("inv_perm", inv)], "w_dense", axis=0)
    if qw.nnz:
        rows = np.repeat(np.arange(n), np.diff(t["row_offsets"].astype(np.int64)))
        idx = const("outlier_idx", np.stack([t["col_indices"].astype(np.int64), rows], axis=1))
        vals = node("Cast", [const("outlier_values", t["values"])], "ovals", to=F)
        cur = node("GatherND", [w, idx], "ocur")
        w = node("ScatterND", [w, idx, node("Add", [cur, vals], "onew")], "w_full")
    if dtype != F:
        w = node("Cast", [w], "w_cast", to=dtype)
    nodes.append(helper.make_node("MatMul", [x, w], [y], name=f"{prefix}.p.MatMul"))
    return Lowered(nodes, inits)


def quantize_spqr(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, bits: int, group_size: int,
                  stat_bits: int, stat_group: int, outlier_threshold: float, act_order: bool, damp: float,
                  block_size: int, loo_outliers: bool, range_search: bool = True,
                  device: str = "cpu", **whole_model: Any) -> SpQRQuantizedWeight:
    """Quantize one ``[K, N]`` weight with SpQR. Without a Hessian, H = I (data-free, saliency = error²).

    ``whole_model`` takes the ``finetune_*`` options, which act later (:func:`tune_spqr`)."""
    unknown = [k for k in whole_model if not is_whole_model_option(k)]
    if unknown:
        raise FormatError(f"{name}: unknown option(s) {', '.join(unknown)}")
    try:
        ref.validate_attributes(K=weight_kn.shape[0], N=weight_kn.shape[1], bits=bits, group_size=group_size,
                                stat_bits=stat_bits, stat_group=stat_group)
    except ref.SpQRLayoutError as e:
        raise FormatError(f"{name}: {e}") from None
    if not outlier_threshold > 0:
        raise FormatError(f"{name}: outlier_threshold must be > 0 (inf disables outliers), got {outlier_threshold}")
    cfg = SpQRConfig(bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group=stat_group,
                     outlier_threshold=outlier_threshold, act_order=act_order, damp=damp, block_size=block_size,
                     loo_outliers=loo_outliers, range_search=range_search)
    w = torch.from_numpy(np.ascontiguousarray(weight_kn.T)).float().to(device)
    h = None if hessian is None else hessian.to(device)
    return SpQRQuantizedWeight.from_result(name, spqr_quantize(w, h, cfg), cfg)


#: Paper settings (β1 = β2 = 16, 3-bit statistics, act-order), with the 4-bit budget of spqr-w3 spent unevenly
#: (screened on SmolLM2-135M without fine-tuning, 256 calibration windows: docs/spqr-bit-allocation.md). With
#: fine-tuning it gave 25.087 at 3.997 bits/weight (3.943 since index tensors are int16), where the uniform
#: preset before (all 3-bit, threshold 0.35) gave 25.244 at 3.973 (now 3.919): fine-tuning recovers much of what
#: the layer-wise method loses either way.
#: - outliers are the cheapest bits to give up: threshold 0.35 -> 0.5 keeps ~0.27% instead of ~0.62% of weights
#:   (-0.11 bits/weight for +0.08 perplexity), 1.0 costs much more (+0.69 for a further -0.07 bits/weight);
#: - attention value projections at 4 bits buy the most per bit (v_proj: -0.40 perplexity for +0.024 bits/weight;
#:   q/k: -0.03 for +0.10; o_proj: -0.10 for +0.07), then MLP up projections (-0.77 for +0.21 for all 30),
#:   and of those the later blocks' (blocks 15-29: 26.116 vs 0-14: 26.237).
#: Coarser statistics where errors matter little cost more than they free (q/k/o groups of 32: +0.33 for
#: -0.05 bits/weight; MLP stat_group 32: +0.20 for -0.09). These patterns name Llama-style layers of a model
#: with at least 17 blocks; on other models they match fewer layers (or none) and the rest stays 3-bit.
#: w4 has no 4-bit budget to keep, so it aims at accuracy (within 2% of float on SmolLM2-135M): 0.1 keeps ~0.5%
#: outliers (4.90 bits/weight) and it fine-tunes on 512 windows (0.2 and 256 windows: 4.80 bits/weight, +3.2%).
#: Calibration windows (x 256 tokens) by default, more than the other formats' 64: SpQR measurably gains from
#: more Hessian data (spqr-w3 without fine-tuning on SmolLM2-135M: 64 windows 27.479, 256 windows 26.846),
#: for ~2.5 more minutes of calibration.
CALIB_SAMPLES = 256

#: Since the index tensors went int16 (0.054 bits/weight freed), the down projections of blocks 24-29 get 4 bits
#: too: with 1024 calibration and tuning windows 24.596 at 3.990 bits/weight, against 24.681 at 3.944 without
#: them and 24.722 at 3.990 for the up projections of blocks 10-15 instead (docs/spqr-bit-allocation.md).
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
        "group_size": Option(int, 16, "β1: weights per first-level scale/zero along K (multiple of 16)"),
        "stat_bits": Option(int, 3, "bits of each quantized first-level scale and zero", choices=tuple(range(1, 9))),
        "stat_group": Option(int, 16, "β2: output rows sharing one fp16 second-level step/min"),
        "outlier_threshold": Option(float, outlier_threshold,
                                    "keep a weight in fp16 when its saliency exceeds this times the layer's "
                                    "typical saliency (inf: no outliers)"),
        "act_order": Option(bool, True, "process and store columns by decreasing Hessian diagonal (op gathers X)"),
        "damp": Option(float, 0.01, "damping added to the Hessian diagonal, relative to its mean"),
        "block_size": Option(int, 128, "columns per lazy GPTQ update block"),
        "loo_outliers": Option(bool, True, "leave-one-out screening keeps likely outliers out of group ranges"),
        "range_search": Option(bool, True, "per row, shrink a group's range when that lowers its weighted error"),
        **finetune_options(lr=1e-3, scale_lr=1e-3, windows=finetune_windows),  # on by default: see qcompile.finetune
    }


def tune_spqr(source: Any, quantized: dict[str, QuantizedWeight], calib: np.ndarray, opts: dict[str, Any],
              device: str, progress: bool, float_names: set[str] | None = None
              ) -> tuple[dict[str, QuantizedWeight], dict[str, np.ndarray], dict[str, Any]] | None:
    """The format's whole-model step: the fp16 statistics and outlier values of every SpQR layer tuned by
    :func:`qcompile.finetune.tune_format_layers`; every code and outlier position stays as it is."""
    from qcompile.spqr_finetune import SpQRLinear

    layers = {n: q for n, q in quantized.items() if isinstance(q, SpQRQuantizedWeight)}

    def from_module(q: SpQRQuantizedWeight, mod: SpQRLinear) -> SpQRQuantizedWeight:
        attrs = {a: v for a, v in q.attrs.items() if a not in ("K", "N")}
        return SpQRQuantizedWeight(q.format_name, k=q.k, n=q.n, **attrs, tensors={**q.tensors, **mod.stored()})

    return tune_format_layers(source, calib, opts, progress, float_names, layers,
                              lambda q: SpQRLinear(q.tensors, **q.attrs), from_module, desc="spqr finetune")


def _register(name: str, bits: int, outlier_threshold: float, finetune_windows: int = 256,
              layer_options: tuple[LayerOverride, ...] = ()) -> None:
    def quantize(weight_kn, hessian, **opts):
        return quantize_spqr(weight_kn, hessian, name=name, **opts)

    register(Format(
        name=name,
        description=f"SpQR: {bits}-bit codes in groups of 16"
                    f"{' (4-bit where -L says so)' if layer_options else ''}, 3-bit bi-level statistics, fp16 "
                    "outliers (CSR); then the fp16 side parameters and norms are fine-tuned against the float "
                    "model (finetune_*)",
        runtime="qcompile_ops custom-op library (qcompile.SpQRMatMul)",
        quantize=quantize,
        options=_options(bits, outlier_threshold, finetune_windows),
        needs_calibration=True,
        emits=("native", "simulated", "portable"),
        tune=tune_spqr,
        calib_samples=CALIB_SAMPLES,
        layer_options=layer_options,
    ))


for _name, _preset in PRESETS.items():
    _register(_name, **_preset)
