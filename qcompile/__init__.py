"""qcompile: ONNX graph-rewriting compiler for quantized transformer weights.

The API functions are imported lazily so ``import qcompile`` stays cheap (torch loads on first use).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {"compile": "qcompile.api", "export": "qcompile.api", "evaluate": "qcompile.api",
        "inspect_model": "qcompile.api", "list_formats": "qcompile.api", "ops_library_path": "qcompile.runtime",
        "make_session": "qcompile.runtime", "trt_plugins_library_path": "qcompile.runtime",
        "build_engine": "qcompile.engine", "generate": "qcompile.generation", "generate_stream": "qcompile.generation"}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
