"""FP4 (MXFP4 / NVFP4) numerics: codecs and packing against the numpy reference, stored scales, the MSE
scale search, GPTQ / MR-GPTQ on the FP4 grid, and the Hadamard fusion algebra."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.errors import FormatError
from qcompile.formats import get_format
from qcompile.formats.fp4.numerics import (MXFP4, NVFP4, FP4Grid, choose_scales, decode_scale_codes, e2m1_decode,
                                  e2m1_encode, quantize_fp4, rtn_fp4)
from qcompile.solvers.gptq import hessian_weighted_error, relative_output_error, rtn
from qcompile.solvers.hadamard import effective_block, rotate_hessian, rotate_weight, unrotate_weight
from qcompile.formats.fp4 import reference as ref

SPECS = [MXFP4, NVFP4]


def _heavy(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Student-t weights: heavy tails like real LLM weights, so clipping choices matter."""
    return (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)


def _quantize(fmt: str, w_kn: np.ndarray, h: torch.Tensor | None = None, **opts):
    f = get_format(fmt)
    return f.quantize(w_kn, h, device="cpu", **f.resolve_options(opts))


# ---- codecs ---------------------------------------------------------------------------------------------


def test_e2m1_torch_codec_matches_reference_including_ties_and_saturation():
    rng = np.random.default_rng(0)
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = np.concatenate([rng.normal(0, 3, 4000), mids, -mids, [0.0, -0.0, 6.0, 7.0, -100.0, 1e-9, -1e-9]])
    codes = e2m1_encode(torch.from_numpy(x).float()).numpy()
    np.testing.assert_array_equal(codes, ref.encode_e2m1(x.astype(np.float32)))
    np.testing.assert_array_equal(e2m1_decode(torch.arange(16, dtype=torch.uint8)).numpy(), ref.E2M1_VALUES)


@pytest.mark.parametrize("fmt", ["e8m0", "e4m3"])
def test_scale_decode_matches_reference_for_all_codes(fmt):
    got = decode_scale_codes(torch.arange(256, dtype=torch.uint8), fmt).numpy()
    np.testing.assert_array_equal(got, ref.decode_scales(np.arange(256, dtype=np.uint8), fmt))


# ---- packing and stored values -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,k", [("mxfp4-rtn", 72), ("nvfp4-rtn", 40), ("mxfp4-rtn", 64)])
def test_packed_layout_round_trips_through_reference(fmt, k):
    """K not a multiple of G pads codes with 0; unpacking the stored bytes gives back the codes."""
    rng = np.random.default_rng(1)
    q = _quantize(fmt, _heavy(rng, (k, 24)))
    p = q.packed()
    g = q.spec.group_size
    kp = ref.padded_k(k, g)
    assert p["W"].dtype == np.uint8 and p["W"].shape == (24, kp // 2)
    assert p["scales"].dtype == np.uint8 and p["scales"].shape == (24, kp // g)
    assert ("tensor_scale" in p) == (fmt.startswith("nvfp4"))
    np.testing.assert_array_equal(ref.unpack_fp4(p["W"], k), q.codes)
    np.testing.assert_array_equal(ref.unpack_fp4(p["W"], kp)[:, k:], 0)
    np.testing.assert_array_equal(ref.pack_fp4(q.codes, g), p["W"])
    assert not np.isnan(ref.decode_scales(p["scales"], q.spec.scale_format)).any()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.grid)
def test_scale_values_used_are_exactly_the_stored_decoded_scales(spec):
    rng = np.random.default_rng(2)
    wg = torch.from_numpy(_heavy(rng, (8, 6, spec.group_size)))
    ts = 0.0173 if spec.tensor_scale else 1.0
    codes, vals = choose_scales(wg, spec, ts, search=True)
    np.testing.assert_array_equal(vals.numpy(), (decode_scale_codes(codes, spec.scale_format) * ts).numpy())
    ref_vals = ref.decode_scales(codes.numpy(), spec.scale_format).astype(np.float64) * np.float32(ts)
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-7)


@pytest.mark.parametrize("fmt", ["mxfp4-gptq", "nvfp4-mr"])
def test_gptq_rounds_with_the_values_it_stores(fmt):
    """What GPTQ fed back as the quantized column equals the dequantized stored bytes (with NVFP4's
    tensor scale, up to one float32 rounding of scale * tensor_scale)."""
    from qcompile.formats.fp4 import numerics as f4
    from qcompile.solvers.gptq import gptq

    rng = np.random.default_rng(3)
    k, n = 64, 16
    w = _heavy(rng, (k, n))
    x = rng.standard_normal((256, k)).astype(np.float32)
    h = torch.from_numpy(x.T @ x)
    q = _quantize(fmt, w, h)
    spec = q.spec
    wt = rotate_weight(torch.from_numpy(w.T.copy()), q.hadamard_block)
    hr = rotate_hessian(h.double(), q.hadamard_block).float()
    ts = f4.nvfp4_tensor_scale(wt) if spec.tensor_scale else 1.0
    res = gptq(wt, hr, FP4Grid(spec, ts, True), spec.group_size, damp=0.01, act_order=True)
    np.testing.assert_array_equal(res.codes.numpy(), q.codes)
    np.testing.assert_allclose(res.dequantized.numpy(), q.dequantize_stored_nk(), rtol=2e-7, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.grid)
