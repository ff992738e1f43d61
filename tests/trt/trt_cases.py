"""Real qcompile op nodes for the TensorRT plugin tests, and the case file the C++ harness reads.

Each layer is a small random weight quantized by a registered format and lowered with ``lower_native``
(so attributes and tensors are exactly what ``qcompile compile`` writes), rewritten for TensorRT by
:func:`qcompile.engine.to_tensorrt_onnx`, and turned into plugin fields as TensorRT's ONNX parser does
(:func:`parser_fields`, after onnx-tensorrt's ``loadFields``: INT attributes as kINT32, STRING as kCHAR
with a trailing NUL, TENSOR attributes in their element type).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.engine import to_tensorrt_onnx, weight_inputs
from qcompile.formats import get_format
from qcompile.formats.aqlm.weight import CodebookQuantizedWeight
from qcompile.formats.aqlm import reference as cb_ref
from qcompile.formats.fp4 import reference as fp4_ref
from qcompile.formats.spqr import reference as spqr_ref

# nvinfer1::PluginFieldType values
kFLOAT16, kFLOAT32, kFLOAT64, kINT8, kINT16, kINT32, kCHAR, kDIMS, kUNKNOWN, kBF16, kINT64 = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
_TENSOR_FIELD_TYPE = {TensorProto.FLOAT: kFLOAT32, TensorProto.INT8: kINT8, TensorProto.INT16: kINT16,
                      TensorProto.INT32: kINT32, TensorProto.FLOAT16: kFLOAT16, TensorProto.DOUBLE: kFLOAT64}
_NP_FIELD_TYPE = {np.dtype(np.float32): kFLOAT32, np.dtype(np.int8): kINT8, np.dtype(np.int16): kINT16,
                  np.dtype(np.int32): kINT32, np.dtype(np.float16): kFLOAT16, np.dtype(np.int64): kINT64,
                  np.dtype(np.float64): kFLOAT64}

# Required fields per plugin (docs/ops.md: attributes without a default, non-optional inputs).
REQUIRED = {
    "FP4MatMul": ("K", "N", "group_size", "scale_format", "W", "scales"),
    "SpQRMatMul": ("K", "N", "bits", "codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values"),
    "CodebookMatMul": ("K", "N", "num_codebooks", "codebook_size", "codes", "codebooks", "scales"),
}


@dataclasses.dataclass
class Field:
    name: str
    type: int  # PluginFieldType
    length: int
    data: bytes


@dataclasses.dataclass
class Case:
    name: str
    plugin: str
    K: int
    N: int
    fields: list[Field]
    x: np.ndarray | None = None  # [M, K] float32
    y: np.ndarray | None = None  # reference for float32 X
    y16: np.ndarray | None = None  # reference for X rounded to float16
    workspace: tuple[int, int] | None = None  # (rows, bytes) getWorkspaceSize must give for X max [rows, K]
    expect_error: str = ""

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def array(self, name: str) -> np.ndarray:
        f = self.field(name)
        dt = {kFLOAT32: np.float32, kINT8: np.int8, kINT16: np.int16, kINT32: np.int32, kFLOAT16: np.float16,
              kINT64: np.int64}[f.type]
        return np.frombuffer(f.data, dtype=dt).copy()

    def bad(self, suffix: str, expect: str, **changes: Field | np.ndarray | int | str | None) -> "Case":
        """A copy whose named fields are replaced (an ndarray, int or str becomes a field as the parser would
        make it; None removes the field), expected to be refused with a message containing ``expect``."""
        fields = {f.name: f for f in self.fields}
        for k, v in changes.items():
            if v is None:
                fields.pop(k, None)
            else:
                fields[k] = v if isinstance(v, Field) else make_field(k, v)
        return Case(f"{self.name}.{suffix}", self.plugin, self.K, self.N, list(fields.values()), expect_error=expect)


def make_field(name: str, value: np.ndarray | int | str) -> Field:
    if isinstance(value, str):
        data = value.encode() + b"\0"
        return Field(name, kCHAR, len(data), data)
    if isinstance(value, (int, np.integer)):
        return Field(name, kINT32, 1, np.array([value], np.int32).tobytes())
    arr = np.ascontiguousarray(value)
    return Field(name, _NP_FIELD_TYPE[arr.dtype], arr.size, arr.tobytes())


def parser_fields(node: onnx.NodeProto) -> list[Field]:
    """The fields TensorRT's ONNX parser hands the plugin for a rewritten node (every attribute the
    creator names; plugin_namespace / plugin_version only select the creator)."""
    out = []
    for a in node.attribute:
        if a.name in ("plugin_namespace", "plugin_version"):
            continue
        if a.type == onnx.AttributeProto.INT:
            out.append(Field(a.name, kINT32, 1, np.array([a.i], np.int32).tobytes()))
        elif a.type == onnx.AttributeProto.STRING:
            out.append(Field(a.name, kCHAR, len(a.s) + 1, a.s + b"\0"))
        elif a.type == onnx.AttributeProto.TENSOR:
            arr = numpy_helper.to_array(a.t)
            out.append(Field(a.name, _TENSOR_FIELD_TYPE[a.t.data_type], arr.size, np.ascontiguousarray(arr).tobytes()))
        else:
            raise AssertionError(f"attribute {a.name} of type {a.type} is no plugin field")
    return out


def lowered_model(q, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node model ``y = x @ W`` from a quantized weight's native lowering."""
    k, n = q.shape
    low = q.lower_native("x", "y", "layer", dtype)
    graph = helper.make_graph(low.nodes, "g", [helper.make_tensor_value_info("x", dtype, ["m", k])],
                              [helper.make_tensor_value_info("y", dtype, ["m", n])], low.initializers)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in low.opset_imports.items()]
    return helper.make_model(graph, opset_imports=opsets)


