"""The native library as an artifact: where it is found, what it links, how it registers, and the
header-fetch script's parsing and checksum logic (no network: the download step is not exercised)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qcompile import runtime

REPO = Path(__file__).resolve().parent.parent
FETCH = REPO / "custom_ops" / "cmake" / "fetch_ort_headers.py"


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_ort_headers", FETCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


needs_source = pytest.mark.skipif(not FETCH.is_file(), reason="source tree not available (installed package)")


# ---- library lookup -------------------------------------------------------------------------------------


def test_env_override_and_missing_file(monkeypatch, tmp_path, ops_library):
    monkeypatch.setenv(runtime.ENV_VAR, str(ops_library))
    assert runtime.ops_library_path() == ops_library.resolve()
    monkeypatch.setenv(runtime.ENV_VAR, str(tmp_path / "nope.so"))
    with pytest.raises(runtime.OpsLibraryNotFoundError, match="not a file"):
        runtime.ops_library_path()


def test_not_built_error_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)
    monkeypatch.setattr(runtime, "_candidates", lambda: [tmp_path / "a.so", tmp_path / "b.so"])
    with pytest.raises(runtime.OpsLibraryNotFoundError, match="tools/build_ops.sh"):
        runtime.ops_library_path()


# ---- the artifact ---------------------------------------------------------------------------------------------


def _needed(lib: Path) -> list[str]:
    if shutil.which("readelf") is None:
        pytest.skip("readelf not available")
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_library_links_neither_onnxruntime_nor_shared_cudart(ops_library):
    needed = _needed(ops_library)
    assert needed, "no DT_NEEDED entries read"
    assert not [n for n in needed if "onnxruntime" in n], needed
    assert not [n for n in needed if n.startswith(("libcudart", "libcuda.", "libcublas"))], needed


def test_exports_register_custom_ops_only(ops_library):
    if shutil.which("nm") is None:
        pytest.skip("nm not available")
    out = subprocess.run(["nm", "-D", "--defined-only", str(ops_library)], capture_output=True, text=True,
                         check=True).stdout
    symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert "RegisterCustomOps" in symbols
    ours = [s for s in symbols if "qcompile" in s]
    assert not ours, f"internal symbols leak: {ours[:5]}"


def _tiny_model():
    node = helper.make_node("FP4MatMul", ["x", "w", "s"], ["y"], domain="qcompile", K=8, N=2, group_size=8,
                            scale_format="e8m0")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                            helper.make_tensor_value_info("w", TensorProto.UINT8, [2, 4]),
                                            helper.make_tensor_value_info("s", TensorProto.UINT8, [2, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompile", 1)])


def test_register_in_many_sessions_and_make_session(ops_library, monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, str(ops_library))
    w = np.full((2, 4), 0x22, np.uint8)  # every code 2 -> 1.0
    s = np.array([[127], [128]], np.uint8)  # scales 1 and 2
    x = np.arange(8, dtype=np.float32)[None]
    for _ in range(3):  # RegisterCustomOps runs once per SessionOptions; domains must not clash
        sess = runtime.make_session(_tiny_model(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {"x": x, "w": w, "s": s})[0], [[28.0, 56.0]])
    so = runtime.session_options(intra_op_threads=1)
    assert so.intra_op_num_threads == 1
    ort.InferenceSession(_tiny_model().SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_unregistered_op_fails_cleanly():
    with pytest.raises(Exception, match="FP4MatMul|qcompile"):
        ort.InferenceSession(_tiny_model().SerializeToString(), providers=["CPUExecutionProvider"])


# ---- header fetch script --------------------------------------------------------------------------------------


@needs_source
def test_mirror_parsing_deb822_and_legacy(tmp_path):
    f = _fetch_module()
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"
        "Signed-By: /usr/share/keyrings/k.gpg\n")
    assert f.mirror_from_sources(deb822, tmp_path / "none") == ("http://mirror.example/debian/",
                                                                 "/usr/share/keyrings/k.gpg")
    legacy = tmp_path / "sources.list"
    legacy.write_text("# deb http://commented.example/debian x main\n"
                      "deb [arch=amd64 signed-by=/k.gpg] http://legacy.example/debian bookworm main\n")
    assert f.mirror_from_sources(tmp_path / "none", legacy) == ("http://legacy.example/debian", "/k.gpg")
    with pytest.raises(RuntimeError, match="no Debian archive URI"):
        f.mirror_from_sources(tmp_path / "none", tmp_path / "none2")


@needs_source
def test_fetch_rejects_a_deb_with_the_wrong_checksum(tmp_path):
    f = _fetch_module()
    fake = tmp_path / "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
    fake.write_bytes(b"not the package")
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        f.fetch(tmp_path / "cache", fake)
    assert not (tmp_path / "cache").exists()


@needs_source
def test_fetch_uses_an_existing_cache(tmp_path):
    f = _fetch_module()
    inc = tmp_path / "cache" / "usr" / "include" / "onnxruntime"
    inc.mkdir(parents=True)
    (inc / "onnxruntime_cxx_api.h").write_text("// cached\n")
    assert f.fetch(tmp_path / "cache", None) == inc  # no download attempted
