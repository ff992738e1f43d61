"""Numpy reference of the CPU ops' prefill arithmetic on AMX (docs/ops.md, "Conventions"): with more than one
row of X, on CPUs with AMX-BF16, the kernels split every activation and every dequantized weight into a bf16
high part and a bf16 remainder (``v = hi + lo + e`` with ``|e| ≤ 2⁻¹⁶|v|``, both parts rounded to nearest
even) and add the three products ``hi·hi + hi·lo + lo·hi`` in fp32. Each output is then off the exact result by
at most ``2⁻¹⁴ Σ|x·w|`` plus fp32 accumulation: about 15 bits, like the fixed-point tables of the batch-1 walks
at the default accuracy level. ``accuracy_level=1`` (or ``QCOMPILE_PREFILL_AMX=0``) keeps fp32."""
from __future__ import annotations

from functools import cache

import numpy as np

#: Relative bound of one product: 2⁻¹⁶ from each split, (1 + 2⁻⁸)²·2⁻¹⁶ for the dropped lo·lo product, and a
#: 2⁻³² cross term; 2⁻¹⁴ covers their sum.
RELATIVE_BOUND = 2.0**-14


def bf16_round(v: np.ndarray) -> np.ndarray:
    """float32 ``v`` rounded to the nearest bf16 (ties to even), as float32; finite values only."""
    u = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def split_bf16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` bf16 parts (as float32) of float32 ``v``: ``hi = bf16(v)``, ``lo = bf16(v − hi)``."""
    v = np.asarray(v, np.float32)
    hi = bf16_round(v)
    return hi, bf16_round(v - hi)


def matmul_bf16x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x [M, K] @ w [K, N]`` as the AMX prefill computes it (the three split products, summed exactly here:
    a kernel's fp32 accumulation adds its usual error on top)."""
    xh, xl = (p.astype(np.float64) for p in split_bf16(x))
    wh, wl = (p.astype(np.float64) for p in split_bf16(w))
    return xh @ wh + xh @ wl + xl @ wh


def error_bound(x_abs: np.ndarray, w_abs: np.ndarray) -> np.ndarray:
    """``[M, N]`` bound on ``|matmul_bf16x3(x, w) − x @ w|`` from ``|x| [M, K]`` and ``|w| [K, N]``."""
    return RELATIVE_BOUND * (np.asarray(x_abs, np.float64) @ np.asarray(w_abs, np.float64))


@cache
def host_has_amx() -> bool:
    """This machine's CPU has what the AMX path needs (AMX tiles with bf16 dot products, AVX-512BW and BF16),
    from /proc/cpuinfo (Linux; False elsewhere). The library also asks the OS for the tile state, which this
    does not check."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} <= set(flags)
