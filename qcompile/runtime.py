"""Running compiled models: find the ``qcompile_ops`` custom-op library and open ONNX Runtime sessions with
it registered where the model needs it. :func:`make_session` is the one session factory every caller
(evaluation, calibration, the CLI, tools, tests) uses, so all load the library the same way.

Lookup order of :func:`ops_library_path`: ``$QCOMPILE_OPS_LIBRARY`` (explicit file), the copy installed in
the package (``qcompile/_native/libqcompile_ops.so``, put there by ``pip install .`` or
``tools/build_ops.sh``), then the source-tree build folder ``build/ops/``. :func:`trt_plugins_library_path`
finds the TensorRT plugin library (``libqcompile_trt_plugins.so``) the same way, with
``$QCOMPILE_TRT_PLUGINS_LIBRARY``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort

from qcompile.errors import QCompileError

LIBRARY_NAME = "libqcompile_ops.so"
OPS_DOMAIN = "qcompile"
ENV_VAR = "QCOMPILE_OPS_LIBRARY"
_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent


class OpsLibraryNotFoundError(QCompileError):
    """The native custom-op library is not built (or $QCOMPILE_OPS_LIBRARY points nowhere)."""


def _candidates() -> list[Path]:
    return [_PACKAGE_DIR / "_native" / LIBRARY_NAME, _REPO_ROOT / "build" / "ops" / LIBRARY_NAME]


def ops_library_path() -> Path:
    """Absolute path of ``libqcompile_ops.so``; raises :class:`OpsLibraryNotFoundError` saying how to build it."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise OpsLibraryNotFoundError(f"${ENV_VAR}={env} is not a file")
        return path.resolve()
    for path in _candidates():
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in _candidates())
    raise OpsLibraryNotFoundError(
        f"the qcompile_ops custom-op library is not built (looked for {looked}). Build it with "
        f"`tools/build_ops.sh` (source tree) or `pip install .`, or set ${ENV_VAR} to the .so file")


TRT_PLUGINS_LIBRARY_NAME = "libqcompile_trt_plugins.so"
TRT_PLUGINS_ENV_VAR = "QCOMPILE_TRT_PLUGINS_LIBRARY"


def _trt_candidates() -> list[Path]:
    return [_PACKAGE_DIR / "_native" / TRT_PLUGINS_LIBRARY_NAME, _REPO_ROOT / "build" / "ops" / TRT_PLUGINS_LIBRARY_NAME]


def trt_plugins_library_path() -> Path:
    """Absolute path of ``libqcompile_trt_plugins.so`` (TensorRT plugins for the qcompile ops); raises
    :class:`OpsLibraryNotFoundError` saying how to build it. It is built only where nvcc and the TensorRT
    headers are found (see custom_ops/README.md)."""
    env = os.environ.get(TRT_PLUGINS_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise OpsLibraryNotFoundError(f"${TRT_PLUGINS_ENV_VAR}={env} is not a file")
        return path.resolve()
    for path in _trt_candidates():
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in _trt_candidates())
    raise OpsLibraryNotFoundError(
        f"the TensorRT plugin library is not built (looked for {looked}). It needs nvcc and the TensorRT "
        f"headers at build time: run `tools/build_ops.sh` (source tree) or `pip install .` on a machine with "
        f"the CUDA toolkit (the build output says why it was skipped), or set ${TRT_PLUGINS_ENV_VAR}")


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime has it, always CPU as the fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(options: ort.SessionOptions | None = None, *, intra_op_threads: int | None = None,
                    optimization: ort.GraphOptimizationLevel | None = None) -> ort.SessionOptions:
    """Session options with the custom-op library registered (``options`` is updated in place if given)."""
    so = options if options is not None else ort.SessionOptions()
    so.register_custom_ops_library(str(ops_library_path()))
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    if optimization is not None:
        so.graph_optimization_level = optimization
    return so


def needs_ops_library(model: Any) -> bool:
    """True if ``model`` (path, serialized bytes or ``onnx.ModelProto``) imports the ``qcompile`` op domain."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    return any(o.domain == OPS_DOMAIN for o in model.opset_import)


def make_session(model: Any, providers: Sequence[Any] | None = None, *, options: ort.SessionOptions | None = None,
                 intra_op_threads: int | None = None, **kw: Any) -> ort.InferenceSession:
    """An ``InferenceSession`` for ``model`` (path, serialized bytes or ``onnx.ModelProto``), with our op
    library registered when the model uses ``qcompile.*`` ops. Warnings stay quiet unless ``options`` says
    otherwise. Extra keyword arguments go to ``InferenceSession`` (e.g. ``provider_options``)."""
    so = options if options is not None else ort.SessionOptions()
    if options is None:
        so.log_severity_level = 3
    if needs_ops_library(model):
        session_options(so)
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = str(model)
    try:
        return ort.InferenceSession(model, sess_options=so, providers=list(providers or default_providers()), **kw)
    except Exception as e:  # onnxruntime drops our ops' error code at session creation: give it back
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

        if isinstance(e, RuntimeException) and any(f"{op}:" in str(e) for op in _our_op_types()):
            raise InvalidArgument(str(e)) from None
        raise


def _our_op_types() -> list[str]:
    from qcompile.formats import all_formats

    return sorted({f.op.type for f in all_formats() if f.op.domain == OPS_DOMAIN})
