"""TensorRT plugins (libqcompile_trt_plugins.so) without TensorRT: a C++ harness
(custom_ops/trt/tests/harness.cpp), compiled here against the same TensorRT headers, loads the library as
TensorRT's plugin registry does and drives each plugin through the builder's and runtime's calls on layers
quantized by the real formats (tests/trt_cases.py): creation from the node's fields, output types and
shapes for several M (with test doubles for IExprBuilder / IDimensionExpr), supported formats, workspace,
serialize -> deserialize, clone / attachToContext (with a test-double error recorder), and malformed
fields (missing, wrong type, wrong length, out-of-range indices and codes), each refused with an error
logged through TensorRT's logger (a test double), never a crash.

Not tested here: anything inside TensorRT itself (its parser, builder or runtime calling these methods).
enqueue against the numpy reference runs only where the harness finds a CUDA device (skipped otherwise).
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qcompile import runtime

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "custom_ops" / "trt" / "tests" / "harness.cpp"
FETCH = REPO / "custom_ops" / "cmake" / "fetch_trt_headers.py"
OPS = ("FP4MatMul", "SpQRMatMul", "CodebookMatMul")

needs_source = pytest.mark.skipif(not HARNESS.is_file(), reason="source tree not available (installed package)")


def _fetch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_trt_headers", FETCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_roots() -> list[Path]:
    """Candidate CUDA toolkit roots: where nvcc says it lives (it may be a wrapper script), then the usual."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    roots = []
    res = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True)
    m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.M)
    if m:
        roots.append(Path(m.group(1).strip()).resolve())
    roots += [Path(os.path.realpath(nvcc)).parent.parent]
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return roots + [Path("/usr/local/cuda")]


