"""The damage estimate of ``-f auto`` (Fisher-weighted output error) against the KL it estimates, on the tiny model:
perturb one layer at a time and measure KL(float || perturbed) on held-out windows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.solvers.sensitivity import damage, output_fisher
from tiny_model import TINY_LINEARS, build_tiny_model, random_tokens, student_kl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hessian(model, name: str, ids: np.ndarray) -> torch.Tensor:
    xs = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, inp, _o: xs.append(inp[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    return x.T @ x / len(x)


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_fisher_weighted_error_ranks_layers_by_their_measured_kl():
    model = build_tiny_model(seed=2)
    calib, held = random_tokens(16, 32, seed=4), random_tokens(16, 32, seed=5)
    fisher = output_fisher(model, TINY_LINEARS, calib, seed=0)
    assert set(fisher) == set(TINY_LINEARS) and all(f.shape == (model.get_submodule(n).out_features,) and
                                                    bool((f > 0).all()) for n, f in fisher.items())
    rng = np.random.default_rng(0)
    predicted, measured, plain = [], [], []
    for i, name in enumerate(TINY_LINEARS):
        lin = model.get_submodule(name)
        w = lin.weight.detach().numpy().T.copy()  # [K, N]
        noise = rng.standard_normal(w.shape).astype(np.float32) * np.abs(w).mean() * (0.1 + 0.05 * (i % 3))
        h = _hessian(model, name, calib)
        predicted.append(damage(w, w + noise, h, fisher[name]))
        plain.append(damage(w, w + noise, h, None))
        student = build_tiny_model(seed=2)
        with torch.no_grad():
            student.get_submodule(name).weight.copy_(torch.from_numpy((w + noise).T))
        measured.append(student_kl(model, student, held))
    rho = _spearman(predicted, measured)
    assert rho > 0.8, (rho, predicted, measured)
    # second order: within a factor of 3 of the measured KL for small perturbations
    ratio = np.array(predicted) / np.array(measured)
    assert 1 / 3 < float(np.median(ratio)) < 3, ratio
    assert rho > _spearman(plain, measured)  # the output Fisher is what makes layers comparable


def test_damage_is_half_the_output_error_without_fisher_and_scales_with_it():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    d = rng.standard_normal((8, 5)).astype(np.float32) * 0.1
    x = rng.standard_normal((100, 8)).astype(np.float32)
    h = torch.from_numpy(x.T @ x / 100)
    direct = 0.5 * float(((x @ d) ** 2).mean(0).sum())
    assert damage(w, w + d, h, None) == pytest.approx(direct, rel=1e-5)
    f = torch.arange(1, 6, dtype=torch.float32)
    assert damage(w, w + d, h, f) == pytest.approx(0.5 * float((((x @ d) ** 2).mean(0) * f.numpy()).sum()), rel=1e-5)
