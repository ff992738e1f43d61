#!/usr/bin/env bash
# Build the qcompile_ops custom-op library for source-tree use: configures custom_ops/ into build/ops,
# builds it, and copies libqcompile_ops.so into qcompile/_native/ (git-ignored), where
# qcompile.runtime.ops_library_path() finds it. `pip install .` does the same through scikit-build-core.
# With nvcc and the TensorRT headers (fetched, or $QCOMPILE_TRT_INCLUDE_DIR) it also builds and copies
# libqcompile_trt_plugins.so (qcompile.runtime.trt_plugins_library_path()).
#
#   tools/build_ops.sh            # Release build, CUDA kernels too when nvcc is found
#   JOBS=4 tools/build_ops.sh     # parallel jobs (default 2)
#   QCOMPILE_WITH_CUDA=OFF tools/build_ops.sh   # skip CUDA even if nvcc exists
#   QCOMPILE_ORT_INCLUDE_DIR=/path/to/include tools/build_ops.sh   # use these ORT headers (no download)
#   QCOMPILE_WITH_TRT=OFF tools/build_ops.sh    # skip the TensorRT plugins
#   QCOMPILE_SANITIZE=address,undefined tools/build_ops.sh   # sanitizer build for the fuzzer: CPU only, into
#                                  # build/ops-asan/, never copied to qcompile/_native/ (see qcompile/fuzz/)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sanitize="${QCOMPILE_SANITIZE:-}"
if [ -n "$sanitize" ]; then
  build="${QCOMPILE_BUILD_DIR:-$root/build/ops-asan}"
  QCOMPILE_WITH_CUDA=OFF
else
  build="${QCOMPILE_BUILD_DIR:-$root/build/ops}"
fi
jobs="${JOBS:-2}"
gen=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$build/CMakeCache.txt" ]; then gen=(-G Ninja); fi
py="${PYTHON:-$(command -v python3 || command -v python)}"
nice cmake -S "$root/custom_ops" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DQCOMPILE_WITH_CUDA="${QCOMPILE_WITH_CUDA:-ON}" -DQCOMPILE_WITH_TRT="${QCOMPILE_WITH_TRT:-ON}" \
  -DQCOMPILE_SANITIZE="$sanitize" -DPython3_EXECUTABLE="$py"
nice cmake --build "$build" -j "$jobs"
if [ -n "$sanitize" ]; then  # an instrumented library only loads with its runtime preloaded: keep it out of the package
  echo "built $build/libqcompile_ops.so (-fsanitize=$sanitize)"
  exit 0
fi
mkdir -p "$root/qcompile/_native"
cp -f "$build/libqcompile_ops.so" "$root/qcompile/_native/libqcompile_ops.so.tmp"
mv -f "$root/qcompile/_native/libqcompile_ops.so.tmp" "$root/qcompile/_native/libqcompile_ops.so"
echo "built $root/qcompile/_native/libqcompile_ops.so"
trt="$root/qcompile/_native/libqcompile_trt_plugins.so"
if grep -q '^QCOMPILE_TRT_PLUGINS_BUILT:INTERNAL=ON$' "$build/CMakeCache.txt"; then
  cp -f "$build/libqcompile_trt_plugins.so" "$trt.tmp"
  mv -f "$trt.tmp" "$trt"
  echo "built $trt"
else
  rm -f "$trt"  # a copy from an earlier build would no longer match the sources
  echo "TensorRT plugins not built (see the qcompile_trt_plugins line of the CMake output above)"
fi
