"""The FP4 numpy reference against independent definitions (torch's float8, explicit formulas)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.formats.fp4 import reference as fp4


def test_e2m1_table_and_round_trip():
    codes = np.arange(16, dtype=np.uint8)
    vals = fp4.decode_e2m1(codes)
    assert vals[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert (vals[9:] == -vals[1:8]).all()
    # every code except -0 round-trips; -0 encodes to the canonical +0
    enc = fp4.encode_e2m1(vals)
    assert (enc[codes != 8] == codes[codes != 8]).all() and enc[8] == 0


def test_e2m1_encode_nearest_ties_even():
    x = np.array([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 100.0, -0.3, -5.0, -1e9])
    got = fp4.decode_e2m1(fp4.encode_e2m1(x))
    want = [0, 0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -4.0, -6.0]
    assert got.tolist() == want
    # brute-force nearest on random values: error never exceeds the distance to any other grid point
    r = np.random.default_rng(0).uniform(-7, 7, 5000)
    q = fp4.decode_e2m1(fp4.encode_e2m1(r)).astype(np.float64)
    best = np.abs(np.clip(r, -6, 6)[:, None] - fp4.E2M1_VALUES[None, :].astype(np.float64)).min(axis=1)
    assert np.allclose(np.abs(np.clip(r, -6, 6) - q), best)
    with pytest.raises(ValueError):
        fp4.encode_e2m1(np.array([np.nan]))


def test_e4m3_decode_matches_torch_for_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    got = fp4.decode_e4m3(codes)
    assert np.array_equal(np.isnan(ref), np.isnan(got))
    assert np.isnan(got[[0x7F, 0xFF]]).all() and np.isnan(got).sum() == 2
    ok = ~np.isnan(ref)
    assert np.array_equal(ref[ok], got[ok])
    assert np.array_equal(np.signbit(ref[ok]), np.signbit(got[ok]))
    assert got[0x7E] == 448 and got[0x01] == 2.0**-9


def test_e4m3_encode_matches_torch_rne_with_saturation():
    vals = fp4.E4M3_VALUES[~np.isnan(fp4.E4M3_VALUES)]
    pos = np.sort(vals[vals > 0])
    mids = (pos[1:] + pos[:-1]) / 2  # exact ties: must round to the even code
    x = np.concatenate([np.random.default_rng(1).normal(0, 60, 20000), vals, mids, -mids, [1e6, -1e6, 460, 470]])
    x = x.astype(np.float32)
    ref = torch.from_numpy(np.clip(x, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(fp4.encode_e4m3(x), ref)
    assert fp4.encode_e4m3(np.array([np.inf]))[0] == 0x7E and fp4.encode_e4m3(np.array([np.nan]))[0] == 0x7F


def test_e8m0_codec():
    s = np.arange(255, dtype=np.uint8)
    v = fp4.decode_e8m0(s)
    assert np.array_equal(v.astype(np.float64), 2.0 ** (s.astype(np.float64) - 127))
    assert np.isnan(fp4.decode_e8m0(np.array([255], np.uint8))).all()
    assert np.array_equal(fp4.encode_e8m0(v), s)
    assert fp4.encode_e8m0(np.array([3.0]), "floor")[0] == 128 and fp4.encode_e8m0(np.array([3.0]), "ceil")[0] == 129
    assert fp4.encode_e8m0(np.array([1e300, 0.0, -1.0]), "round").tolist() == [254, 0, 0]


def test_hadamard_orthogonal_symmetric():
    for b in (1, 2, 8, 64, 256):
        h = fp4.hadamard_matrix(b)
        assert np.allclose(h @ h.T, np.eye(b)) and np.allclose(h, h.T)
        assert np.allclose(np.abs(h), 1 / np.sqrt(b))
    with pytest.raises(ValueError):
        fp4.hadamard_matrix(12)


def test_hadamard_transform_is_blockwise_and_fusion_identity():
    rng = np.random.default_rng(2)
    b, k, n = 16, 64, 24
    x = rng.normal(size=(3, 5, k))
    w = rng.normal(size=(n, k))
    hx = fp4.hadamard_transform(x, b)
    h = fp4.hadamard_matrix(b)
    assert np.allclose(hx[..., 16:32], x[..., 16:32] @ h)
    assert np.allclose(fp4.hadamard_transform(hx, b), x)  # involution (symmetric + orthogonal)
    w_rot = fp4.hadamard_transform(w, b)  # W_stored = W_blocks @ H
    assert np.allclose(hx @ w_rot.T, x @ w.T)
    with pytest.raises(ValueError):
        fp4.hadamard_transform(x, 48)


def test_pack_unpack_layout():
    codes = np.array([[1, 2, 3, 4, 5], [15, 0, 7, 8, 9]], dtype=np.uint8)
    packed = fp4.pack_fp4(codes, 8)
    assert packed.shape == (2, 4) and packed.dtype == np.uint8
    assert packed[0, 0] == 0x21 and packed[0, 2] == 0x05 and packed[0, 3] == 0  # low nibble first, zero pad
    assert np.array_equal(fp4.unpack_fp4(packed, 5), codes)
    rnd = np.random.default_rng(3).integers(0, 16, (7, 100), dtype=np.uint8)
    assert np.array_equal(fp4.unpack_fp4(fp4.pack_fp4(rnd, 32), 100), rnd)


def _random_op(rng, k, n, g, fmt, ts=None):
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    w = fp4.pack_fp4(codes, g)
    ng = fp4.padded_k(k, g) // g
    scales = rng.integers(120, 132, (n, ng), dtype=np.uint8) if fmt == "e8m0" else \
        fp4.encode_e4m3(rng.uniform(0.01, 2, (n, ng)))
    return codes, w, scales


@pytest.mark.parametrize("fmt", ["e8m0", "e4m3"])
def test_dequantize_matches_explicit_formula(fmt):
    rng = np.random.default_rng(4)
    k, n, g = 40, 6, 16
    codes, w, scales = _random_op(rng, k, n, g, fmt)
    deq = fp4.dequantize_fp4(w, scales, np.array([0.5], np.float32), k, g, fmt)
    sc = fp4.decode_scales(scales, fmt)
    for nn in range(n):
        for kk in range(0, k, 7):
            assert deq[nn, kk] == np.float32(fp4.E2M1_VALUES[codes[nn, kk]] * sc[nn, kk // g] * 0.5)


def test_matmul_reference_fusion_and_bias():
    rng = np.random.default_rng(5)
    k, n, g, b = 64, 10, 32, 32
    codes, w, scales = _random_op(rng, k, n, g, "e8m0")
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    wd = fp4.dequantize_fp4(w, scales, None, k, g, "e8m0").astype(np.float64)
    y = fp4.fp4_matmul_reference(x, w, scales, None, bias, K=k, N=n, group_size=g, scale_format="e8m0",
                                 hadamard_block=b)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    want = fp4.hadamard_transform(x.astype(np.float64), b) @ wd.T + bias
    assert np.allclose(y, want, rtol=1e-5, atol=1e-5)
    y16 = fp4.fp4_matmul_reference(x.astype(np.float16), w, scales, K=k, N=n, group_size=g, scale_format="e8m0")
    assert y16.dtype == np.float16


@pytest.mark.parametrize("bad", [
    dict(K=0), dict(group_size=12), dict(group_size=4), dict(scale_format="e5m2"), dict(hadamard_block=3),
    dict(hadamard_block=512), dict(K=40, hadamard_block=16),
])
def test_validate_rejects_bad_attributes(bad):
    k, n, g = 64, 4, 32
    attrs = dict(K=k, N=n, group_size=g, scale_format="e8m0", hadamard_block=0) | bad
    kk = attrs["K"]
    kp = fp4.padded_k(max(kk, 1), attrs["group_size"]) if attrs["group_size"] > 0 else k
    x = np.zeros((1, kk), np.float32)
    w = np.zeros((n, kp // 2), np.uint8)
    s = np.zeros((n, max(kp // max(attrs["group_size"], 1), 1)), np.uint8)
    with pytest.raises(ValueError):
        fp4.validate_fp4_inputs(x, w, s, **attrs)


def test_validate_rejects_bad_shapes():
    k, n, g = 40, 4, 16  # Kp = 48
    ok = dict(x=np.zeros((2, k), np.float32), w=np.zeros((n, 24), np.uint8), scales=np.zeros((n, 3), np.uint8))
    attrs = dict(K=k, N=n, group_size=g, scale_format="e4m3")
    fp4.validate_fp4_inputs(**ok, **attrs)
    for key, val in [("x", np.zeros((2, k + 1), np.float32)), ("w", np.zeros((n, 20), np.uint8)),
                     ("scales", np.zeros((n, 2), np.uint8)), ("tensor_scale", np.ones(2, np.float32)),
                     ("bias", np.zeros(n + 1, np.float32))]:
        with pytest.raises(ValueError):
            fp4.validate_fp4_inputs(**(ok | {key: val}), **attrs)
