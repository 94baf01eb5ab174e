// Definitions shared by the CPU (host compiler) and CUDA (nvcc) kernels of the fused adapter.
// No torch headers: kernels see plain pointers, sizes and strides.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__
#define FA_INLINE __forceinline__
#else
#define FA_HD
#define FA_INLINE inline
#endif

namespace fa {

// 16-bit storage types: the bits as stored in memory; arithmetic always happens in float.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

FA_HD FA_INLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);  // GCC >= 11, Clang >= 9; unlike memcpy, it vectorises in loops
#endif
}

FA_HD FA_INLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// IEEE binary16 -> float (exact, subnormals, infinities and NaN included).
FA_HD FA_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Subnormal (or zero): mantissa · 2^-24.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// float -> IEEE binary16, rounding to nearest even (overflow to infinity, NaN stays NaN).
FA_HD FA_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7FFFFFFFu;
  if (abs_bits >= 0x7F800000u) return sign | (abs_bits > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (abs_bits >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: infinity
  if (abs_bits < 0x38800000u) {                        // below 2^-14: subnormal half
    // Adding 0.5 makes the FPU round the value to a multiple of 2^-24 (nearest even).
    const float shifted = bits_to_float(abs_bits) + 0.5f;
    return sign | static_cast<uint16_t>(float_to_bits(shifted) - 0x3F000000u);
  }
  const uint32_t odd = (abs_bits >> 13) & 1u;
  const uint32_t rounded = abs_bits + 0xFFFu + odd - (112u << 23);
  return sign | static_cast<uint16_t>(rounded >> 13);
}

FA_HD FA_INLINE float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, rounding to nearest even (NaN stays a quiet NaN).
FA_HD FA_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

FA_HD FA_INLINE float to_float(float v) { return v; }
FA_HD FA_INLINE float to_float(Half v) { return half_to_float(v.bits); }
FA_HD FA_INLINE float to_float(BFloat16 v) { return bf16_to_float(v.bits); }

template <typename T>
FA_HD FA_INLINE T from_float(float v);
template <>
FA_HD FA_INLINE float from_float<float>(float v) {
  return v;
}
template <>
FA_HD FA_INLINE Half from_float<Half>(float v) {
  return Half{float_to_half(v)};
}
template <>
FA_HD FA_INLINE BFloat16 from_float<BFloat16>(float v) {
  return BFloat16{float_to_bf16(v)};
}

// v rounded to T and back (the identity for float). The CUDA kernels round the activations a to T
// before the up-projection, as the tensor cores need and as the Triton kernels do, in the forward and
// in the backward alike, so that both take the same u = a Wuᵀ.
template <typename T>
FA_HD FA_INLINE float round_to(float v) {
  return to_float(from_float<T>(v));
}

}  // namespace fa
