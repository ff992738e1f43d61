"""SpQRMatMul cases: ``reference.spqr.random_packed`` weights, half of them in the spqr-w3 layout (3-bit codes,
groups of 16, 3-bit stats, stat_group 16) that the prepared lane layout and the fixed-point pair tables serve,
with int16/int32 index tensors mixed; the mutations aim at the CSR table, the permutation and the bitstreams."""
from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.fuzz.case import F16, F32, AttrSpec, Case, InputSpec, OpSpec, Rejected, draw_lead, finish, pick
from qcompile.fuzz.oracle import Linear, max1, prefill_amx_relative
from qcompile.formats.spqr import reference as ref

I32, I16 = np.dtype(np.int32), np.dtype(np.int16)
INDEX = (I16, I32)
INPUTS = (InputSpec("X", None, floats=True), InputSpec("codes", (I32,)), InputSpec("stat_codes", (I32,)),
          InputSpec("stat_params", (F16,), floats=True), InputSpec("row_offsets", INDEX),
          InputSpec("col_indices", INDEX), InputSpec("values", (F16,), floats=True),
          InputSpec("perm", INDEX, optional=True), InputSpec("bias", None, optional=True, floats=True))
ATTRS = (AttrSpec("K", int), AttrSpec("N", int), AttrSpec("bits", int, interesting=(2, 3, 4, 5, 8)),
         AttrSpec("group_size", int, 16, interesting=(8, 16, 24, 32, 48, 64)),
         AttrSpec("stat_bits", int, 3, interesting=tuple(range(0, 10))),
         AttrSpec("stat_group", int, 16, interesting=(1, 7, 16, 32, 48)))
WEIGHTS = ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm")


def base(rng: np.random.Generator) -> Case:
    if rng.random() < 0.5:  # spqr-w3: K past whole 80-position lane blocks, N past 32-row groups
        bits, gs, sb, sg = 3, 16, int(pick(rng, (3, 3, 1, 2, 4))), int(pick(rng, (16, 16, 32, 48)))
        k = int(pick(rng, [80 * int(rng.integers(1, 5)) + int(rng.integers(0, 40)), int(rng.integers(1, 80))]))
        n = int(pick(rng, [int(rng.integers(1, 70)), 32, 33, 257]))
    else:
        bits, gs = int(pick(rng, (3, 4))), 16 * int(rng.integers(1, 5))
        sb, sg = int(rng.integers(1, 9)), int(pick(rng, (int(rng.integers(1, 20)), 16, 32)))
        k, n = int(rng.integers(1, 300)), int(rng.integers(1, 80))
    dtypes = {f"{t}_dtype": pick(rng, INDEX) for t in ("col", "offsets", "perm")}
    packed = ref.random_packed(k, n, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg,
                               outlier_rate=float(pick(rng, (0.0, 0.01, 0.05, 0.3))),
                               with_perm=bool(rng.random() < 0.6), seed=int(rng.integers(2**31)), **dtypes)
    if packed["row_offsets"][-1] != packed["col_indices"].size:  # int16 offsets wrapped: store int32
        counts = np.diff(packed["row_offsets"].astype(np.int64)) % 65536
        packed["row_offsets"] = ref.row_offsets_from_counts(counts, I32)
    dtype = pick(rng, (F32, F16))
    lead = draw_lead(rng)
    inputs: dict[str, np.ndarray | None] = {"X": rng.standard_normal(lead + (k,)).astype(dtype)}
    inputs |= {w: packed.get(w) for w in WEIGHTS}
    inputs["bias"] = rng.standard_normal(n).astype(dtype) if rng.random() < 0.5 else None
    case = Case("SpQRMatMul", dict(K=k, N=n, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg), inputs, set())
    return finish(case, SPEC, rng)


# ---- SpQR-only mutations ---------------------------------------------------------------------------------------


def _index_value(rng: np.random.Generator, case: Case, dtype: np.dtype) -> int:
    k = case.attrs.get("K") if type(case.attrs.get("K")) is int else 1
    nnz = case.inputs["col_indices"].size if case.inputs["col_indices"] is not None else 0
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.iinfo(np.int32)
    v = int(pick(rng, [-1, k, k + 1, k - 1, nnz, nnz + 1, info.max, info.min, int(rng.integers(-50, 50))]))
    return int(np.clip(v, info.min, info.max))


