// CPU kernels of the fused bottleneck adapter (see linear_adapter.h for the math and the layout).
//
// Rows are processed in blocks small enough that every per-block buffer (BM × D floats) stays in
// the L2 cache through all stages: load and upcast x, LayerNorm statistics, the down-projection,
// the activation, the up-projection and the epilogue. Weights are upcast once per call into float
// matrices of H rows whose length D is padded to a whole number of vectors, so that the two matrix
// kernels below run full vectors without tails: padding is zero in every operand they read.
#include <algorithm>
#include <vector>

#include "linear_adapter.h"

namespace fa {
namespace {

constexpr int64_t kLanes = 16;
// GCC/Clang vector of 16 floats: AVX-512 registers where available, split by the compiler elsewhere.
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float)), __may_alias__));

inline VecF load(const float* p) { return *reinterpret_cast<const VecF*>(p); }
inline void store(float* p, VecF v) { *reinterpret_cast<VecF*>(p) = v; }
inline VecF splat(float s) { return VecF{} + s; }

inline float horizontal_sum(VecF v) {
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Matrix kernels on float. K and widths are multiples of kLanes.
// ---------------------------------------------------------------------------------------------

// C[i][j] = Σ_k A[i][k] B[j][k] for an R×J tile (rows of A and B are contiguous along k).
template <int R, int J>
void dot_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k, float* c, int64_t ldc) {
  VecF acc[R][J] = {};
  for (int64_t kk = 0; kk < k; kk += kLanes) {
    VecF av[R], bv[J];
    for (int r = 0; r < R; ++r) av[r] = load(a + r * lda + kk);
    for (int j = 0; j < J; ++j) bv[j] = load(b + j * ldb + kk);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] += av[r] * bv[j];
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) c[r * ldc + j] = horizontal_sum(acc[r][j]);
}

template <int R>
void dot_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t k, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_tile<R, 4>(a, lda, b + j * ldb, ldb, k, c + j, ldc);
  switch (n - j) {
    case 3: dot_tile<R, 3>(a, lda, b + j * ldb, ldb, k, c + j, ldc); break;
    case 2: dot_tile<R, 2>(a, lda, b + j * ldb, ldb, k, c + j, ldc); break;
    case 1: dot_tile<R, 1>(a, lda, b + j * ldb, ldb, k, c + j, ldc); break;
    default: break;
  }
}

// C (m×n) = A (m×k) Bᵀ with B (n×k): the products of rows with the H rows of a weight matrix.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
             int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) dot_rows<4>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc);
  switch (m - i) {
    case 3: dot_rows<3>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc); break;
    case 2: dot_rows<2>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc); break;
    case 1: dot_rows<1>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc); break;
    default: break;
  }
}

// A small matrix with arbitrary strides: A(i, k) = data[i * row_stride + k * col_stride].
struct Strided {
  const float* data;
  int64_t row_stride, col_stride;
  float operator()(int64_t i, int64_t k) const { return data[i * row_stride + k * col_stride]; }
};

// C[i][:] (+)= Σ_k A(i, k) B[k][:] for an R×(V·kLanes) tile.
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

template <int R>
void axpy_rows(Strided a, int64_t k, const float* b, int64_t ldb, int64_t width, float* c, int64_t ldc,
               bool accumulate) {
  constexpr int64_t kChunk = 4 * kLanes;
  int64_t col = 0;
  for (; col + kChunk <= width; col += kChunk) axpy_tile<R, 4>(a, k, b + col, ldb, c + col, ldc, accumulate);
  switch ((width - col) / kLanes) {
    case 3: axpy_tile<R, 3>(a, k, b + col, ldb, c + col, ldc, accumulate); break;
    case 2: axpy_tile<R, 2>(a, k, b + col, ldb, c + col, ldc, accumulate); break;
    case 1: axpy_tile<R, 1>(a, k, b + col, ldb, c + col, ldc, accumulate); break;
    default: break;
  }
}

// C (m×width) (+)= A (m×k) B (k×width): rows times a weight matrix, or a rank-k update of one.
void gemm_nn(int64_t m, int64_t k, Strided a, const float* b, int64_t ldb, int64_t width, float* c, int64_t ldc,
             bool accumulate) {
  auto rows_from = [&](int64_t i) { return Strided{a.data + i * a.row_stride, a.row_stride, a.col_stride}; };
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) axpy_rows<4>(rows_from(i), k, b, ldb, width, c + i * ldc, ldc, accumulate);
  switch (m - i) {
    case 3: axpy_rows<3>(rows_from(i), k, b, ldb, width, c + i * ldc, ldc, accumulate); break;
    case 2: axpy_rows<2>(rows_from(i), k, b, ldb, width, c + i * ldc, ldc, accumulate); break;
    case 1: axpy_rows<1>(rows_from(i), k, b, ldb, width, c + i * ldc, ldc, accumulate); break;
    default: break;
  }
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
      for (int64_t c = 0; c < d; ++c) out[c] = to_float(row[c]);
    } else {
      for (int64_t c = 0; c < d; ++c) out[c] = to_float(row[c * stride_col]);
    }
  }
}

