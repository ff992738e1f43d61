"""The multiple-choice knapsack of ``-f auto`` against brute force: random instances with groups whose members
share tensors, ties in damage and bytes, tied groups; the budget is never exceeded, also on a coarse grid."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from qcompile.solvers.knapsack import Choice, combination_bytes, group_frontier, solve


def random_instance(seed: int, groups: int = 4, max_members: int = 3, keys: int = 3):
    """Groups of 1-3 layers, each with a choice per palette key (some keys missing in some layers). Small
    integer bytes and damages, so that ties happen; keys 0 and 1 carry a tensor shared by the whole group."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        members = []
        for m in range(int(rng.integers(1, max_members + 1))):
            choices = []
            for k in range(keys):
                if rng.random() < 0.15 and k:
                    continue  # this layer cannot take that setting
                shared = frozenset({(f"perm-{g}-{k % 2}", int(rng.integers(1, 4)) * 0 + 3)}) if k < 2 else frozenset()
                choices.append(Choice(k, int(rng.integers(4, 20)) + 3 * bool(shared), float(rng.integers(0, 6))))
            members.append(choices)
        out.append(members)
    return out


def brute_force(groups, budget: int, tie: bool = False) -> float:
    """Least total damage over every assignment (tied: one key per group), inf when nothing fits."""
    per_group = []
    for members in groups:
        options = []
        for picks in itertools.product(*(range(len(m)) for m in members)):
            chosen = [m[i] for m, i in zip(members, picks)]
            if tie and len({c.key for c in chosen}) > 1:
                continue
            options.append((combination_bytes(chosen), math.fsum(c.damage for c in chosen)))
        per_group.append(options)
    best = math.inf
    for combo in itertools.product(*per_group):
        if sum(b for b, _ in combo) <= budget:
            best = min(best, math.fsum(d for _, d in combo))
    return best


def total(groups, picks) -> tuple[int, float]:
    chosen = [[m[i] for m, i in zip(members, p)] for members, p in zip(groups, picks)]
    return sum(combination_bytes(c) for c in chosen), math.fsum(c.damage for cs in chosen for c in cs)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("tie", [False, True])
def test_exact_grid_matches_brute_force(seed, tie):
    groups = random_instance(seed)
    least = sum(min(o.bytes for o in group_frontier(g, tie)) for g in groups)
    most = sum(max(o.bytes for o in group_frontier(g, tie)) for g in groups)
    for budget in sorted({least, (least + most) // 2, least + (most - least) // 5, most}):
        want = brute_force(groups, budget, tie)
        sol = solve(groups, budget, tie=tie, cells=10**6)  # a cell of one byte: exact
        assert sol.cell == 1
        got_bytes, got_damage = total(groups, sol.picks)
        assert (got_bytes, got_damage) == (sol.bytes, pytest.approx(sol.damage))
        assert got_bytes <= budget and got_damage == pytest.approx(want)
        if tie:
            assert all(len({m[i].key for m, i in zip(members, p)}) == 1 for members, p in zip(groups, sol.picks))


@pytest.mark.parametrize("seed", range(6))
def test_coarse_grid_never_exceeds_the_budget_and_stays_near_the_optimum(seed):
    groups = random_instance(seed, groups=6)
    least = sum(group_frontier(g)[0].bytes for g in groups)
    for budget in (least, least + 7, least + 23, least + 60):
        sol = solve(groups, budget, cells=5)
        got_bytes, got_damage = total(groups, sol.picks)
        assert got_bytes == sol.bytes <= budget and sol.cell == max(1, math.ceil((budget - least) / 5))
        # the rounding loses at most one cell per group of the budget
        assert got_damage <= brute_force(groups, max(least, budget - len(groups) * sol.cell)) + 1e-9


def test_shared_tensors_are_counted_once_and_can_decide_the_choice():
    perm = ("perm", 10)
    a = [Choice("spqr", 30, 1.0, frozenset({perm})), Choice("fp4", 25, 1.2)]
    b = [Choice("spqr", 30, 1.0, frozenset({perm})), Choice("fp4", 25, 1.2)]
    assert combination_bytes([a[0], b[0]]) == 50 and combination_bytes([a[0], b[1]]) == 55
    # 50 bytes fit both layers only with the shared tensor stored once
    sol = solve([[a, b]], 50, cells=10**6)
    assert sol.picks == [(0, 0)] and sol.bytes == 50 and sol.damage == pytest.approx(2.0)
    with pytest.raises(ValueError, match="over the budget"):
        solve([[a, b]], 49)


def test_deterministic_and_ties_go_to_the_earlier_option():
    groups = [[[Choice(k, 10, 1.0) for k in range(3)]] for _ in range(5)]
    first = solve(groups, 50)
    assert first.picks == [(0,)] * 5 and solve(groups, 50) == first