def _hessian(rng: np.random.Generator, k: int) -> torch.Tensor:
    x = rng.standard_normal((256, k)).astype(np.float32)
    return torch.from_numpy(x.T @ x)


def _quantize(fmt: str, w: np.ndarray, h: torch.Tensor | None, **opts):
    f = get_format(fmt)
    return f.quantize(w, h, device="cpu", **f.resolve_options(opts))


def _with_reference(case: Case, ref, rng: np.random.Generator, rows: int = 33) -> Case:
    """Adds X and the float32 / float16-input references; ``ref(x)`` computes Y from float32 X."""
    x = rng.standard_normal((rows, case.K)).astype(np.float32)
    case.x = x
    case.y = np.asarray(ref(x), np.float32)
    case.y16 = np.asarray(ref(x.astype(np.float16).astype(np.float32)), np.float32)
    return case


def _case(name: str, model: onnx.ModelProto, extra: dict[str, np.ndarray] | None = None) -> Case:
    trt_model = to_tensorrt_onnx(model)
    (node,) = trt_model.graph.node
    fields = parser_fields(node)
    for k, v in (extra or {}).items():  # e.g. a bias, which no compiled model has but the op allows
        fields.append(make_field(k, v))
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    return Case(name, node.op_type, attrs["K"], attrs["N"], fields)


