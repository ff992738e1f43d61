"""Multiple-choice knapsack: one setting per layer, least total damage, bytes within a budget.

Why a knapsack: ``-f auto`` gives every layer one palette setting; each setting of each layer has an exact
cost in bytes and an estimated damage, the damages add up (to first order, see
:mod:`qcompile.solvers.sensitivity`), and the file must fit the budget. Picking one option per layer under a
sum constraint is the multiple-choice knapsack problem.

Layers that read the same input (q/k/v, gate/up) form a *group*: their settings may store byte-identical
tensors (SpQR's act-order permutation is sorted from the shared Hessian), which the share pass then stores
once. So a group is solved as one item whose options are the combinations of its members' settings, each
costed after sharing (the Pareto frontier of them: no combination that costs more and damages more than
another). With ``tie=True`` a group's members must take the same palette entry (one fused choice).

The solver is an exact dynamic programme over a grid of byte cells for the bytes above each group's smallest
option: every such extra is rounded *up* to whole cells, so the chosen bytes never exceed the budget (and the
smallest options always fit); then a repair step spends the cells' rounding slack on the single
switches that lower the damage most, with exact bytes. With a cell of one byte the result is optimal.
Deterministic: ties go to the earlier option.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Hashable, Sequence

import numpy as np

#: Byte cells of the dynamic programme's grid (the cell is the budget over this, at least one byte).
DEFAULT_CELLS = 1 << 17


@dataclasses.dataclass(frozen=True)
class Choice:
    """One setting of one layer: its palette entry (for tying), bytes, damage, and the tensors it stores that a
    layer of its group might store identically (``(digest, bytes)``; counted once in a combination)."""

    key: Hashable
    bytes: int
    damage: float
    shared: frozenset[tuple[Hashable, int]] = frozenset()


@dataclasses.dataclass(frozen=True)
class GroupOption:
    """One combination of settings for a group's members (an index into each member's choices)."""

    picks: tuple[int, ...]
    bytes: int
    damage: float


def combination_bytes(choices: Sequence[Choice]) -> int:
    """Bytes of layers stored together: identical shared tensors counted once."""
    own = sum(c.bytes - sum(n for _, n in c.shared) for c in choices)
    unique: dict[Hashable, int] = {}
    for c in choices:
        for digest, n in c.shared:
            unique[digest] = n
    return own + sum(unique.values())


def group_frontier(members: Sequence[Sequence[Choice]], tie: bool = False) -> list[GroupOption]:
    """The group's combinations that no other beats in both bytes and damage, by increasing bytes."""
    if tie and len(members) > 1:
        keys = [k for k in (c.key for c in members[0]) if all(any(c.key == k for c in m) for m in members[1:])]
        combos = [tuple(next(i for i, c in enumerate(m) if c.key == k) for m in members) for k in keys]
    else:
        combos = list(itertools.product(*(range(len(m)) for m in members)))
    options = []
    for picks in combos:
        chosen = [m[i] for m, i in zip(members, picks)]
        options.append(GroupOption(picks, combination_bytes(chosen), math.fsum(c.damage for c in chosen)))
    options.sort(key=lambda o: (o.bytes, o.damage, o.picks))
    frontier: list[GroupOption] = []
    for o in options:
        if not frontier or o.damage < frontier[-1].damage:
            frontier.append(o)
    return frontier


@dataclasses.dataclass(frozen=True)
class Solution:
    picks: list[tuple[int, ...]]  # per group, the choice index of each member
    bytes: int
    damage: float
    cell: int  # bytes per grid cell the programme used


def solve(groups: Sequence[Sequence[Sequence[Choice]]], budget: int, *, tie: bool = False,
          cells: int = DEFAULT_CELLS) -> Solution:
    """Least total damage with total bytes <= ``budget``; ``groups[g][m]`` lists member m's choices.

    Raises ValueError when even the smallest choices do not fit."""
    fronts = [group_frontier(g, tie) for g in groups]
    if any(not f for f in fronts):
        raise ValueError("a group has no choice common to all its members")
    least = sum(f[0].bytes for f in fronts)
    if least > budget:
        raise ValueError(f"the smallest choices take {least:,} bytes, over the budget of {budget:,}")
    spare = budget - least  # the programme spends bytes above each group's smallest option
    cell = max(1, math.ceil(spare / cells))
    cap = spare // cell
    inf = math.inf
    best = np.zeros(cap + 1)  # best[c]: least damage of the groups so far within c cells of extra bytes
    back = []
    for front in fronts:
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int32)
        for j, o in enumerate(front):
            w = math.ceil((o.bytes - front[0].bytes) / cell)
            if w > cap:
                break  # the frontier is sorted by bytes
            cand = best[: cap + 1 - w] + o.damage
            better = cand < new[w:]
            new[w:][better] = cand[better]
            arg[w:][better] = j
        best = new
        back.append(arg)
    chosen = []
    c = cap
    for front, arg in zip(reversed(fronts), reversed(back)):
        j = int(arg[c])
        chosen.append(j)
        c -= math.ceil((front[j].bytes - front[0].bytes) / cell)
    chosen.reverse()
    chosen = _repair(fronts, chosen, budget)
    total = sum(f[j].bytes for f, j in zip(fronts, chosen))
    return Solution([f[j].picks for f, j in zip(fronts, chosen)], total,
                    math.fsum(f[j].damage for f, j in zip(fronts, chosen)), cell)


def _repair(fronts: list[list[GroupOption]], chosen: list[int], budget: int) -> list[int]:
    """Spend what the grid's rounding left over: apply the single switch that lowers the damage most within the
    exact remaining bytes, until none does."""
    chosen = list(chosen)
    slack = budget - sum(f[j].bytes for f, j in zip(fronts, chosen))
    while True:
        move = None
        for g, (front, j) in enumerate(zip(fronts, chosen)):
            for k, o in enumerate(front):
                extra = o.bytes - front[j].bytes
                gain = front[j].damage - o.damage
                if extra <= slack and gain > 0 and (move is None or gain > move[0]):
                    move = (gain, g, k, extra)
        if move is None:
            return chosen
        _, g, k, extra = move
        chosen[g] = k
        slack -= extra
