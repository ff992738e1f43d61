"""The SpQRMatMul numpy reference: bitstream layout pinned bit by bit, the validator's rules, and the
dequantization semantics (permutation, additive outliers, ragged groups) on hand-built examples."""
from __future__ import annotations

import numpy as np
import pytest

from qcompile.formats.spqr import reference as ref

ATTRS = dict(K=64, N=32, bits=3, group_size=16, stat_bits=3, stat_group=16)
KEYS = ("codes", "stat_codes", "stat_params", "row_offsets", "col_indices", "values", "perm")


@pytest.mark.parametrize("width", range(1, 9))
def test_bitstream_round_trip(width):
    rng = np.random.default_rng(width)
    length = 37
    v = rng.integers(0, 1 << width, size=(3, length))
    words = ref.pack_bitstream(v, width, -(-length * width // 32))
    assert words.dtype == np.int32
    np.testing.assert_array_equal(ref.unpack_bitstream(words, width, length), v)


def test_code_bit_layout_is_lsb_first_stream():
    c3 = (np.arange(32) % 8)[None]
    w3 = ref.pack_codes(c3, 3).view(np.uint32)[0]
    # codes 0..7 in 3-bit fields from bit 0: 0b111_110_101_100_011_010_001_000 = 0xFAC688
    assert w3[0] & 0xFFFFFF == 0xFAC688
    # position 10 straddles words 0 and 1 (bits 30..32): code 2 = 0b010 -> bit 31 of word 0 set, bit 0 of word 1 clear
    assert (w3[0] >> 30) == 0b10 and (w3[1] & 1) == 0
    c4 = np.arange(16)[None]
    w4 = ref.pack_codes(c4, 4).view(np.uint32)[0]
    assert list(w4) == [0x76543210, 0xFEDCBA98, 0, 0]
    assert ref.pack_codes(np.zeros((2, 33), np.uint8), 3).shape == (2, 6)  # 2 chunks of 32 positions


def test_stat_codes_are_scale_stream_then_zero_stream():
    sc = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])  # 11 groups * 3 bits = 33 bits -> SW = 2 words
    zc = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5]])
    words = ref.pack_stat_codes(sc, zc, 3)
    assert words.shape == (1, 4)
    u = words.view(np.uint32)[0]
    assert u[0] & 7 == 1 and (u[0] >> 3) & 7 == 2 and u[2] & 7 == 7
    back_s, back_z = ref.unpack_stat_codes(words, 3, 11)
    np.testing.assert_array_equal(back_s, sc)
    np.testing.assert_array_equal(back_z, zc)


def _tiny(perm=None):
    """K=20 (two groups of 16, the second ragged), N=2, stat_group 1: every value is easy to state."""
    k, n = 20, 2
    codes = np.tile(np.arange(k) % 8, (n, 1))
    sc = np.array([[1, 2], [3, 0]])
    zc = np.array([[2, 1], [0, 4]])
    sp = np.zeros((2, 4, 2), np.float16)
    sp[:, 0] = 0.5  # scale step
    sp[:, 1] = 0.25  # scale min
    sp[:, 2] = 1.0  # zero step
    sp[:, 3] = 0.5  # zero min
    packed = {
        "codes": ref.pack_codes(codes, 3), "stat_codes": ref.pack_stat_codes(sc, zc, 3), "stat_params": sp,
        "row_offsets": np.array([0, 2, 3], np.int32), "col_indices": np.array([0, 0, 19], np.int16),
        "values": np.array([1.0, 0.5, -2.0], np.float16), "perm": perm,
    }
    attrs = dict(K=k, N=n, bits=3, group_size=16, stat_bits=3, stat_group=1)
    scale = sc * 0.5 + 0.25
    zero = zc * 1.0 + 0.5
    g = np.arange(k) // 16
    dense = scale[:, g] * (codes - zero[:, g])  # [N, K] stored order
    return packed, attrs, dense


