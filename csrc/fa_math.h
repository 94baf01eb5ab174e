// The adapter math shared by the CPU and the CUDA kernels: activations and their derivatives, the
// dropout hash, LayerNorm row statistics and their merge, the output epilogue. Everything in float.
// fusedadapters/ops/reference.py is the specification; the constants below are its constants.
#pragma once

#include <math.h>

#include <cstdint>

#include "fa_common.h"

namespace fa {

enum class Activation : int { Identity = 0, Hardtanh, Relu, Selu, Swish, Gelu };

constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kSeluScale = 1.0507009873554804934193349852946f;
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// e^v within 2 ulp for v in [-87, 88] (clamped outside: 0 or 1.6e38 are what the activations need), in
// plain arithmetic that a compiler vectorises, unlike a call into libm (or floorf): v = n ln2 + r with
// |r| <= ln2/2, e^r by Cephes' degree-7 polynomial, 2^n through the exponent bits.
FA_HD FA_INLINE float exp_fast(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);  // comparisons, not fminf/fmaxf: they vectorise
  // n = round(v / ln2): adding 1.5 * 2^23 rounds to an integer, which the low bits then hold.
  const float shifted = v * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const int32_t n_int = static_cast<int32_t>(float_to_bits(shifted)) - 0x4B400000;
  float r = v - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  return e_r * bits_to_float(static_cast<uint32_t>(n_int + 127) << 23);
}

// act(h); gelu is the exact erf form, swish is SiLU.
FA_HD FA_INLINE float activate(Activation act, float h) {
  switch (act) {
    case Activation::Identity: return h;
    case Activation::Hardtanh: return h < -1.0f ? -1.0f : (h > 1.0f ? 1.0f : h);  // NaN stays NaN
    case Activation::Relu: return h < 0.0f ? 0.0f : h;
    case Activation::Selu: return kSeluScale * (h > 0.0f ? h : kSeluAlpha * expm1f(h));
    case Activation::Gelu: return 0.5f * h * (1.0f + erff(h * kInvSqrt2));
    case Activation::Swish: break;
  }
  return h / (1.0f + exp_fast(-h));
}

// act'(h), 0 at relu's 0 and at hardtanh's ±1 like PyTorch.
FA_HD FA_INLINE float activate_grad(Activation act, float h) {
  switch (act) {
    case Activation::Identity: return 1.0f;
    case Activation::Hardtanh: return (h > -1.0f && h < 1.0f) ? 1.0f : 0.0f;
    case Activation::Relu: return h > 0.0f ? 1.0f : 0.0f;
    case Activation::Selu: return h > 0.0f ? kSeluScale : kSeluScale * kSeluAlpha * exp_fast(h);
    case Activation::Gelu: {
      const float cdf = 0.5f * (1.0f + erff(h * kInvSqrt2));
      return cdf + h * kInvSqrt2Pi * exp_fast(-0.5f * h * h);
    }
    case Activation::Swish: break;
  }
  const float sig = 1.0f / (1.0f + exp_fast(-h));
  return sig * (1.0f + h * (1.0f - sig));
}

// ---------------------------------------------------------------------------------------------
// Dropout: element (n, d) is kept when uniform(seed, n, d) >= p, with (uint32 arithmetic)
//   r = mix32(seed + n · 0x9E3779B9),  uniform = (mix32(r xor d) >> 8) / 2^24
// and mix32 the "lowbias32" mixer. A pure function of (seed, n, d): backward regenerates the mask.
// ---------------------------------------------------------------------------------------------

constexpr uint32_t kHashMul1 = 0x7FEB352Du;
constexpr uint32_t kHashMul2 = 0x846CA68Bu;
constexpr uint32_t kRowStride = 0x9E3779B9u;

FA_HD FA_INLINE uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= kHashMul1;
  v ^= v >> 15;
  v *= kHashMul2;
  return v ^ (v >> 16);
}

// The per-row half of the hash; only the low 32 bits of the seed and of the row count.
FA_HD FA_INLINE uint32_t dropout_row_hash(int64_t seed, int64_t row) {
  return mix32(static_cast<uint32_t>(seed) + static_cast<uint32_t>(row) * kRowStride);
}

FA_HD FA_INLINE float dropout_uniform(uint32_t row_hash, int64_t col) {
  return static_cast<float>(mix32(row_hash ^ static_cast<uint32_t>(col)) >> 8) * (1.0f / 16777216.0f);
}

// What the epilogue multiplies y by: s · m with m = keep / (1 - p) (m = 1 without dropout).
struct DropScale {
  bool has_dropout;
  float dropout_p;
  float keep_scale;  // 1 / (1 - p), or 0 when p >= 1
  float scale;       // s (1 without a scale)

  FA_HD FA_INLINE float factor(uint32_t row_hash, int64_t col) const {
    if (has_dropout && !(dropout_uniform(row_hash, col) >= dropout_p)) return 0.0f;
    return has_dropout ? keep_scale * scale : scale;
  }
};

FA_HD FA_INLINE DropScale make_drop_scale(float dropout_p, float scale) {
  DropScale ds;
  ds.has_dropout = dropout_p > 0.0f;
  ds.dropout_p = dropout_p;
  ds.keep_scale = dropout_p >= 1.0f ? 0.0f : 1.0f / (1.0f - dropout_p);
  ds.scale = scale;
  return ds;
}

// ---------------------------------------------------------------------------------------------
// LayerNorm statistics: (count, mean, M2 = Σ (v - mean)²) of a part of a row, merged exactly as
// Chan et al.'s parallel variance, so that parts computed apart (chunks of a row on a CPU, slices
// of D on different CTAs) combine without the cancellation of Σv² - (Σv)²/D.
// ---------------------------------------------------------------------------------------------

struct RowStats {
  float count;
  float mean;
  float m2;
};

FA_HD FA_INLINE RowStats merge_stats(RowStats a, RowStats b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.count / count;
  RowStats out;
  out.count = count;
  out.mean = a.mean + delta * wb;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  return out;
}

// Two passes over a short part of a row (it is in registers or L1): exact mean, then M2.
template <typename Load>
FA_HD FA_INLINE RowStats part_stats(int64_t count, Load load) {
  float sum = 0.0f;
  for (int64_t i = 0; i < count; ++i) sum += load(i);
  const float mean = count > 0 ? sum / static_cast<float>(count) : 0.0f;
  float m2 = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float c = load(i) - mean;
    m2 += c * c;
  }
  RowStats s;
  s.count = static_cast<float>(count);
  s.mean = mean;
  s.m2 = m2;
  return s;
}

// 1 / sqrt(variance + eps) of merged statistics over a full row.
FA_HD FA_INLINE float inv_std(RowStats s, float eps) {
  const float var = s.count > 0.0f ? fmaxf(s.m2 / s.count, 0.0f) : 0.0f;
  return 1.0f / sqrtf(var + eps);
}

// ---------------------------------------------------------------------------------------------
// Epilogues. z = s m y is what the adapter adds; row_sq = Σ_d z². Given the output gradient dout
// and the row_sq gradient q: dz = dout + 2 q z, dy = s m dz.
// ---------------------------------------------------------------------------------------------

FA_HD FA_INLINE float output_value(float x, float z, bool residual) { return residual ? x + z : z; }

FA_HD FA_INLINE float grad_z(float dout, float q, float z) { return dout + 2.0f * q * z; }

}  // namespace fa
