"""SpQR numerics (Dettmers et al.): GPTQ-style sweep with tiny groups, bi-level statistics and
sensitivity-chosen fp16 outliers. Torch layout ``[N, K]`` like :mod:`qcompile.solvers.gptq`.

Why a separate loop from :func:`qcompile.solvers.gptq.gptq`: SpQR decides outliers *inside* the sweep, from
the error each weight's rounding would cause scaled by the inverse-Hessian diagonal
(``((w - q) / d_k)^2`` with ``d_k = chol(H⁻¹)_kk``, the OBS saliency), and fits each group's statistics
only when the sweep reaches it, on the already error-compensated weights, excluding likely outliers.

Pieces:

* groups of ``group_size`` consecutive (stored-order) columns per output row: asymmetric min-max grid
  ``w ≈ scale * (code - zero)`` with float ``zero``;
* bi-level statistics: the ``N`` scales (and zeros) of one column group are quantized again to
  ``stat_bits`` in blocks of ``stat_group`` rows, with an fp16 step and min per block; the codes are
  computed with the statistics exactly as stored (what the file says is what we rounded with);
* outliers: a leave-one-out test before fitting a group marks weights whose exclusion shrinks the
  group's saliency-weighted error by more than the threshold; they do not stretch the group's range.
  During the sweep a weight whose saliency exceeds the threshold keeps its (updated) value: the
  file stores ``fp16(w - dense)`` which the op adds to the dense value;
* the threshold is relative to the layer's typical saliency ``mean_k(var_n(W[:, k]) / d_k^2)``;
* act-order: columns are processed (and stored) in order of decreasing Hessian diagonal; the op
  gathers ``X[..., perm]`` once per call instead of un-permuting the weight.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from qcompile.errors import FormatError
from qcompile.formats.base import is_whole_model_option
from qcompile.formats.spqr import reference as ref
from qcompile.formats.spqr.weight import SpQRQuantizedWeight
from qcompile.solvers.gptq import _inverse_hessian_cholesky

FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class SpQRConfig:
    bits: int = 3
    group_size: int = 16
    stat_bits: int = 3
    stat_group: int = 16
    outlier_threshold: float = 0.2  # relative to the layer's typical saliency; inf = no outliers
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    loo_outliers: bool = True  # leave-one-out pre-detection when fitting a group's statistics
    range_search: bool = True  # per row, shrink the group's range if that lowers its saliency-weighted error


@dataclasses.dataclass
class SpQRResult:
    """Everything the packed format stores, in torch-side form (stored order unless said)."""

    codes: torch.Tensor  # [N, K] int, stored order
    scale_codes: torch.Tensor  # [N, G] int
    zero_codes: torch.Tensor  # [N, G] int
    stat_params: np.ndarray  # [ceil(N/stat_group), 4, G] float16: scale_step, scale_min, zero_step, zero_min
    outlier_rows: np.ndarray  # [nnz] int64, sorted by (row, col)
    outlier_cols: np.ndarray  # [nnz] int64, ORIGINAL input-feature index
    outlier_values: np.ndarray  # [nnz] float16, added to the dense value
    perm: np.ndarray | None  # [K] int64: stored position p holds input feature perm[p]
    dequantized: torch.Tensor  # [N, K] float32, ORIGINAL order, what the packed tensors represent


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 (saturating) and return float32: what a stored fp16 reads back as."""
    return t.clamp(-FP16_MAX, FP16_MAX).half().float()


