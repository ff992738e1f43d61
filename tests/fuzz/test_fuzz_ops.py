"""The op-library fuzzer in the suite (issue 22): a time-bounded run of qcompile.fuzz against the AddressSanitizer +
UBSan build, the harness's own guarantees (a crashing or hanging case is a failure naming its seed, not the end
of pytest), the oracle against the numpy references, and regression tests for what the fuzzer found.

The CI part takes ~100 s: 90 s of building the sanitizer library when the C++ sources changed (~30 s) plus
fuzzing for the rest, and ~10 s of harness and regression tests.
``QCOMPILE_FUZZ_SECONDS`` / ``QCOMPILE_FUZZ_SEED`` change its budget and seed; the long run is
``python tools/fuzz_ops.py --seconds 1800``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from qcompile.fuzz import runner, sanitizer
from qcompile.fuzz.case import Case, feeds, to_model
from qcompile.fuzz.oracle import judge
from qcompile.formats import all_formats
from qcompile.formats.spqr import fuzz as spqr_fuzz
from qcompile.formats.spqr import reference as spqr_ref

CI_TOTAL_SECONDS = 90.0  # build (when stale) + fuzzing; the other tests here add ~10 s
MIN_FUZZ_SECONDS = 30.0


def _sanitizer_toolchain() -> bool:
    if not (shutil.which("c++") and shutil.which("ldd") and shutil.which("cmake")):
        return False
    lib = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(lib) and os.path.exists(lib)


@pytest.fixture(scope="module")
def sanitized() -> tuple[dict[str, str], float]:
    """Worker environment for the sanitizer build (built first when stale), and the seconds that took."""
    if not _sanitizer_toolchain():
        pytest.skip("no C++ compiler with AddressSanitizer (libasan), ldd or cmake")
    stale = not (sanitizer.LIBRARY.is_file() and sanitizer.STAMP.is_file()
                 and sanitizer.STAMP.read_text().strip() == sanitizer.source_hash())
    if stale and os.environ.get("QCOMPILE_TEST_NO_BUILD") == "1":
        pytest.skip("the sanitizer build is missing or stale and QCOMPILE_TEST_NO_BUILD=1")
    t0 = time.monotonic()
    try:
        env = runner.library_env("asan", log=lambda msg: None)
    except sanitizer.SanitizerBuildError as e:
        pytest.fail(str(e), pytrace=False)
    return env, time.monotonic() - t0


# ---- the CI fuzz run -------------------------------------------------------------------------------------------


def test_fuzz_ops_under_sanitizers(sanitized, tmp_path):
    """Every case a clean ONNX Runtime error or the reference's output; no crash, sanitizer report or hang."""
    env, build_seconds = sanitized
    seconds = float(os.environ.get("QCOMPILE_FUZZ_SECONDS", max(MIN_FUZZ_SECONDS, CI_TOTAL_SECONDS - build_seconds)))
    seed = int(os.environ.get("QCOMPILE_FUZZ_SEED", 0))
    stats = runner.fuzz(seconds, seed, env=env, out_dir=tmp_path, log=lambda msg: None)
    summary = stats.summary()
    print(summary)
    assert not stats.failures, summary + "\n\n" + "\n\n".join(f.report() for f in stats.failures[:5])
    for op in runner.OPS:  # the run reached every op, with both kinds of answers
        assert stats.by_op[(op, "equal")] >= 20 and stats.by_op[(op, "clean_error")] >= 10, summary


# ---- the harness ---------------------------------------------------------------------------------------------------


def _valid_case(op: str, seed: int = 0) -> Case:
    case = runner.OPS[op].base(np.random.default_rng(seed))
    case.seed = seed
    return case


class _CrashOnce(runner.Runner):
    """Sends one self-test request that kills the worker, then runs cases normally."""

    def __init__(self, env, selftest: str, timeout: float = 120.0):
        super().__init__(env, timeout=timeout)
        self.selftest = selftest

    def request(self, case):
        if self.selftest:
            req, self.selftest = {"selftest": self.selftest}, ""
            return req
        return super().request(case)


@pytest.mark.parametrize("selftest,verdict,marker", [("segv", "crash", "AddressSanitizer"),
                                                     ("hang", "timeout", "hang")])
def test_dying_worker_is_a_failure_with_its_case_seed(sanitized, selftest, verdict, marker):
    env, _ = sanitized
    r = _CrashOnce(env, selftest, timeout=5.0)
    case = _valid_case("SpQRMatMul", seed=3)
    try:
        out = r.check(case)
        assert out.verdict == verdict and marker in out.detail, out.detail[-2000:]
        assert "--case-seed 3" in runner.Failure(case, out).report()
        assert r.check(case).verdict == "equal"  # a fresh worker runs the next case
        assert r.worker_starts == 2
    finally:
        r.close()


