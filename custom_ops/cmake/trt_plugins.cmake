# libqcompile_trt_plugins.so: TensorRT IPluginV3 plugins for the qcompile ops (trt/*.cpp), over the same
# CUDA kernels as the ONNX Runtime library (the object library qcompile_cuda_kernels, compiled once).
# Included from CMakeLists.txt after the ORT library is defined. Optional: skipped, with a message saying
# why, without CUDA or without the TensorRT headers; it never links libnvinfer (the plugin interfaces are
# header-only), so it builds where TensorRT is not installed.
#
# TensorRT headers: $QCOMPILE_TRT_INCLUDE_DIR (a folder holding NvInferRuntime.h, e.g. a TensorRT
# install's include/) if set, else cmake/fetch_trt_headers.py (the TensorRT 10.14 headers from PyPI's
# kernel-lens 2.0.1, sha256-pinned, cached in ~/.cache/qcompile or $QCOMPILE_CACHE_DIR).
option(QCOMPILE_WITH_TRT "Build the TensorRT plugin library when CUDA and the TensorRT headers are available" ON)
set(QCOMPILE_TRT_PLUGINS_BUILT OFF CACHE INTERNAL "whether libqcompile_trt_plugins.so is part of this build")

set(_trt_skip "")
if(NOT QCOMPILE_WITH_TRT)
  set(_trt_skip "QCOMPILE_WITH_TRT=OFF")
elseif(NOT _with_cuda)
  set(_trt_skip "the plugins run the CUDA kernels and this build has no CUDA compiler (nvcc)")
endif()

set(_trt_inc "")
if(NOT _trt_skip)
  if(DEFINED ENV{QCOMPILE_TRT_INCLUDE_DIR} AND NOT "$ENV{QCOMPILE_TRT_INCLUDE_DIR}" STREQUAL "")
    set(_trt_inc "$ENV{QCOMPILE_TRT_INCLUDE_DIR}")
    message(STATUS "qcompile_trt_plugins: TensorRT headers from \$QCOMPILE_TRT_INCLUDE_DIR = ${_trt_inc}")
  else()
    find_package(Python3 COMPONENTS Interpreter REQUIRED)
    if(DEFINED ENV{QCOMPILE_CACHE_DIR} OR DEFINED ENV{HOME})
      set(_trt_fetch_args "")  # default cache: ~/.cache/qcompile (or $QCOMPILE_CACHE_DIR)
    else()
      set(_trt_fetch_args --dest "${CMAKE_BINARY_DIR}/trt-headers")
    endif()
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/cmake/fetch_trt_headers.py" ${_trt_fetch_args}
      OUTPUT_VARIABLE _trt_inc OUTPUT_STRIP_TRAILING_WHITESPACE
      ERROR_VARIABLE _trt_fetch_log
      RESULT_VARIABLE _trt_fetch_rc)
    if(NOT _trt_fetch_rc EQUAL 0)
      set(_trt_skip "could not fetch the TensorRT headers (cmake/fetch_trt_headers.py):\n${_trt_fetch_log}\n"
                    "Set QCOMPILE_TRT_INCLUDE_DIR to a folder holding NvInferRuntime.h to use your own")
      set(_trt_inc "")
    endif()
  endif()
  if(_trt_inc AND NOT EXISTS "${_trt_inc}/NvInferRuntime.h")
    set(_trt_skip "${_trt_inc} holds no NvInferRuntime.h (set QCOMPILE_TRT_INCLUDE_DIR to the folder that does)")
  endif()
endif()

if(_trt_skip)
  message(STATUS "qcompile_trt_plugins: NOT built: ${_trt_skip}")
  return()
endif()
message(STATUS "qcompile_trt_plugins: building libqcompile_trt_plugins.so with TensorRT headers ${_trt_inc}")

file(GLOB _trt_sources CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/trt/*.cpp")
add_library(qcompile_trt_plugins SHARED ${_trt_sources} ${_shared_objects})
qcompile_target_settings(qcompile_trt_plugins)
# SYSTEM: TensorRT's headers are not held to this project's warning flags.
target_include_directories(qcompile_trt_plugins SYSTEM PRIVATE "${_trt_inc}" ${CUDAToolkit_INCLUDE_DIRS})
target_link_libraries(qcompile_trt_plugins PRIVATE Threads::Threads CUDA::cudart_static ${CMAKE_DL_LIBS})
if(UNIX)
  target_link_libraries(qcompile_trt_plugins PRIVATE rt)
endif()
if(UNIX AND NOT APPLE)
  # refuse undefined symbols at link time: the library must not depend on libnvinfer
  target_link_options(qcompile_trt_plugins PRIVATE -Wl,--no-undefined)
endif()
set(QCOMPILE_TRT_PLUGINS_BUILT ON CACHE INTERNAL "whether libqcompile_trt_plugins.so is part of this build")
install(TARGETS qcompile_trt_plugins LIBRARY DESTINATION qcompile/_native)