def test_dequantize_semantics_by_hand():
    packed, attrs, dense = _tiny()
    w = ref.dequantize(*(packed[k] for k in KEYS), **attrs)
    want = dense.T.copy()
    want[0, 0] += 1.5  # two outliers on (row 0, col 0) add up
    want[19, 1] += -2.0
    np.testing.assert_array_equal(w, want.astype(np.float32))


def test_permutation_moves_stored_positions_and_outliers_use_original_index():
    perm = np.roll(np.arange(20), 3).astype(np.int32)  # stored p holds feature perm[p]
    packed, attrs, dense = _tiny(perm)
    w = ref.dequantize(*(packed[k] for k in KEYS), **attrs)
    want = np.zeros((20, 2), np.float32)
    want[perm] = dense.T
    want[0, 0] += 1.5
    want[19, 1] -= 2.0
    np.testing.assert_array_equal(w, want)
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    y = ref.spqr_matmul_reference(x, *(packed[k] for k in KEYS), **attrs)
    np.testing.assert_allclose(y, x @ want, rtol=1e-6, atol=1e-6)
    y16 = ref.spqr_matmul_reference(x.astype(np.float16), *(packed[k] for k in KEYS), **attrs)
    assert y16.dtype == np.float16


def _good():
    return ref.random_packed(64, 32, outlier_rate=0.1, with_perm=True, seed=5)


@pytest.mark.parametrize("mutate,msg", [
    (lambda p: p["row_offsets"].__setitem__(0, 1), "row_offsets\\[0\\]"),
    (lambda p: p["row_offsets"].__setitem__(slice(3, 5), p["row_offsets"][3:5][::-1] + [5, 0]), "non-decreasing"),
    (lambda p: p["row_offsets"].__setitem__(-1, p["row_offsets"][-1] - 1), "row_offsets\\[N\\]"),
    (lambda p: p["col_indices"].__setitem__(0, 64), "col_indices"),
    (lambda p: p["col_indices"].__setitem__(0, -3), "col_indices"),
    (lambda p: p.__setitem__("values", p["values"][:-1]), "values has"),
    (lambda p: p.__setitem__("values", p["values"].astype(np.float32)), "float16"),
    (lambda p: p.__setitem__("row_offsets", p["row_offsets"].astype(np.int64)), "row_offsets must be int16 or int32"),
    (lambda p: p.__setitem__("perm", p["perm"].astype(np.int64)), "perm must be int16 or int32"),
    (lambda p: p["perm"].__setitem__(0, p["perm"][1]), "permutation"),
    (lambda p: p["perm"].__setitem__(0, 64), "perm entries"),
    (lambda p: p.__setitem__("codes", p["codes"][:, :-1]), "codes shape"),
    (lambda p: p.__setitem__("stat_params", p["stat_params"][:1]), "stat_params shape"),
])
def test_validator_rules(mutate, msg):
    p = _good()
    ref.validate_inputs(None, *(p[k] for k in KEYS), **ATTRS)  # well-formed passes
    mutate(p)
    with pytest.raises(ref.SpQRLayoutError, match=msg):
        ref.validate_inputs(None, *(p[k] for k in KEYS), **ATTRS)


@pytest.mark.parametrize("change,msg", [(dict(bits=2), "bits"), (dict(group_size=24), "group_size"),
                                        (dict(stat_bits=9), "stat_bits"), (dict(stat_group=0), "stat_group"),
                                        (dict(N=0), "positive")])
def test_attribute_rules(change, msg):
    with pytest.raises(ref.SpQRLayoutError, match=msg):
        ref.validate_attributes(**(ATTRS | change))


def test_x_shape_checked():
    p = _good()
    with pytest.raises(ref.SpQRLayoutError, match="K=64"):
        ref.spqr_matmul_reference(np.ones((2, 63), np.float32), *(p[k] for k in KEYS), **ATTRS)
