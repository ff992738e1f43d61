"""What the test machine's CPU offers, for tests of kernel paths that only some CPUs take."""
from __future__ import annotations


def has_avx512bw() -> bool:
    """AVX-512BW listed in /proc/cpuinfo (the kernels' fixed-point table walks need it; Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512bw" in line for line in f)
    except OSError:
        return False
