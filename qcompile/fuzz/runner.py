"""The fuzz runner: case seeds -> cases -> the worker subprocess -> verdicts -> a report.

    python tools/fuzz_ops.py --seconds 1800 --seed 7      # a long run (the CI part is tests/fuzz/test_fuzz_ops.py)
    python tools/fuzz_ops.py --case-seed 30064771085        # replay one case, printing it in full

A case is a pure function of its case seed (``seed << 32 | index``), so any failure is reproduced by its case
seed alone. Each verdict is one of

* ``clean_error``  -- the op raised an ONNX Runtime error and the reference rejects the inputs too;
* ``equal``        -- the op's output is the reference's (oracle.judge);
* ``known_issue``  -- a failure that matches a reported bug in :data:`KNOWN_ISSUES` (pinned by an xfail test);
* failures: ``crash`` (the worker died: signal, sanitizer report, abort), ``timeout``, ``accepted_invalid``
  (an output where the reference says the inputs break the contract), ``error_on_valid`` (an error where
  the reference accepts them: the op is stricter than its contract), ``mismatch``, ``harness`` (the
  fuzzer's own code failed on the case).
"""
from __future__ import annotations

import argparse
import os
import pickle
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qcompile.fuzz import sanitizer
from qcompile.fuzz.case import (SHARED_MUTATIONS, Case, OpSpec, Rejected, check_input_types, feeds, pick, read_attrs,
                                to_model)
from qcompile.fuzz.oracle import Linear, judge, without_inf
from qcompile.fuzz.worker import HEADER, write_frame

def _registered_ops() -> dict[str, OpSpec]:
    """Every op whose format package brings fuzz cases (``fuzz.py``, named in the format's OpSpec)."""
    from qcompile.formats import all_formats

    return {f.op.fuzz.op: f.op.fuzz for f in all_formats() if f.op.fuzz is not None}


OPS: dict[str, OpSpec] = _registered_ops()
#: Short names for the command line: the op type without "MatMul", lower case (fp4, spqr, codebook).
ALIASES = {op.removesuffix("MatMul").lower(): op for op in OPS}
ENV_SWITCHES = sorted({k for s in OPS.values() for k in s.env})
N_MUTATIONS = (0, 0, 1, 1, 1, 2, 2, 3)  # a quarter of the cases stay valid: path and shape coverage
OP_MUTATION_WEIGHT = 2.0
FAILURES = ("crash", "timeout", "accepted_invalid", "error_on_valid", "mismatch", "harness")
REPO = sanitizer.REPO


# ---- cases -----------------------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    return (seed << 32) | index


def generate(cseed: int) -> Case:
    """The case of a case seed: op, valid base case, then 0-3 mutations (shared and the op's own)."""
    rng = np.random.default_rng(cseed)
    spec = OPS[pick(rng, sorted(OPS))]
    case = spec.base(rng)
    case.seed = cseed
    table = [(w, partial(fn, spec)) for w, fn in SHARED_MUTATIONS.values()]
    table += [(OP_MUTATION_WEIGHT, fn) for fn in spec.mutations.values()]
    p = np.array([w for w, _ in table]) / sum(w for w, _ in table)
    for _ in range(int(pick(rng, N_MUTATIONS))):
        for _attempt in range(8):  # a mutation may not apply to this case: draw another
            label = table[rng.choice(len(table), p=p)][1](case, rng)
            if label:
                case.mutations.append(label)
                break
    return case


def op_of(cseed: int) -> str:
    return OPS[pick(np.random.default_rng(cseed), sorted(OPS))].op


@dataclass
class Expectation:
    """The reference's view: why it rejects the case, or the case as a Linear (raw and with infinities -> 1)."""
    rejected: str | None
    raw: Linear | None = None
    finite: Linear | None = None


def expect(case: Case) -> Expectation:
    spec = OPS[case.op]
    try:
        check_input_types(case, spec)
        attrs = read_attrs(case, spec)
        finite_inputs = {k: without_inf(v) for k, v in case.inputs.items()}
        raw = spec.linear(case, attrs)
        if any(v is not case.inputs[k] for k, v in finite_inputs.items()):  # without_inf copied it
            finite = spec.linear(replace(case, inputs=finite_inputs), attrs)
        else:  # no infinity anywhere: the same Linear
            finite = raw
    except Rejected as e:
        return Expectation(str(e))
    return Expectation(None, raw, finite)


# ---- the worker process -------------------------------------------------------------------------------------------


