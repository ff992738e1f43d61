"""The prefill driver's test switches, named as the kernel tests parametrize them."""
from __future__ import annotations


def pin_prefill_tiles(monkeypatch, variant: str) -> None:
    """``variant``: "avx2..." pins the AVX2 microkernel (QCOMPILE_PREFILL_AVX2); "...passes-R-tiles-T" sweeps X in
    passes of R rows with T tiles of W per task (QCOMPILE_PREFILL_PASS_ROWS, _TASK_TILES), as large M and N do;
    anything else ("auto") leaves the driver's own choices."""
    if variant.startswith("avx2"):
        monkeypatch.setenv("QCOMPILE_PREFILL_AVX2", "1")
    if "passes" in variant:
        _, rows, _, tiles = variant.rsplit("-", 3)
        monkeypatch.setenv("QCOMPILE_PREFILL_PASS_ROWS", rows)
        monkeypatch.setenv("QCOMPILE_PREFILL_TASK_TILES", tiles)