def fp4_cases(rng: np.random.Generator) -> list[Case]:
    k, n = 128, 40
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    q = _quantize("mxfp4-mr", w, _hessian(rng, k))  # E8M0 scales, G=32, Hadamard block 32
    c = _case("fp4_mxfp4_mr", lowered_model(q))
    attrs = {key: c.array(key)[0] for key in ("K", "N", "group_size", "hadamard_block")}
    w_u8, s_u8 = c.array("W").view(np.uint8).reshape(n, -1), c.array("scales").view(np.uint8).reshape(n, -1)
    _with_reference(c, lambda x: fp4_ref.fp4_matmul_reference(
        x, w_u8, s_u8, K=k, N=n, group_size=int(attrs["group_size"]), scale_format="e8m0",
        hadamard_block=int(attrs["hadamard_block"])), rng)
    c.workspace = (64, 64 * k * 4)  # the rotated X, float32

    q2 = _quantize("nvfp4-rtn", w, None)  # E4M3 scales, G=16, tensor_scale, no rotation
    bias = (rng.standard_normal(n) * 0.1).astype(np.float16)
    c2 = _case("fp4_nvfp4_bias", lowered_model(q2), {"bias": bias})
    ts = c2.array("tensor_scale")
    w2, s2 = c2.array("W").view(np.uint8).reshape(n, -1), c2.array("scales").view(np.uint8).reshape(n, -1)
    _with_reference(c2, lambda x: fp4_ref.fp4_matmul_reference(
        x, w2, s2, ts, bias.astype(np.float32), K=k, N=n, group_size=16, scale_format="e4m3"), rng)
    c2.workspace = (64, 0)

    bad = [
        c.bad("group_size_12", "group_size must be a power of two", group_size=12),
        c.bad("scale_format", 'scale_format must be "e8m0" or "e4m3", got "e5m2"', scale_format="e5m2"),
        c.bad("hadamard_24", "hadamard_block must be 0 or a power of two", hadamard_block=24),
        c.bad("hadamard_256", "hadamard_block 256 does not divide K=128", hadamard_block=256),
        c.bad("k_zero", "K and N must be positive", K=0),
        c.bad("w_short", "W shape must be [N, Kp/2] = [40, 64]", W=c.array("W")[:-1]),
        c.bad("scales_rows", "scales shape must be [N, Kp/G] = [40, 4]", scales=c.array("scales")[:-4]),
        c.bad("w_int16", "field W must be kINT8, got kINT16", W=c.array("W").view(np.int16)),
        c.bad("no_scale_format", "required field scale_format is missing", scale_format=None),
        c2.bad("tensor_scale_2", "tensor_scale must hold exactly 1 element", tensor_scale=np.ones(2, np.float32)),
        c2.bad("bias_short", "bias shape must be [N] = [40]", bias=bias[:-1]),
        c2.bad("bias_int32", "field bias must be kFLOAT32 or kFLOAT16, got kINT32", bias=np.zeros(n, np.int32)),
    ]
    return [c, c2] + bad


