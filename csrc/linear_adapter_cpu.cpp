// CPU kernels of the fused bottleneck adapter (see linear_adapter.h for the math and the layout).
//
// Rows are processed in blocks small enough that every per-block buffer (BM × D floats) stays in
// the L2 cache through all stages: load and upcast x, LayerNorm statistics, the down-projection,
// the activation, the up-projection and the epilogue. Weights are upcast once per call into float
// matrices of H rows whose length D is padded to a whole number of vectors, so that the two matrix
// kernels below run full vectors without tails: padding is zero in every operand they read.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "linear_adapter.h"

namespace fa {
namespace {

constexpr int64_t kLanes = 16;

// Marks an elementwise loop over a row as free of loop-carried dependences, so that the compiler
// vectorises it without checking whether the row pointers overlap (needs -fopenmp-simd).
#define FA_SIMD _Pragma("omp simd")
// GCC/Clang vector of 16 floats: AVX-512 registers where available, split by the compiler elsewhere.
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float)), __may_alias__));

inline VecF load(const float* p) { return *reinterpret_cast<const VecF*>(p); }
inline void store(float* p, VecF v) { *reinterpret_cast<VecF*>(p) = v; }
// One broadcast (vbroadcastss from memory where AVX-512 exists: it keeps the FMA ports free).
inline VecF splat(float s) {
#if defined(__AVX512F__)
  return (VecF)_mm512_set1_ps(s);
#else
  return VecF{} + s;
#endif
}

// Σ of the lanes, as a tree (lane l plus lane l + 8, then + 4, ...): a fixed order, short chains.
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Vec4 __attribute__((vector_size(4 * sizeof(float))));

inline float horizontal_sum(VecF v) {
  Vec8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof lo8, sizeof hi8);
  const Vec8 sum8 = lo8 + hi8;
  Vec4 lo4, hi4;
  std::memcpy(&lo4, &sum8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&sum8) + sizeof lo4, sizeof hi4);
  const Vec4 sum4 = lo4 + hi4;
  return (sum4[0] + sum4[2]) + (sum4[1] + sum4[3]);
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// The matrix kernel on float: C (+)= A B with B's rows, C's rows and their widths padded to whole
// vectors, and A read through strides (so that Aᵀ costs nothing).
// ---------------------------------------------------------------------------------------------

// A small matrix with arbitrary strides: A(i, k) = data[i * row_stride + k * col_stride].
struct Strided {
  const float* data;
  int64_t row_stride, col_stride;
  float operator()(int64_t i, int64_t k) const { return data[i * row_stride + k * col_stride]; }
  Strided rows_from(int64_t i) const { return Strided{data + i * row_stride, row_stride, col_stride}; }
};

// C[i][:] (+)= Σ_k A(i, k) B[k][:] for an R×(V·kLanes) tile, kept in registers for the whole sum.
template <int R, int V>
void axpy_tile(Strided a, int64_t k, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  VecF acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : VecF{};
  for (int64_t kk = 0; kk < k; ++kk) {
    VecF bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load(b + kk * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const VecF s = splat(a(r, kk));
      for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

constexpr int kTileRows = 8;

// One V·kLanes wide column strip of C, all m rows (B's strip stays in L1 across the row tiles).
template <int V>
void axpy_strip(int64_t m, Strided a, int64_t k, const float* b, int64_t ldb, float* c, int64_t ldc,
                bool accumulate) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    axpy_tile<kTileRows, V>(a.rows_from(i), k, b, ldb, c + i * ldc, ldc, accumulate);
  const Strided rest = a.rows_from(i);
  float* c_rest = c + i * ldc;
  switch (m - i) {
    case 7: return axpy_tile<7, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    case 6: return axpy_tile<6, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    case 5: return axpy_tile<5, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    case 4: return axpy_tile<4, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    case 3: return axpy_tile<3, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    case 2: return axpy_tile<2, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    case 1: return axpy_tile<1, V>(rest, k, b, ldb, c_rest, ldc, accumulate);
    default: return;
  }
}

// C (m×width) (+)= A (m×k) B (k×width): rows times a weight matrix, or a rank-k update of one. Each
// tile of C stays in registers for the whole sum over k: no horizontal sums.
void gemm_nn(int64_t m, int64_t k, Strided a, const float* b, int64_t ldb, int64_t width, float* c, int64_t ldc,
             bool accumulate) {
  constexpr int64_t kStrip = 2 * kLanes;
  int64_t col = 0;
  for (; col + kStrip <= width; col += kStrip) axpy_strip<2>(m, a, k, b + col, ldb, c + col, ldc, accumulate);
  if (col < width) axpy_strip<1>(m, a, k, b + col, ldb, c + col, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------------
// Rows, statistics, weights
// ---------------------------------------------------------------------------------------------

// Upcast m rows of a strided N×D matrix into a padded float buffer (the padding is left alone).
template <typename T>
void load_rows(const T* src, int64_t stride_row, int64_t stride_col, int64_t m, int64_t d, float* dst, int64_t ldd) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = src + i * stride_row;
    float* out = dst + i * ldd;
    if (stride_col == 1) {
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) out[c] = to_float(row[c]);
    } else {
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) out[c] = to_float(row[c * stride_col]);
    }
  }
}

