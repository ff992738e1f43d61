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
"""
from __future__ import annotations

import numpy as np
import torch

from qcompile.errors import FormatError
from qcompile.formats.fp4 import reference as ref
from qcompile.formats.fp4.weight import MXFP4, NVFP4, SPECS, FP4QuantizedWeight, FP4Spec  # noqa: F401 (re-exported)
from qcompile.solvers.gptq import gptq
from qcompile.solvers.hadamard import effective_block, rotate_hessian, rotate_weight

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
    """The FP4 grid as a GPTQ :class:`~qcompile.solvers.gptq.Grid`: ``fit`` picks a group's stored scale (with the
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
