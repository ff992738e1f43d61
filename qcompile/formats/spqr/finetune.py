"""SpQR's tunable layer for :mod:`qcompile.solvers.distill` and the format's ``to_module``/``from_module``: the fp16 side parameters of a packed SpQR weight.

Why: at 3 bits the per-layer GPTQ sweep leaves errors that compound through the blocks. The file holds,
besides the 3/4-bit codes, fp16 second-level statistics (per block of ``stat_group`` rows and column
group: scale step, scale min, zero step, zero min) and fp16 outlier values. Those are continuous, so they
can be tuned against the float model with every code (dense codes, stat codes, outlier positions) fixed:
the file layout and its size do not change.

Parametrization (so one Adam learning rate fits every layer): the scale step/min are divided by a per-block
reference magnitude (relative steps, the "scale" group); zero step/min are already in code units and the
outlier values are divided by the dense scale at their position (code units too; the "main" group).
"""
from __future__ import annotations

import numpy as np
import torch

from qcompile.formats.spqr import reference as ref
from qcompile.formats.spqr.weight import SpQRQuantizedWeight
from qcompile.solvers.distill import TunableLinear


class SpQRLinear(TunableLinear):
    """``y = x Wᵀ`` with ``W`` decoded as :func:`qcompile.formats.spqr.reference.dequantize` does, differentiably in
    the statistics' fp16 parameters and the outlier values."""

    def __init__(self, tensors: dict[str, np.ndarray], *, K: int, N: int, bits: int, group_size: int,
                 stat_bits: int, stat_group: int, bias: torch.Tensor | None = None):
        super().__init__()
        g = ref.num_groups(K, group_size)
        self.k, self.n, self.gs, self.groups = K, N, group_size, g
        codes = np.zeros((N, g * group_size), dtype=np.uint8)
        codes[:, :K] = ref.unpack_codes(tensors["codes"], bits, K)
        sc, zc = ref.unpack_stat_codes(tensors["stat_codes"], stat_bits, g)
        self.register_buffer("codes", torch.from_numpy(codes), persistent=False)  # [N, G*gs] stored order
        self.register_buffer("sc", torch.from_numpy(sc.astype(np.float32)), persistent=False)  # [N, G]
        self.register_buffer("zc", torch.from_numpy(zc.astype(np.float32)), persistent=False)
        self.register_buffer("row_block", torch.arange(N) // stat_group, persistent=False)
        sp = torch.from_numpy(tensors["stat_params"].astype(np.float32))  # [NB, 4, G]
        top = float((1 << stat_bits) - 1)
        ref_mag = torch.maximum(sp[:, 0].abs() * top, sp[:, 1].abs())
        self.register_buffer("scale_ref", torch.where(ref_mag > 0, ref_mag, torch.ones_like(ref_mag)),
                             persistent=False)  # [NB, G]
        self.scale_params = torch.nn.Parameter(sp[:, :2] / self.scale_ref[:, None])  # [NB, 2, G]
        self.zero_params = torch.nn.Parameter(sp[:, 2:].clone())  # [NB, 2, G]
        offsets = tensors["row_offsets"].astype(np.int64)
        rows = np.repeat(np.arange(N), np.diff(offsets))
        cols = tensors["col_indices"].astype(np.int64)
        perm = tensors.get("perm")
        self.register_buffer("inv_perm", None if perm is None else torch.from_numpy(
            np.argsort(perm.astype(np.int64))), persistent=False)
        self.register_buffer("out_rows", torch.from_numpy(rows), persistent=False)
        self.register_buffer("out_cols", torch.from_numpy(cols), persistent=False)
        # each outlier in units of the dense scale at its position (stored position of column c: inv_perm[c])
        with torch.no_grad():
            scale, _ = self._scale_zero()
            pos = self.out_cols if self.inv_perm is None else self.inv_perm[self.out_cols]
            unit = scale[self.out_rows, pos // group_size].abs()
        self.register_buffer("out_unit", torch.where(unit > 0, unit, torch.ones_like(unit)), persistent=False)
        self.out_params = torch.nn.Parameter(torch.from_numpy(tensors["values"].astype(np.float32)) / self.out_unit)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"main": [self.zero_params, self.out_params], "scale": [self.scale_params]}

    def _stat_params(self) -> torch.Tensor:
        """``[NB, 4, G]``: scale step, scale min, zero step, zero min (the file's stat_params)."""
        return torch.cat([self.scale_params * self.scale_ref[:, None], self.zero_params], dim=1)

    def _scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first-level ``(scale [N, G], zero [N, G])`` decoded from its stat codes."""
        sp = self._stat_params()[self.row_block]  # [N, 4, G]
        return self.sc * sp[:, 0] + sp[:, 1], self.zc * sp[:, 2] + sp[:, 3]

    def weight(self) -> torch.Tensor:
        scale, zero = self._scale_zero()
        codes = self.codes.view(self.n, self.groups, self.gs).float()
        dense = ((codes - zero[:, :, None]) * scale[:, :, None]).reshape(self.n, -1)[:, :self.k]
        if self.inv_perm is not None:
            dense = dense[:, self.inv_perm]
        if self.out_rows.numel():
            dense = dense.index_put((self.out_rows, self.out_cols), self.out_params * self.out_unit, accumulate=True)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight(), self.bias)

    def stored(self) -> dict[str, np.ndarray]:
        """The new ``stat_params`` and ``values`` (float16, saturated), ready to replace the packed ones."""
        with torch.no_grad():
            sp = self._stat_params().clamp(-65504, 65504).numpy().astype(np.float16)
            vals = (self.out_params * self.out_unit).clamp(-65504, 65504).numpy().astype(np.float16)
        return {"stat_params": np.ascontiguousarray(sp), "values": vals}


def to_module(q: SpQRQuantizedWeight) -> SpQRLinear:
    """The tune pass's module for one SpQR layer."""
    return SpQRLinear(q.tensors, **q.attrs)


def from_module(q: SpQRQuantizedWeight, mod: SpQRLinear) -> SpQRQuantizedWeight:
    """``q`` with the tuned fp16 statistics and outlier values; every code and outlier position stays as it is."""
    attrs = {a: v for a, v in q.attrs.items() if a not in ("K", "N")}
    out = SpQRQuantizedWeight(q.format_name, k=q.k, n=q.n, **attrs, tensors={**q.tensors, **mod.stored()})
    out.accuracy_level = q.accuracy_level
    return out