// m float rows of a strided N×D matrix and their row stride: the matrix itself when it is float with
// unit column stride, else an upcast copy in `buffer` (row stride `width`).
struct Rows {
  const float* data;
  int64_t stride;
  const float* row(int64_t i) const { return data + i * stride; }
};

template <typename T>
Rows float_rows(const T* src, int64_t stride_row, int64_t stride_col, int64_t m, int64_t d, float* buffer,
                int64_t width) {
  if constexpr (std::is_same<T, float>::value) {
    if (stride_col == 1) return Rows{src, stride_row};
  }
  load_rows(src, stride_row, stride_col, m, d, buffer, width);
  return Rows{buffer, width};
}

// out[0, d) = v[0, d) in T. (Streaming stores were slower here: the outputs fit the large L3.)
template <typename T>
void store_row(T* out, const float* v, int64_t d) {
  FA_SIMD
  for (int64_t c = 0; c < d; ++c) out[c] = from_float<T>(v[c]);
}


// Statistics of one row v[0, d) shifted by `shift` (the row's first element, so that a mean that is
// large next to the spread costs no precision): lane l of the vectors holds the part
// {l, l + 16, ...} of the row, whose mean and M2 come from two vector passes; the 16 parts then merge
// in lane order.
RowStats row_stats(const float* v, int64_t d, float shift) {
  const int64_t full = d / kLanes * kLanes, rest = d - full;
  const VecF c = splat(shift);
  VecF count, in_tail;
  for (int64_t l = 0; l < kLanes; ++l) {
    count[l] = static_cast<float>(full / kLanes + (l < rest ? 1 : 0));
    in_tail[l] = l < rest ? 1.0f : 0.0f;
  }
  VecF tail = {};
  std::memcpy(&tail, v + full, rest * sizeof(float));
  tail = (tail - c) * in_tail;
  VecF sum = tail;
  for (int64_t k = 0; k < full; k += kLanes) sum += load(v + k) - c;
  VecF mean;
  for (int64_t l = 0; l < kLanes; ++l) mean[l] = count[l] > 0.0f ? sum[l] / count[l] : 0.0f;
  const VecF c_tail = (tail - mean) * in_tail;
  VecF m2 = c_tail * c_tail;
  for (int64_t k = 0; k < full; k += kLanes) {
    const VecF centred = (load(v + k) - c) - mean;
    m2 += centred * centred;
  }
  RowStats stats{0.0f, 0.0f, 0.0f};
  for (int64_t l = 0; l < kLanes; ++l) stats = merge_stats(stats, RowStats{count[l], mean[l], m2[l]});
  return stats;
}

