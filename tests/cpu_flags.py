"""What the test machine's CPU offers, for tests of kernel paths that only some CPUs take."""
from __future__ import annotations


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_avx512bw() -> bool:
    """AVX-512BW listed in /proc/cpuinfo (the kernels' fixed-point table walks need it; Linux only)."""
    return "avx512bw" in _flags()


def has_avx512vnni() -> bool:
    """AVX-512BW, VL and VNNI (the int8 activation kernels of accuracy_level 4)."""
    return {"avx512bw", "avx512vl", "avx512_vnni"} <= _flags()


def has_avx512vbmi() -> bool:
    """AVX-512BW and VBMI (the int8 table walk of CodebookMatMul at accuracy_level 4)."""
    return {"avx512bw", "avx512vbmi"} <= _flags()


def has_gfni() -> bool:
    """GFNI (the SpQR int8 walk extracts its code fields with vgf2p8affineqb where the CPU has it)."""
    return "gfni" in _flags()


def has_avx2() -> bool:
    return {"avx2", "fma", "f16c"} <= _flags()


def has_amx_bf16() -> bool:
    """AMX tiles with bf16 dot products and AVX-512 BF16 (the prefill kernels' AMX path)."""
    from qcompile.formats.prefill_amx import host_has_amx

    return host_has_amx()
