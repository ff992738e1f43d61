"""The numpy reference of the AMX prefill arithmetic (qcompile.formats.prefill_amx) against float64: the bf16
splits, and the documented bound on the three-product result."""
from __future__ import annotations

import numpy as np

from qcompile.formats import prefill_amx


def test_bf16_round_is_nearest_even():
    # 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1); 1 + 3·2^-8
    # is halfway between 1 + 2^-7 and 1 + 2^-6, and goes to 1 + 2^-6
    v = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, -3.0], np.float32)
    np.testing.assert_array_equal(prefill_amx.bf16_round(v), np.array([1, 1 + 2.0**-6, 1 + 2.0**-7, -3], np.float32))


def test_split_recovers_sixteen_bits():
    v = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 10.0 ** np.arange(-3, 7).repeat(1000)
    hi, lo = prefill_amx.split_bf16(v)
    for part in (hi, lo):  # both bf16: the low 16 bits of their float32 encodings are zero
        assert not (part.view(np.uint32) & 0xFFFF).any()
    rel = np.abs(v.astype(np.float64) - hi - lo) / np.abs(v)
    assert rel.max() <= 2.0**-16
    assert rel.max() > 2.0**-20  # the remainder is itself rounded: not exact


def test_three_products_within_bound_and_the_bound_is_tight():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    w = (rng.standard_normal((512, 48)) * rng.uniform(0.01, 100, 48)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    got = prefill_amx.matmul_bf16x3(x, w)
    bound = prefill_amx.error_bound(np.abs(x), np.abs(w))
    err = np.abs(got - exact)
    assert (err <= bound).all()
    assert (err / bound).max() > 1e-3  # not a vacuous bound: one bf16 product alone would break it
    hi_only = prefill_amx.split_bf16(x)[0].astype(np.float64) @ prefill_amx.split_bf16(w)[0].astype(np.float64)
    assert (np.abs(hi_only - exact) > bound).any()
