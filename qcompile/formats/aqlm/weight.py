"""AQLM codebook formats (``aqlm-2x8``, ``aqlm-1x16``, ``aqlm-1x8``) lowered to ``qcompile.CodebookMatMul``.

Each group of ``in_group_size`` (8) consecutive input weights of an output row is ``scale[n]`` times the
sum of M codewords, one from each of M codebooks of ``2^B`` entries shared by the layer. Stored tensors
(exactly what the op reads, so bits per weight includes the codebooks and the scales):

* codes ``[N, K/8, M]``: uint8 when ``B <= 8``, uint16 when ``B <= 16`` (byte-aligned, no bit packing);
* codebooks ``[M, 2^B, 8]`` float16;
* scales ``[N]`` float16.

Codes cost ``M*B/8`` bits per weight (2 for 2x8); codebooks are a per-layer constant (8 KiB for 2x8,
1 MiB for 1x16), so 1x16 only pays off on layers far wider than the default model's. The numerics are in
:mod:`qcompile.formats.aqlm.numerics`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.formats.aqlm import reference as ref
from qcompile.formats.base import Lowered, QuantizedWeight

OP_DOMAIN = "qcompile"
OP_NAME = "CodebookMatMul"
OP_VERSION = 1


class CodebookQuantizedWeight(QuantizedWeight):
    """An additive-codebook weight: codes, shared codebooks, per-output-channel scales."""

    accuracy_level = 0  # the op attribute (format option); not part of the weight

    def __init__(self, name: str, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
                 history: list[tuple[str, float]] | None = None):
        n, g, m = codes.shape
        m2, size, d = codebooks.shape
        if m2 != m or scales.shape != (n,):
            raise FormatError(f"inconsistent codebook weight: codes {codes.shape}, codebooks {codebooks.shape}, "
                              f"scales {scales.shape}")
        self.format_name = name
        self.codes = np.ascontiguousarray(codes.astype(ref.code_dtype(size)))
        self.codebooks = np.ascontiguousarray(codebooks.astype(np.float16))
        self.scales = np.ascontiguousarray(scales.astype(np.float16))
        self.history = list(history or [])
        ref.validate(None, self.codes, self.codebooks, self.scales, None, **self.attributes())

    # -- geometry ---------------------------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def in_group_size(self) -> int:
        return int(self.codebooks.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        n, g, _ = self.codes.shape
        return g * self.in_group_size, n

    def attributes(self) -> dict[str, int]:
        k, n = self.shape
        return {"K": k, "N": n, "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size,
                "in_group_size": self.in_group_size}

    # -- contract ---------------------------------------------------------------------------------------
    def packed(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "codebooks": self.codebooks, "scales": self.scales}

    def dequantize(self) -> np.ndarray:
        return ref.dequantize(self.codes, self.codebooks, self.scales).T.copy()

    def lower_native(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        _check_dtype(dtype)
        inits = [numpy_helper.from_array(arr, f"{prefix}.{key}") for key, arr in self.packed().items()]
        level = {"accuracy_level": self.accuracy_level} if self.accuracy_level else {}
        node = helper.make_node(OP_NAME, [x] + [t.name for t in inits], [y], name=f"{prefix}.{OP_NAME}",
                                domain=OP_DOMAIN, **self.attributes(), **level)
        return Lowered([node], inits, {OP_DOMAIN: OP_VERSION})

    def lower_portable(self, x: str, y: str, prefix: str, dtype: int) -> Lowered:
        """Standard ONNX: Gather codewords (codes offset per codebook), ReduceSum, × scale, MatMul.

        The codes stay in their stored dtype (Cast to int64 in-graph) so the file is as small as native.
        """
        _check_dtype(dtype)
        k, n = self.shape
        m, size, d = self.codebooks.shape
        p = f"{prefix}.cbq"
        inits = [
            numpy_helper.from_array(self.codes, f"{prefix}.codes"),
            numpy_helper.from_array(self.codebooks.reshape(m * size, d), f"{prefix}.codebooks"),
            numpy_helper.from_array(self.scales.reshape(n, 1), f"{prefix}.scales"),
            numpy_helper.from_array((np.arange(m, dtype=np.int64) * size), f"{p}.offsets"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), f"{p}.axis_m"),
            numpy_helper.from_array(np.array([n, k], dtype=np.int64), f"{p}.shape_nk"),
        ]
        f32 = TensorProto.FLOAT
        nodes = [
            helper.make_node("Cast", [f"{prefix}.codes"], [f"{p}.codes64"], to=TensorProto.INT64, name=f"{p}.cast_codes"),
            helper.make_node("Add", [f"{p}.codes64", f"{p}.offsets"], [f"{p}.idx"], name=f"{p}.offset"),
            helper.make_node("Cast", [f"{prefix}.codebooks"], [f"{p}.cb32"], to=f32, name=f"{p}.cast_cb"),
            helper.make_node("Gather", [f"{p}.cb32", f"{p}.idx"], [f"{p}.words"], axis=0, name=f"{p}.gather"),
            helper.make_node("ReduceSum", [f"{p}.words", f"{p}.axis_m"], [f"{p}.sum"], keepdims=0, name=f"{p}.sum"),
            helper.make_node("Reshape", [f"{p}.sum", f"{p}.shape_nk"], [f"{p}.w_nk"], name=f"{p}.reshape"),
            helper.make_node("Cast", [f"{prefix}.scales"], [f"{p}.s32"], to=f32, name=f"{p}.cast_s"),
            helper.make_node("Mul", [f"{p}.w_nk", f"{p}.s32"], [f"{p}.ws_nk"], name=f"{p}.scale"),
            helper.make_node("Transpose", [f"{p}.ws_nk"], [f"{p}.w_kn"], perm=[1, 0], name=f"{p}.transpose"),
        ]
        w_name = f"{p}.w_kn"
        if dtype != f32:
            nodes.append(helper.make_node("Cast", [w_name], [f"{p}.w_kn_t"], to=dtype, name=f"{p}.cast_w"))
            w_name = f"{p}.w_kn_t"
        nodes.append(helper.make_node("MatMul", [x, w_name], [y], name=f"{p}.matmul"))
        return Lowered(nodes, inits, {})

    def extra_report(self) -> dict[str, Any]:
        k, n = self.shape
        stored = self.stored_bytes()
        out: dict[str, Any] = {
            "num_codebooks": self.num_codebooks,
            "codebook_bits": int(np.log2(self.codebook_size)),
            "in_group_size": self.in_group_size,
            "code_bits_per_weight": 8.0 * self.codes.nbytes / (k * n),
            "codebook_bytes": int(self.codebooks.nbytes),
            "codebook_share": self.codebooks.nbytes / stored,
            "scale_bits_per_weight": 8.0 * self.scales.nbytes / (k * n),
        }
        if self.history:
            out["aqlm_error_init"] = self.history[0][1]
            out["aqlm_error_final"] = self.history[-1][1]
        return out


def _check_dtype(dtype: int) -> None:
    if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise FormatError(f"CodebookMatMul supports float32/float16 activations, got "
                          f"{onnx.TensorProto.DataType.Name(dtype)}")
