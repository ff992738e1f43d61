"""CodebookMatMul cases: random codes and codebooks as the kernel tests draw them, a third of them aqlm-2x8-like
layers wide enough (N >= 8·S) for the prepared batch-1 byte walk and its fixed-point tables; every path can be
pinned (QCOMPILE_CODEBOOK_PATH), and the mutations aim at the codes and at codewords the codes use."""
from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.fuzz.case import F16, F32, AttrSpec, Case, InputSpec, OpSpec, Rejected, draw_lead, finish, pick
from qcompile.fuzz.oracle import Linear, max1, prefill_amx_relative
from qcompile.formats.aqlm import reference as ref

CODES = (np.dtype(np.uint8), np.dtype(np.uint16))
INPUTS = (InputSpec("X", None, floats=True), InputSpec("codes", CODES), InputSpec("codebooks", (F16,), floats=True),
          InputSpec("scales", (F16, F32), floats=True), InputSpec("bias", None, optional=True, floats=True))
ATTRS = (AttrSpec("K", int), AttrSpec("N", int), AttrSpec("num_codebooks", int, interesting=(0, 1, 2, 16, 17)),
         AttrSpec("codebook_size", int, interesting=(0, 1, 255, 256, 257, 65535, 65536, 65537)),
         AttrSpec("in_group_size", int, 8, interesting=(0, 1, 7, 8, 32, 33)))