def test_vectorized_rtn_equals_rtn_through_the_grid(spec):
    rng = np.random.default_rng(4)
    w = torch.from_numpy(_heavy(rng, (12, 3 * spec.group_size + 5)))
    ts = 0.001 if spec.tensor_scale else 1.0
    codes, scodes = rtn_fp4(w, spec, ts, True)
    res = rtn(w, FP4Grid(spec, ts, True), spec.group_size)
    np.testing.assert_array_equal(codes.numpy(), res.codes.numpy())
    np.testing.assert_array_equal(scodes.numpy(), torch.stack([p[0] for p in res.group_params], 1).numpy())


# ---- scale search --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.grid)
def test_mse_scale_search_never_worse_than_plain_amax_scale(spec):
    rng = np.random.default_rng(5)
    w = torch.from_numpy(np.concatenate([_heavy(rng, (64, 8 * spec.group_size)),
                                         rng.standard_normal((64, 8 * spec.group_size)).astype(np.float32)]))
    ts = float(w.abs().max()) / (6 * 448) if spec.tensor_scale else 1.0
    errs = {}
    for search in (False, True):
        codes, scodes = rtn_fp4(w, spec, ts, search)
        deq = ref.dequantize_fp4(ref.pack_fp4(codes.numpy(), spec.group_size), scodes.numpy(),
                                 ts if spec.tensor_scale else None, w.shape[1], spec.group_size, spec.scale_format)
        errs[search] = ((deq - w.numpy()) ** 2).reshape(w.shape[0], -1, spec.group_size).sum(-1)
    assert (errs[True] <= errs[False] * (1 + 1e-6)).all()  # per group
    assert errs[True].sum() < 0.97 * errs[False].sum()  # and it does find better scales


def test_plain_e8m0_scale_never_clips():
    """Without search the MXFP4 scale is the smallest power of two with amax/scale <= 6."""
    amax = torch.tensor([6.0, 6.0001, 3.0, 1e-3, 12.0, 0.75])
    wg = torch.stack([amax, -amax / 3], dim=1).unsqueeze(1)  # [6, 1, 2]
    _, vals = choose_scales(wg, MXFP4, 1.0, search=False)
    ratio = amax / vals[:, 0]
    assert ((ratio <= 6) & (ratio > 3)).all(), ratio


# ---- GPTQ and MR-GPTQ on the FP4 grid --------------------------------------------------------------------


def _correlated_inputs(rng: np.random.Generator, k: int, tokens: int = 2048) -> np.ndarray:
    """Inputs with a few high-variance directions shared by many channels (strong correlations)."""
    basis = rng.standard_normal((4, k)) * 6.0
    return (rng.standard_normal((tokens, k)) + rng.standard_normal((tokens, 4)) @ basis).astype(np.float32)


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_gptq_beats_rtn_in_hessian_weighted_error(grid):
    rng = np.random.default_rng(6)
    k, n = 128, 64
    w = _heavy(rng, (k, n))
    x = _correlated_inputs(rng, k)
    h = torch.from_numpy(x.T.astype(np.float64) @ x).float()
    wt = torch.from_numpy(w.T.copy())
    e_rtn = hessian_weighted_error(wt, torch.from_numpy(_quantize(f"{grid}-rtn", w).dequantize().T.copy()), h)
    e_gptq = hessian_weighted_error(wt, torch.from_numpy(_quantize(f"{grid}-gptq", w, h).dequantize().T.copy()), h)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_mr_gptq_beats_gptq_with_outlier_input_channels():
    """A few input channels with large weights (and activations) make plain MXFP4 groups that hold them
    coarse; the block rotation spreads them over the block and MR-GPTQ wins clearly."""
    rng = np.random.default_rng(7)
    k, n = 128, 64
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    outliers = rng.choice(k, 6, replace=False)
    w[outliers] *= 12.0
    x = rng.standard_normal((2048, k)).astype(np.float32)
    x[:, outliers] *= 4.0
    h = torch.from_numpy(x.T.astype(np.float64) @ x).float()
    wt = torch.from_numpy(w.T.copy())
    errs = {m: relative_output_error(wt, torch.from_numpy(_quantize(f"mxfp4-{m}", w, h).dequantize().T.copy()), h)
            for m in ("gptq", "mr")}
    assert errs["mr"] < 0.8 * errs["gptq"], errs


def test_gptq_methods_need_a_hessian_and_reject_bad_weights():
    w = np.ones((32, 4), np.float32)
    with pytest.raises(FormatError, match="Hessian"):
        _quantize("mxfp4-mr", w, None)
    with pytest.raises(FormatError, match="Hessian shape"):
        _quantize("nvfp4-gptq", w, torch.eye(16))
    bad = w.copy()
    bad[3, 1] = np.nan
    with pytest.raises(FormatError, match="NaN"):
        _quantize("mxfp4-rtn", bad)
    with pytest.raises(FormatError, match="hadamard_block"):
        get_format("mxfp4-mr").resolve_options({"hadamard_block": 48})