inline float dot(const float* a, const float* b, int64_t width) {
  VecF acc = {};
  for (int64_t k = 0; k < width; k += kLanes) acc += load(a + k) * load(b + k);
  return horizontal_sum(acc);
}

// Float copies of the parameters in the layouts the matrix kernel reads, zero-padded: D to `width`
// and H to `hwidth` columns. The forward uses down_t and up_t, the backward down, up and up_t.
struct Weights {
  int64_t width = 0, hwidth = 0;
  std::vector<float> gamma, beta;  // (width)
  std::vector<float> down_t;       // forward: (Wd∘γ)ᵀ for pre norm, Wdᵀ for post norm (D × hwidth)
  std::vector<float> down;         // backward: Wd (H × width)
  std::vector<float> up_t;         // Wuᵀ (H × width)
  std::vector<float> up;           // backward: Wu (D × hwidth), less its column means for post norm
};

template <typename T>
Weights upcast_weights(const AdapterShape& s, const T* ln_weight, const T* ln_bias, const T* down_weight,
                       const T* up_weight, bool for_forward, const ParallelFor& parallel_for) {
  Weights w;
  w.width = round_up(s.d, kLanes);
  w.hwidth = round_up(s.h, kLanes);
  w.gamma.assign(w.width, 0.0f);
  w.beta.assign(w.width, 0.0f);
  for (int64_t c = 0; c < s.d; ++c) {
    w.gamma[c] = to_float(ln_weight[c]);
    w.beta[c] = to_float(ln_bias[c]);
  }
  const bool fold_gamma = for_forward && s.pre_norm;
  w.up_t.assign(s.h * w.width, 0.0f);
  (for_forward ? w.down_t : w.up).assign(s.d * w.hwidth, 0.0f);
  if (!for_forward) w.down.assign(s.h * w.width, 0.0f);
  // The post-norm backward multiplies Wu by du, whose sum over D is zero: Wu less its column means
  // gives the same product without the cancellation that a large mean of Wu would cause.
  const bool centre_up = !for_forward && !s.pre_norm;
  parallel_for(s.h, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double up_sum = 0.0;
      for (int64_t c = 0; c < s.d && centre_up; ++c) up_sum += to_float(up_weight[c * s.h + j]);
      const float up_mean = static_cast<float>(up_sum / static_cast<double>(s.d));
      for (int64_t c = 0; c < s.d; ++c) {
        const float wd = to_float(down_weight[j * s.d + c]), wu = to_float(up_weight[c * s.h + j]);
        w.up_t[j * w.width + c] = wu;
        if (for_forward) {
          w.down_t[c * w.hwidth + j] = fold_gamma ? wd * w.gamma[c] : wd;
        } else {
          w.down[j * w.width + c] = wd;
          w.up[c * w.hwidth + j] = wu - up_mean;
        }
      }
    }
  });
  return w;
}

// Rows per block: as many as fit `buffer_bytes` in one block buffer (at least 4, at most 64). The
// forward wants small blocks (its buffers stay near L1 and the L2 keeps the weights), the backward
// large ones (each block reads and writes the partial weight gradients once).
constexpr int64_t kForwardBlockBytes = 32 * 1024;
constexpr int64_t kBackwardBlockBytes = 256 * 1024;

int64_t block_rows(int64_t width, int64_t buffer_bytes) {
  const int64_t rows = buffer_bytes / (width * static_cast<int64_t>(sizeof(float)));
  return std::min<int64_t>(64, std::max<int64_t>(4, rows / 4 * 4));
}

// Per-block buffers of one worker, allocated once per range of blocks; padding stays zero.
// `count` zeroed floats of the calling thread's scratch memory `slot`, kept from call to call (fresh
// allocations of this size cost a page fault per 4 KiB).
float* thread_scratch(int slot, int64_t count) {
  thread_local std::vector<float> pool[2];
  std::vector<float>& v = pool[slot];
  if (static_cast<int64_t>(v.size()) < count) v.resize(count);
  std::fill(v.begin(), v.begin() + count, 0.0f);
  return v.data();
}