def spqr_cases(rng: np.random.Generator) -> list[Case]:
    k, n = 128, 48
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[rng.integers(0, k, 40), rng.integers(0, n, 40)] += 0.8  # outliers for the CSR table
    q = _quantize("spqr-w3", w, _hessian(rng, k), outlier_threshold=0.2)
    assert q.nnz > 0 and "perm" in q.tensors
    assert q.tensors["col_indices"].dtype == np.int16 and q.tensors["perm"].dtype == np.int16  # the compiler's
    c = _case("spqr_w3", lowered_model(q))
    attrs = dict(K=k, N=n, bits=3, group_size=16, stat_bits=3, stat_group=16)
    t = {key: c.array(key) for key in weight_inputs()["SpQRMatMul"] if key != "bias"}
    assert t["col_indices"].dtype == np.int32 and t["perm"].dtype == np.int32  # widened for the ONNX parser

    def ref(x, t=t, bias=None):
        return spqr_ref.spqr_matmul_reference(
            x, t["codes"].reshape(n, -1), t["stat_codes"].reshape(n, -1), t["stat_params"].reshape(-1, 4, k // 16),
            t["row_offsets"], t["col_indices"], t["values"], t["perm"], bias, **attrs)

    _with_reference(c, ref, rng)
    c.workspace = (64, 0)

    # int16 index tensors (as the compiler stores them; a direct createPlugin can pass them) and a float32 bias
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    t16 = dict(t, row_offsets=t["row_offsets"].astype(np.int16), col_indices=t["col_indices"].astype(np.int16),
               perm=t["perm"].astype(np.int16))
    fields16 = [make_field(f.name, t16[f.name]) if f.name in ("row_offsets", "col_indices", "perm") else f
                for f in c.fields] + [make_field("bias", bias)]
    c16 = Case("spqr_w3_int16_bias", "SpQRMatMul", k, n, fields16)
    _with_reference(c16, lambda x: ref(x, t16, bias), rng)

    ci, perm, ro = t["col_indices"], t["perm"], t["row_offsets"]
    nnz = ci.size
    dup = perm.copy()
    dup[1] = dup[0]
    dec = ro.copy()
    r = int(np.argmax(np.diff(ro.astype(np.int64)) > 0))  # a row with outliers: lower its end below its start
    dec[r + 1] = dec[r] - 1
    last = ro.copy()
    last[-1] = nnz + 1  # still non-decreasing: only the total is wrong
    first = ro.copy()
    first[0] = 1
    bad = [
        c.bad("col_eq_k", f"col_indices[3] = {k} is outside [0, K={k})", col_indices=_set(ci, 3, k)),
        c16.bad("col16_eq_k", f"col_indices[2] = {k} is outside [0, K={k})",
                col_indices=_set(t16["col_indices"], 2, k)),
        c16.bad("perm16_repeat", "perm is not a permutation of 0..K-1", perm=_set(t16["perm"], 7, t16["perm"][3])),
        c.bad("col_negative", f"col_indices[0] = -1 is outside [0, K={k})", col_indices=_set(ci, 0, -1)),
        c.bad("perm_repeat", f"perm is not a permutation of 0..K-1 ({perm[0]} repeats)", perm=dup),
        c.bad("perm_eq_k", f"perm[5] = {k} is outside [0, K={k})", perm=_set(perm, 5, k)),
        c.bad("perm_negative", f"perm[0] = -1 is outside [0, K={k})", perm=_set(perm, 0, -1)),
        c.bad("perm_short", f"perm shape must be [K] = [{k}]", perm=perm[:-1]),
        c.bad("offsets_decrease", "row_offsets must be non-decreasing", row_offsets=dec),
        c.bad("offsets_first", "row_offsets[0] must be 0, got 1", row_offsets=first),
        c.bad("offsets_last", f"row_offsets[N] = {nnz + 1} but col_indices/values hold {nnz} outliers",
              row_offsets=last),
        c.bad("values_short", "values shape", values=t["values"][:-1]),
        c.bad("bits_5", "bits must be 3 or 4, got 5", bits=5),
        c.bad("bits_wide", "field bits = 4294967299 is outside int32",
              bits=Field("bits", kINT64, 1, np.array([(1 << 32) + 3], np.int64).tobytes())),
        c.bad("group_24", "group_size must be a positive multiple of 16, got 24", group_size=24),
        c.bad("stat_bits_9", "stat_bits must be in 1..8, got 9", stat_bits=9),
        c.bad("stat_params_f32", "field stat_params must be kFLOAT16, got kFLOAT32",
              stat_params=t["stat_params"].astype(np.float32)),
        c.bad("codes_short", "codes shape must be [N, ceil(K/32)*bits]", codes=t["codes"][:-3]),
        c.bad("no_row_offsets", "required field row_offsets is missing", row_offsets=None),
        c.bad("unknown_field", "unknown field 'tensor_scale'", tensor_scale=np.ones(1, np.float32)),
    ]
    return [c, c16] + bad


def _set(a: np.ndarray, i: int, v: int) -> np.ndarray:
    b = a.copy()
    b[i] = v
    return b


def codebook_cases(rng: np.random.Generator) -> list[Case]:
    k, n = 64, 32
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    q = _quantize("aqlm-2x8", w, _hessian(rng, k), rounds=1, kmeans_iters=4, beam_size=2)
    c = _case("aqlm_2x8", lowered_model(q))
    assert c.field("codes").type == kINT8  # uint8 codes reinterpreted

    def ref_of(qw, scales=None, bias=None):
        return lambda x: cb_ref.codebook_matmul(x, qw.codes, qw.codebooks, qw.scales if scales is None else scales,
                                                bias, **qw.attributes())

    _with_reference(c, ref_of(q), rng)
    c.workspace = (64, 0)

    # 128 codewords (codes uint8 with a limit below 256) with float32 scales and a bias
    q7 = _quantize("aqlm-2x8", w, _hessian(rng, k), nbits=7, rounds=1, kmeans_iters=4, beam_size=2)
    scales32 = q7.scales.astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    c7 = _case("aqlm_2x7_f32scales_bias", lowered_model(q7), {"bias": bias})
    c7.fields = [make_field("scales", scales32) if f.name == "scales" else f for f in c7.fields]
    _with_reference(c7, ref_of(q7, scales32, bias), rng)

    # 300 codewords: uint16 codes, from a synthetic weight of that geometry. Through the ONNX parser they
    # arrive as int32 values; a direct createPlugin can pass their 16 bits as kINT16.
    m16, s16 = 1, 300
    codes = rng.integers(0, s16, size=(n, k // 8, m16)).astype(np.uint16)
    codes[0, 0, 0] = 299
    books = (rng.standard_normal((m16, s16, 8)) * 0.1).astype(np.float16)
    q16 = CodebookQuantizedWeight("aqlm-synthetic", codes, books, (rng.random(n) + 0.5).astype(np.float16))
    c16 = _case("codebook_uint16_codes", lowered_model(q16))
    assert c16.field("codes").type == kINT32
    _with_reference(c16, ref_of(q16), rng)
    c16b = Case("codebook_uint16_codes_int16", "CodebookMatMul", k, n,
                [make_field("codes", codes.view(np.int16)) if f.name == "codes" else f for f in c16.fields])
    _with_reference(c16b, ref_of(q16), rng)

    codes7 = c7.array("codes")
    bad = [
        c7.bad("code_out_of_range", "code 200 at [0, 1, 1] is out of range for codebook_size=128",
               codes=_set(codes7.view(np.uint8), 3, 200).view(np.int8)),  # flat 3 = [n 0, group 1, codebook 1]
        c16b.bad("code16_out_of_range", "code 300 at [1, 0, 0] is out of range for codebook_size=300",
                 codes=_set(codes.view(np.uint16).reshape(-1), k // 8, 300).view(np.int16)),
        c16.bad("code32_out_of_range", "code 300 at [1, 0, 0] is out of range for codebook_size=300",
                codes=_set(c16.array("codes"), k // 8, 300)),
        c16.bad("code32_wraps_to_valid", "code 65541 at [0, 2, 0] is out of range for codebook_size=300",
                codes=_set(c16.array("codes"), 2, 65536 + 5)),  # would narrow to the valid code 5
        c16.bad("code32_negative", "code -1 at [0, 0, 0] is out of range for codebook_size=300",
                codes=_set(c16.array("codes"), 0, -1)),
        c16.bad("code32_short", "codes shape must be [N, K/in_group_size, num_codebooks]",
                codes=c16.array("codes")[:-1]),
        c.bad("codebooks_16", "num_codebooks must be in 1..16, got 17", num_codebooks=17),
        c.bad("group_3", "K=64 must be a multiple of in_group_size=3", in_group_size=3),
        c.bad("codes_int16", "field codes must be kINT16 or kINT32, got kINT8", codebook_size=300),
        c16.bad("codes_int8", "field codes must be kINT8, got kINT32", codebook_size=256),
        c.bad("codebooks_short", "codebooks shape must be [num_codebooks, codebook_size, in_group_size]",
              codebooks=c.array("codebooks")[:-8]),
        c.bad("scales_int32", "field scales must be kFLOAT16 or kFLOAT32, got kINT32", scales=np.ones(n, np.int32)),
        c.bad("no_codes", "required field codes is missing", codes=None),
    ]
    return [c, c7, c16, c16b] + bad


def all_cases(seed: int = 0) -> dict[str, list[Case]]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    return {"FP4MatMul": fp4_cases(rng), "SpQRMatMul": spqr_cases(rng), "CodebookMatMul": codebook_cases(rng)}


def write_cases(path: Path, cases: list[Case]) -> None:
    """The harness's case file (format: custom_ops/trt/tests/harness.cpp, read_cases)."""
    with open(path, "wb") as f:
        def matrix(tag: str, m: np.ndarray | None) -> None:
            if m is not None:
                m = np.ascontiguousarray(m, np.float32)
                f.write(f"{tag} {m.shape[0]} {m.shape[1]}\n".encode() + m.tobytes() + b"\n")

        for c in cases:
            f.write(f"case {c.name} {c.plugin} {c.K} {c.N}\n".encode())
            f.write(("required " + " ".join(REQUIRED[c.plugin]) + "\n").encode())
            for fl in c.fields:
                f.write(f"field {fl.name} {fl.type} {fl.length} {len(fl.data)}\n".encode() + fl.data + b"\n")
            if c.workspace:
                f.write(f"workspace {c.workspace[0]} {c.workspace[1]}\n".encode())
            matrix("x", c.x)
            matrix("y", c.y)
            matrix("y16", c.y16)
            if c.expect_error:
                f.write(f"expect_error {c.expect_error}\n".encode())
            f.write(b"end\n")