def quantize_stat(v: torch.Tensor, stat_bits: int, stat_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-level min-max quantization of one statistic vector ``v[N]`` in blocks of ``stat_group`` rows.

    Returns ``(codes[N], params[NB, 2] (step, min) as fp16-representable float32, dequantized[N])``.
    """
    n = v.shape[0]
    nb = math.ceil(n / stat_group)
    pad = nb * stat_group - n
    vp = torch.nn.functional.pad(v, (0, pad), value=float("nan")).view(nb, stat_group)
    vmin = _fp16(torch.nan_to_num(vp, nan=float("inf")).min(dim=1).values)
    vmax = torch.nan_to_num(vp, nan=float("-inf")).max(dim=1).values
    top = (1 << stat_bits) - 1
    step = _fp16((vmax - vmin).clamp(min=0) / top)
    # fp16 rounding of the step can leave vmax just outside; clamping the code costs at most half a step.
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.round((vp - vmin[:, None]) / safe[:, None]), 0, top)
    codes = torch.where(step[:, None] > 0, codes, torch.zeros_like(codes))
    codes = torch.nan_to_num(codes, nan=0.0).reshape(-1)[:n]
    deq = codes * step.repeat_interleave(stat_group)[:n] + vmin.repeat_interleave(stat_group)[:n]
    return codes.to(torch.int32), torch.stack([step, vmin], dim=1), deq


class BiLevelGroup:
    """The statistics of one column group for all rows, as the file stores them."""

    def __init__(self, w: torch.Tensor, keep: torch.Tensor | None, cfg: SpQRConfig, d: torch.Tensor | None = None):
        """Fit on ``w[N, g]``; ``keep`` marks the weights allowed to shape the range (not likely outliers);
        ``d`` (the group's inverse-Hessian Cholesky diagonal) weights the optional range search."""
        self.maxq = (1 << cfg.bits) - 1
        if keep is None:
            xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
        else:
            big = torch.finfo(w.dtype).max
            xmin = torch.where(keep, w, torch.full_like(w, big)).min(dim=1).values
            xmax = torch.where(keep, w, torch.full_like(w, -big)).max(dim=1).values
            empty = ~keep.any(dim=1)
            xmin = torch.where(empty, torch.zeros_like(xmin), xmin)
            xmax = torch.where(empty, torch.zeros_like(xmax), xmax)
        if cfg.range_search:
            xmin, xmax = _search_range(w, keep, xmin, xmax, d, self.maxq)
        scale = (xmax - xmin) / self.maxq
        self.scale_codes, sparams, self.scale = quantize_stat(scale, cfg.stat_bits, cfg.stat_group)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        # centre the grid on the range: if the stored scale came out smaller, both ends clip equally.
        zero = self.maxq / 2 - (xmin + xmax) / (2 * safe)
        zero = torch.where(self.scale > 0, zero, torch.zeros_like(zero))
        self.zero_codes, zparams, self.zero = quantize_stat(zero, cfg.stat_bits, cfg.stat_group)
        self.params = torch.cat([sparams, zparams], dim=1)  # [NB, 4]
        self._inv = torch.where(self.scale > 0, 1 / safe, torch.zeros_like(safe))

    def quantize(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round one column ``[N]``: ``(dense value[N], code[N])`` using the stored statistics."""
        q = torch.clamp(torch.round(col * self._inv + self.zero), 0, self.maxq)
        return self.scale * (q - self.zero), q


SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _search_range(w: torch.Tensor, keep: torch.Tensor | None, xmin: torch.Tensor, xmax: torch.Tensor,
                  d: torch.Tensor | None, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the centred shrink of ``[xmin, xmax]`` with the lowest saliency-weighted rounding error of
    the group's kept weights (clipping a rare extreme can beat a coarser grid for all the others)."""
    inv_d2 = torch.ones(w.shape[1], device=w.device) if d is None else 1.0 / d.square()
    mask = torch.ones_like(w) if keep is None else keep.to(w.dtype)
    centre, half = (xmax + xmin) / 2, (xmax - xmin) / 2
    best_err = best_lo = best_hi = None
    for f in SHRINK:
        lo, hi = centre - half * f, centre + half * f
        scale = ((hi - lo) / maxq).clamp(min=1e-12)
        q = torch.clamp(torch.round((w - lo[:, None]) / scale[:, None]), 0, maxq) * scale[:, None] + lo[:, None]
        err = ((w - q).square() * inv_d2 * mask).sum(dim=1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """For each weight of a group ``w[N, g]``: how much the group's saliency-weighted RTN error
    ``Σ_j ((w_j - q_j) / d_j)^2`` shrinks when that weight is left out of the min-max fit (and out of the sum).
    Uses plain (first-level) statistics: this is only a screening test."""
    n, g = w.shape
    maxq = (1 << bits) - 1
    inv_d2 = 1.0 / d.square()

    def rtn_err(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale = ((hi - lo) / maxq).clamp(min=1e-12)
        q = torch.clamp(torch.round((x - lo.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, maxq)
        return (x - (q * scale.unsqueeze(-1) + lo.unsqueeze(-1))).square()

    base = (rtn_err(w, w.min(dim=1).values, w.max(dim=1).values) * inv_d2).sum(dim=1)  # [N]
    if g < 2:
        return torch.zeros_like(w)
    idx = torch.tensor([[j for j in range(g) if j != i] for i in range(g)], device=w.device)  # [g, g-1]
    loo = w[:, idx]  # [N, g, g-1]
    err = rtn_err(loo, loo.min(dim=2).values, loo.max(dim=2).values) * inv_d2[idx]
    return base.unsqueeze(1) - err.sum(dim=2)


def typical_saliency(w: torch.Tensor, d: torch.Tensor) -> float:
    """The layer's typical saliency scale ``mean_k(var_n(W[:, k]) / d_k^2)`` the threshold is relative to."""
    return float((w.var(dim=0, unbiased=False) / d.square()).mean().clamp(min=1e-30))


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: SpQRConfig) -> SpQRResult:
    """Quantize ``weight[N, K]`` (torch layout) with SpQR. ``hessian`` None means H = I (data-free)."""
    if cfg.group_size <= 0 or cfg.group_size % 16:
        raise ValueError(f"group_size must be a positive multiple of 16, got {cfg.group_size}")
    w = weight.detach().clone().float()
    n, k = w.shape
    dev = w.device
    h = torch.eye(k, device=dev) if hessian is None else hessian.detach().clone().to(dev, torch.float32)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if cfg.act_order else torch.arange(k, device=dev)
    w = w[:, perm]
    h = h[perm][:, perm]
    u = _inverse_hessian_cholesky(h, cfg.damp)
    d = torch.diag(u)
    thr = cfg.outlier_threshold * typical_saliency(w, d) if math.isfinite(cfg.outlier_threshold) else math.inf
    gs = cfg.group_size
    ngroups = math.ceil(k / gs)
    block = max(gs, (cfg.block_size // gs) * gs)

    deq = torch.zeros_like(w)
    codes = torch.zeros((n, k), dtype=torch.int32, device=dev)
    scale_codes = torch.zeros((n, ngroups), dtype=torch.int32, device=dev)
    zero_codes = torch.zeros_like(scale_codes)
    nb = math.ceil(n / cfg.stat_group)
    stat_params = torch.zeros((nb, 4, ngroups), device=dev)
    is_outlier = torch.zeros((n, k), dtype=torch.bool, device=dev)
    out_vals = torch.zeros((n, k), device=dev)
    grp: BiLevelGroup | None = None

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                g = col // gs
                gw = w1[:, i:i + min(gs, k - col)]
                keep = None
                if cfg.loo_outliers and math.isfinite(thr):
                    keep = leave_one_out_gain(gw, d[col:col + gw.shape[1]], cfg.bits) <= thr
                grp = BiLevelGroup(gw, keep, cfg, d[col:col + gw.shape[1]])
                scale_codes[:, g] = grp.scale_codes
                zero_codes[:, g] = grp.zero_codes
                stat_params[:, :, g] = grp.params
            assert grp is not None
            x = w1[:, i]
            q, c = grp.quantize(x)
            if math.isfinite(thr):
                out = ((x - q) / d[col]).square() > thr
                delta = _fp16(torch.where(out, x - q, torch.zeros_like(x)))
                q = q + delta
                is_outlier[:, col] = out
                out_vals[:, col] = delta
            deq[:, col] = q
            codes[:, col] = c.to(torch.int32)
            e = (x - q) / d[col]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    inv = torch.argsort(perm)
    rows, pos = torch.nonzero(is_outlier, as_tuple=True)
    vals = out_vals[rows, pos]
    orig_cols = perm[pos]
    order = np.lexsort((orig_cols.cpu().numpy(), rows.cpu().numpy()))
    return SpQRResult(
        codes=codes.cpu(),
        scale_codes=scale_codes.cpu(),
        zero_codes=zero_codes.cpu(),
        stat_params=stat_params.cpu().numpy().astype(np.float16),
        outlier_rows=rows.cpu().numpy()[order].astype(np.int64),
        outlier_cols=orig_cols.cpu().numpy()[order].astype(np.int64),
        outlier_values=vals.cpu().numpy()[order].astype(np.float16),
        perm=perm.cpu().numpy().astype(np.int64) if cfg.act_order else None,
        dequantized=deq[:, inv].cpu(),
    )


def quantize_spqr(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, bits: int, group_size: int,
                  stat_bits: int, stat_group: int, outlier_threshold: float, act_order: bool, damp: float,
                  block_size: int, loo_outliers: bool, range_search: bool = True,
                  device: str = "cpu", **whole_model: Any) -> SpQRQuantizedWeight:
    """Quantize one ``[K, N]`` weight with SpQR. Without a Hessian, H = I (data-free, saliency = error²).

    ``whole_model`` takes the ``finetune_*`` options, which act later (the tune pass, :mod:`qcompile.passes.tune`)."""
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