// Per-block buffers of one worker (its scratch slot 0).
struct Buffers {
  float* rows[5];
  float *hidden, *act, *act_grad, *dh, *c1, *c2, *q;
  Buffers(int64_t bm, int64_t width, int64_t hwidth) {
    float* next = thread_scratch(0, 5 * bm * width + 4 * bm * hwidth + 3 * bm);
    auto take = [&](int64_t count) { float* p = next; next += count; return p; };
    for (auto& r : rows) r = take(bm * width);
    for (auto* v : {&hidden, &act, &act_grad, &dh}) *v = take(bm * hwidth);
    for (auto* v : {&c1, &c2, &q}) *v = take(bm);
  }
  float* row(int i) { return rows[i]; }
};

// act(h[j]) and, when `grad` is given, act'(h[j]) for j < n; the activation is chosen once per row,
// outside the loop, so that the loop vectorises.
template <Activation A>
void activate_row_as(const float* h, int64_t n, float* act, float* grad) {
  FA_SIMD
  for (int64_t j = 0; j < n; ++j) act[j] = activate(A, h[j]);
  if (grad == nullptr) return;
  FA_SIMD
  for (int64_t j = 0; j < n; ++j) grad[j] = activate_grad(A, h[j]);
}

void activate_row(Activation activation, const float* h, int64_t n, float* act, float* grad) {
  switch (activation) {
    case Activation::Identity: return activate_row_as<Activation::Identity>(h, n, act, grad);
    case Activation::Hardtanh: return activate_row_as<Activation::Hardtanh>(h, n, act, grad);
    case Activation::Relu: return activate_row_as<Activation::Relu>(h, n, act, grad);
    case Activation::Selu: return activate_row_as<Activation::Selu>(h, n, act, grad);
    case Activation::Swish: return activate_row_as<Activation::Swish>(h, n, act, grad);
    case Activation::Gelu: return activate_row_as<Activation::Gelu>(h, n, act, grad);
  }
}

DropScale drop_scale_of(const AdapterShape& s) { return make_drop_scale(s.dropout_p, s.scale ? *s.scale : 1.0f); }

inline uint32_t row_hash_of(const AdapterShape& s, int64_t row) {
  return s.dropout_p > 0.0f ? dropout_row_hash(*s.seed, row) : 0u;
}

