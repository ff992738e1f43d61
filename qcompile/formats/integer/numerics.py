"""Integer numerics: an asymmetric uniform grid per (row, group) with an integer zero point, rounded by RTN
or GPTQ (:mod:`qcompile.solvers.gptq`)."""
from __future__ import annotations

import numpy as np
import torch

from qcompile.errors import FormatError
from qcompile.formats.integer.weight import IntQuantizedWeight
from qcompile.solvers.gptq import gptq, rtn


class IntGrid:
    """Asymmetric uniform grid per (row, group) with an integer zero point; optional MSE clipping."""

    def __init__(self, bits: int, mse: bool = False, scale_dtype: torch.dtype = torch.float32):
        self.bits = bits
        self.maxq = 2**bits - 1
        self.mse = mse
        self.scale_dtype = scale_dtype

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (xmax - xmin) / self.maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scale = scale.to(self.scale_dtype).float()  # what the file stores is what we round with
        zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq)
        return scale, zero

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xmin = torch.clamp(w.min(dim=1).values, max=0)
        xmax = torch.clamp(w.max(dim=1).values, min=0)
        scale, zero = self._params(xmin, xmax)
        if self.mse:
            best = self._err(w, scale, zero)
            for shrink in torch.linspace(0.98, 0.5, 25).tolist():
                s, z = self._params(xmin * shrink, xmax * shrink)
                e = self._err(w, s, z)
                better = e < best
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
                best = torch.minimum(best, e)
        return scale, zero

    def _err(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, self.maxq)
        return ((scale[:, None] * (q - zero[:, None]) - w) ** 2).sum(dim=1)

    def quantize(self, col: torch.Tensor, params, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = params
        q = torch.clamp(torch.round(col / scale) + zero, 0, self.maxq)
        return scale * (q - zero), q


def quantize_int(weight_kn: np.ndarray, hessian: torch.Tensor | None, *, name: str, bits: int, method: str,
                 group_size: int, act_order: bool, damp: float, mse: bool, accuracy_level: int,
                 device: str = "cpu") -> IntQuantizedWeight:
    """Quantize one ``[K, N]`` weight to ``bits`` with RTN or GPTQ."""
    if group_size < 1:
        raise FormatError(f"group_size must be positive, got {group_size}")
    w = torch.from_numpy(np.ascontiguousarray(weight_kn.T)).float().to(device)
    grid = IntGrid(bits, mse=mse)
    if method == "gptq":
        if hessian is None:
            raise FormatError(f"{name} needs calibration statistics (a Hessian)")
        res = gptq(w, hessian.to(device), grid, group_size, damp=damp, act_order=act_order)
    else:
        res = rtn(w, grid, group_size)
    scales = torch.stack([p[0] for p in res.group_params], dim=1).cpu().numpy()
    zeros = torch.stack([p[1] for p in res.group_params], dim=1).cpu().numpy()
    return IntQuantizedWeight(name, res.codes.numpy(), scales, zeros, bits, group_size, accuracy_level)