@pytest.mark.parametrize("op", sorted(runner.OPS))
def test_oracle_accepts_the_reference_and_flags_a_wrong_output(op):
    """The oracle built from the op modules agrees with the numpy reference functions, and is not blind."""
    for seed in range(6):
        case = _valid_case(op, seed)
        exp = runner.expect(case)
        assert exp.rejected is None, exp.rejected
        x, a = case.x, dict(case.attrs)
        spec = next(f.op for f in all_formats() if f.op.type == op)  # the registry's reference of the op
        y = spec.reference(x, *(case.inputs.get(n) for n in spec.inputs), **a)
        assert judge(y, x.shape, x.dtype, exp.raw, exp.finite) is None
        if y.size:
            bad = y.copy().reshape(-1)
            bad[0] += np.float32(0.01) * (np.abs(y).max() + 1)
            assert "mismatch" in judge(bad.reshape(y.shape), x.shape, x.dtype, exp.raw, exp.finite)


# ---- what the fuzzer found ---------------------------------------------------------------------------------------


def test_codebook_byte_walk_with_fewer_than_16_tables_is_clean_under_ubsan(sanitized):
    """Constant byte codes of a wide layer with G·M < 16 tables: preparing the fixed-point walk's (empty) layout
    called memset on a null pointer (UBSan: nonnull argument) until pack_block returned early."""
    env, _ = sanitized
    rng = np.random.default_rng(0)
    k, n, m, s = 40, 2101, 3, 250  # T = (40/8)·3 = 15 tables: no whole 16-table slice
    case = Case("CodebookMatMul", dict(K=k, N=n, num_codebooks=m, codebook_size=s, in_group_size=8), {
        "X": rng.standard_normal((1, k)).astype(np.float32),
        "codes": rng.integers(0, s, (n, k // 8, m)).astype(np.uint8),
        "codebooks": (rng.standard_normal((m, s, 8)) * 0.5).astype(np.float16),
        "scales": rng.uniform(0.5, 1.5, n).astype(np.float32), "bias": None}, {"codes", "codebooks", "scales"})
    r = runner.Runner(env)
    try:
        out = r.check(case)
    finally:
        r.close()
    assert out.verdict == "equal", out.detail[-3000:]


def _run(ops_session, case: Case) -> np.ndarray:
    return ops_session(to_model(case, runner.OPS[case.op])).run(None, feeds(case))[0]


@pytest.mark.parametrize("op,attr", [("FP4MatMul", "hadamard_block"), ("SpQRMatMul", "group_size"),
                                     ("CodebookMatMul", "in_group_size")])
def test_list_typed_attribute_is_an_error(ops_session, op, attr):
    default = next(a.default for a in runner.OPS[op].attrs if a.name == attr)
    case = next(c for c in (_valid_case(op, seed) for seed in range(100)) if c.attrs[attr] == default)
    case.attrs[attr] = [default]  # the value the op would use anyway: only the type is wrong
    with pytest.raises(Exception, match=op):
        _run(ops_session, case)


def test_codebook_fed_codes_checked_without_rows(ops_session):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (4, 2, 1)).astype(np.uint8)
    codes[1, 1, 0] = 16
    case = Case("CodebookMatMul", dict(K=16, N=4, num_codebooks=1, codebook_size=16, in_group_size=8), {
        "X": np.zeros((0, 16), np.float32), "codes": codes,
        "codebooks": rng.standard_normal((1, 16, 8)).astype(np.float16),
        "scales": np.ones(4, np.float16), "bias": None}, {"codebooks", "scales"})
    with pytest.raises(Exception, match="out of range"):
        _run(ops_session, case)


def test_spqr_stat_group_above_2_30_is_legal(ops_session):
    k, n = 64, 9
    packed = spqr_ref.random_packed(k, n, outlier_rate=0.05, with_perm=True, seed=2)
    attrs = dict(K=k, N=n, bits=3, group_size=16, stat_bits=3, stat_group=2**31)
    x = np.random.default_rng(2).standard_normal((2, k)).astype(np.float32)
    case = Case("SpQRMatMul", attrs, {"X": x, **{w: packed.get(w) for w in spqr_fuzz.WEIGHTS}, "bias": None},
                set(spqr_fuzz.WEIGHTS))
    y = _run(ops_session, case)
    want = spqr_ref.spqr_matmul_reference(x, *(packed.get(w) for w in spqr_fuzz.WEIGHTS), **attrs)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_known_issues_name_existing_tests():
    here = Path(__file__).read_text()
    for ki in runner.KNOWN_ISSUES:
        path, name = ki.test.split("::")
        assert path == "tests/fuzz/test_fuzz_ops.py" and f"def {name}(" in here, ki.test