// Statistics of one padded row v[0, d): lane l of the vectors holds the part {l, l + 16, ...} of the
// row, whose exact mean and M2 come from two vector passes; the 16 parts then merge in lane order.
RowStats row_stats(const float* v, int64_t d, int64_t width) {
  VecF sum = {};
  for (int64_t k = 0; k < width; k += kLanes) sum += load(v + k);  // the padding is zero
  VecF count, keep_last;
  for (int64_t l = 0; l < kLanes; ++l) {
    count[l] = static_cast<float>(d / kLanes + (l < d % kLanes ? 1 : 0));
    keep_last[l] = (d % kLanes == 0 || l < d % kLanes) ? 1.0f : 0.0f;
  }
  VecF mean;
  for (int64_t l = 0; l < kLanes; ++l) mean[l] = count[l] > 0.0f ? sum[l] / count[l] : 0.0f;
  VecF m2 = {};
  for (int64_t k = 0; k + kLanes < width; k += kLanes) {
    const VecF c = load(v + k) - mean;
    m2 += c * c;
  }
  const VecF c_last = (load(v + width - kLanes) - mean) * keep_last;
  m2 += c_last * c_last;
  RowStats stats{0.0f, 0.0f, 0.0f};
  for (int64_t l = 0; l < kLanes; ++l) stats = merge_stats(stats, RowStats{count[l], mean[l], m2[l]});
  return stats;
}

inline float dot(const float* a, const float* b, int64_t width) {
  VecF acc = {};
  for (int64_t k = 0; k < width; k += kLanes) acc += load(a + k) * load(b + k);
  return horizontal_sum(acc);
}

// Float copies of the parameters, rows padded to `width` with zeros.
struct Weights {
  int64_t width = 0;
  std::vector<float> gamma, beta;  // (width)
  std::vector<float> down;         // Wd (H × width); Wd∘γ for the pre-norm forward
  std::vector<float> up_t;         // Wuᵀ (H × width)
};

template <typename T>
Weights upcast_weights(const AdapterShape& s, const T* ln_weight, const T* ln_bias, const T* down_weight,
                       const T* up_weight, bool fold_gamma, const ParallelFor& parallel_for) {
  Weights w;
  w.width = round_up(s.d, kLanes);
  w.gamma.assign(w.width, 0.0f);
  w.beta.assign(w.width, 0.0f);
  for (int64_t c = 0; c < s.d; ++c) {
    w.gamma[c] = to_float(ln_weight[c]);
    w.beta[c] = to_float(ln_bias[c]);
  }
  w.down.assign(s.h * w.width, 0.0f);
  w.up_t.assign(s.h * w.width, 0.0f);
  parallel_for(s.h, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float* down = w.down.data() + j * w.width;
      float* up_t = w.up_t.data() + j * w.width;
      for (int64_t c = 0; c < s.d; ++c) {
        down[c] = to_float(down_weight[j * s.d + c]) * (fold_gamma ? w.gamma[c] : 1.0f);
        up_t[c] = to_float(up_weight[c * s.h + j]);
      }
    }
  });
  return w;
}

// Rows per block: as many as keep one block buffer within 64 KiB (at least 4, at most 64).
int64_t block_rows(int64_t width) {
  return std::min<int64_t>(64, std::max<int64_t>(4, (16384 / width) / 4 * 4));
}

// Per-block buffers of one worker, allocated once per range of blocks; padding stays zero.
struct Buffers {
  std::vector<float> rows[5];
  std::vector<float> hidden, act, act_grad, dh, c1, c2, q;
  Buffers(int64_t bm, int64_t width, int64_t h) {
    for (auto& r : rows) r.assign(bm * width, 0.0f);
    for (auto* v : {&hidden, &act, &act_grad, &dh}) v->assign(bm * h, 0.0f);
    for (auto* v : {&c1, &c2, &q}) v->assign(bm, 0.0f);
  }
  float* row(int i) { return rows[i].data(); }
};

DropScale drop_scale_of(const AdapterShape& s) { return make_drop_scale(s.dropout_p, s.scale ? *s.scale : 1.0f); }