@dataclass
class Died:
    """The worker did not answer: exit status or signal, and what it wrote to stderr meanwhile."""
    reason: str
    report: str


class Worker:
    """One ``python -m qcompile.fuzz.worker`` process; restarted by :class:`Runner` after it dies."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        fd, path = tempfile.mkstemp(prefix="fuzz-worker-", suffix=".log", dir=log_dir)
        self.stderr_path, self._stderr = Path(path), os.fdopen(fd, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "qcompile.fuzz.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=REPO)
        self.mark = 0
        ready = self.receive(timeout=300)
        if isinstance(ready, Died) or not ready.get("ready"):
            raise RuntimeError(f"the fuzz worker did not start: {getattr(ready, 'reason', ready)}\n"
                               f"{getattr(ready, 'report', '')}")

    def send(self, req: dict[str, Any]) -> bool:
        self.mark = self.stderr_path.stat().st_size
        try:
            write_frame(self.proc.stdin, req)
            return True
        except (BrokenPipeError, OSError):
            return False

    def _read(self, n: int, deadline: float) -> bytes | None:
        fd, buf = self.proc.stdout.fileno(), b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def receive(self, timeout: float) -> dict[str, Any] | Died:
        deadline = time.monotonic() + timeout
        head = self._read(HEADER.size, deadline)
        body = head and self._read(HEADER.unpack(head)[0], deadline)
        if body is None:
            timed_out = time.monotonic() >= deadline and self.proc.poll() is None
            return self.kill(f"no reply within {timeout:.0f} s (hang)" if timed_out else "")
        reply = pickle.loads(body)
        report = self.new_stderr()
        if any(m in report for m in sanitizer.REPORT_MARKERS):  # a report that did not end the process
            return self.kill("sanitizer report", report)
        return reply

    def new_stderr(self) -> str:
        self._stderr.flush()
        with open(self.stderr_path, "rb") as f:
            f.seek(self.mark)
            return f.read().decode(errors="replace")

    def kill(self, reason: str, report: str | None = None) -> Died:
        if self.proc.poll() is None:
            if not reason:
                try:  # it closed its pipe: give a sanitizer time to finish writing its report
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            self.proc.kill()
        rc = self.proc.wait()
        if not reason:
            reason = f"worker exited with status {rc}" if rc >= 0 else f"worker killed by signal {-rc}"
        report = self.new_stderr() if report is None else report
        self.close()
        return Died(reason, report)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        self.stderr_path.unlink(missing_ok=True)


# ---- running and judging ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    verdict: str
    detail: str = ""
    tag: str = ""  # known_issue: the KnownIssue's name; clean_error: "stage: exception type"


@dataclass(frozen=True)
class KnownIssue:
    """A reported bug the fuzzer keeps finding: its failures count as ``known_issue``, not as failures, while
    the named regression test (``xfail(strict=True)``) pins it. Fixing the bug makes that test pass, hence
    fail as XPASS: then delete the entry here and the marker there."""
    name: str
    test: str
    matches: Callable[[Case, Expectation, Outcome], bool]


KNOWN_ISSUES: tuple[KnownIssue, ...] = ()  # none open: add one with the xfail test that pins it


def known_issue(case: Case, exp: Expectation, out: Outcome) -> Outcome:
    for ki in KNOWN_ISSUES:
        if ki.matches(case, exp, out):
            return Outcome("known_issue", f"{ki.test}: {out.detail}", tag=ki.name)
    return out


def judge_reply(case: Case, exp: Expectation, reply: dict[str, Any]) -> Outcome:
    if reply["stage"] != "ok":
        msg = f"{reply['stage']}: {reply['error_type']}: {reply['error']}"
        if exp.rejected is not None:
            return Outcome("clean_error", msg, tag=f"{reply['stage']}: {reply['error_type']}")
        return Outcome("error_on_valid", msg)
    if exp.rejected is not None:
        return Outcome("accepted_invalid", f"the op returned an output; the reference rejects: {exp.rejected}")
    for i, y in enumerate(reply["outputs"]):
        problem = judge(y, case.x.shape, case.x.dtype, exp.raw, exp.finite)
        if problem:
            return Outcome("mismatch", f"run {i}: {problem}")
    return Outcome("equal")


class Runner:
    """Runs cases in a worker subprocess, restarting it after each death."""

    def __init__(self, env: dict[str, str], timeout: float = 120.0, log_dir: Path | None = None):
        self.env, self.timeout = env, timeout
        self.log_dir = log_dir or Path(tempfile.gettempdir())
        self.worker: Worker | None = None
        self.worker_starts = 0

    def _worker(self) -> Worker:
        if self.worker is None:
            self.worker = Worker(self.env, self.log_dir)
            self.worker_starts += 1
        return self.worker

    def execute(self, req: dict[str, Any], between=lambda: None) -> tuple[dict[str, Any] | Died, Any]:
        """Sends ``req``, calls ``between()`` while the worker runs it, then waits for the reply."""
        w = self._worker()
        sent = w.send(req)
        extra = between()
        reply = w.receive(self.timeout) if sent else w.kill("")
        if isinstance(reply, Died):
            self.worker = None
        return reply, extra

    def request(self, case: Case) -> dict[str, Any]:
        """The worker request that runs ``case`` (tests substitute self-tests here)."""
        return {"model": to_model(case, OPS[case.op]), "feeds": feeds(case), "env": case.env,
                "clear_env": ENV_SWITCHES, "threads": case.threads, "runs": case.runs}

    def check(self, case: Case) -> Outcome:
        """Runs ``case`` in the worker while the reference judges it, and returns the verdict."""
        try:
            req = self.request(case)
        except Exception as e:  # noqa: BLE001 - e.g. an attribute onnx cannot encode: the fuzzer's fault
            return Outcome("harness", f"building the model: {type(e).__name__}: {e}")

        def reference() -> Expectation | Exception:
            try:
                return expect(case)
            except Exception as e:  # noqa: BLE001
                return e

        reply, exp = self.execute(req, reference)
        if isinstance(reply, Died):
            return Outcome("timeout" if "hang" in reply.reason else "crash", f"{reply.reason}\n{reply.report[-6000:]}")
        if isinstance(exp, Exception):
            return Outcome("harness", f"reference: {type(exp).__name__}: {exp}")
        try:
            return known_issue(case, exp, judge_reply(case, exp, reply))
        except Exception as e:  # noqa: BLE001
            return Outcome("harness", f"judging: {type(e).__name__}: {e}")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


@dataclass
class Failure:
    case: Case
    outcome: Outcome

    def report(self) -> str:
        return (f"[{self.outcome.verdict}] {self.case.describe()}\n  {self.outcome.detail.strip()}\n"
                f"  reproduce: python tools/fuzz_ops.py --case-seed {self.case.seed}")


@dataclass
class Stats:
    cases: int = 0
    verdicts: Counter = field(default_factory=Counter)
    by_op: Counter = field(default_factory=Counter)
    tags: Counter = field(default_factory=Counter)  # (verdict, Outcome.tag) -> count
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    worker_starts: int = 0

    def add(self, case: Case, out: Outcome) -> None:
        self.cases += 1
        self.verdicts[out.verdict] += 1
        self.by_op[(case.op, out.verdict)] += 1
        if out.tag:
            self.tags[(out.verdict, out.tag)] += 1
        if out.verdict in FAILURES:
            self.failures.append(Failure(case, out))

    def summary(self) -> str:
        v = self.verdicts
        failed = ", ".join(f"{v[f]} {f}" for f in FAILURES if v[f])
        lines = [f"{self.cases} cases in {self.seconds:.0f} s ({self.cases / max(self.seconds, 1e-9):.1f}/s, "
                 f"{self.worker_starts} worker starts): {v['clean_error']} clean errors, {v['equal']} outputs equal "
                 f"to the reference, {v['known_issue']} known issues, {len(self.failures)} failures"
                 + (f" ({failed})" if failed else "")]
        for op in sorted(OPS):
            row = {k[1]: c for k, c in self.by_op.items() if k[0] == op}
            lines.append(f"  {op}: " + ", ".join(f"{c} {k}" for k, c in sorted(row.items())))
        kinds = ", ".join(f"{c} {t}" for (v, t), c in self.tags.most_common() if v == "clean_error")
        lines.append(f"  clean errors by stage and type: {kinds or 'none'}")
        for (v, name), c in self.tags.most_common():
            if v == "known_issue":
                lines.append(f"  known issue x{c}: {name}")
        return "\n".join(lines)


def save_failure(f: Failure, out_dir: Path) -> Path:
    """The failing case as files: model.onnx, feeds.npz, env.txt and report.txt (rerun them without the fuzzer)."""
    d = out_dir / str(f.case.seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(to_model(f.case, OPS[f.case.op]))
    np.savez(d / "feeds.npz", **feeds(f.case))
    (d / "env.txt").write_text("".join(f"{k}={v}\n" for k, v in f.case.env.items()) + f"threads={f.case.threads}\n")
    (d / "report.txt").write_text(f.report() + "\n")
    return d


def library_env(build: str, log=print) -> dict[str, str]:
    """Environment for workers: the sanitizer build (built if stale) or the normal library."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    if build == "asan":
        env.update(sanitizer.environment(sanitizer.library(log=log)))
    else:
        from qcompile.runtime import ops_library_path
        env["QCOMPILE_OPS_LIBRARY"] = str(ops_library_path())
    return env