def base(rng: np.random.Generator) -> Case:
    if rng.random() < 0.3:  # the batch-1 byte walk: byte codes, 256-entry tables, M >= 2, N >= 8·S
        m, s, d = int(pick(rng, (2, 2, 3, 4))), int(pick(rng, (256, 256, 250))), 8
        k, n = 8 * int(rng.integers(1, 40)), int(rng.integers(2048, 2110))
        lead = (1,) if rng.random() < 0.7 else draw_lead(rng)
    else:
        m = int(pick(rng, (1, 1, 2, 2, 3, 4, 16)))
        s = int(pick(rng, (1, 2, 5, 16, 250, 256, 257, 300, 1024)))
        d = int(pick(rng, (1, 2, 4, 8, 8, 8, 16, 32, int(rng.integers(1, 33)))))
        k, n = d * int(rng.integers(1, 25)), int(rng.integers(1, 70))
        lead = draw_lead(rng)
    dtype = pick(rng, (F32, F16))
    case = Case("CodebookMatMul", dict(K=k, N=n, num_codebooks=m, codebook_size=s, in_group_size=d), {
        "X": rng.standard_normal(lead + (k,)).astype(dtype),
        "codes": rng.integers(0, s, (n, k // d, m)).astype(ref.code_dtype(s)),
        "codebooks": (rng.standard_normal((m, s, d)) * 0.5).astype(np.float16),
        "scales": rng.uniform(0.5, 1.5, n).astype(pick(rng, (F16, F32))),
        "bias": rng.standard_normal(n).astype(dtype) if rng.random() < 0.5 else None,
    }, set())
    return finish(case, SPEC, rng)


# ---- codebook-only mutations -----------------------------------------------------------------------------------


def code_values(case: Case, rng: np.random.Generator) -> str | None:
    """Codes at or past codebook_size (one, or a whole row) where the code type allows them, or every code the
    last codeword S-1 (legal)."""
    codes, s = case.inputs["codes"], case.attrs.get("codebook_size")
    if codes is None or not codes.size or codes.dtype not in CODES or type(s) is not int or s < 1:
        return None
    top = int(np.iinfo(codes.dtype).max)
    codes = codes.copy()
    flat = codes.reshape(-1)
    if rng.random() < 0.3 or s > top:
        flat[:] = min(max(s - 1, 0), top)
        label = "last"
    else:
        v = int(pick(rng, [s, min(s + 1, top), top]))
        if rng.random() < 0.7:
            flat[int(rng.integers(flat.size))] = v
        else:
            flat[:] = v
        label = f"out_of_range={v}"
    case.inputs["codes"] = codes
    return f"codes:{label}"


def used_codeword(case: Case, rng: np.random.Generator) -> str | None:
    """A special value into a codeword the codes actually use (the shared mutation mostly hits unused ones)."""
    codes, books = case.inputs["codes"], case.inputs["codebooks"]
    if codes is None or books is None or codes.ndim != 3 or books.ndim != 3 or not codes.size or books.dtype != F16:
        return None
    n, g, m = (int(rng.integers(v)) for v in codes.shape)
    s = int(codes[n, g, m])
    if m >= books.shape[0] or s >= books.shape[1] or not books.shape[2]:
        return None
    books = books.copy()
    label, v = pick(rng, [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf), ("max", 65504.0), ("dmin", 2.0**-24)])
    books[m, s, int(rng.integers(books.shape[2]))] = v
    case.inputs["codebooks"] = books
    return f"codeword[{m},{s}]={label}"


MUTATIONS = {"code_values": code_values, "used_codeword": used_codeword}


# ---- the reference's view ------------------------------------------------------------------------------------------


def linear(case: Case, a: dict[str, Any]) -> Linear:
    """Validates with ``reference.codebook.validate``, then ``W[n, k] = scales[n] · Σ_m codebooks[m, code, j]``
    (float64; the reference's fp32 weight would overflow where the kernels, scaling last, need not)."""
    x, codes, books, scales, bias = (case.inputs[n] for n in ("X", "codes", "codebooks", "scales", "bias"))
    try:
        ref.validate(x.shape, codes, books, scales, bias, x_dtype=x.dtype, **a)
    except ValueError as e:
        raise Rejected(str(e)) from e
    if not (1 <= a["num_codebooks"] <= 16 and 1 <= a["in_group_size"] <= 32):  # docs/ops.md; the reference allows more
        raise Rejected("num_codebooks must be in 1..16 and in_group_size in 1..32")
    k, n, d = a["K"], a["N"], a["in_group_size"]
    cb = books.astype(np.float64)
    idx = codes.astype(np.intp)
    with np.errstate(all="ignore"):
        sums = sum(cb[j][idx[:, :, j]] for j in range(a["num_codebooks"])).reshape(n, k)
        abs_sums = sum(np.abs(cb[j])[idx[:, :, j]] for j in range(a["num_codebooks"])).reshape(n, k)
        peak_sums = sum(max1(cb[j])[idx[:, :, j]] for j in range(a["num_codebooks"])).reshape(n, k)
        sv = scales.astype(np.float64)[:, None]
        xd = x.astype(np.float64).reshape(-1, k)
        extra = 0.0
        lut_rows = xd.shape[0] == 1 or case.env.get("QCOMPILE_CODEBOOK_PATH") == "lut"
        if lut_rows and "QCOMPILE_CODEBOOK_LUT_FP32" not in case.env:  # the fixed-point walk may serve each row
            bound = np.stack([ref.lut_fixed_point_error_bound(r, books, scales) for r in xd]) if len(xd) else 0.0
            extra = np.where(np.isfinite(bound), bound, 0.0)  # (a non-finite table takes the fp32 walk)
        return Linear(x=xd, w=(sv * sums).T, b=None if bias is None else bias.astype(np.float64),
                      x_mag=np.abs(xd), w_mag=(np.abs(sv) * abs_sums).T,
                      x_peak=max1(xd), w_peak=(max1(sv) * peak_sums).T,
                      n_terms=k + (k // d) * a["num_codebooks"] + d + 8, extra_tol=extra,
                      relative_tol=prefill_amx_relative(case.env, a, len(xd)))


SPEC = OpSpec("CodebookMatMul", INPUTS, ATTRS, {"QCOMPILE_CODEBOOK_PATH": (None, None, "lut", "fused", "gemm"),
                                                "QCOMPILE_CODEBOOK_NO_AVX2": (None, None, "1"),
                                                "QCOMPILE_CODEBOOK_LUT_FP32": (None, "1"),
                                                "QCOMPILE_PREFILL_AMX": (None, None, "0")}, base, MUTATIONS, linear)