inline uint32_t row_hash_of(const AdapterShape& s, int64_t row) {
  return s.dropout_p > 0.0f ? dropout_row_hash(*s.seed, row) : 0u;
}

// v[c] *= s m for one row (c < d).
inline void apply_drop_scale(const DropScale& ds, uint32_t row_hash, float* v, int64_t d) {
  if (!ds.has_dropout) {
    for (int64_t c = 0; c < d; ++c) v[c] *= ds.scale;
  } else {
    for (int64_t c = 0; c < d; ++c) v[c] *= ds.factor(row_hash, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_block(const ForwardArgs<T>& a, const Weights& w, const float* b_proj, int64_t r0, int64_t m,
                   Buffers& buf) {
  const AdapterShape& s = a.shape;
  const int64_t d = s.d, h = s.h, width = w.width;
  float* xs = buf.row(0);  // x (float)
  float* t = buf.row(1);   // x̂ (pre) or u, then û (post)
  float* y = buf.row(2);
  float* hid = buf.hidden.data();
  float* act = buf.act.data();
  load_rows(a.x + r0 * a.x_stride_row, a.x_stride_row, a.x_stride_col, m, d, xs, width);

  if (s.pre_norm) {
    for (int64_t i = 0; i < m; ++i) {
      const RowStats st = row_stats(xs + i * width, d, width);
      const float r = inv_std(st, s.eps);
      a.mean[r0 + i] = st.mean;
      a.mean[s.n + r0 + i] = 0.0f;
      a.rstd[r0 + i] = r;
      for (int64_t c = 0; c < d; ++c) t[i * width + c] = (xs[i * width + c] - st.mean) * r;
    }
    gemm_nt(m, h, width, t, width, w.down.data(), width, hid, h);  // x̂ (Wd∘γ)ᵀ
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < h; ++j) hid[i * h + j] += b_proj[j];
  } else {
    gemm_nt(m, h, width, xs, width, w.down.data(), width, hid, h);
  }
  for (int64_t e = 0; e < m * h; ++e) act[e] = activate(s.activation, hid[e]);
  std::copy(hid, hid + m * h, a.hidden + r0 * h);

  gemm_nn(m, h, Strided{act, h, 1}, w.up_t.data(), width, width, s.pre_norm ? y : t, width, false);
  if (!s.pre_norm) {
    for (int64_t i = 0; i < m; ++i) {
      const float* u = t + i * width;
      const RowStats st = row_stats(u, d, width);
      const float r = inv_std(st, s.eps);
      a.mean[r0 + i] = st.mean;
      a.mean[s.n + r0 + i] = 0.0f;
      a.rstd[r0 + i] = r;
      for (int64_t c = 0; c < d; ++c) y[i * width + c] = (u[c] - st.mean) * r * w.gamma[c] + w.beta[c];
    }
  }

  const DropScale ds = drop_scale_of(s);
  for (int64_t i = 0; i < m; ++i) {
    float* z = y + i * width;
    apply_drop_scale(ds, row_hash_of(s, r0 + i), z, d);
    const float* x = xs + i * width;
    T* out = a.out + (r0 + i) * d;
    float sq = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      sq += z[c] * z[c];
      out[c] = from_float<T>(output_value(x[c], z[c], s.residual));
    }
    if (a.row_sq) a.row_sq[r0 + i] = sq;
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
  const int64_t d = s.d, h = s.h, width = w.width, n = s.n;
  const DropScale ds = drop_scale_of(s);
  float* g = buf.row(0);   // dout
  float* t = buf.row(1);   // pre: x̂ then x̂γ + β;  post: û then dx before the store
  float* dy = buf.row(2);  // y, then dy
  float* e = buf.row(3);   // pre: dh Wd;  post: du
  float* xs = buf.row(4);  // post: x
  const float* hid = a.hidden + r0 * h;
  float *act = buf.act.data(), *act_grad = buf.act_grad.data(), *dh = buf.dh.data();
  float *c1 = buf.c1.data(), *c2 = buf.c2.data(), *q = buf.q.data();
  const bool need_ln = a.d_ln_weight != nullptr, need_dwd = a.d_down != nullptr, need_dwu = a.d_up != nullptr;

  load_rows(a.grad_out + r0 * a.g_stride_row, a.g_stride_row, a.g_stride_col, m, d, g, width);
  for (int64_t e2 = 0; e2 < m * h; ++e2) {
    act[e2] = activate(s.activation, hid[e2]);
    act_grad[e2] = activate_grad(s.activation, hid[e2]);
  }
  for (int64_t i = 0; i < m; ++i) q[i] = a.grad_row_sq ? a.grad_row_sq[r0 + i] : 0.0f;

  auto normalize = [&](const float* v, float* out, int64_t i) {  // ((v - c) - (μ - c)) r
    const float shift = a.mean[r0 + i], mean_c = a.mean[n + r0 + i], r = a.rstd[r0 + i];
    for (int64_t c = 0; c < d; ++c) out[c] = ((v[c] - shift) - mean_c) * r;
  };
  // dy = s m (dout + 2 q z), z = s m y; y (in dy) is read only when q is present.
  auto output_grad = [&](int64_t i) {
    const uint32_t rh = row_hash_of(s, r0 + i);
    float* row = dy + i * width;
    const float* go = g + i * width;
    if (a.grad_row_sq) {
      apply_drop_scale(ds, rh, row, d);
      for (int64_t c = 0; c < d; ++c) row[c] = grad_z(go[c], q[i], row[c]);
    } else {
      std::copy(go, go + d, row);
    }
    apply_drop_scale(ds, rh, row, d);
  };
  auto store_dx = [&](const float* v, int64_t i) {
    T* out = a.dx + (r0 + i) * d;
    const float* go = g + i * width;
    for (int64_t c = 0; c < d; ++c) out[c] = from_float<T>(s.residual ? go[c] + v[c] : v[c]);
  };

  if (s.pre_norm) {
    const float* gvec = a.proj;     // Wd γ
    const float* bvec = a.proj + h;  // Wd β
    if (a.grad_row_sq) gemm_nn(m, h, Strided{act, h, 1}, w.up_t.data(), width, width, dy, width, false);
    for (int64_t i = 0; i < m; ++i) output_grad(i);
    gemm_nt(m, h, width, dy, width, w.up_t.data(), width, dh, h);  // da = dy Wu
    for (int64_t i = 0; i < m; ++i) {
      float s1 = 0.0f, s2 = 0.0f;
      for (int64_t j = 0; j < h; ++j) {
        const int64_t k = i * h + j;
        dh[k] *= act_grad[k];
        s1 += dh[k] * gvec[j];
        s2 += dh[k] * (hid[k] - bvec[j]);
      }
      c1[i] = s1;
      c2[i] = s2;
    }
    const bool need_e = a.dx || need_ln;
    if (need_e) gemm_nn(m, h, Strided{dh, h, 1}, w.down.data(), width, width, e, width, false);  // dh Wd
    if (need_e || need_dwd) {
      load_rows(a.x + r0 * a.x_stride_row, a.x_stride_row, a.x_stride_col, m, d, t, width);
      for (int64_t i = 0; i < m; ++i) normalize(t + i * width, t + i * width, i);
    }
    const float inv_d = 1.0f / static_cast<float>(d);
    for (int64_t i = 0; i < m; ++i) {
      const float* ei = e + i * width;
      const float* xh = t + i * width;
      if (a.dx) {
        const float r = a.rstd[r0 + i], k1 = c1[i] * inv_d, k2 = c2[i] * inv_d;
        float* dxi = xs + i * width;  // scratch for the row of dx
        for (int64_t c = 0; c < d; ++c) dxi[c] = r * (ei[c] * w.gamma[c] - (k1 + xh[c] * k2));
        store_dx(dxi, i);
      }
      if (need_ln) {
        for (int64_t c = 0; c < d; ++c) {
          p.d_gamma[c] += ei[c] * xh[c];
          p.d_beta[c] += ei[c];
        }
      }
    }
    if (need_dwd) {
      for (int64_t i = 0; i < m; ++i)
        for (int64_t c = 0; c < d; ++c) t[i * width + c] = t[i * width + c] * w.gamma[c] + w.beta[c];
      gemm_nn(h, m, Strided{dh, 1, h}, t, width, width, p.d_down, width, true);  // += dhᵀ (x̂γ + β)
    }
    if (need_dwu) gemm_nn(h, m, Strided{act, 1, h}, dy, width, width, p.d_up_t, width, true);  // += aᵀ dy
    return;
  }

  // Post norm.
  gemm_nn(m, h, Strided{act, h, 1}, w.up_t.data(), width, width, t, width, false);  // u
  for (int64_t i = 0; i < m; ++i) {
    float* uh = t + i * width;
    normalize(uh, uh, i);
    if (a.grad_row_sq) {
      float* yi = dy + i * width;
      for (int64_t c = 0; c < d; ++c) yi[c] = uh[c] * w.gamma[c] + w.beta[c];
    }
    output_grad(i);
    // dû = dy γ,  c1 = Σ dû,  c2 = Σ dû û,  du = r (dû - (c1 + û c2)/D)
    const float* dyi = dy + i * width;
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      const float duh = dyi[c] * w.gamma[c];
      s1 += duh;
      s2 += duh * uh[c];
    }
    const float r = a.rstd[r0 + i], k1 = s1 / static_cast<float>(d), k2 = s2 / static_cast<float>(d);
    float* du = e + i * width;
    for (int64_t c = 0; c < d; ++c) du[c] = r * (dyi[c] * w.gamma[c] - (k1 + uh[c] * k2));
    if (need_ln) {
      for (int64_t c = 0; c < d; ++c) {
        p.d_gamma[c] += dyi[c] * uh[c];
        p.d_beta[c] += dyi[c];
      }
    }
  }
  gemm_nt(m, h, width, e, width, w.up_t.data(), width, dh, h);  // da = du Wu
  for (int64_t k = 0; k < m * h; ++k) dh[k] *= act_grad[k];
  if (a.dx) {
    gemm_nn(m, h, Strided{dh, h, 1}, w.down.data(), width, width, t, width, false);  // dh Wd
    for (int64_t i = 0; i < m; ++i) store_dx(t + i * width, i);
  }
  if (need_dwd) {
    load_rows(a.x + r0 * a.x_stride_row, a.x_stride_row, a.x_stride_col, m, d, xs, width);
    gemm_nn(h, m, Strided{dh, 1, h}, xs, width, width, p.d_down, width, true);  // += dhᵀ x
  }
  if (need_dwu) gemm_nn(h, m, Strided{act, 1, h}, e, width, width, p.d_up_t, width, true);  // += aᵀ du
}

constexpr int64_t kMaxRowGroups = 16;

}  // namespace

