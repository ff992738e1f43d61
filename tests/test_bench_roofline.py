"""qcompile bench --roofline: the read-bandwidth probe and each op's GB/s against it (tiny shapes: the plumbing,
not the speed)."""
from __future__ import annotations

import pytest


def test_bench_roofline_columns(ops_library, monkeypatch):
    """--roofline: the read-bandwidth probe in every row, and each op's GB/s over its stored bytes against it."""
    from qcompile import bench

    monkeypatch.setenv("QCOMPILE_OPS_LIBRARY", str(ops_library))
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 0)  # an 8 MiB probe, not twice a server's L3
    rows = bench.run_op_bench(ops=["FP4MatMul", "FP4MatMul-a4"], shapes=[(256, 64)], ms=[1], repeats=2, warmup=1,
                              flush_mb=1, clock="thread_cpu", verbose=False, roofline=True, probe_mb=8)
    (r,) = rows
    assert r["read_GBps_1t"] > 0
    for op in ("FP4MatMul", "FP4MatMul-a4"):
        gbps = bench.registered_ops()[op].weight_bytes(256, 64) / (r[f"{op}_ms"] / 1000) / 1e9
        assert r[f"{op}_GBps"] == pytest.approx(gbps)
        assert r[f"{op}_bw_frac"] == pytest.approx(gbps / r["read_GBps_1t"])
    assert "MatMul_GBps" not in r  # baselines: time only
    table = bench.format_table(rows)
    assert table.startswith("streaming read") and "FP4MatMul-a4_bw_frac" in table


def test_cache_flusher_evicts_by_reading_or_writing():
    """The default flush reads its buffer (clean lines, as the layers before leave them in decode); "write"
    rewrites it; anything else is refused by name."""
    from qcompile.bench import _CacheFlusher

    read = _CacheFlusher(1)
    read()
    read()
    assert read.mode == "read" and read.sink == 2.0 and (read.buf == 1.0).all()
    write = _CacheFlusher(1, "write")
    write()
    assert (write.buf == 2.0).all()
    _CacheFlusher(0)()  # no buffer: nothing to do
    with pytest.raises(ValueError, match="flush mode"):
        _CacheFlusher(1, "rinse")


def test_bench_rows_name_the_flush(ops_library, monkeypatch):
    from qcompile import bench

    monkeypatch.setenv("QCOMPILE_OPS_LIBRARY", str(ops_library))
    kw = dict(ops=["FP4MatMul"], shapes=[(256, 64)], ms=[1], repeats=1, warmup=1, flush_mb=1, clock="thread_cpu",
              verbose=False, baselines=False)
    assert bench.run_op_bench(**kw)[0]["flush"] == "read"
    assert bench.run_op_bench(**kw, flush_mode="write")[0]["flush"] == "write"
    assert bench.run_op_bench(**kw, cold_cache=False)[0]["flush"] is None


def test_flush_and_probe_exceed_the_last_level_cache(monkeypatch):
    """The default flush and the probe's buffer are twice the largest cache sysfs reports (at least 64 / 256
    MiB), so a server's L3 cannot hold the weights between runs; the probe reads that buffer."""
    from qcompile import bench

    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 300 << 20)
    assert bench.default_flush_mb() == 600
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 8 << 20)
    assert bench.default_flush_mb() == 64
    seen = []
    monkeypatch.setattr(bench, "_read_all", lambda buf: seen.append(buf.nbytes) or 1)
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 4 << 20)
    assert bench.read_bandwidth(2, "wall", repeats=1, megabytes=6) > 0
    assert sum(seen) == 2 * (8 << 20) and len(seen) == 4  # 8 MiB (2x the cache) in two shares, twice


def test_last_level_cache_is_read_from_sysfs(tmp_path, monkeypatch):
    from qcompile import bench

    for i, size in enumerate(["48K", "2048K", "300M"]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    real = bench.Path
    monkeypatch.setattr(bench, "Path", lambda p: tmp_path if p == "/sys/devices/system/cpu/cpu0/cache" else real(p))
    assert bench.last_level_cache_bytes() == 300 << 20


def test_interleave_times_the_ops_in_rounds(ops_library, monkeypatch):
    """--interleave: each round runs every op once (FP4MatMul, then the baselines), three rounds for three
    repeats; without it, one op's repeats come before the next op's."""
    from qcompile import bench

    monkeypatch.setenv("QCOMPILE_OPS_LIBRARY", str(ops_library))
    calls: list[str] = []
    timed = bench._CpuTimer.time_once
    monkeypatch.setattr(bench._CpuTimer, "time_once", lambda self, x: (calls.append(self.node_op), timed(self, x)))
    kw = dict(ops=["FP4MatMul"], shapes=[(256, 64)], ms=[1], repeats=3, warmup=1, flush_mb=1, clock="thread_cpu",
              verbose=False)
    (row,) = bench.run_op_bench(**kw, interleave=True)
    n = len(calls) // 3
    assert n >= 2 and calls[0] == "FP4MatMul" and calls == calls[:n] * 3
    assert row["interleave"] is True and all(row[k] > 0 for k in row if k.endswith("_ms"))
    calls.clear()
    (row,) = bench.run_op_bench(**kw)
    assert calls[:3] == ["FP4MatMul"] * 3 and row["interleave"] is False
