"""Microscaling FP4 weight formats (MXFP4, NVFP4): RTN, GPTQ and MR-GPTQ numerics, lowered to
``qcompile.FP4MatMul`` (native) or to standard ONNX ops (portable).

Grids (per the op contract, docs/ops.md):

* **MXFP4**: E2M1 values, groups of 32 consecutive k, one E8M0 (power-of-two) scale per group.
* **NVFP4**: E2M1 values, groups of 16, one E4M3 scale per group, times an fp32 per-tensor scale
  ``amax / (6 * 448)`` so the largest group scale lands at E4M3's maximum and the others keep E4M3's
  full relative precision (groups 2^15 times smaller than the largest would only then turn subnormal).

Scales: per group we try a few *representable* scales and keep the one with the least squared error
(``scale_search``): for E8M0 the no-clipping exponent ``ceil(log2(amax/6))`` and its two neighbours (one
below clips the largest values but halves the step: often better for Gaussian-like groups); for E4M3 the
nearest code to ``amax/6`` and the codes up to 4 steps below / 1 above (≈ 0.6x .. 1.125x). The plain scale is
always a candidate, so the search can only lower the group's error. Dequantization always uses the
stored, decoded scale.

Methods: ``rtn`` (round to nearest per group), ``gptq`` (GPTQ on the FP4 grid via :class:`FP4Grid`, static
groups + act-order by default) and ``mr`` = MR-GPTQ (Egiazarian et al.): a block-wise Hadamard rotation of
the input dimension (block ``b``, default = the group size) is fused into the weight, ``W_rot = W @ R``,
the Hessian is rotated alike, ``H_rot = Rᵀ H R``, and GPTQ with act-order runs on the rotated problem; the
op rotates activations online (attribute ``hadamard_block``). Rotating each group by a block of its own
size turns heavy-tailed groups into near-Gaussian ones, which is where the MSE scale search pays off most
for MXFP4's coarse power-of-two scales (the abstract's "format-specific optimizations"). If ``b`` does not
divide K, the largest power of two dividing both is used (``effective_block``; recorded in the report);
SmolLM2's K = 576 = 2^6·9 and 1536 = 2^9·3 take every b ≤ 64 as asked, and b = 128 falls back to 64 for
K = 576.

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
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import FormatError
from qcompile.formats.base import Format, Lowered, Option, QuantizedWeight, register
from qcompile.gptq import gptq
from qcompile.hadamard import effective_block, rotate_hessian, rotate_weight
from qcompile.reference import fp4 as ref

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

E4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN
E8M0_MAX_CODE = 254  # 255 is NaN
_ROW_CHUNK_ELEMS = 1 << 22  # bound the scale search's [rows, groups, candidates, G] temporaries

# ---- torch codecs (same rounding as the numpy reference: RNE ties, saturate at ±6, never -0) ------------

_E2M1_MAG = torch.tensor(ref.E2M1_MAGNITUDES.tolist(), dtype=torch.float32)
_E2M1_MID = (_E2M1_MAG[1:] + _E2M1_MAG[:-1]) / 2  # 7 decision boundaries


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float tensor -> E2M1 codes (uint8 0..15), nearest value with ties to the even code."""
    mid = _E2M1_MID.to(x.device)
    mag = x.abs().float()
    down = torch.bucketize(mag, mid, right=False)  # a tie resolves to the smaller magnitude
    up = torch.bucketize(mag, mid, right=True)  # ... or to the larger
    idx = torch.where(down % 2 == 0, down, up)  # E2M1 index parity == mantissa bit
    sign = (x < 0) & (idx != 0)
    return (idx | (sign.to(idx.dtype) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    mag = _E2M1_MAG.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def decode_scale_codes(codes: torch.Tensor, scale_format: str) -> torch.Tensor:
    """uint8 scale codes -> float32 scale values, exactly as FP4MatMul decodes them."""
    if scale_format == "e8m0":
        s = codes.to(torch.int32)
        val = torch.ldexp(torch.ones_like(s, dtype=torch.float32), (s - ref.E8M0_BIAS).float())
        return torch.where(s == ref.E8M0_NAN, torch.full_like(val, float("nan")), val)
    if scale_format == "e4m3":
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    raise FormatError(f"unknown scale_format {scale_format!r}")


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(v)) for v > 0 (frexp: v = m·2^e, m ∈ [0.5, 1))."""
    m, e = torch.frexp(v)
    return torch.where(m == 0.5, e - 1, e)


def candidate_scale_codes(amax: torch.Tensor, spec: FP4Spec, tensor_scale: float, search: bool) -> torch.Tensor:
    """Scale codes to try for groups with absolute maxima ``amax``: ``[..., C]`` int64, plain choice first."""
    if spec.scale_format == "e8m0":
        e0 = torch.where(amax > 0, _ceil_log2(amax / ref.E2M1_MAX), torch.zeros_like(amax, dtype=torch.int32))
        offsets = [0, -1, 1] if search else [0]
        c = e0.long().unsqueeze(-1) + torch.tensor(offsets, device=amax.device) + ref.E8M0_BIAS
        return c.clamp(0, E8M0_MAX_CODE)
    target = (amax / (ref.E2M1_MAX * tensor_scale)).clamp(max=ref.E4M3_MAX)
    c0 = target.float().to(torch.float8_e4m3fn).view(torch.uint8).long().clamp(min=1)
    offsets = [0, -1, -2, -3, -4, 1] if search else [0]
    return (c0.unsqueeze(-1) + torch.tensor(offsets, device=amax.device)).clamp(1, E4M3_MAX_CODE)


def choose_scales(wg: torch.Tensor, spec: FP4Spec, tensor_scale: float, search: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales for ``wg [R, ngroups, g]``: ``(codes uint8 [R, ngroups], values float32 [R, ngroups])``
    where ``values = decode(codes) * tensor_scale`` is what quantization divides by and dequantization
    multiplies by. With ``search`` the candidate with the least squared group error wins (ties: plain)."""
    rows = wg.shape[0]
    chunk = max(1, _ROW_CHUNK_ELEMS // max(1, wg[0].numel() * 6))
    out_c, out_v = [], []
    for r0 in range(0, rows, chunk):
        w = wg[r0:r0 + chunk].float()
        cand = candidate_scale_codes(w.abs().amax(-1), spec, tensor_scale, search)  # [r, ng, C]
        vals = decode_scale_codes(cand.to(torch.uint8), spec.scale_format) * tensor_scale
        if cand.shape[-1] == 1:
            best = torch.zeros(cand.shape[:-1], dtype=torch.long, device=w.device)
        else:
            v = vals.unsqueeze(-1)  # [r, ng, C, 1]
            x = w.unsqueeze(-2)  # [r, ng, 1, g]
            q = e2m1_decode(e2m1_encode(x / v)) * v
            best = ((q - x) ** 2).sum(-1).argmin(-1)  # first minimum = plain scale on ties
        out_c.append(torch.gather(cand, -1, best.unsqueeze(-1)).squeeze(-1).to(torch.uint8))
        out_v.append(torch.gather(vals, -1, best.unsqueeze(-1)).squeeze(-1))
    return torch.cat(out_c), torch.cat(out_v)


def nvfp4_tensor_scale(w: torch.Tensor) -> float:
    """fp32 per-tensor scale ``amax / (6 * 448)``: the largest group scale becomes E4M3's maximum."""
    amax = float(w.abs().max()) if w.numel() else 0.0
    ts = np.float32(amax / (ref.E2M1_MAX * ref.E4M3_MAX)) if amax > 0 else np.float32(1.0)
    return float(ts) if ts > 0 else 1.0


class FP4Grid:
    """The FP4 grid as a GPTQ :class:`~qcompile.gptq.Grid`: ``fit`` picks a group's stored scale (with the
    same MSE search as RTN), ``quantize`` rounds a column to E2M1 at that scale."""

    def __init__(self, spec: FP4Spec, tensor_scale: float = 1.0, search: bool = True):
        self.spec = spec
        self.tensor_scale = tensor_scale
        self.search = search

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, vals = choose_scales(w.unsqueeze(1), self.spec, self.tensor_scale, self.search)
        return codes[:, 0], vals[:, 0]

    def quantize(self, col: torch.Tensor, params, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, vals = params
        codes = e2m1_encode(col / vals)
        return e2m1_decode(codes) * vals, codes


def rtn_fp4(w_nk: torch.Tensor, spec: FP4Spec, tensor_scale: float = 1.0, search: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorized RTN: ``(codes uint8 [N, K], scale codes uint8 [N, Kp/G])`` (same result as
    ``gptq.rtn(w, FP4Grid(...), G)``, in one pass)."""
    n, k = w_nk.shape
    g = spec.group_size
    kp = ref.padded_k(k, g)
    wp = torch.nn.functional.pad(w_nk.float(), (0, kp - k)).reshape(n, kp // g, g)
    scodes, svals = choose_scales(wp, spec, tensor_scale, search)
    codes = e2m1_encode(wp / svals.unsqueeze(-1)).reshape(n, kp)[:, :k]
    return codes, scodes


# ---- the quantized weight ----------------------------------------------------------------------------------


class FP4QuantizedWeight(QuantizedWeight):
    """E2M1 codes + per-group scales (+ tensor scale), possibly in a Hadamard-rotated basis."""

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
                "hadamard_block": self.hadamard_block}

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


# ---- quantize entry point and registry ----------------------------------------------------------------------

METHODS = ("rtn", "gptq", "mr")


def quantize_fp4(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, spec: FP4Spec, method: str,
                 hadamard_block: int | None = None, act_order: bool = True, damp: float = 0.01, scale_search: bool = True,
                 device: str = "cpu") -> FP4QuantizedWeight:
    """Quantize one ``[K, N]`` weight to ``spec`` with ``method`` (rtn | gptq | mr).

    ``hadamard_block`` (0 = none) rotates the input dimension before quantizing; ``None`` means the group
    size for ``mr`` and 0 otherwise. The stored weight is the rotated one; :meth:`FP4QuantizedWeight.dequantize`
    undoes it."""
    if method not in METHODS:
        raise FormatError(f"{name}: unknown method {method!r}; accepted: {', '.join(METHODS)}")
    weight_kn = np.asarray(weight_kn)
    if weight_kn.ndim != 2 or 0 in weight_kn.shape:
        raise FormatError(f"{name}: expected a non-empty [K, N] weight, got shape {weight_kn.shape}")
    if not np.isfinite(weight_kn).all():
        raise FormatError(f"{name}: weight has NaN or Inf values")
    k, n = weight_kn.shape
    if hadamard_block is None:
        hadamard_block = spec.group_size if method == "mr" else 0
    block = effective_block(k, hadamard_block)
    w = torch.from_numpy(np.ascontiguousarray(weight_kn.T, dtype=np.float32)).to(device)
    if block:
        w = rotate_weight(w, block)
    ts = nvfp4_tensor_scale(w) if spec.tensor_scale else 1.0
    if method == "rtn":
        codes, scodes = rtn_fp4(w, spec, ts, scale_search)
    else:
        if hessian is None:
            raise FormatError(f"{name} needs calibration statistics (a Hessian)")
        if tuple(hessian.shape) != (k, k):
            raise FormatError(f"{name}: Hessian shape {tuple(hessian.shape)} != [K, K] = [{k}, {k}]")
        h = hessian.to(device=device, dtype=torch.float32)
        if block:
            h = rotate_hessian(h.double(), block).float()
        res = gptq(w, h, FP4Grid(spec, ts, scale_search), spec.group_size, damp=damp, act_order=act_order)
        codes = res.codes.to(torch.uint8)
        scodes = torch.stack([p[0].cpu() for p in res.group_params], dim=1)
    return FP4QuantizedWeight(name, spec, codes.cpu().numpy(), scodes.cpu().numpy(),
                              ts if spec.tensor_scale else None, block, hadamard_block)


_BLOCKS = (0, 2, 4, 8, 16, 32, 64, 128, 256)


def _options(spec: FP4Spec, method: str) -> dict[str, Option]:
    default_block = spec.group_size if method == "mr" else 0
    opts = {
        "hadamard_block": Option(int, default_block, "block-wise Hadamard rotation of the input dim fused into "
                                 "the weight (0 = none); falls back to the largest power of two dividing K",
                                 choices=_BLOCKS),
        "scale_search": Option(bool, True, "per group, keep the representable scale (neighbouring exponents / "
                               "E4M3 codes) with the least squared error instead of the plain amax one"),
    }
    if method != "rtn":
        opts["act_order"] = Option(bool, True, "quantize columns by decreasing Hessian diagonal (static groups)")
        opts["damp"] = Option(float, 0.01, "damping added to the Hessian diagonal, relative to its mean")
    return opts


_DESCRIPTIONS = {
    "rtn": "round to nearest",
    "gptq": "GPTQ on the FP4 grid (act-order, static groups)",
    "mr": "MR-GPTQ: block-wise Hadamard rotation fused into the weight + GPTQ (act-order)",
}


def _register_fp4(spec: FP4Spec, method: str) -> None:
    name = f"{spec.grid}-{method}"

    def quantize(weight_kn, hessian, **opts):
        return quantize_fp4(weight_kn, hessian, name=name, spec=spec, method=method, **opts)

    scale = "E8M0 power-of-two" if spec.scale_format == "e8m0" else "E4M3 + fp32 tensor"
    register(Format(
        name=name,
        description=f"{spec.grid.upper()} (E2M1, groups of {spec.group_size}, {scale} scales), {_DESCRIPTIONS[method]}",
        runtime="qcompile_ops (qcompile.FP4MatMul)",
        quantize=quantize,
        options=_options(spec, method),
        needs_calibration=method != "rtn",
        emits=("native", "simulated", "portable"),
        default_emit="native",
    ))


for _spec in (MXFP4, NVFP4):
    for _method in METHODS:
        _register_fp4(_spec, _method)