def fuzz(seconds: float, seed: int = 0, *, ops: list[str] | None = None, build: str = "asan",
         max_cases: int | None = None, out_dir: Path | None = None, progress: float = 60.0,
         log=partial(print, flush=True), env: dict[str, str] | None = None) -> Stats:
    """Cases ``seed << 32 | i`` for i = 0, 1, ... until ``seconds`` pass (or ``max_cases`` ran); failing
    cases are saved under ``out_dir`` when given."""
    want = {ALIASES.get(o, o) for o in (ops or OPS)}
    unknown = want - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {sorted(OPS)} or {sorted(ALIASES)}")
    runner = Runner(env or library_env(build, log))
    stats = Stats()
    t0 = time.monotonic()
    last = t0
    i = 0
    try:
        while time.monotonic() - t0 < seconds and (max_cases is None or stats.cases < max_cases):
            cs = case_seed(seed, i)
            i += 1
            if op_of(cs) not in want:
                continue
            try:
                case = generate(cs)
                out = runner.check(case)
            except Exception as e:  # noqa: BLE001 - the generator's fault, reported like any failure
                case, out = Case(op_of(cs), {}, {}, set(), seed=cs), Outcome("harness", f"{type(e).__name__}: {e}")
            stats.add(case, out)
            if out.verdict in FAILURES:
                log(stats.failures[-1].report())
                if out_dir is not None and case.x is not None:
                    log(f"  saved to {save_failure(stats.failures[-1], out_dir)}")
            if time.monotonic() - last >= progress:
                last = time.monotonic()
                log(f"... {stats.cases} cases, {sum(stats.verdicts[f] for f in FAILURES)} failures")
    finally:
        stats.seconds = time.monotonic() - t0
        stats.worker_starts = runner.worker_starts
        runner.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=float(os.environ.get("QCOMPILE_FUZZ_SECONDS", 60)),
                   help="time budget (default $QCOMPILE_FUZZ_SECONDS or 60)")
    p.add_argument("--seed", type=int, default=int(os.environ.get("QCOMPILE_FUZZ_SEED", 0)))
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--ops", default=",".join(sorted(ALIASES)), help="comma-separated: fp4,spqr,codebook")
    p.add_argument("--build", choices=("asan", "normal"), default="asan",
                   help="asan: the sanitizer build (default); normal: the library tests use")
    p.add_argument("--case-seed", type=int, default=None, help="run this one case and print it in full")
    p.add_argument("--print-env", action="store_true",
                   help="print the shell exports that load the sanitizer build (e.g. to run the kernel tests with it: "
                        "eval \"$(python tools/fuzz_ops.py --print-env)\"; pytest tests/test_spqr_kernels.py)")
    p.add_argument("--save", type=Path, default=REPO / "build" / "fuzz-failures",
                   help="where failing cases are saved (default build/fuzz-failures)")
    args = p.parse_args(argv)
    if args.print_env:
        import shlex
        lib = sanitizer.library(log=lambda msg: print(msg, file=sys.stderr))
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sanitizer.environment(lib).items()), end="")
        return 0
    if args.case_seed is not None:
        case = generate(args.case_seed)
        print(case.describe())
        runner = Runner(library_env(args.build))
        try:
            out = runner.check(case)
        finally:
            runner.close()
        print(f"verdict: {out.verdict}\n{out.detail}")
        if out.verdict in FAILURES:
            print(f"saved to {save_failure(Failure(case, out), args.save)}")
        return 1 if out.verdict in FAILURES else 0
    stats = fuzz(args.seconds, args.seed, ops=args.ops.split(","), build=args.build, max_cases=args.cases,
                 out_dir=args.save)
    print(stats.summary())
    return 1 if stats.failures else 0