def _first(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


@pytest.fixture(scope="session")
def trt_headers() -> Path:
    env = os.environ.get("QCOMPILE_TRT_INCLUDE_DIR")
    if env:
        return Path(env)
    res = subprocess.run([sys.executable, str(FETCH)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"TensorRT headers unavailable (fetch_trt_headers.py failed): {res.stderr.strip()[-300:]}")
    return Path(res.stdout.strip())


@pytest.fixture(scope="session")
def trt_library(trt_headers: Path) -> Path:
    """libqcompile_trt_plugins.so; built with tools/build_ops.sh when missing. With nvcc and the headers it
    must exist afterwards (a build that silently skipped it fails here)."""
    try:
        return runtime.trt_plugins_library_path()
    except runtime.OpsLibraryNotFoundError:
        pass
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the TensorRT plugins are built only with CUDA")
    if os.environ.get("QCOMPILE_TEST_NO_BUILD") == "1":
        pytest.skip("libqcompile_trt_plugins.so is not built and QCOMPILE_TEST_NO_BUILD=1")
    lock_path = REPO / "build" / ".ops-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return runtime.trt_plugins_library_path()
        except runtime.OpsLibraryNotFoundError:
            pass
        env = dict(os.environ, PYTHON=sys.executable, QCOMPILE_TRT_INCLUDE_DIR=str(trt_headers))
        res = subprocess.run(["bash", str(REPO / "tools" / "build_ops.sh")], cwd=REPO, env=env, capture_output=True,
                             text=True)
    try:
        return runtime.trt_plugins_library_path()
    except runtime.OpsLibraryNotFoundError:
        pytest.fail(f"nvcc and the TensorRT headers are here but the plugin library was not built:\n"
                    f"{(res.stdout + res.stderr)[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def harness(trt_headers: Path, trt_library: Path, tmp_path_factory) -> Path:
    if not HARNESS.is_file():
        pytest.skip("source tree not available (installed package)")
    cxx = shutil.which("c++") or shutil.which("g++")
    roots = _cuda_roots()
    if cxx is None or not roots:
        pytest.skip("needs a C++ compiler and the CUDA toolkit")
    inc = _first([r / sub / "cuda_runtime_api.h" for r in roots for sub in ("include", "targets/x86_64-linux/include", "targets/sbsa-linux/include")])
    lib = _first([r / sub / "libcudart_static.a" for r in roots for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")])
    if inc is None or lib is None:
        pytest.fail(f"nvcc is here but cuda_runtime_api.h / libcudart_static.a were not found under "
                    f"{', '.join(map(str, roots))}", pytrace=False)
    exe = tmp_path_factory.mktemp("trt_harness") / "harness"
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter",
           f"-I{REPO / 'custom_ops' / 'include'}", "-isystem", str(trt_headers), "-isystem", str(inc.parent),
           str(HARNESS), "-o", str(exe), f"-L{lib.parent}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"compiling the harness failed:\n{res.stderr[-4000:]}"
    return exe


@pytest.fixture(scope="session")
def cases():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import trt_cases

    return trt_cases, trt_cases.all_cases()


@pytest.fixture(scope="session")
def harness_runs(harness: Path, trt_library: Path, cases, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """(exit status, output) of one harness run per op, enqueue included (it skips without a device)."""
    mod, all_cases = cases
    out = {}
    folder = tmp_path_factory.mktemp("trt_cases")
    for op, cs in all_cases.items():
        path = folder / f"{op}.bin"
        mod.write_cases(path, cs)
        res = subprocess.run([str(harness), str(trt_library), str(path), "--enqueue"], capture_output=True, text=True,
                             timeout=600)
        out[op] = (res.returncode, res.stdout + res.stderr)
    return out


# The checks every well-formed case must pass by name (so that a harness that silently stops early, or
# skips a group of checks, fails here rather than passing with fewer checks).
GOOD_CASE_CHECKS = (
    "createPlugin from the node's fields", "core, build and runtime capabilities", "core name / version / namespace",
    "output type follows X fp16", "output type refused for X type 2", "output shape rank 2 M=7",
    "output shape rank 3 M=64 (symbolic batch)", "output shape refused for last dim K+1", "X fp32 linear supported",
    "X fp16 linear supported", "X type 2 rejected", "X kHWC8 rejected", "Y fp16 after X fp32 rejected",
    "configurePlugin accepts [-1, K]", "workspace for 64 rows", "onShapeChange refuses X [3, K+1]",
    "serialized fields carry every given field", "serialize -> deserialize -> identical fields",
    "clone has identical fields", "attached clone reports errors to the context's error recorder",
    "refuses missing K", "refuses K as kFLOAT64", "refuses a repeated field", "refuses an unknown field",
    "refuses a null field collection",
)


@needs_source
@pytest.mark.parametrize("op", OPS)
def test_harness_drives_plugin(op, harness_runs, cases):
    rc, out = harness_runs[op]
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert rc == 0 and not fails, "\n".join(fails) or out[-3000:]
    passed = {line[len("PASS "):] for line in out.splitlines() if line.startswith("PASS ")}
    _, all_cases = cases
    good = [c for c in all_cases[op] if not c.expect_error]
    bad = [c for c in all_cases[op] if c.expect_error]
    assert good and bad
    for c in good:
        for name in GOOD_CASE_CHECKS:
            if name == "workspace for 64 rows" and c.workspace is None:
                continue
            assert f"{c.name}: {name}" in passed, f"missing check {c.name}: {name}"
        for f in c.fields:  # every field: wrong type, wrong length, no data
            assert f"{c.name}: refuses {f.name} as kFLOAT64" in passed
            assert f"{c.name}: refuses {f.name} with length -1" in passed
    for c in bad:
        assert f'{c.name}: refused with "{c.expect_error}"' in passed, f"missing check for {c.name}"
    assert re.search(r"^harness: \d+ passed, 0 failed", out, re.M)


@needs_source
@pytest.mark.parametrize("op", OPS)
def test_enqueue_matches_numpy_reference(op, harness_runs, cases):
    rc, out = harness_runs[op]
    if re.search(r"^SKIP .*: enqueue vs numpy reference: no CUDA device", out, re.M):
        pytest.skip("no CUDA device: enqueue was not run (the harness checks it where one exists)")
    _, all_cases = cases
    for c in all_cases[op]:
        if c.expect_error:
            continue
        for dtype in ("fp32", "fp16"):
            for m in (1, c.x.shape[0]):
                assert f"PASS {c.name}: enqueue {dtype} M={m}" in out, out[-3000:]
    assert rc == 0


def test_plugin_library_links_no_tensorrt_and_exports_the_entry_points(trt_library):
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("readelf / nm not available")
    dyn = subprocess.run(["readelf", "-d", str(trt_library)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed
    assert not [n for n in needed if "nvinfer" in n or n.startswith(("libcudart", "libcuda.", "libonnxruntime"))], needed
    syms = subprocess.run(["nm", "-D", "--defined-only", str(trt_library)], capture_output=True, text=True,
                          check=True).stdout
    names = {line.split()[-1] for line in syms.splitlines() if line.strip()}
    assert {"getCreators", "setLoggerFinder"} <= names
    ours = [s for s in names if "qcompile" in s or (not s.startswith("_") and s not in ("getCreators", "setLoggerFinder"))]
    assert not ours, f"unexpected exported symbols: {ours[:5]}"


# ---- header fetch script ------------------------------------------------------------------------------------


@needs_source
def test_fetch_rejects_a_wheel_with_the_wrong_checksum(tmp_path):
    f = _fetch_module()
    fake = tmp_path / f.WHEEL
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(f.MEMBER_DIR + "NvInferRuntime.h", "// not the real one\n")
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        f.fetch(tmp_path / "cache", fake)
    assert not (tmp_path / "cache").exists()


@needs_source
def test_fetch_uses_an_existing_cache(tmp_path):
    f = _fetch_module()
    inc = tmp_path / "cache" / "include" / "tensorrt"
    inc.mkdir(parents=True)
    (inc / "NvInferRuntime.h").write_text("// cached\n")
    assert f.fetch(tmp_path / "cache", None) == inc  # no download attempted


@needs_source
def test_extract_takes_only_the_header_folders_plain_headers(tmp_path):
    f = _fetch_module()
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f.MEMBER_DIR + "NvInferRuntime.h", "a")
        z.writestr(f.MEMBER_DIR + "NvInfer.h", "b")
        z.writestr(f.MEMBER_DIR + "sub/Nested.h", "c")
        z.writestr(f.MEMBER_DIR + "notes.txt", "d")
        z.writestr("kernel_lens/other/Other.h", "e")
        z.writestr(f.MEMBER_DIR + "../../../escape.h", "f")
    assert f.extract_headers(wheel, tmp_path / "out") == 2
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["include/tensorrt/NvInfer.h", "include/tensorrt/NvInferRuntime.h"]
    assert not list(tmp_path.rglob("escape.h"))


@needs_source
def test_pip_is_also_tried_without_the_build_isolation_path(monkeypatch):
    # Inside `pip install .` PYTHONPATH hides the interpreter's own pip; one candidate must drop it.
    f = _fetch_module()
    monkeypatch.setenv("PYTHONPATH", "/isolated/overlay")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    cands = f.pip_commands()
    assert cands[0][0] == [sys.executable, "-m", "pip"] and cands[0][1]["PYTHONPATH"] == "/isolated/overlay"
    assert any(cmd[:1] == [sys.executable] and "PYTHONPATH" not in env and "PYTHONNOUSERSITE" not in env
               for cmd, env in cands)