def test_zero_weight_quantizes_to_zero():
    for fmt in ("mxfp4-rtn", "nvfp4-rtn"):
        q = _quantize(fmt, np.zeros((32, 4), np.float32))
        assert np.array_equal(q.dequantize(), np.zeros((32, 4), np.float32))


# ---- Hadamard algebra --------------------------------------------------------------------------------


def test_rotation_algebra_weight_hessian_and_output():
    rng = np.random.default_rng(8)
    k, n, b = 64, 8, 16
    x = rng.standard_normal((50, k))
    w = rng.standard_normal((n, k))  # torch layout [N, K]
    x_rot = ref.hadamard_transform(x, b)  # what the op does online
    w_rot = rotate_weight(torch.from_numpy(w), b).numpy()
    np.testing.assert_allclose(w_rot, ref.hadamard_transform(w, b), atol=1e-12)
    np.testing.assert_allclose(x_rot @ w_rot.T, x @ w.T, atol=1e-10)  # fusion identity
    h_rot = rotate_hessian(torch.from_numpy(x.T @ x), b).numpy()
    np.testing.assert_allclose(h_rot, x_rot.T @ x_rot, atol=1e-9)  # H_rot = Rᵀ H R
    np.testing.assert_allclose(unrotate_weight(torch.from_numpy(w_rot), b).numpy(), w, atol=1e-12)


def test_mr_dequantize_undoes_the_rotation_and_errors_agree_in_both_bases():
    rng = np.random.default_rng(9)
    k, n = 64, 16
    w = _heavy(rng, (k, n))
    x = rng.standard_normal((300, k)).astype(np.float32)
    h = torch.from_numpy(x.T.astype(np.float64) @ x)
    q = _quantize("nvfp4-mr", w, h.float())
    assert q.hadamard_block == 16
    stored, plain = q.dequantize_stored(), q.dequantize()
    np.testing.assert_allclose(ref.hadamard_transform(plain.T.astype(np.float64), 16), stored.T, atol=1e-6)
    # The model's output through the rotated stored weight equals the one through dequantize().
    np.testing.assert_allclose(ref.hadamard_transform(x.astype(np.float64), 16) @ stored, x @ plain,
                               rtol=1e-4, atol=1e-5)
    wt = torch.from_numpy(w.T.copy())
    e_plain = relative_output_error(wt, torch.from_numpy(plain.T.copy()), h)
    e_rot = relative_output_error(rotate_weight(wt.double(), 16), torch.from_numpy(stored.T.copy()),
                                  rotate_hessian(h, 16))
    assert e_plain == pytest.approx(e_rot, rel=1e-4)


def test_effective_block_falls_back_to_a_power_of_two_dividing_k():
    assert effective_block(576, 128) == 64
    assert effective_block(1536, 128) == 128
    assert effective_block(576, 32) == 32
    assert effective_block(40, 32) == 8
    assert effective_block(6, 16) == 2
    assert effective_block(9, 16) == 0
    assert effective_block(64, 0) == 0
    rng = np.random.default_rng(10)
    w = _heavy(rng, (48, 4))
    q = _quantize("mxfp4-mr", w, torch.eye(48))
    assert q.hadamard_block == 16 and q.extra_report()["hadamard_block_requested"] == 32


# ---- size -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,bits", [("mxfp4-rtn", 4.25), ("nvfp4-rtn", 4.5 + 32 / 576**2)])
def test_bits_per_weight_from_packed_bytes(fmt, bits):
    rng = np.random.default_rng(11)
    q = _quantize(fmt, (rng.standard_normal((576, 576)) * 0.02).astype(np.float32))
    assert q.bits_per_weight() == pytest.approx(bits, rel=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for torch")
@pytest.mark.parametrize("fmt", ["mxfp4-mr", "nvfp4-gptq", "nvfp4-rtn"])
def test_cuda_numerics_agree_with_cpu(fmt):
    rng = np.random.default_rng(16)
    k, n = 128, 32
    w = _heavy(rng, (k, n))
    x = _correlated_inputs(rng, k, 512)
    h = torch.from_numpy(x.T.astype(np.float64) @ x).float()
    f = get_format(fmt)
    opts = f.resolve_options({})
    q_cpu = f.quantize(w, h, device="cpu", **opts)
    q_gpu = f.quantize(w, h, device="cuda", **opts)
    wt = torch.from_numpy(w.T.copy())
    e_cpu = relative_output_error(wt, torch.from_numpy(q_cpu.dequantize().T.copy()), h)
    e_gpu = relative_output_error(wt, torch.from_numpy(q_gpu.dequantize().T.copy()), h)
    assert e_gpu == pytest.approx(e_cpu, rel=0.05)
    assert (q_gpu.codes == q_cpu.codes).mean() > 0.95
