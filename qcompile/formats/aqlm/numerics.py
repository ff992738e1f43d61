"""AQLM numerics: additive (multi-codebook) quantization of one linear weight under a calibration Hessian.

Representation (torch layout ``[N, K]``; K split into ``G = K / d`` groups of ``d`` consecutive inputs)::

    Ŵ[n, g*d:(g+1)*d] = s[n] * Σ_m C[m, codes[n, g, m], :]

with ``M`` codebooks ``C[m]`` of ``2^B`` codewords of length ``d`` shared by the whole layer and one scale
per output channel. The objective is the layer-output error the calibration data sees,
``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` with ``H = XᵀX``.

Algorithm (Egiazarian et al., "Extreme Compression of LLMs via Additive Quantization"), alternating:

1. init: per-row RMS scales, residual k-means on the normalized groups (fitted on a subsample: the full
   layer would make init dominate the budget and a few thousand vectors per centroid pin the centroids);
2. codes: a sweep over groups, each group's M codes chosen by beam search. The search is *exact* with
   respect to the full H: with the other groups fixed, the error as a function of group ``g``'s codeword
   sum ``u`` is ``s²(uᵀ H_gg u − 2uᵀ t)`` where ``t = H_gg u_old + (E H)_g / s`` carries every cross-group
   coupling. ``(E H)`` is kept current GPTQ-style: exact for a block of groups at the block start (one
   GEMM), updated by rank-d corrections inside the block. Rows are independent, so everything is
   vectorized over rows; candidate costs are one ``[rows, d] x [d, 2^B]`` GEMM per (group, codebook)
   plus precomputed codeword norms under ``H_gg``;
3. codebooks: exact least squares under the full H given codes and scales, by conjugate gradient on
   the normal equations (each step: gather-decode, one ``[N,K]x[K,K]`` GEMM, scatter-add) with a
   block-Jacobi preconditioner (per codeword ``Σ s² H_gg`` over its uses);
4. scales: closed-form per-row least squares under H.

Finally codebooks and scales are rounded to fp16 (what the op stores), scales re-fitted to the rounded
codebooks, and one more code sweep adapts codes to exactly the stored values.

Fine-tuning of codebooks/scales against the float model needs the whole model, not one linear: it is a
separate whole-model step, :mod:`qcompile.formats.aqlm.finetune` (format option ``finetune_epochs``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qcompile.errors import FormatError
from qcompile.formats.aqlm.weight import CodebookQuantizedWeight
from qcompile.formats.base import is_whole_model_option


@dataclasses.dataclass
class AQLMConfig:
    num_codebooks: int = 2  # M
    nbits: int = 8  # B: each codebook has 2^B codewords
    in_group_size: int = 8  # d: consecutive input weights per codeword
    beam_size: int = 1  # candidates kept per row while choosing one group's M codes
    rounds: int = 3  # (codebooks, scales, codes) alternations after init
    kmeans_iters: int = 12
    kmeans_weighted: bool = True  # k-means under diag(H) instead of plain MSE
    cg_iters: int = 12  # conjugate-gradient steps per codebook update
    damp: float = 0.01  # added to H's diagonal, relative to its mean
    seed: int = 0
    device: str = "cpu"
    progress: bool = False
    block_groups: int = 16  # groups per exact (E H) refresh in the code sweep

    def validate(self, k: int) -> None:
        if self.num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {self.num_codebooks}")
        if not 1 <= self.nbits <= 16:
            raise ValueError(f"nbits must be in 1..16, got {self.nbits}")
        if self.in_group_size < 1 or k % self.in_group_size:
            raise ValueError(f"K={k} must be a multiple of in_group_size={self.in_group_size}")
        if self.beam_size < 1 or self.rounds < 0 or self.cg_iters < 0 or self.kmeans_iters < 0:
            raise ValueError("beam_size must be >= 1 and rounds, cg_iters, kmeans_iters >= 0")


@dataclasses.dataclass
class AQLMResult:
    codes: torch.Tensor  # [N, G, M] int64
    codebooks: torch.Tensor  # [M, 2^B, d] float32, fp16-representable
    scales: torch.Tensor  # [N] float32, fp16-representable
    history: list[tuple[str, float]]  # (stage, relative H-weighted error) after each stage


# ---- basic operations -----------------------------------------------------------------------------


def decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """codes ``[N, G, M]`` + codebooks ``[M, 2^B, d]`` (+ scales ``[N]``) -> weight ``[N, G*d]``."""
    n, g, m = codes.shape
    d = codebooks.shape[-1]
    out = torch.zeros((n, g, d), dtype=codebooks.dtype, device=codebooks.device)
    for j in range(m):
        out += codebooks[j][codes[:, :, j]]
    out = out.reshape(n, g * d)
    return out if scales is None else out * scales[:, None]


def prepare_hessian(h: torch.Tensor | None, k: int, damp: float, device: str) -> torch.Tensor:
    """H normalized to mean diagonal 1 (scale-free search), dead inputs given unit weight, damped."""
    if h is None:
        return torch.eye(k, device=device)
    if tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match K={k}")
    h = h.detach().to(device=device, dtype=torch.float32).clone()
    h = 0.5 * (h + h.T)
    diag = torch.diagonal(h)
    mean = diag[diag > 0].mean() if bool((diag > 0).any()) else torch.tensor(1.0, device=device)
    h /= mean
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    torch.diagonal(h)[dead] = 1.0
    torch.diagonal(h).add_(damp)
    return h


def weighted_error(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W−Ŵ) H (W−Ŵ)ᵀ) / tr(W H Wᵀ)."""
    e = w - what
    num = float(((e @ h) * e).sum())
    den = float(((w @ h) * w).sum())
    return num / max(den, 1e-30)


