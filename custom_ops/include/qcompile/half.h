// IEEE binary16 <-> binary32 conversion on the host, bit-exact (round to nearest even), no intrinsics,
// so every CPU kernel can read and write fp16 tensors on any x86-64 or ARM machine.
#pragma once
#include <cstdint>
#include <cstring>

namespace qcompile {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: overflow
  if (ax < 0x38800000u) {  // result is subnormal or zero: let the FPU round by adding a magic number
    float a;
    std::memcpy(&a, &ax, 4);
    a += 0.5f;  // 0.5 = 2^-1; the ulp of values in [0.5,1) is 2^-24 = half's subnormal step
    uint32_t r;
    std::memcpy(&r, &a, 4);
    return static_cast<uint16_t>(sign | (r - 0x3F000000u));
  }
  // normal: rebias and round mantissa to 10 bits, ties to even
  uint32_t m = ax + 0xC8000FFFu + ((ax >> 13) & 1u);  // -(112<<23) + 0xFFF + lsb
  return static_cast<uint16_t>(sign | (m >> 13));
}

}  // namespace qcompile