// v[c] *= s m for one row (c < d).
inline void apply_drop_scale(const DropScale& ds, uint32_t row_hash, float* v, int64_t d) {
  if (!ds.has_dropout && ds.scale == 1.0f) return;
  if (!ds.has_dropout) {
    FA_SIMD
    for (int64_t c = 0; c < d; ++c) v[c] *= ds.scale;
  } else {
    FA_SIMD
    for (int64_t c = 0; c < d; ++c) v[c] *= ds.factor(row_hash, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The LayerNorm statistics of row ``row`` (its values v, shifted by v[0]), stored for the backward as
// (c, μ - c) and r.
struct RowNorm {
  float mean_c;
  float rstd;
};

template <typename T>
RowNorm normalize_stats(const ForwardArgs<T>& a, int64_t row, const float* v, int64_t d) {
  const RowStats st = row_stats(v, d, v[0]);
  const float r = inv_std(st, a.shape.eps);
  a.mean[row] = v[0];
  a.mean[a.shape.n + row] = st.mean;
  a.rstd[row] = r;
  return RowNorm{st.mean, r};
}

template <typename T>
void forward_block(const ForwardArgs<T>& a, const Weights& w, const float* b_proj, int64_t r0, int64_t m,
                   Buffers& buf) {
  const AdapterShape& s = a.shape;
  const int64_t d = s.d, h = s.h, width = w.width, hw = w.hwidth;
  float* t = buf.row(1);   // x̂ (pre) or u, then û (post)
  float* y = buf.row(2);
  float* hid = buf.hidden;
  float* act = buf.act;
  const Rows xs = float_rows(a.x + r0 * a.x_stride_row, a.x_stride_row, a.x_stride_col, m, d, buf.row(0), width);

  if (s.pre_norm) {
    for (int64_t i = 0; i < m; ++i) {
      const float* x = xs.row(i);
      const RowNorm nm = normalize_stats(a, r0 + i, x, d);
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) t[i * width + c] = ((x[c] - x[0]) - nm.mean_c) * nm.rstd;
    }
    gemm_nn(m, d, Strided{t, width, 1}, w.down_t.data(), hw, hw, hid, hw, false);  // x̂ (Wd∘γ)ᵀ
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < h; ++j) hid[i * hw + j] += b_proj[j];
  } else {
    gemm_nn(m, d, Strided{xs.data, xs.stride, 1}, w.down_t.data(), hw, hw, hid, hw, false);  // x Wdᵀ
  }
  for (int64_t i = 0; i < m; ++i) {
    activate_row(s.activation, hid + i * hw, h, act + i * hw, nullptr);
    std::copy(hid + i * hw, hid + i * hw + h, a.hidden + (r0 + i) * h);
  }

  gemm_nn(m, h, Strided{act, hw, 1}, w.up_t.data(), width, width, s.pre_norm ? y : t, width, false);
  if (!s.pre_norm) {
    for (int64_t i = 0; i < m; ++i) {
      const float* u = t + i * width;
      const RowNorm nm = normalize_stats(a, r0 + i, u, d);
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) y[i * width + c] = ((u[c] - u[0]) - nm.mean_c) * nm.rstd * w.gamma[c] + w.beta[c];
    }
  }

  const DropScale ds = drop_scale_of(s);
  for (int64_t i = 0; i < m; ++i) {
    float* z = y + i * width;
    apply_drop_scale(ds, row_hash_of(s, r0 + i), z, d);
    if (a.row_sq) a.row_sq[r0 + i] = dot(z, z, width);  // the padding of z is zero
    const float* x = xs.row(i);
    T* out = a.out + (r0 + i) * d;
    FA_SIMD
    for (int64_t c = 0; c < d; ++c) out[c] = from_float<T>(output_value(x[c], z[c], s.residual));
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// One row group's float partial sums of the weight gradients (padded like the weights).
struct Partials {
  float* d_down;   // H × width (dWd)
  float* d_up_t;   // H × width (dWuᵀ)
  float* d_gamma;  // width
  float* d_beta;   // width
};

template <typename T>
void backward_block(const BackwardArgs<T>& a, const Weights& w, int64_t r0, int64_t m, Buffers& buf,
                    const Partials& p) {
  const AdapterShape& s = a.shape;
  const int64_t d = s.d, h = s.h, width = w.width, hw = w.hwidth, n = s.n;
  const DropScale ds = drop_scale_of(s);
  float* t = buf.row(1);   // pre: x̂ then x̂γ + β;  post: û then dx before the store
  float* dy = buf.row(2);  // y, then dy
  float* e = buf.row(3);   // pre: dh Wd;  post: du
  float* xs = buf.row(4);  // post: x
  const float* hid = a.hidden + r0 * h;
  float *act = buf.act, *act_grad = buf.act_grad, *dh = buf.dh;
  float *c1 = buf.c1, *c2 = buf.c2, *q = buf.q;
  const bool need_ln = a.d_ln_weight != nullptr, need_dwd = a.d_down != nullptr, need_dwu = a.d_up != nullptr;

  const Rows g = float_rows(a.grad_out + r0 * a.g_stride_row, a.g_stride_row, a.g_stride_col, m, d, buf.row(0), width);
  for (int64_t i = 0; i < m; ++i) activate_row(s.activation, hid + i * h, h, act + i * hw, act_grad + i * hw);
  for (int64_t i = 0; i < m; ++i) q[i] = a.grad_row_sq ? a.grad_row_sq[r0 + i] : 0.0f;

  auto normalize = [&](const float* v, float* out, int64_t i) {  // ((v - c) - (μ - c)) r, post norm
    const float shift = a.mean[r0 + i], mean_c = a.mean[n + r0 + i], r = a.rstd[r0 + i];
    FA_SIMD
    for (int64_t c = 0; c < d; ++c) out[c] = ((v[c] - shift) - mean_c) * r;
  };
  // dy = s m (dout + 2 q z), z = s m y; y (in dy) is read only when q is present.
  auto output_grad = [&](int64_t i) {
    const uint32_t rh = row_hash_of(s, r0 + i);
    float* row = dy + i * width;
    const float* go = g.row(i);
    if (a.grad_row_sq) {
      apply_drop_scale(ds, rh, row, d);
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) row[c] = grad_z(go[c], q[i], row[c]);
    } else {
      std::copy(go, go + d, row);
    }
    apply_drop_scale(ds, rh, row, d);
  };
  auto store_dx = [&](float* v, int64_t i) {  // post norm: dx = [dout +] v
    const float* go = g.row(i);
    if (s.residual) {
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) v[c] += go[c];
    }
    store_row(a.dx + (r0 + i) * d, v, d);
  };

  if (s.pre_norm) {
    const float* gvec = a.proj;     // Wd γ
    const float* bvec = a.proj + h;  // Wd β
    // Without a row_sq gradient, dropout or scale, dy is dout: read in place where its rows can serve
    // as the padded rows the matrix kernel reads.
    const bool dy_is_dout =
        !a.grad_row_sq && !ds.has_dropout && ds.scale == 1.0f && (g.data == buf.row(0) || width == d);
    const Rows dyr = dy_is_dout ? g : Rows{dy, width};
    if (!dy_is_dout) {
      if (a.grad_row_sq) gemm_nn(m, h, Strided{act, hw, 1}, w.up_t.data(), width, width, dy, width, false);
      for (int64_t i = 0; i < m; ++i) output_grad(i);
    }
    gemm_nn(m, d, Strided{dyr.data, dyr.stride, 1}, w.up.data(), hw, hw, dh, hw, false);  // da = dy Wu
    // dWu while dy is still in the cache.
    if (need_dwu) gemm_nn(h, m, Strided{act, 1, hw}, dyr.data, dyr.stride, width, p.d_up_t, width, true);  // += aᵀ dy
    for (int64_t i = 0; i < m; ++i) {
      float s1 = 0.0f, s2 = 0.0f;
      for (int64_t j = 0; j < h; ++j) {
        const int64_t k = i * hw + j;
        dh[k] *= act_grad[k];
        s1 += dh[k] * gvec[j];
        s2 += dh[k] * (hid[i * h + j] - bvec[j]);
      }
      c1[i] = s1;
      c2[i] = s2;
    }
    const bool need_e = a.dx || need_ln;
    if (need_e) gemm_nn(m, h, Strided{dh, hw, 1}, w.down.data(), width, width, e, width, false);  // dh Wd
    // One pass per row over x̂ = ((x - c) - (μ - c)) r and e = dh Wd: dx = [dout +] r (eγ - (c1 + x̂ c2)/D),
    // dγ += e x̂, dβ += e, and x̂γ + β (into t) for dWd.
    const float inv_d = 1.0f / static_cast<float>(d), keep_dout = s.residual ? 1.0f : 0.0f;
    const Rows xr = (need_e || need_dwd)
        ? float_rows(a.x + r0 * a.x_stride_row, a.x_stride_row, a.x_stride_col, m, d, t, width) : Rows{};
    for (int64_t i = 0; need_e || need_dwd ? i < m : false; ++i) {
      const float* x = xr.row(i);
      const float* ei = e + i * width;
      const float* go = g.row(i);
      const float shift = a.mean[r0 + i], mean_c = a.mean[n + r0 + i], r = a.rstd[r0 + i];
      const float k1 = c1[i] * inv_d, k2 = c2[i] * inv_d;
      float* xn = t + i * width;
      T* dxi = a.dx ? a.dx + (r0 + i) * d : nullptr;
      auto row_pass = [&](auto with_dx, auto with_ln) {  // compile-time flags: branch-free inner loop
        FA_SIMD
        for (int64_t c = 0; c < d; ++c) {
          const float xh = ((x[c] - shift) - mean_c) * r;
          if constexpr (decltype(with_dx)::value)
            dxi[c] = from_float<T>(keep_dout * go[c] + r * (ei[c] * w.gamma[c] - (k1 + xh * k2)));
          if constexpr (decltype(with_ln)::value) {
            p.d_gamma[c] += ei[c] * xh;
            p.d_beta[c] += ei[c];
          }
          xn[c] = xh * w.gamma[c] + w.beta[c];
        }
      };
      using Yes = std::true_type;
      using No = std::false_type;
      if (a.dx && need_ln) row_pass(Yes{}, Yes{});
      else if (a.dx) row_pass(Yes{}, No{});
      else if (need_ln) row_pass(No{}, Yes{});
      else row_pass(No{}, No{});
    }
    if (need_dwd) gemm_nn(h, m, Strided{dh, 1, hw}, t, width, width, p.d_down, width, true);  // += dhᵀ (x̂γ + β)
    return;
  }

  // Post norm.
  gemm_nn(m, h, Strided{act, hw, 1}, w.up_t.data(), width, width, t, width, false);  // u
  for (int64_t i = 0; i < m; ++i) {
    float* uh = t + i * width;
    normalize(uh, uh, i);
    if (a.grad_row_sq) {
      float* yi = dy + i * width;
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) yi[c] = uh[c] * w.gamma[c] + w.beta[c];
    }
    output_grad(i);
    // dû = dy γ,  c1 = Σ dû,  c2 = Σ dû û,  du = r (dû - (c1 + û c2)/D)
    const float* dyi = dy + i * width;
    float* duh = e + i * width;  // dû, then du in place
    FA_SIMD
    for (int64_t c = 0; c < d; ++c) duh[c] = dyi[c] * w.gamma[c];
    VecF v1 = {}, v2 = {};
    for (int64_t k = 0; k < width; k += kLanes) {  // the padding of dû is zero
      v1 += load(duh + k);
      v2 += load(duh + k) * load(uh + k);
    }
    const float s1 = horizontal_sum(v1), s2 = horizontal_sum(v2);
    const float r = a.rstd[r0 + i], k1 = s1 / static_cast<float>(d), k2 = s2 / static_cast<float>(d);
    FA_SIMD
    for (int64_t c = 0; c < d; ++c) duh[c] = r * (duh[c] - (k1 + uh[c] * k2));
    if (need_ln) {
      FA_SIMD
      for (int64_t c = 0; c < d; ++c) {
        p.d_gamma[c] += dyi[c] * uh[c];
        p.d_beta[c] += dyi[c];
      }
    }
  }
  gemm_nn(m, d, Strided{e, width, 1}, w.up.data(), hw, hw, dh, hw, false);  // da = du Wu
  for (int64_t k = 0; k < m * hw; ++k) dh[k] *= act_grad[k];
  if (a.dx) {
    gemm_nn(m, h, Strided{dh, hw, 1}, w.down.data(), width, width, t, width, false);  // dh Wd
    for (int64_t i = 0; i < m; ++i) store_dx(t + i * width, i);
  }
  if (need_dwd) {
    load_rows(a.x + r0 * a.x_stride_row, a.x_stride_row, a.x_stride_col, m, d, xs, width);
    gemm_nn(h, m, Strided{dh, 1, hw}, xs, width, width, p.d_down, width, true);  // += dhᵀ x
  }
  if (need_dwu) gemm_nn(h, m, Strided{act, 1, hw}, e, width, width, p.d_up_t, width, true);  // += aᵀ du
}