def _chunk_rows(total: int, per_row: int, budget: int = 1 << 22) -> int:
    return max(1, min(total, budget // max(per_row, 1)))


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid for every row of ``x`` ``[n, d]``; chunked to bound memory.

    ``weights`` ``[n, d]`` (optional, positive) makes the distance ``Σ_j w_j (x_j − c_j)²``.
    """
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    step = _chunk_rows(x.shape[0], centroids.shape[0])
    cn = (centroids * centroids).sum(1)
    for i in range(0, x.shape[0], step):
        xs = x[i : i + step]
        if weights is None:
            dist = torch.addmm(cn[None, :], xs, centroids.T, alpha=-2.0)
        else:
            ws = weights[i : i + step]
            dist = torch.addmm(ws @ (centroids * centroids).T, ws * xs, centroids.T, alpha=-2.0)
        out[i : i + step] = dist.argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, sample: int,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd's k-means on (a random subsample of) ``x`` ``[n, d]``; returns centroids ``[k, d]``.

    ``weights`` ``[n, d]``: per-coordinate importance (diagonal-metric k-means; centroids become
    weighted means). Empty clusters are re-seeded from random points so no codeword is wasted.
    """
    n = x.shape[0]
    if n > sample:
        pick = torch.randperm(n, generator=gen)[:sample].to(x.device)
        x = x[pick]
        weights = None if weights is None else weights[pick]
        n = sample
    if n <= k:  # fewer vectors than codewords: store them all (and random copies in the spare slots)
        extra = torch.randint(0, n, (k - n,), generator=gen).to(x.device)
        return torch.cat([x, x[extra]], 0).clone()
    wts = torch.ones_like(x) if weights is None else weights
    cent = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    for _ in range(iters):
        idx = assign_nearest(x, cent, weights)
        sums = torch.zeros_like(cent).index_add_(0, idx, x * wts)
        mass = torch.zeros_like(cent).index_add_(0, idx, wts)
        empty = mass.sum(1) == 0
        cent = torch.where(mass > 0, sums / mass.clamp(min=1e-30), cent)
        ne = int(empty.sum())
        if ne:
            cent[empty] = x[torch.randint(0, n, (ne,), generator=gen).to(x.device)]
    return cent


# ---- the three alternating updates ------------------------------------------------------------------


def _group_blocks(h: torch.Tensor, g: int, d: int) -> torch.Tensor:
    """Diagonal ``d x d`` blocks of H: ``[G, d, d]``."""
    hb = h.reshape(g, d, g, d)
    idx = torch.arange(g, device=h.device)
    return hb[idx, :, idx, :]


def update_codes(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                 scales: torch.Tensor, beam_size: int = 1, block_groups: int = 16) -> torch.Tensor:
    """One sweep over groups; each group's M codes re-chosen by beam search under the full H.

    Never increases the objective (the current codes are always among the candidates).
    """
    n, k = w.shape
    m_cb, ncode, d = codebooks.shape
    g_all = k // d
    codes = codes.clone()
    hblk = _group_blocks(h, g_all, d)
    safe_s = torch.where(scales.abs() > 1e-20, scales, torch.ones_like(scales))
    # Rows are independent: chunk them so the [rows, beam, 2^B] candidate costs stay bounded.
    step = _chunk_rows(n, beam_size * ncode)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        wr, cr, sr = w[rows], codes[rows], safe_s[rows]
        err = wr - decode(cr, codebooks, scales[rows])
        for b0 in range(0, g_all, block_groups):
            b1 = min(g_all, b0 + block_groups)
            cols = slice(b0 * d, b1 * d)
            resid = err @ h[:, cols]  # (E H) for this block's columns, exact now
            for g in range(b0, b1):
                lc = slice((g - b0) * d, (g - b0 + 1) * d)
                hgg = hblk[g]
                u_old = decode(cr[:, g : g + 1], codebooks).reshape(-1, d)
                target = u_old @ hgg + resid[:, lc] / sr[:, None]
                new_codes, u_new = _beam_search_group(cr[:, g], u_old, target, hgg, codebooks, beam_size)
                cr[:, g] = new_codes
                delta = (u_new - u_old) * scales[rows, None]
                err[:, g * d : (g + 1) * d] -= delta
                resid -= delta @ h[g * d : (g + 1) * d, cols]
        codes[rows] = cr
    return codes


def _beam_search_group(cur: torch.Tensor, u: torch.Tensor, target: torch.Tensor, hgg: torch.Tensor,
                       codebooks: torch.Tensor, beam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize ``uᵀ H_gg u − 2uᵀ t`` over the M codes of one group for every row.

    cur ``[R, M]`` current codes, u ``[R, d]`` their codeword sum. Codebook by codebook, each kept
    hypothesis tries every codeword in that codebook's slot; the ``beam_size`` best survive.
    """
    m_cb, ncode, d = codebooks.shape
    rows = cur.shape[0]
    ch = codebooks @ hgg  # [M, 2^B, d]
    norms = (ch * codebooks).sum(-1)  # cᵀ H_gg c: [M, 2^B]
    if beam_size == 1:
        cur = cur.clone()
        for m in range(m_cb):
            p = u - codebooks[m][cur[:, m]]
            v = p @ hgg - target
            cost = torch.addmm(norms[m][None, :], v, codebooks[m].T, alpha=2.0)
            best = cost.argmin(1)
            cur[:, m] = best
            u = p + codebooks[m][best]
        return cur, u
    beams = cur[:, None, :].clone()  # [R, L, M]
    usum = u[:, None, :]  # [R, L, d]
    ar = torch.arange(rows, device=cur.device)[:, None]
    tgt = target[:, None, :]
    for m in range(m_cb):
        p = usum - codebooks[m][beams[:, :, m]]  # [R, L, d]: sum without slot m
        v = p @ hgg - tgt
        base = ((v - tgt) * p).sum(-1)  # pᵀH p − 2pᵀt
        nbeam = p.shape[1]
        cost = torch.addmm(norms[m][None, :], v.reshape(-1, d), codebooks[m].T, alpha=2.0)
        cost = cost.view(rows, nbeam * ncode) if nbeam == 1 else (cost.view(rows, nbeam, ncode)
                                                                 + base[:, :, None]).view(rows, -1)
        if m == m_cb - 1:  # only the best hypothesis leaves the last codebook
            flat = cost.argmin(1, keepdim=True)
        else:
            flat = torch.topk(cost, min(beam_size, cost.shape[1]), dim=1, largest=False, sorted=False).indices
        src, code = flat // ncode, flat % ncode
        beams = beams[ar, src]
        beams[:, :, m] = code
        usum = p[ar, src] + codebooks[m][code]
    return beams[:, 0], usum[:, 0]


def _scatter(z: torch.Tensor, codes: torch.Tensor, ncode: int) -> torch.Tensor:
    """Adjoint of :func:`decode` (without scales): ``[N, K]`` -> ``[M, 2^B, d]`` sums per codeword."""
    n, g, m_cb = codes.shape
    d = z.shape[1] // g
    zg = z.reshape(n * g, d)
    out = torch.zeros((m_cb, ncode, d), dtype=z.dtype, device=z.device)
    for m in range(m_cb):
        out[m].index_add_(0, codes[:, :, m].reshape(-1), zg)
    return out


def update_codebooks(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor, iters: int) -> torch.Tensor:
    """Least-squares codebooks under the full H for fixed codes and scales (preconditioned CG).

    The normal equations are singular (M codebooks can trade a shift between them, unused codewords do
    not matter), so a tiny ridge (1e-6 of the typical diagonal) makes them definite; the result is kept
    only if it lowers the objective, so this step can never make the layer worse.
    """
    if iters == 0:
        return codebooks
    m_cb, ncode, d = codebooks.shape
    n, g, _ = codes.shape
    s = scales[:, None]

    # Block-Jacobi preconditioner: for codeword (m, i), Σ over its uses (n, g) of s_n² H_gg.
    hblk = _group_blocks(h, g, d).reshape(g, d * d)
    gidx = torch.arange(g, device=w.device)[None, :].expand(n, g)
    s2 = (scales * scales)[:, None].expand(n, g).reshape(-1)
    blocks = torch.empty((m_cb, ncode, d, d), dtype=w.dtype, device=w.device)
    unused = torch.empty((m_cb, ncode), dtype=torch.bool, device=w.device)
    for m in range(m_cb):
        use = torch.zeros(ncode * g, dtype=w.dtype, device=w.device)
        use.index_add_(0, (codes[:, :, m] * g + gidx).reshape(-1), s2)
        blocks[m] = (use.reshape(ncode, g) @ hblk).reshape(ncode, d, d)
        unused[m] = use.reshape(ncode, g).sum(1) == 0
    used_diag = torch.diagonal(blocks, dim1=-2, dim2=-1).mean(-1)[~unused]
    ridge = 1e-6 * float(used_diag.mean()) if used_diag.numel() else 1e-6
    eye = torch.eye(d, dtype=w.dtype, device=w.device)
    pre = torch.linalg.inv(blocks + ridge * eye + unused[..., None, None] * eye)

    def apply_a(c: torch.Tensor) -> torch.Tensor:
        return _scatter((decode(codes, c, scales) @ h) * s, codes, ncode) + ridge * c

    def precond(r: torch.Tensor) -> torch.Tensor:
        return (pre @ r[..., None])[..., 0]

    x = codebooks.clone()
    rhs = _scatter((w @ h) * s, codes, ncode)
    stop = 1e-14 * max(float((rhs * precond(rhs)).sum()), 1e-30)
    r = rhs - apply_a(x)
    z = precond(r)
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(iters):
        if rz <= stop:
            break
        ap = apply_a(p)
        pap = float((p * ap).sum())
        if not pap > 0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        z = precond(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    before = _objective(w, h, codes, codebooks, scales)
    after = _objective(w, h, codes, x, scales)
    return x if after < before else codebooks


def _objective(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
               scales: torch.Tensor) -> float:
    e = w - decode(codes, codebooks, scales)
    val = float(((e @ h) * e).sum())
    return val if val == val else float("inf")  # NaN never counts as an improvement


def update_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                  scales: torch.Tensor) -> torch.Tensor:
    """Per-row least squares ``s_n = (w_nᵀ H u_n) / (u_nᵀ H u_n)``; rows with u = 0 keep their scale."""
    u = decode(codes, codebooks)
    uh = u @ h
    num = (w * uh).sum(1)
    den = (u * uh).sum(1)
    ok = den > 1e-12 * den.abs().max().clamp(min=1e-30)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), scales)


def _round_half(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (what the op stores), saturating instead of overflowing to inf."""
    return t.clamp(-65504.0, 65504.0).half().float()


# ---- driver -------------------------------------------------------------------------------------------


def init_residual_kmeans(w: torch.Tensor, h: torch.Tensor, cfg: AQLMConfig, gen: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row RMS scales, then residual k-means codebook by codebook on the normalized groups.

    The k-means metric is H's diagonal (times the row scale²): the part of the objective a codebook
    can see without knowing the codes, so init already spends codewords on the inputs that matter.
    """
    n, k = w.shape
    d, ncode, m_cb = cfg.in_group_size, 2**cfg.nbits, cfg.num_codebooks
    scales = w.pow(2).mean(1).sqrt()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    resid = (w / scales[:, None]).reshape(n * (k // d), d)
    weights = None
    if cfg.kmeans_weighted:
        weights = ((scales * scales)[:, None] * torch.diagonal(h)[None, :]).reshape(n * (k // d), d)
        weights = weights / weights.mean()
    sample = max(64 * ncode, 16384) if ncode <= 4096 else 4 * ncode
    books, codes = [], []
    for _ in range(m_cb):
        cent = kmeans(resid, ncode, cfg.kmeans_iters, gen, sample, weights)
        idx = assign_nearest(resid, cent, weights)
        resid = resid - cent[idx]
        books.append(cent)
        codes.append(idx)
    codes_t = torch.stack(codes, 1).reshape(n, k // d, m_cb)
    return codes_t, torch.stack(books, 0), scales


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: AQLMConfig) -> AQLMResult:
    """Quantize one ``[N, K]`` weight. ``hessian`` ``[K, K]`` (None = plain MSE)."""
    n, k = weight.shape
    cfg.validate(k)
    dev = cfg.device
    w = weight.detach().to(dev, torch.float32)
    h = prepare_hessian(hessian, k, cfg.damp, dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[tuple[str, float]] = []
    total = 3 + cfg.rounds
    bar = tqdm(total=total, desc=f"aqlm {cfg.num_codebooks}x{cfg.nbits} [{n}x{k}]", leave=False,
               disable=not cfg.progress)

    def note(stage: str, codes, books, scales) -> None:
        history.append((stage, weighted_error(w, decode(codes, books, scales), h)))
        bar.set_postfix_str(f"{stage} err={history[-1][1]:.4g}")
        bar.update(1)

    # The error is measured after init and after each round's code sweep (one GEMM each); the codebook
    # and scale steps are exact least squares and only ever lower it.
    codes, books, scales = init_residual_kmeans(w, h, cfg, gen)
    note("kmeans", codes, books, scales)
    scales = update_scales(w, h, codes, books, scales)
    for r in range(cfg.rounds):
        books = update_codebooks(w, h, codes, books, scales, cfg.cg_iters)
        scales = update_scales(w, h, codes, books, scales)
        codes = update_codes(w, h, codes, books, scales, cfg.beam_size, cfg.block_groups)
        note(f"round{r}", codes, books, scales)
    # Store exactly what the op stores: fp16 codebooks, fp16 scales refitted to them, codes adapted.
    books = _round_half(books)
    scales = _round_half(update_scales(w, h, codes, books, scales))
    codes = update_codes(w, h, codes, books, scales, cfg.beam_size, cfg.block_groups)
    note("final", codes, books, scales)
    bar.close()
    return AQLMResult(codes.cpu(), books.cpu(), scales.cpu(), history)


def codebook_bits(num_codebooks: int, nbits: int, in_group_size: int) -> float:
    """Bits per weight of the codes alone (codebooks and scales are per-layer overhead)."""
    return num_codebooks * nbits / in_group_size


def code_storage_dtype(nbits: int) -> str:
    return "uint8" if nbits <= 8 else "uint16"


def quantize_codebook(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, num_codebooks: int,
                      nbits: int, in_group_size: int, beam_size: int, rounds: int, cg_iters: int,
                      kmeans_iters: int, damp: float, seed: int, progress: bool = False,
                      device: str = "cpu", **whole_model: Any) -> CodebookQuantizedWeight:
    """Quantize one ``[K, N]`` weight with AQLM. ``hessian`` None = plain weight MSE (data-free).

    ``whole_model`` takes the ``finetune_*`` options, which act later (the tune pass, :mod:`qcompile.passes.tune`)."""
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


__all__ = ["AQLMConfig", "AQLMResult", "aqlm_quantize", "decode", "update_codes", "update_codebooks",
           "update_scales", "init_residual_kmeans", "prepare_hessian", "weighted_error", "kmeans",
           "assign_nearest", "codebook_bits", "code_storage_dtype", "quantize_codebook"]