template <typename T>
void linear_adapter_forward_cpu(const ForwardArgs<T>& a, const ParallelFor& parallel_for) {
  const AdapterShape& s = a.shape;
  if (s.n == 0) return;
  const Weights w = upcast_weights(s, a.ln_weight, a.ln_bias, a.down_weight, a.up_weight, s.pre_norm, parallel_for);
  if (s.pre_norm) {  // g = Wd γ and b = Wd β, from the unfolded weights
    for (int64_t j = 0; j < s.h; ++j) {
      float g = 0.0f, b = 0.0f;
      for (int64_t c = 0; c < s.d; ++c) {
        const float wd = to_float(a.down_weight[j * s.d + c]);
        g += wd * w.gamma[c];
        b += wd * w.beta[c];
      }
      a.proj[j] = g;
      a.proj[s.h + j] = b;
    }
  }
  const int64_t bm = block_rows(w.width);
  const int64_t blocks = (s.n + bm - 1) / bm;
  parallel_for(blocks, [&](int64_t begin, int64_t end) {
    Buffers buf(bm, w.width, s.h);
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
  const int64_t width = w.width, bm = block_rows(width);
  const int64_t blocks = (s.n + bm - 1) / bm;
  const int64_t groups = std::max<int64_t>(1, std::min(blocks, kMaxRowGroups));
  const int64_t blocks_per_group = (blocks + groups - 1) / groups;
  const int64_t stride = 2 * h * width + 2 * width;  // one group's partials
  std::vector<float> partials(groups * stride, 0.0f);

  parallel_for(groups, [&](int64_t begin, int64_t end) {
    Buffers buf(bm, width, h);
    for (int64_t grp = begin; grp < end; ++grp) {
      float* base = partials.data() + grp * stride;
      const Partials p{base, base + h * width, base + 2 * h * width, base + 2 * h * width + width};
      for (int64_t blk = grp * blocks_per_group; blk < std::min(blocks, (grp + 1) * blocks_per_group); ++blk) {
        const int64_t r0 = blk * bm;
        backward_block(a, w, r0, std::min(bm, s.n - r0), buf, p);
      }
    }
  });

  // Sum the groups in group order.
  auto group_sum = [&](int64_t offset) {
    float v = 0.0f;
    for (int64_t grp = 0; grp < groups; ++grp) v += partials[grp * stride + offset];
    return v;
  };
  parallel_for(h, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t c = 0; c < d; ++c) {
        if (a.d_down) a.d_down[j * d + c] = group_sum(j * width + c);
        if (a.d_up) a.d_up[c * h + j] = group_sum(h * width + j * width + c);
      }
  });
  if (a.d_ln_weight) {
    for (int64_t c = 0; c < d; ++c) {
      a.d_ln_weight[c] = group_sum(2 * h * width + c);
      a.d_ln_bias[c] = group_sum(2 * h * width + width + c);
    }
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
