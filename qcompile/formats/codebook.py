"""AQLM codebook formats (``aqlm-2x8``, ``aqlm-1x16``, ``aqlm-1x8``) lowered to ``qcompile.CodebookMatMul``.

Each group of ``in_group_size`` (8) consecutive input weights of an output row is ``scale[n]`` times the
sum of M codewords, one from each of M codebooks of ``2^B`` entries shared by the layer. Stored tensors
(exactly what the op reads, so bits per weight includes the codebooks and the scales):

* codes ``[N, K/8, M]``: uint8 when ``B <= 8``, uint16 when ``B <= 16`` (byte-aligned, no bit packing);
* codebooks ``[M, 2^B, 8]`` float16;
* scales ``[N]`` float16.

Codes cost ``M*B/8`` bits per weight (2 for 2x8); codebooks are a per-layer constant (8 KiB for 2x8,
1 MiB for 1x16), so 1x16 only pays off on layers far wider than the default model's. The numerics are in
:mod:`qcompile.aqlm`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.aqlm import AQLMConfig, aqlm_quantize
from qcompile.errors import FormatError
from qcompile.finetune import finetune_options, tune_format_layers
from qcompile.formats.base import Format, Lowered, Option, QuantizedWeight, is_whole_model_option, register
from qcompile.reference import codebook as ref

OP_DOMAIN = "qcompile"
OP_NAME = "CodebookMatMul"
OP_VERSION = 1


class CodebookQuantizedWeight(QuantizedWeight):
    """An additive-codebook weight: codes, shared codebooks, per-output-channel scales."""

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
        node = helper.make_node(OP_NAME, [x] + [t.name for t in inits], [y], name=f"{prefix}.{OP_NAME}",
                                domain=OP_DOMAIN, **self.attributes())
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


def quantize_codebook(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, num_codebooks: int,
                      nbits: int, in_group_size: int, beam_size: int, rounds: int, cg_iters: int,
                      kmeans_iters: int, damp: float, seed: int, progress: bool = False,
                      device: str = "cpu", **whole_model: Any) -> CodebookQuantizedWeight:
    """Quantize one ``[K, N]`` weight with AQLM. ``hessian`` None = plain weight MSE (data-free).

    ``whole_model`` takes the ``finetune_*`` options, which act later (:func:`tune_codebooks`)."""
    unknown = [k for k in whole_model if not is_whole_model_option(k)]
    if unknown:
        raise FormatError(f"{name}: unknown option(s) {', '.join(unknown)}")
    k, n = weight_kn.shape
    if in_group_size < 1 or k % in_group_size:
        raise FormatError(f"{name}: K={k} must be a multiple of in_group_size={in_group_size}")
    if not 1 <= nbits <= 16:
        raise FormatError(f"{name}: nbits must be in 1..16, got {nbits}")
    if num_codebooks < 1 or beam_size < 1 or rounds < 0:
        raise FormatError(f"{name}: num_codebooks and beam_size must be >= 1 and rounds >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise FormatError(f"{name}: device=cuda requested but torch sees no CUDA device")
    cfg = AQLMConfig(num_codebooks=num_codebooks, nbits=nbits, in_group_size=in_group_size, beam_size=beam_size,
                     rounds=rounds, cg_iters=cg_iters, kmeans_iters=kmeans_iters, damp=damp, seed=seed,
                     device=device, progress=progress)
    w = torch.from_numpy(np.ascontiguousarray(weight_kn.T, dtype=np.float32))
    res = aqlm_quantize(w, hessian, cfg)
    return CodebookQuantizedWeight(name, res.codes.numpy(), res.codebooks.numpy(), res.scales.numpy(),
                                   res.history)


def _options(m: int, b: int, beam: int, rounds: int, kmeans_iters: int) -> dict[str, Option]:
    return {
        "num_codebooks": Option(int, m, "M: codebooks summed per group"),
        "nbits": Option(int, b, "B: each codebook has 2^B codewords (codes are uint8 up to 8, uint16 up to 16)"),
        "in_group_size": Option(int, 8, "consecutive input weights per codeword (K must be a multiple)"),
        "beam_size": Option(int, beam, "hypotheses kept per row while choosing a group's M codes"),
        "rounds": Option(int, rounds, "rounds of (codebooks, scales, codes) updates after k-means init"),
        "cg_iters": Option(int, 8, "conjugate-gradient steps per codebook least-squares update"),
        "kmeans_iters": Option(int, kmeans_iters, "Lloyd iterations per codebook at init"),
        "damp": Option(float, 0.01, "added to the Hessian diagonal, relative to its mean"),
        "seed": Option(int, 0, "seed of k-means sampling and init"),
        "progress": Option(bool, False, "per-layer progress bar with the running error"),
        **finetune_options(),  # on by default: see qcompile.finetune
    }


def tune_codebooks(source: Any, quantized: dict[str, QuantizedWeight], calib: np.ndarray, opts: dict[str, Any],
                   device: str, progress: bool, float_names: set[str] | None = None
                   ) -> tuple[dict[str, QuantizedWeight], dict[str, np.ndarray], dict[str, Any]] | None:
    """The format's whole-model step: codebooks and scales of every codebook layer tuned by
    :func:`qcompile.finetune.tune_format_layers` (codes fixed), then rounded to fp16 as the op stores them."""
    from qcompile.aqlm_finetune import CodebookLinear

    layers = {n: q for n, q in quantized.items() if isinstance(q, CodebookQuantizedWeight)}

    def to_module(q: CodebookQuantizedWeight) -> CodebookLinear:
        return CodebookLinear(torch.from_numpy(q.codes.astype(np.int64)), torch.from_numpy(q.codebooks.astype(np.float32)),
                              torch.from_numpy(q.scales.astype(np.float32)))

    def from_module(q: CodebookQuantizedWeight, mod: CodebookLinear) -> CodebookQuantizedWeight:
        books, scales = mod.stored()
        return CodebookQuantizedWeight(q.format_name, q.codes, np.clip(books, -65504, 65504),
                                       np.clip(scales, -65504, 65504), q.history)

    return tune_format_layers(source, calib, opts, progress, float_names, layers, to_module, from_module,
                              desc="aqlm finetune")


def _register(name: str, m: int, b: int, beam: int, rounds: int, kmeans_iters: int, note: str) -> None:
    def quantize(weight_kn, hessian, **opts):
        return quantize_codebook(weight_kn, hessian, name=name, **opts)

    register(Format(
        name=name,
        description=f"AQLM additive codebooks: {m} codebook(s) x 2^{b} codewords over groups of 8 inputs, "
                    f"per-channel fp16 scale; {note}; then codebooks, scales and norms are fine-tuned against "
                    "the float model (finetune_*)",
        runtime="onnxruntime + qcompile_ops (qcompile.CodebookMatMul)",
        quantize=quantize,
        options=_options(m, b, beam, rounds, kmeans_iters),
        needs_calibration=True,
        emits=("native", "simulated", "portable"),
        default_emit="native",
        tune=tune_codebooks,
    ))


_register("aqlm-2x8", 2, 8, 4, 3, 12, "2 bits/weight of codes + 8 KiB codebooks per layer")
_register("aqlm-1x8", 1, 8, 1, 3, 12, "1 bit/weight of codes + 4 KiB codebook per layer")
_register("aqlm-1x16", 1, 16, 1, 2, 4, "2 bits/weight of codes + a 1 MiB codebook per layer (only for wide layers)")
