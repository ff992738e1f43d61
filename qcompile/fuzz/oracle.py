"""What a run must give, given the numpy reference's view of a case.

Every op here computes ``Y = X_eff @ W + b`` for an effective activation (X rotated, permuted, or X itself) and
a dequantized weight, so one judge serves all three: the op module describes its case as a :class:`Linear`
(built from the reference's decoders, in float64) with two companion bounds, and :func:`judge` checks each
output element by the first rule that applies:

1. a NaN input takes part (every X element of a row meets every weight of a column): the output is NaN;
2. some fp32 intermediate of some evaluation order may overflow (``peak``, the sum over terms of the product of
   ``max(1, |factor|)``, reaches 2^126): nothing is asserted, fp32 accumulation error is unbounded there;
3. an infinity takes part: the output is not finite (Inf or NaN: kernels factor scales out of sums, so
   ``inf - inf`` may appear where the reference has ``inf``);
4. otherwise the output equals the reference within the fp32 summation bound ``(n + 4)·2^-24·Σ|terms|``
   (n terms per output), an underflow allowance ``2^-120·peak``, the output rounding (2^-23 relative in
   float32, 2^-10 plus the denormal step in float16), any documented fixed-point bound of the op, and
   ``2^-14·Σ|terms|`` where the AMX prefill (bf16 splits, docs/ops.md) may serve the call;
   infinities are compared as the dtype's largest finite value (an output rounding past it is no error).

Rules 1 and 3 use the rows/columns test above, so they hold for any summation order. Bounds are computed
with infinities replaced by 1, so an infinite input does not put its row into the "overflow" regime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OVERFLOW_PEAK = 2.0**126


@dataclass
class Linear:
    """``Y = x @ w + b`` in float64 plus the magnitudes the kernels' fp32 terms reach.

    ``x_mag @ w_mag`` is Σ|terms| of the kernel's rearrangement (the accuracy scale); ``x_peak @ w_peak`` bounds
    any partial product or sum (overflow/underflow). ``extra_tol`` is a documented fixed-point bound ([M, N] or
    scalar) and ``n_terms`` the number of fp32 terms summed per output."""
    x: np.ndarray  # [M, K'] float64
    w: np.ndarray  # [K', N] float64
    b: np.ndarray | None  # [N]
    x_mag: np.ndarray
    w_mag: np.ndarray
    x_peak: np.ndarray
    w_peak: np.ndarray
    n_terms: int
    extra_tol: np.ndarray | float = 0.0
    relative_tol: float = 0.0  # a further bound relative to Σ|terms| (prefill_amx_relative)


def prefill_amx_relative(env: dict, attrs: dict, rows: int) -> float:
    """The AMX prefill's bound relative to Σ|terms| (qcompile.formats.prefill_amx) where it may serve a call:
    more than one row of X, an AMX host, accuracy_level not 1 and QCOMPILE_PREFILL_AMX not "0"; else 0."""
    from qcompile.formats import prefill_amx

    if rows <= 1 or attrs.get("accuracy_level", 0) == 1 or env.get("QCOMPILE_PREFILL_AMX") == "0":
        return 0.0
    return prefill_amx.RELATIVE_BOUND if prefill_amx.host_has_amx() else 0.0


def max1(a: np.ndarray) -> np.ndarray:
    """``max(1, |a|)``: bounds every partial product of factors taken in any order."""
    return np.maximum(1.0, np.abs(a))


def without_inf(a: np.ndarray | None) -> np.ndarray | None:
    """Infinities -> 1 (NaN kept): the case's bounds and genuine-NaN test without the infinities' effect."""
    if a is None or a.dtype.kind != "f" or not np.isinf(a).any():
        return a
    return np.where(np.isinf(a), np.ones((), a.dtype), a)


def _nonfinite_rows_cols(lin: Linear, test) -> np.ndarray:
    rows = test(lin.x).any(axis=1)[:, None]
    cols = test(lin.w).any(axis=0)[None, :]
    out = rows | cols
    if lin.b is not None:
        out = out | test(lin.b)[None, :]
    return out


def judge(y: np.ndarray, x_shape: tuple[int, ...], out_dtype: np.dtype, raw: Linear, finite: Linear) -> str | None:
    """None when ``y`` is what the rules above allow, else a description of the first mismatches. ``raw`` is
    the case's Linear, ``finite`` the same case with infinities replaced by 1."""
    n = raw.w.shape[1]
    want_shape = tuple(x_shape[:-1]) + (n,)
    if y.dtype != out_dtype or y.shape != want_shape:
        return f"output {y.dtype}{list(y.shape)}, expected {out_dtype}{list(want_shape)}"
    got = y.reshape(-1, n).astype(np.float64)
    if got.size == 0:
        return None
    with np.errstate(all="ignore"):
        must_nan = _nonfinite_rows_cols(finite, np.isnan)
        must_nonfinite = _nonfinite_rows_cols(raw, lambda a: ~np.isfinite(a))
        b_abs = 0.0 if finite.b is None else np.abs(finite.b)[None, :]
        b_peak = 0.0 if finite.b is None else max1(finite.b)[None, :]
        want = finite.x @ finite.w + (0.0 if finite.b is None else finite.b[None, :])
        mag = finite.x_mag @ finite.w_mag + b_abs
        peak = finite.x_peak @ finite.w_peak + b_peak
        free = ~(peak < OVERFLOW_PEAK)
        fmax = float(np.finfo(out_dtype).max)
        if out_dtype == np.float16:
            rounding = np.abs(want) * 2.0**-10 + 2.0**-24
        else:
            rounding = np.abs(want) * 2.0**-23 + 2.0**-149
        tol = ((finite.n_terms + 4) * 2.0**-24 + finite.relative_tol) * mag + 2.0**-120 * peak + rounding \
            + finite.extra_tol
        err = np.abs(np.clip(got, -fmax, fmax) - np.clip(want, -fmax, fmax))
        bad_nan = must_nan & ~np.isnan(got)
        bad_inf = ~must_nan & ~free & must_nonfinite & np.isfinite(got)
        bad_val = ~must_nan & ~free & ~must_nonfinite & ~(err <= tol)
    msgs = []
    for what, bad in (("expected NaN", bad_nan), ("expected a non-finite value", bad_inf), ("mismatch", bad_val)):
        if bad.any():
            idx = [tuple(int(i) for i in ix) for ix in np.argwhere(bad)[:3]]
            detail = ", ".join(f"[{m},{c}] got {got[m, c]!r} want {want[m, c]!r} tol {tol[m, c]:.3g}" for m, c in idx)
            msgs.append(f"{what} at {int(bad.sum())} of {bad.size} outputs: {detail}")
    return "; ".join(msgs) or None
