# Sanitizer builds of the op library, for the fuzzer (qcompile/fuzz/, tools/fuzz_ops.py):
#
#   cmake -DQCOMPILE_SANITIZE=address,undefined -DQCOMPILE_WITH_CUDA=OFF ...
#   QCOMPILE_SANITIZE=address,undefined tools/build_ops.sh      # -> build/ops-asan/ (CPU only)
#
# The value is passed to -fsanitize= as is. UBSan is made fatal (-fno-sanitize-recover=all) so that undefined
# behaviour ends the process like an ASan report does, instead of printing and carrying on. The library is
# loaded into an uninstrumented Python: the sanitizer runtimes must be LD_PRELOADed (qcompile/fuzz/sanitizer.py
# works out the environment). -O0: a third of -O1's compile time (the fuzzer's CI budget includes building it), and
# nothing optimised away under the sanitizers.
set(QCOMPILE_SANITIZE "" CACHE STRING "Comma-separated -fsanitize= list for the op library (e.g. address,undefined); empty: none")

function(qcompile_sanitize target)
  if(NOT QCOMPILE_SANITIZE)
    return()
  endif()
  set(_flags "-fsanitize=${QCOMPILE_SANITIZE}" -fno-omit-frame-pointer -g -O0)
  if(QCOMPILE_SANITIZE MATCHES "undefined")
    list(APPEND _flags -fno-sanitize-recover=all)
  endif()
  # appended after the target's -O3, so -O0 wins
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${_flags}>")
  target_link_options(${target} PRIVATE "-fsanitize=${QCOMPILE_SANITIZE}")
  message(STATUS "qcompile_ops: sanitizers ON (-fsanitize=${QCOMPILE_SANITIZE})")
endfunction()