def index_corruption(case: Case, rng: np.random.Generator) -> str | None:
    """The CSR and permutation faults a file can hold: an out-of-range, negative or extreme entry in any index
    tensor; offsets swapped (decreasing), shifted at the front or the end; a repeated permutation entry."""
    names = [n for n in ("row_offsets", "col_indices", "perm") if case.inputs.get(n) is not None
             and case.inputs[n].size and case.inputs[n].dtype.kind in "iu"]
    if not names:
        return None
    name = pick(rng, names)
    arr = case.inputs[name].copy()
    flat = arr.reshape(-1)
    kind = pick(rng, ["value", "value", "swap", "first", "last", "repeat"])
    if kind == "swap" and flat.size >= 2:
        i = int(rng.integers(flat.size - 1))
        flat[i], flat[i + 1] = flat[i + 1], flat[i]
        if flat[i] == flat[i + 1]:
            flat[i] = flat[i] + 1 if flat[i] < np.iinfo(arr.dtype).max else flat[i] - 1
    elif kind == "repeat" and flat.size >= 2:
        i, j = rng.choice(flat.size, 2, replace=False)
        flat[i] = flat[j]
    else:
        i = {"first": 0, "last": flat.size - 1}.get(kind, int(rng.integers(flat.size)))
        flat[i] = _index_value(rng, case, arr.dtype)
        kind = f"{kind}[{i}]={flat[i]}"
    case.inputs[name] = arr
    return f"index:{name}:{kind}"


def index_types(case: Case, rng: np.random.Generator) -> str | None:
    """An index tensor stored in the other legal type (values wrap when int16 cannot hold them)."""
    names = [n for n in ("row_offsets", "col_indices", "perm") if case.inputs.get(n) is not None
             and case.inputs[n].dtype in INDEX]
    if not names:
        return None
    name = pick(rng, names)
    arr = case.inputs[name]
    case.inputs[name] = arr.astype(I16 if arr.dtype == I32 else I32)
    return f"index_type:{name}"


def bitstreams(case: Case, rng: np.random.Generator) -> str | None:
    """Random words in codes or stat codes (every bit pattern decodes to codes in range), including the
    padding past K and the unused tail bits the contract says are zero and ignored."""
    name = pick(rng, ("codes", "stat_codes"))
    arr = case.inputs.get(name)
    if arr is None or not arr.size or arr.dtype != I32:
        return None
    arr = arr.copy()
    flat = arr.reshape(-1)
    kind = "all" if rng.random() < 0.5 else "tail"
    if kind == "all":
        flat[:] = rng.integers(-2**31, 2**31, flat.size, dtype=np.int64).astype(np.int32)
    else:
        flat[-1] = -1  # the last word of the last row: its padding/tail bits all set
    case.inputs[name] = arr
    return f"bitstream:{name}:{kind}"


def outlier_layout(case: Case, rng: np.random.Generator) -> str | None:
    """Legal but unusual tables: no permutation, the identity or reversed one, every outlier in one row,
    duplicate (row, column) entries (they add up)."""
    k = case.attrs.get("K")
    kind = pick(rng, ["no_perm", "identity", "reversed", "one_row", "duplicates"])
    if kind in ("identity", "reversed") and type(k) is int and 0 < k <= 4096:
        p = np.arange(k)[:: 1 if kind == "identity" else -1]
        case.inputs["perm"] = p.astype(case.inputs["perm"].dtype if case.inputs.get("perm") is not None else I32)
    elif kind == "no_perm":
        case.inputs["perm"] = None
    else:
        ro, ci, va = (case.inputs.get(n) for n in ("row_offsets", "col_indices", "values"))
        if any(t is None for t in (ro, ci, va)) or ro.ndim != 1 or ro.size < 2 or not ci.size or ci.shape != va.shape:
            return None
        if kind == "one_row":
            r = int(rng.integers(ro.size - 1))
            new = np.zeros(ro.size, np.int64)
            new[r + 1:] = ci.size
        else:
            ci = np.repeat(ci, 2)
            va = np.repeat(va, 2)
            new = ro.astype(np.int64) * 2
        case.inputs["row_offsets"] = new.astype(I32)
        case.inputs["col_indices"], case.inputs["values"] = ci, va
    return f"outliers:{kind}"


