// What the CPU kernels need to pick a code path at run time: the AVX2 target attribute, whether this CPU
// has AVX2 + FMA + F16C, and the environment switches tests use to pin the portable path.
#pragma once

#include <cstdint>
#include <cstdlib>
#if defined(__linux__)
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QC_X86 1
// Functions compiled for AVX2 + FMA + F16C; call them only when cpu_has_avx2() is true.
#define QC_AVX2 __attribute__((target("avx2,fma,f16c")))
// Functions compiled for AVX-512F + BW (the fixed-point table walks); call them only when
// cpu_has_avx512bw() is true.
#define QC_AVX512BW __attribute__((target("avx512f,avx512bw")))
#define QC_AVX512F __attribute__((target("avx2,fma,f16c,avx512f")))
// QC_AVX2 plus BMI1/2 (scalar bit-field extraction in table walks); every AVX2 CPU has them.
#define QC_AVX2_BMI2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
// AVX-512F/BW/VL with VNNI byte dot products (the int8 activation kernels); call only when
// cpu_has_avx512vnni() is true, and use VBMI instructions only after cpu_has_avx512vbmi().
#define QC_AVX512VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
// QC_AVX512VNNI plus GFNI (a byte's bit fields moved by one affine instruction); call only when
// cpu_has_avx512vnni() and cpu_has_gfni() are true.
#define QC_AVX512VNNI_GFNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")))
// AVX-512F/BW with VBMI byte permutes (the int8 table walks); call only when cpu_has_avx512vbmi() is true.
#define QC_AVX512VBMI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vbmi")))
#else
#define QC_X86 0
#endif

namespace qcompile {

// AVX2, FMA and F16C together (the set every QC_AVX2 function assumes), checked once per process.
inline bool cpu_has_avx2() {
#if QC_X86
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// AVX-512F and BW (with the OS saving zmm state), checked once per process.
inline bool cpu_has_avx512bw() {
#if QC_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

// AVX-512F, BW, VL and VNNI (vpdpbusd), checked once per process.
inline bool cpu_has_avx512vnni() {
#if QC_X86
  static const bool ok = cpu_has_avx2() && cpu_has_avx512bw() && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// AVX-512F, BW and VBMI (vpermi2b), checked once per process.
inline bool cpu_has_avx512vbmi() {
#if QC_X86
  static const bool ok = cpu_has_avx2() && cpu_has_avx512bw() && __builtin_cpu_supports("avx512vbmi");
  return ok;
#else
  return false;
#endif
}

// GFNI (vgf2p8affineqb), checked once per process. Ice Lake, Zen 4 and later have it; Cascade Lake does not.
inline bool cpu_has_gfni() {
#if QC_X86
  static const bool ok = __builtin_cpu_supports("gfni");
  return ok;
#else
  return false;
#endif
}

// Environment variable `name` is set to anything but "" or "0". Read on every call, so tests can flip it.
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] && v[0] != '0';
}

// An op's AVX2 paths run: the CPU has AVX2 + FMA + F16C and the op's switch `disable_env` (e.g.
// QCOMPILE_FP4_NO_AVX2, which tests set to pin the portable path) is not set.
inline bool avx2_enabled(const char* disable_env) { return cpu_has_avx2() && !env_flag(disable_env); }

// Bytes of one core's L2 cache (glibc reads it from CPUID; 1 MiB where it cannot tell). Read once.
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return static_cast<int64_t>(v);
#endif
    return int64_t{1} << 20;
  }();
  return bytes;
}

// An op's AVX-512BW fixed-point walk runs: the CPU has AVX-512F + BW and `disable_env` (e.g.
// QCOMPILE_SPQR_LUT_FP32) is not set.
inline bool avx512bw_enabled(const char* disable_env) { return cpu_has_avx512bw() && !env_flag(disable_env); }

}  // namespace qcompile