constexpr int64_t kMaxRowGroups = 16;

}  // namespace

template <typename T>
void linear_adapter_forward_cpu(const ForwardArgs<T>& a, const ParallelFor& parallel_for) {
  const AdapterShape& s = a.shape;
  if (s.n == 0) return;
  const Weights w = upcast_weights(s, a.ln_weight, a.ln_bias, a.down_weight, a.up_weight, true, parallel_for);
  if (s.pre_norm) {  // g = Wd γ and b = Wd β, from the unfolded weights
    std::vector<float> row(w.width, 0.0f);
    for (int64_t j = 0; j < s.h; ++j) {
      for (int64_t c = 0; c < s.d; ++c) row[c] = to_float(a.down_weight[j * s.d + c]);
      a.proj[j] = dot(row.data(), w.gamma.data(), w.width);
      a.proj[s.h + j] = dot(row.data(), w.beta.data(), w.width);
    }
  }
  const int64_t bm = block_rows(w.width, kForwardBlockBytes);
  const int64_t blocks = (s.n + bm - 1) / bm;
  parallel_for(blocks, [&](int64_t begin, int64_t end) {
    Buffers buf(bm, w.width, w.hwidth);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * bm;
      forward_block(a, w, s.pre_norm ? a.proj + s.h : nullptr, r0, std::min(bm, s.n - r0), buf);
    }
  });
}