MUTATIONS = {"index_corruption": index_corruption, "index_types": index_types, "bitstreams": bitstreams,
             "outlier_layout": outlier_layout}


# ---- the reference's view ------------------------------------------------------------------------------------------


def linear(case: Case, a: dict[str, Any]) -> Linear:
    """Validates with ``reference.spqr.validate_inputs``, then the op as the kernels compute it: the dense part
    over the permuted activation (stored order) and the outliers over X itself, ``x = [X[:, perm], X]``."""
    x = case.x
    args = [case.inputs[n] for n in WEIGHTS]
    try:
        ref.validate_inputs(x, *args, case.inputs["bias"], **a)
    except ValueError as e:
        raise Rejected(str(e)) from e
    codes, stat_codes, stat_params, ro, ci, va, perm = args
    k, n, gs = a["K"], a["N"], a["group_size"]
    g = ref.num_groups(k, gs)
    q = ref.unpack_codes(codes, a["bits"], k).astype(np.float64)  # [N, K] stored order
    sc, zc = ref.unpack_stat_codes(stat_codes, a["stat_bits"], g)
    sp = stat_params.astype(np.float32)[np.arange(n) // a["stat_group"]]  # [N, 4, G]
    gi = np.arange(k) // gs
    with np.errstate(all="ignore"):
        s_mul, z_mul = sc.astype(np.float32) * sp[:, 0], zc.astype(np.float32) * sp[:, 2]
        scale = (s_mul + sp[:, 1]).astype(np.float64)[:, gi]  # fp32, as the contract computes them
        zero = (z_mul + sp[:, 3]).astype(np.float64)[:, gi]
        dense = scale * (q - zero)  # [N, K]
        rows = np.repeat(np.arange(n), np.diff(ro.astype(np.int64)))
        outl = np.zeros((k, n))
        np.add.at(outl, (ci.astype(np.int64), rows), va.astype(np.float64))
        outl_abs = np.zeros((k, n))
        np.add.at(outl_abs, (ci.astype(np.int64), rows), np.abs(va.astype(np.float64)))
        outl_peak = np.zeros((k, n))
        np.add.at(outl_peak, (ci.astype(np.int64), rows), max1(va.astype(np.float64)))
        xd = x.astype(np.float64).reshape(-1, k)
        xs = xd if perm is None else xd[:, perm.astype(np.int64)]
        scale_peak = max1(np.abs(s_mul) + np.abs(sp[:, 1]))[:, gi]
        zero_peak = (np.abs(z_mul) + np.abs(sp[:, 3]))[:, gi]
        per_row = int(np.diff(ro.astype(np.int64)).max()) if n else 0
        extra = 0.0
        if (xd.shape[0] == 1 and a["bits"] == 3 and gs == 16 and "QCOMPILE_SPQR_LUT_FP32" not in case.env
                and np.isfinite(xd).all()):  # the fixed-point pair tables may serve this call
            bound = ref.pair_table_error_bound(xd[0], stat_codes, stat_params, perm, **a)
            extra = np.where(np.isfinite(bound), bound, 0.0)[None, :]
        return Linear(x=np.concatenate([xs, xd], axis=1), w=np.concatenate([dense.T, outl]),
                      b=None if case.inputs["bias"] is None else case.inputs["bias"].astype(np.float64),
                      x_mag=np.abs(np.concatenate([xs, xd], axis=1)),
                      w_mag=np.concatenate([(np.abs(scale) * (np.abs(q) + np.abs(zero) + 8)).T, outl_abs]),
                      x_peak=max1(np.concatenate([xs, xd], axis=1)),
                      w_peak=np.concatenate([(scale_peak * max1(q + zero_peak + 8)).T, outl_peak]),
                      n_terms=k + per_row + 16, extra_tol=extra,
                      relative_tol=prefill_amx_relative(case.env, a, len(xd)))


SPEC = OpSpec("SpQRMatMul", INPUTS, ATTRS, {"QCOMPILE_SPQR_SCALAR": (None, None, "1"),
                                            "QCOMPILE_SPQR_LUT_FP32": (None, "1"),
                                            "QCOMPILE_PREFILL_AMX": (None, None, "0")}, base, MUTATIONS, linear)
