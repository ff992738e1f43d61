"""FP4MatMul cases: weights quantized with the reference's codecs (round-to-nearest E2M1 under per-group E8M0
or E4M3 scales), shapes around the kernel's 64-weight blocks and 16/8-row prefill tiles, every Hadamard block."""
from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.fuzz.case import F16, F32, AttrSpec, Case, InputSpec, OpSpec, Rejected, draw_lead, finish, pick
from qcompile.fuzz.oracle import Linear, max1, prefill_amx_relative
from qcompile.formats.fp4 import reference as ref

U8 = (np.dtype(np.uint8),)
INPUTS = (InputSpec("X", None, floats=True), InputSpec("W", U8), InputSpec("scales", U8),
          InputSpec("tensor_scale", (F32,), optional=True, floats=True),
          InputSpec("bias", None, optional=True, floats=True))
ATTRS = (AttrSpec("K", int), AttrSpec("N", int),
         AttrSpec("group_size", int, interesting=ref.GROUP_SIZES + (4, 12, 512)),
         AttrSpec("scale_format", str, interesting=("e8m0", "e4m3", "e5m2")),
         AttrSpec("hadamard_block", int, 0, interesting=(0, 1, 3, 512) + ref.HADAMARD_BLOCKS))


def base(rng: np.random.Generator) -> Case:
    g = int(pick(rng, ref.GROUP_SIZES))
    fmt = pick(rng, ref.SCALE_FORMATS)
    hb = int(pick(rng, (0, 0, 0) + ref.HADAMARD_BLOCKS))
    if hb:
        k = hb * int(rng.integers(1, max(2, 640 // hb)))
    else:
        k = int(pick(rng, [int(rng.integers(1, 300)), g * int(rng.integers(1, 5)), 64 * int(rng.integers(1, 6)) + 8]))
    n = int(pick(rng, [int(rng.integers(1, 40)), 1, 12, 13, 37, 130]))
    dtype = pick(rng, (F32, F16))
    w_float = rng.standard_normal((n, k))
    kp = ref.padded_k(k, g)
    amax = np.abs(np.pad(w_float, ((0, 0), (0, kp - k)))).reshape(n, kp // g, g).max(axis=2)
    ts = float(rng.uniform(0.25, 2.0)) if rng.random() < 0.5 else None
    scales = ref.encode_scales(amax / ref.E2M1_MAX / (ts or 1.0) + 1e-12, fmt)
    step = np.repeat(ref.decode_scales(scales, fmt).astype(np.float64), g, axis=1)[:, :k] * (ts or 1.0)
    codes = ref.encode_e2m1(w_float / np.where(step > 0, step, 1.0))  # (a tiny group's E4M3 scale may round to 0)
    lead = draw_lead(rng)
    case = Case("FP4MatMul", dict(K=k, N=n, group_size=g, scale_format=fmt, hadamard_block=hb), {
        "X": rng.standard_normal(lead + (k,)).astype(dtype),
        "W": ref.pack_fp4(codes, g),
        "scales": scales,
        "tensor_scale": None if ts is None else np.array([ts], np.float32),
        "bias": rng.standard_normal(n).astype(dtype) if rng.random() < 0.5 else None,
    }, set())
    return finish(case, SPEC, rng)


# ---- FP4-only mutations -----------------------------------------------------------------------------------------

SPECIAL_SCALE_CODES = {"e8m0": (255, 0, 1, 126, 127, 253, 254),  # NaN, 2^-127, ..., 2^127
                       "e4m3": (0x7F, 0xFF, 0x00, 0x80, 0x01, 0x07, 0x08, 0x7E, 0xFE)}  # NaN, +-0, subnormals, +-448


def scale_codes(case: Case, rng: np.random.Generator) -> str | None:
    """NaN, the smallest and largest scales, subnormal and negative E4M3 codes into one group or a whole row."""
    s, fmt = case.inputs["scales"], case.attrs.get("scale_format")
    if s is None or not s.size or type(fmt) is not str or fmt not in SPECIAL_SCALE_CODES or s.dtype != np.uint8:
        return None
    s = s.copy()
    code = int(pick(rng, SPECIAL_SCALE_CODES[fmt]))
    flat = s.reshape(-1)
    if rng.random() < 0.5:
        flat[int(rng.integers(flat.size))] = code
    else:
        flat[:] = code
    case.inputs["scales"] = s
    return f"scale_code={code:#x}"


def extreme_codes(case: Case, rng: np.random.Generator) -> str | None:
    """Every weight of a row -0 (code 8), +6 or -6, or padding nibbles past K set to garbage (the contract says
    they are zero and never contribute: a kernel must not read them as weights)."""
    w = case.inputs["W"]
    if w is None or not w.size or w.dtype != np.uint8:
        return None
    w = w.copy()
    kind = pick(rng, ["minus_zero", "max", "min", "padding"])
    byte = {"minus_zero": 0x88, "max": 0x77, "min": 0xFF, "padding": 0}[kind]
    if kind == "padding":
        k = case.attrs.get("K")
        if type(k) is not int or not 0 < k < 2 * w.shape[-1]:
            return None
        nib = np.zeros(2 * w.shape[-1], bool)
        nib[k:] = True
        garbage = rng.integers(0, 256, w.shape, dtype=np.uint8)
        mask = (nib[0::2] * 0x0F | nib[1::2] * 0xF0).astype(np.uint8)
        w = (w & ~mask) | (garbage & mask)
    else:
        w.reshape(w.shape[0] if w.ndim else 1, -1)[int(rng.integers(w.shape[0] if w.ndim else 1))] = byte
    case.inputs["W"] = w
    return f"codes:{kind}"


MUTATIONS = {"scale_codes": scale_codes, "extreme_codes": extreme_codes}


# ---- the reference's view ------------------------------------------------------------------------------------------


def linear(case: Case, a: dict[str, Any]) -> Linear:
    """Validates with the reference's rules, then ``Y = Hadamard_b(X) @ Wdeqᵀ + bias`` with
    ``Wdeq = e2m1 · scale · tensor_scale`` decoded in float64 as ``fp4_matmul_reference`` does."""
    x, w, s, ts, b = (case.inputs[k] for k in ("X", "W", "scales", "tensor_scale", "bias"))
    try:
        ref.validate_fp4_inputs(x, w, s, ts, b, **a)
    except ValueError as e:
        raise Rejected(str(e)) from e
    k, g, hb = a["K"], a["group_size"], a["hadamard_block"]
    kp = ref.padded_k(k, g)
    xd = x.astype(np.float64).reshape(-1, k)
    vals = ref.decode_e2m1(ref.unpack_fp4(w, kp)).astype(np.float64)[:, :k]  # [N, K]
    sc = np.repeat(ref.decode_scales(s, a["scale_format"]).astype(np.float64), g, axis=1)[:, :k]
    tsv = 1.0 if ts is None else float(ts.reshape(-1)[0])
    with np.errstate(all="ignore"):
        wdeq = vals * sc * tsv
        # the rotation's fp32 butterflies: every output of a block is a signed sum of the block's inputs
        blocks = np.abs(xd).reshape(len(xd), k // hb, hb).sum(axis=2) if hb else None
        x_rot_sum = np.repeat(blocks, hb, axis=1) if hb else np.abs(xd)
        return Linear(x=ref.hadamard_transform(xd, hb) if hb else xd, w=wdeq.T,
                      b=None if b is None else b.astype(np.float64),
                      x_mag=x_rot_sum / np.sqrt(hb) if hb else np.abs(xd), w_mag=np.abs(wdeq).T,
                      x_peak=max1(x_rot_sum), w_peak=(max1(vals) * max1(sc) * max1(np.float64(tsv))).T,
                      n_terms=k + 2 * (hb.bit_length() if hb else 0),
                      relative_tol=prefill_amx_relative(case.env, a, len(xd)))


SPEC = OpSpec("FP4MatMul", INPUTS, ATTRS, {"QCOMPILE_FP4_NO_AVX2": (None, "1"), "QCOMPILE_PREFILL_AMX": (None, None, "0")},
              base, MUTATIONS, linear)