template <typename T>
void linear_adapter_backward_cpu(const BackwardArgs<T>& a, const ParallelFor& parallel_for) {
  const AdapterShape& s = a.shape;
  const int64_t d = s.d, h = s.h;
  const Weights w = upcast_weights(s, a.ln_weight, a.ln_bias, a.down_weight, a.up_weight, false, parallel_for);
  const int64_t width = w.width, bm = block_rows(width, kBackwardBlockBytes);
  const int64_t blocks = (s.n + bm - 1) / bm;
  const int64_t groups = std::max<int64_t>(1, std::min(blocks, kMaxRowGroups));
  const int64_t blocks_per_group = (blocks + groups - 1) / groups;
  const int64_t stride = 2 * h * width + 2 * width;  // one group's partials
  float* partials = thread_scratch(1, groups * stride);  // the calling thread's slot 1

  parallel_for(groups, [&](int64_t begin, int64_t end) {
    Buffers buf(bm, width, w.hwidth);
    for (int64_t grp = begin; grp < end; ++grp) {
      float* base = partials + grp * stride;
      const Partials p{base, base + h * width, base + 2 * h * width, base + 2 * h * width + width};
      for (int64_t blk = grp * blocks_per_group; blk < std::min(blocks, (grp + 1) * blocks_per_group); ++blk) {
        const int64_t r0 = blk * bm;
        backward_block(a, w, r0, std::min(bm, s.n - r0), buf, p);
      }
    }
  });

  // Sum the groups into the first, in group order, one partial row (of `width`) at a time.
  float* total = partials;
  parallel_for(2 * h + 2, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* acc = total + row * width;
      for (int64_t grp = 1; grp < groups; ++grp) {
        const float* part = partials + grp * stride + row * width;
        FA_SIMD
        for (int64_t c = 0; c < width; ++c) acc[c] += part[c];
      }
    }
  });
  for (int64_t j = 0; j < h; ++j)
    for (int64_t c = 0; c < d; ++c) {
      if (a.d_down) a.d_down[j * d + c] = total[j * width + c];
      if (a.d_up) a.d_up[c * h + j] = total[(h + j) * width + c];
    }
  if (a.d_ln_weight) {
    std::copy(total + 2 * h * width, total + 2 * h * width + d, a.d_ln_weight);
    std::copy(total + (2 * h + 1) * width, total + (2 * h + 1) * width + d, a.d_ln_bias);
  }
}

#define FA_INSTANTIATE(T)                                                                    \
  template void linear_adapter_forward_cpu<T>(const ForwardArgs<T>&, const ParallelFor&); \
  template void linear_adapter_backward_cpu<T>(const BackwardArgs<T>&, const ParallelFor&);
FA_INSTANTIATE(float)
FA_INSTANTIATE(Half)
FA_INSTANTIATE(BFloat16)
#undef FA_INSTANTIATE

}  // namespace fa
