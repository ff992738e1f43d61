"""SpQR's packed weight (exactly the tensors ``qcompile.SpQRMatMul`` stores, so bits per weight count the
statistics, the permutation and every byte of the outlier table; layout: :mod:`qcompile.formats.spqr.reference`)
and its native and portable lowerings."""
from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.formats.base import Lowered, QuantizedWeight
from qcompile.formats.spqr import reference as ref

OP_DOMAIN = "qcompile"
OP_TYPE = "SpQRMatMul"
OP_VERSION = 1


class SpQRQuantizedWeight(QuantizedWeight):
    """A SpQR weight held as the op's packed tensors plus the attributes that describe them."""

    accuracy_level = 0  # the op attribute (format option); not part of the weight

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
    def from_result(cls, name: str, res, cfg) -> "SpQRQuantizedWeight":
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
        level = {"accuracy_level": self.accuracy_level} if self.accuracy_level else {}
        node = helper.make_node(OP_TYPE, [x] + names, [y], name=f"{prefix}.{OP_TYPE}", domain=OP_DOMAIN,
                                **self.attrs, **level)
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
