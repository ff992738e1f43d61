"""The FP4 formats' packed weight and its lowerings: ``qcompile.FP4MatMul`` (native) or standard ONNX ops
(portable).

Storage / cost: ``packed()`` is exactly what FP4MatMul reads: W ``uint8[N, Kp/2]`` (two codes a byte,
even k in the low nibble), scales ``uint8[N, Kp/G]`` and, for NVFP4, ``tensor_scale float32[1]``: 4.25
bits per weight for MXFP4, 4.5 (+32 bits a tensor) for NVFP4.

The **portable** lowering stores the same bytes and dequantizes in-graph with standard ONNX ops
(Cast + 256-entry LUT Gathers for nibble pairs and scales, Mul, Reshape, Slice, Transpose, then MatMul;
the Hadamard of X is Reshape → MatMul with a constant H_b → Reshape). The file stays small (same bytes as
native plus ~3 KB of LUTs per layer), but the dequantized ``[K, N]`` weight is materialized at run time:
4 bytes per weight in fp32 (2 in fp16), plus a transient int32 index copy of W (2 bytes per weight) while
it is built. ONNX Runtime constant-folds the subgraph at session creation (all its inputs are
initializers), so a portable model resides in memory like the float model; it buys portability, not
memory or speed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.formats.base import Lowered, QuantizedWeight
from qcompile.formats.fp4 import reference as ref

OPS_DOMAIN = "qcompile"


@dataclasses.dataclass(frozen=True)
class FP4Spec:
    """One FP4 grid: group size along K, how group scales are stored, and whether a tensor scale is."""

    grid: str
    group_size: int
    scale_format: str  # "e8m0" | "e4m3"
    tensor_scale: bool


MXFP4 = FP4Spec("mxfp4", 32, "e8m0", False)
NVFP4 = FP4Spec("nvfp4", 16, "e4m3", True)
SPECS = {s.grid: s for s in (MXFP4, NVFP4)}

MXFP4 = FP4Spec("mxfp4", 32, "e8m0", False)
NVFP4 = FP4Spec("nvfp4", 16, "e4m3", True)
SPECS = {s.grid: s for s in (MXFP4, NVFP4)}


class FP4QuantizedWeight(QuantizedWeight):
    """E2M1 codes + per-group scales (+ tensor scale), possibly in a Hadamard-rotated basis."""

    accuracy_level = 0  # the op attribute (format option); not part of the weight

    def __init__(self, name: str, spec: FP4Spec, codes_nk: np.ndarray, scale_codes: np.ndarray,
                 tensor_scale: float | None, hadamard_block: int = 0, requested_block: int | None = None):
        n, k = codes_nk.shape
        ng = ref.padded_k(k, spec.group_size) // spec.group_size
        if scale_codes.shape != (n, ng):
            raise FormatError(f"{name}: scales shape {scale_codes.shape} != [N, Kp/G] = [{n}, {ng}]")
        if spec.tensor_scale != (tensor_scale is not None):
            raise FormatError(f"{name}: tensor_scale {'missing' if spec.tensor_scale else 'not allowed'} for {spec.grid}")
        if hadamard_block and k % hadamard_block:
            raise FormatError(f"{name}: hadamard_block {hadamard_block} does not divide K={k}")
        self.format_name = name
        self.spec = spec
        self.codes = np.ascontiguousarray(codes_nk, dtype=np.uint8)
        self.scale_codes = np.ascontiguousarray(scale_codes, dtype=np.uint8)
        self.tensor_scale = None if tensor_scale is None else np.float32(tensor_scale)
        self.hadamard_block = int(hadamard_block)
        self.requested_block = self.hadamard_block if requested_block is None else int(requested_block)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return k, n

    def packed(self) -> dict[str, np.ndarray]:
        out = {"W": ref.pack_fp4(self.codes, self.spec.group_size), "scales": self.scale_codes.copy()}
        if self.tensor_scale is not None:
            out["tensor_scale"] = np.array([self.tensor_scale], dtype=np.float32)
        return out

    def attributes(self) -> dict[str, Any]:
        k, n = self.shape
        return {"K": k, "N": n, "group_size": self.spec.group_size, "scale_format": self.spec.scale_format,
                "hadamard_block": self.hadamard_block,
                **({"accuracy_level": self.accuracy_level} if self.accuracy_level else {})}

    def dequantize_stored_nk(self) -> np.ndarray:
        """The stored (rotated when hadamard_block > 0) weight ``[N, K]`` from the packed bytes."""
        p = self.packed()
        k, _ = self.shape
        return ref.dequantize_fp4(p["W"], p["scales"], p.get("tensor_scale"), k, self.spec.group_size,
                                  self.spec.scale_format)

    def dequantize_stored(self) -> np.ndarray:
        """``[K, N]`` float32 of the weight as stored, i.e. in the rotated basis the op multiplies with."""
        return np.ascontiguousarray(self.dequantize_stored_nk().T)

    def dequantize(self) -> np.ndarray:
        """``[K, N]`` float32 the model effectively uses: the stored weight with the rotation undone
        (``W_rot @ Rᵀ``), so it is directly comparable with the float weight."""
        w = self.dequantize_stored_nk()
        if self.hadamard_block:
            w = ref.hadamard_transform(w.astype(np.float64), self.hadamard_block).astype(np.float32)
        return np.ascontiguousarray(w.T)

    def lower_native(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        inits = [numpy_helper.from_array(a, f"{prefix}.{key}") for key, a in self.packed().items()]
        node = helper.make_node("FP4MatMul", [x] + [t.name for t in inits], [y], name=f"{prefix}.FP4MatMul",
                                domain=OPS_DOMAIN, **self.attributes())
        return Lowered([node], inits, {OPS_DOMAIN: 1})

    def lower_portable(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        k, n = self.shape
        g = self.spec.group_size
        kp = ref.padded_k(k, g)
        p = self.packed()
        t = lambda s: f"{prefix}.{s}"  # noqa: E731
        pairs = np.stack([ref.decode_e2m1(np.arange(256) & 0xF), ref.decode_e2m1(np.arange(256) >> 4)], axis=1)
        scale_lut = ref.decode_scales(np.arange(256, dtype=np.uint8), self.spec.scale_format)  # NaN codes stay NaN
        consts = {
            "W": p["W"], "scales": p["scales"],
            "e2m1_pair_lut": pairs.astype(np.float32), "scale_lut": scale_lut,
            "shape_groups": np.array([n, kp // g, g], dtype=np.int64),
            "shape_scales": np.array([n, kp // g, 1], dtype=np.int64),
            "shape_rows": np.array([n, kp], dtype=np.int64),
        }
        if "tensor_scale" in p:
            consts["tensor_scale"] = p["tensor_scale"]
        nodes = [
            helper.make_node("Cast", [t("W")], [t("W_idx")], to=TensorProto.INT32),
            helper.make_node("Gather", [t("e2m1_pair_lut"), t("W_idx")], [t("W_pairs")], axis=0),  # [N, Kp/2, 2]
            helper.make_node("Reshape", [t("W_pairs"), t("shape_groups")], [t("W_vals")]),  # [N, Kp/G, G]
            helper.make_node("Cast", [t("scales")], [t("scales_idx")], to=TensorProto.INT32),
            helper.make_node("Gather", [t("scale_lut"), t("scales_idx")], [t("scales_f")], axis=0),
            helper.make_node("Reshape", [t("scales_f"), t("shape_scales")], [t("scales_b")]),  # [N, Kp/G, 1]
            helper.make_node("Mul", [t("W_vals"), t("scales_b")], [t("W_grp")]),
        ]
        last = t("W_grp")
        if "tensor_scale" in p:
            nodes.append(helper.make_node("Mul", [last, t("tensor_scale")], [t("W_ts")]))
            last = t("W_ts")
        nodes.append(helper.make_node("Reshape", [last, t("shape_rows")], [t("W_rows")]))  # [N, Kp]
        last = t("W_rows")
        if kp != k:
            consts.update({"slice_start": np.array([0], np.int64), "slice_end": np.array([k], np.int64),
                           "slice_axis": np.array([1], np.int64)})
            nodes.append(helper.make_node("Slice", [last, t("slice_start"), t("slice_end"), t("slice_axis")],
                                          [t("W_nk")]))
            last = t("W_nk")
        nodes.append(helper.make_node("Transpose", [last], [t("W_kn")], perm=[1, 0]))
        last = t("W_kn")
        if dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [last], [t("W_kn_cast")], to=dtype))
            last = t("W_kn_cast")
        xin = x
        if self.hadamard_block:
            b = self.hadamard_block
            consts["hadamard"] = ref.hadamard_matrix(b).astype(helper.tensor_dtype_to_np_dtype(dtype))
            consts["shape_xblocks"] = np.array([-1, k // b, b], dtype=np.int64)
            nodes += [
                helper.make_node("Shape", [x], [t("x_shape")]),
                helper.make_node("Reshape", [x, t("shape_xblocks")], [t("x_blocks")]),
                helper.make_node("MatMul", [t("x_blocks"), t("hadamard")], [t("x_blocks_rot")]),
                helper.make_node("Reshape", [t("x_blocks_rot"), t("x_shape")], [t("x_rot")]),
            ]
            xin = t("x_rot")
        nodes.append(helper.make_node("MatMul", [xin, last], [y], name=f"{prefix}.MatMul"))
        for i, nd in enumerate(nodes[:-1]):
            nd.name = f"{prefix}.{nd.op_type}.{i}"
        inits = [numpy_helper.from_array(a, t(key)) for key, a in consts.items()]
        return Lowered(nodes, inits, {})

    def extra_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"grid": self.spec.grid, "group_size": self.spec.group_size,
                               "scale_format": self.spec.scale_format, "hadamard_block": self.hadamard_block}
        if self.requested_block != self.hadamard_block:
            out["hadamard_block_requested"] = self.requested_block
        if self.tensor_scale is not None:
            out["tensor_scale"] = float(self.tensor_scale)
        return out
