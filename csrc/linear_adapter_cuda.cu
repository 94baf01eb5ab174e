// CUDA kernels of the fused adapter for any N: a row-block forward (on devices before sm_90, or where
// the cluster forward of linear_adapter_cluster.cu does not fit; N <= kDecodeMaxRows goes to the decode
// forward of linear_adapter_decode.cu), and a backward in two launches, a rows pass and a columns
// pass, with the weight gradients summed in a fixed order (deterministic, no atomics).
//
// Never run on a GPU: CI compiles this file for sm_80 and sm_90 and runs it on the CPU simulator
// (cuda_sim.h). A first design, for correctness: float FMAs, weights read through L1/L2, no tensor
// cores and no thread-block cluster (those are the single-read forward's, linear_adapter_cluster.cu).
// The activations are rounded to T before the up-projection (round_to), as in every CUDA forward.
//
// Forward, one CTA per block of R <= kMaxRows rows; the d loops give one column to each thread:
//   pre norm: row statistics of x - c (c = x[n][0]; exact mean, then M2), A = Σ_d (x - c) γ Wdᵀ over
//   chunks of x staged in shared memory, h = r (A - (μ - c) g) + b with proj = (g, b) = (Wd γ, Wd β)
//   from a small launch before; post norm: h = x Wdᵀ, then u = a Wuᵀ three times per element (its
//   mean, its M2, the epilogue; c = u[n][0]). Epilogue: z = s m y, out = [x +] z, row_sq = Σ z².
// Backward rows pass, one CTA per block of rows: dy = s m (dout + 2 q z); pre norm: da = dy Wu,
//   dh = da act'(h), c1 = Σ_j dh g, c2 = Σ_j dh (h - b), dx = [dout +] r (e γ - (c1 + x̂ c2)/D) with
//   e = dh Wd; post norm: dû = dy γ, c1 = Σ dû, c2 = Σ dû û, du = r (dû - (c1 + û c2)/D), da = du Wu
//   computed as du (Wu - m) with m_j the mean of Wu's column j (equal, as Σ_d du = 0, and free of the
//   cancellation that a large mean of Wu would cause),
//   dh = da act'(h), dx = dh Wd [+ dout]. It writes dh, a = act(h) and (c1, c2) to the workspace.
// Backward columns pass, one CTA per slice of 32 columns (fewer for H above 256), over every row in order:
//   dWd[:, slice] = Σ_n dhᵀ v (pre: v = x̂ γ + β; post: v = x), dWu[slice, :] = Σ_n gᵀ a (pre: g = dy;
//   post: g = du), dγ = Σ_n l x̂ and dβ = Σ_n l (pre: l = e; post: l = dy, with û for x̂).
#include "fa_cuda.h"
#include "linear_adapter.h"

namespace fa {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRows = 16;          // rows per CTA of the row-block kernels
constexpr int kStage = kThreads + 1;  // row stride of a staged chunk (odd: no bank conflicts)
constexpr int kMaxColumns = 32;       // columns per CTA of the columns pass, fewer where H needs the room
constexpr int kColumnRows = 16;       // rows the columns pass stages at a time
constexpr int kScratch = 36;          // floats of block_sum's scratch, rounded up to 16 bytes
constexpr int kRowValues = 6;
constexpr size_t kSharedLimit = 160 * 1024;  // within sm_80's opt-in limit (163 KiB)

enum RowValue { kShift = 0, kMeanC, kRstd, kQ, kC1, kC2 };

__device__ __forceinline__ int thread() { return static_cast<int>(threadIdx.x); }

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return to_float(p[i]);
}

__device__ __forceinline__ DropScale drop_scale_of(const AdapterShape& s) {
  return make_drop_scale(s.dropout_p, s.scale ? *s.scale : 1.0f);
}

__device__ __forceinline__ uint32_t row_hash_of(const AdapterShape& s, int64_t n) {
  return s.dropout_p > 0.0f ? dropout_row_hash(*s.seed, n) : 0u;
}

// Consecutive pieces of a shared-memory buffer: next(count) is the next `count` floats.
struct Carve {
  float* at;
  __device__ float* operator()(int64_t count) {
    float* piece = at;
    at += count;
    return piece;
  }
};

// Shared memory of the row-block kernels: block_sum's scratch, three H × R buffers (index j R + i),
// a staged chunk (R × kStage), the per-row values (kRowValues × R) and post norm's column means (H).
struct RowsShared {
  float *scratch, *act, *grad, *acc, *stage, *row, *center;

  static size_t bytes(int64_t h) {
    return sizeof(float) *
           static_cast<size_t>(kScratch + 3 * h * kMaxRows + kMaxRows * kStage + kRowValues * kMaxRows + h);
  }
  __device__ static RowsShared carve(float* base, int64_t h) {
    Carve next{base};
    RowsShared m;
    m.scratch = next(kScratch);
    m.act = next(h * kMaxRows);
    m.grad = next(h * kMaxRows);
    m.acc = next(h * kMaxRows);
    m.stage = next(kMaxRows * kStage);
    m.row = next(kRowValues * kMaxRows);
    m.center = next(h);
    return m;
  }
  __device__ float& value(RowValue k, int i) const { return row[k * kMaxRows + i]; }
};

// y[i] = Σ_j v[j R + i] W(c, j) for the rows i < rows (v: H × R in shared memory), with
// W(c, j) = w[c col_stride + j row_stride]: Wu (D × H) is (h, 1), Wd (H × D) is (1, d).
template <typename T>
__device__ __forceinline__ void times_weight(const float* v, const T* w, int64_t col_stride, int64_t row_stride,
                                             int64_t h, int64_t c, int rows, float* y) {
  FA_UNROLL for (int i = 0; i < kMaxRows; ++i) y[i] = 0.0f;
  for (int64_t j = 0; j < h; ++j) {
    const float wj = load(w, c * col_stride + j * row_stride);
    FA_UNROLL for (int i = 0; i < kMaxRows; ++i)
      if (i < rows) y[i] += v[j * kMaxRows + i] * wj;
  }
}

// center[j] = m_j = mean_d Wu[d][j], the up weight's column means, summed in d order. The post-norm
// backward multiplies du by Wu - m instead of Wu: the same product, as Σ_d du = 0, without the
// cancellation that large column means would cause.
template <typename T>
__device__ void up_column_means(const T* w, int64_t d, int64_t h, float* center) {
  for (int64_t j = thread(); j < h; j += kThreads) {
    float sum = 0.0f;
    for (int64_t c = 0; c < d; ++c) sum += load(w, c * h + j);
    center[j] = sum / static_cast<float>(d);
  }
  __syncthreads();
}

// acc[j R + i] += Σ_cc stage[i][cc] (W(c0 + cc, j) - center[j]) over a staged chunk of `width` columns,
// every (i, j) by one thread. W(c, j) = weight[c * col_stride + j * row_stride]; center may be null.
template <typename T>
__device__ __forceinline__ void accumulate_chunk(float* acc, const float* stage, const T* weight, const float* center,
                                                 int64_t col_stride, int64_t row_stride, int64_t h, int64_t c0,
                                                 int64_t width, int rows) {
  for (int64_t p = thread(); p < h * rows; p += kThreads) {
    const int64_t j = p / rows;
    const int i = static_cast<int>(p % rows);
    const float shift = center ? center[j] : 0.0f;
    float sum = 0.0f;
    for (int64_t cc = 0; cc < width; ++cc)
      sum += stage[i * kStage + cc] * (load(weight, (c0 + cc) * col_stride + j * row_stride) - shift);
    acc[j * kMaxRows + i] += sum;
  }
}

// Mean and rstd of v(i, c) for the block's rows, shifted by the kShift values: Σ (v - shift) for the
// mean, then M2 = Σ ((v - shift) - (μ - shift))², both block sums in a fixed order.
template <typename Value>
__device__ void block_row_stats(const RowsShared& m, int64_t d, int rows, float eps, Value value) {
  for (int i = 0; i < rows; ++i) {
    const float shift = m.value(kShift, i);
    float sum = 0.0f;
    for (int64_t c = thread(); c < d; c += kThreads) sum += value(i, c) - shift;
    const float mean_c = block_sum(sum, m.scratch) / static_cast<float>(d);
    float m2 = 0.0f;
    for (int64_t c = thread(); c < d; c += kThreads) {
      const float v = (value(i, c) - shift) - mean_c;
      m2 += v * v;
    }
    m2 = block_sum(m2, m.scratch);
    if (thread() == 0) {
      m.value(kMeanC, i) = mean_c;
      m.value(kRstd, i) = inv_std(RowStats{static_cast<float>(d), mean_c, m2}, eps);
    }
  }
  __syncthreads();
}

// proj = (Wd γ, Wd β), one CTA per hidden unit j.
template <typename T>
__global__ void __launch_bounds__(kThreads) proj_kernel(ForwardArgs<T> a) {
  FA_DYNAMIC_SHARED(float, scratch);
  const int64_t j = blockIdx.x, d = a.shape.d;
  float g = 0.0f, b = 0.0f;
  for (int64_t c = thread(); c < d; c += kThreads) {
    const float w = load(a.down_weight, j * d + c);
    g += w * load(a.ln_weight, c);
    b += w * load(a.ln_bias, c);
  }
  g = block_sum(g, scratch);
  b = block_sum(b, scratch);
  if (thread() == 0) {
    a.proj[j] = g;
    a.proj[a.shape.h + j] = b;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_rows_kernel(ForwardArgs<T> a) {
  FA_DYNAMIC_SHARED(float, base);
  const AdapterShape& s = a.shape;
  const int64_t d = s.d, h = s.h, r0 = static_cast<int64_t>(blockIdx.x) * kMaxRows;
  const int rows = static_cast<int>(s.n - r0 < kMaxRows ? s.n - r0 : kMaxRows);
  const RowsShared m = RowsShared::carve(base, h);
  auto x_at = [&](int i, int64_t c) { return load(a.x, (r0 + i) * a.x_stride_row + c * a.x_stride_col); };

  if (s.pre_norm) {
    if (thread() < rows) m.value(kShift, thread()) = x_at(thread(), 0);
    __syncthreads();
    block_row_stats(m, d, rows, s.eps, x_at);
  }
  // A = Σ_d (x - c) γ Wdᵀ (pre) or x Wdᵀ (post), in acc.
  for (int64_t p = thread(); p < h * kMaxRows; p += kThreads) m.acc[p] = 0.0f;
  for (int64_t c0 = 0; c0 < d; c0 += kThreads) {
    const int64_t width = d - c0 < kThreads ? d - c0 : kThreads, c = c0 + thread();
    for (int i = 0; i < rows; ++i) {
      float v = 0.0f;
      if (c < d) v = s.pre_norm ? (x_at(i, c) - m.value(kShift, i)) * load(a.ln_weight, c) : x_at(i, c);
      m.stage[i * kStage + thread()] = v;
    }
    __syncthreads();
    accumulate_chunk(m.acc, m.stage, a.down_weight, nullptr, 1, d, h, c0, width, rows);
    __syncthreads();
  }
  // h, a = act(h).
  for (int64_t p = thread(); p < h * rows; p += kThreads) {
    const int64_t j = p / rows;
    const int i = static_cast<int>(p % rows);
    float hv = m.acc[j * kMaxRows + i];
    if (s.pre_norm) hv = m.value(kRstd, i) * (hv - m.value(kMeanC, i) * a.proj[j]) + a.proj[h + j];
    a.hidden[(r0 + i) * h + j] = hv;
    m.act[j * kMaxRows + i] = round_to<T>(activate(s.activation, hv));
  }
  if (s.pre_norm && thread() < rows) {
    a.mean[r0 + thread()] = m.value(kShift, thread());
    a.mean[s.n + r0 + thread()] = m.value(kMeanC, thread());
    a.rstd[r0 + thread()] = m.value(kRstd, thread());
  }
  __syncthreads();

  float y[kMaxRows];
  if (!s.pre_norm) {  // statistics of u = a Wuᵀ, shifted by u[n][0]
    if (thread() == 0) {
      times_weight(m.act, a.up_weight, h, 1, h, 0, rows, y);
      FA_UNROLL for (int i = 0; i < kMaxRows && i < rows; ++i) m.value(kShift, i) = y[i];
    }
    __syncthreads();
    auto u_at = [&](int i, int64_t c) {
      float acc = 0.0f;
      for (int64_t j = 0; j < h; ++j) acc += m.act[j * kMaxRows + i] * load(a.up_weight, c * h + j);
      return acc;
    };
    block_row_stats(m, d, rows, s.eps, u_at);
    if (thread() < rows) {
      a.mean[r0 + thread()] = m.value(kShift, thread());
      a.mean[s.n + r0 + thread()] = m.value(kMeanC, thread());
      a.rstd[r0 + thread()] = m.value(kRstd, thread());
    }
  }
  // Epilogue.
  const DropScale ds = drop_scale_of(s);
  float sq[kMaxRows];
  FA_UNROLL for (int i = 0; i < kMaxRows; ++i) sq[i] = 0.0f;
  for (int64_t c = thread(); c < d; c += kThreads) {
    times_weight(m.act, a.up_weight, h, 1, h, c, rows, y);
    FA_UNROLL for (int i = 0; i < kMaxRows && i < rows; ++i) {
      float yv = y[i];
      if (!s.pre_norm)
        yv = ((yv - m.value(kShift, i)) - m.value(kMeanC, i)) * m.value(kRstd, i) * load(a.ln_weight, c) +
             load(a.ln_bias, c);
      const float z = yv * ds.factor(row_hash_of(s, r0 + i), c);
      sq[i] += z * z;
      a.out[(r0 + i) * d + c] = from_float<T>(output_value(x_at(i, c), z, s.residual));
    }
  }
  if (a.row_sq == nullptr) return;
  FA_UNROLL for (int i = 0; i < kMaxRows; ++i) m.stage[i * kStage + thread()] = sq[i];  // no block_sum in an unrolled loop
  for (int i = 0; i < rows; ++i) {
    const float total = block_sum(m.stage[i * kStage + thread()], m.scratch);
    if (thread() == 0) a.row_sq[r0 + i] = total;
  }
}

// The backward's workspace: dh and a (N × H each), then (c1, c2) (N × 2).
struct BackwardWorkspace {
  float *dh, *act, *c12;
  __host__ __device__ static int64_t floats(int64_t n, int64_t h) { return n * (2 * h + 2); }
  __host__ __device__ static BackwardWorkspace carve(float* base, int64_t n, int64_t h) {
    return BackwardWorkspace{base, base + n * h, base + 2 * n * h};
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_rows_kernel(BackwardArgs<T> a, float* workspace) {
  FA_DYNAMIC_SHARED(float, base);
  const AdapterShape& s = a.shape;
  const int64_t n_rows = s.n, d = s.d, h = s.h, r0 = static_cast<int64_t>(blockIdx.x) * kMaxRows;
  const int rows = static_cast<int>(n_rows - r0 < kMaxRows ? n_rows - r0 : kMaxRows);
  const RowsShared m = RowsShared::carve(base, h);
  const BackwardWorkspace w = BackwardWorkspace::carve(workspace, n_rows, h);
  const DropScale ds = drop_scale_of(s);
  const float inv_d = 1.0f / static_cast<float>(d);
  auto x_at = [&](int i, int64_t c) { return load(a.x, (r0 + i) * a.x_stride_row + c * a.x_stride_col); };
  auto dout_at = [&](int i, int64_t c) { return load(a.grad_out, (r0 + i) * a.g_stride_row + c * a.g_stride_col); };

  if (thread() < rows) {
    const int i = thread();
    m.value(kShift, i) = a.mean[r0 + i];
    m.value(kMeanC, i) = a.mean[n_rows + r0 + i];
    m.value(kRstd, i) = a.rstd[r0 + i];
    m.value(kQ, i) = a.grad_row_sq ? a.grad_row_sq[r0 + i] : 0.0f;
  }
  for (int64_t p = thread(); p < h * kMaxRows; p += kThreads) {
    const int64_t j = p / kMaxRows;
    const int i = static_cast<int>(p % kMaxRows);
    const float hv = i < rows ? a.hidden[(r0 + i) * h + j] : 0.0f;
    m.act[p] = round_to<T>(activate(s.activation, hv));
    m.grad[p] = activate_grad(s.activation, hv);
    m.acc[p] = 0.0f;
  }
  __syncthreads();
  if (!s.pre_norm) up_column_means(a.up_weight, d, h, m.center);

  // dy of row i at column c, from y (post norm: û, returned through u_hat).
  float y[kMaxRows];
  auto output_grads = [&](int64_t c, float* dy, float* u_hat) {
    times_weight(m.act, a.up_weight, h, 1, h, c, rows, y);
    FA_UNROLL for (int i = 0; i < kMaxRows && i < rows; ++i) {
      float yv = y[i];
      if (!s.pre_norm) {
        u_hat[i] = ((yv - m.value(kShift, i)) - m.value(kMeanC, i)) * m.value(kRstd, i);
        yv = u_hat[i] * load(a.ln_weight, c) + load(a.ln_bias, c);
      }
      const float factor = ds.factor(row_hash_of(s, r0 + i), c);
      dy[i] = factor * grad_z(dout_at(i, c), m.value(kQ, i), factor * yv);
    }
  };

  float dy[kMaxRows], u_hat[kMaxRows];
  if (!s.pre_norm) {  // c1 = Σ dû, c2 = Σ dû û with dû = dy γ
    float s1[kMaxRows], s2[kMaxRows];
    FA_UNROLL for (int i = 0; i < kMaxRows; ++i) s1[i] = s2[i] = 0.0f;
    for (int64_t c = thread(); c < d; c += kThreads) {
      output_grads(c, dy, u_hat);
      const float gamma = load(a.ln_weight, c);
      FA_UNROLL for (int i = 0; i < kMaxRows && i < rows; ++i) {
        s1[i] += dy[i] * gamma;
        s2[i] += dy[i] * gamma * u_hat[i];
      }
    }
    // block_sum is not called in an unrolled loop: the partials go through the staging buffer, free
    // until the chunks below.
    FA_UNROLL for (int i = 0; i < kMaxRows; ++i) m.stage[i * kStage + thread()] = s1[i];
    for (int i = 0; i < rows; ++i) {
      const float c1 = block_sum(m.stage[i * kStage + thread()], m.scratch);
      if (thread() == 0) m.value(kC1, i) = c1;
    }
    FA_UNROLL for (int i = 0; i < kMaxRows; ++i) m.stage[i * kStage + thread()] = s2[i];
    for (int i = 0; i < rows; ++i) {
      const float c2 = block_sum(m.stage[i * kStage + thread()], m.scratch);
      if (thread() == 0) m.value(kC2, i) = c2;
    }
    __syncthreads();
  }
  // da = g Wu over staged chunks of g (pre: dy; post: du).
  for (int64_t c0 = 0; c0 < d; c0 += kThreads) {
    const int64_t width = d - c0 < kThreads ? d - c0 : kThreads, c = c0 + thread();
    if (c < d) {
      output_grads(c, dy, u_hat);
      FA_UNROLL for (int i = 0; i < kMaxRows && i < rows; ++i) {
        float g = dy[i];
        if (!s.pre_norm) {
          const float du_hat = dy[i] * load(a.ln_weight, c);
          g = m.value(kRstd, i) * (du_hat - (m.value(kC1, i) + u_hat[i] * m.value(kC2, i)) * inv_d);
        }
        m.stage[i * kStage + thread()] = g;
      }
    }
    __syncthreads();
    accumulate_chunk(m.acc, m.stage, a.up_weight, s.pre_norm ? nullptr : m.center, h, 1, h, c0, width, rows);
    __syncthreads();
  }
  // dh = da act'(h), kept in acc; dh and a to the workspace.
  for (int64_t p = thread(); p < h * rows; p += kThreads) {
    const int64_t j = p / rows;
    const int i = static_cast<int>(p % rows);
    const int64_t k = j * kMaxRows + i;
    m.acc[k] *= m.grad[k];
    w.dh[(r0 + i) * h + j] = m.acc[k];
    w.act[(r0 + i) * h + j] = m.act[k];
  }
  __syncthreads();
  if (s.pre_norm && thread() < rows) {  // c1 = Σ_j dh g, c2 = Σ_j dh (h - b), in j order
    const int i = thread();
    float c1 = 0.0f, c2 = 0.0f;
    for (int64_t j = 0; j < h; ++j) {
      const float dh = m.acc[j * kMaxRows + i];
      c1 += dh * a.proj[j];
      c2 += dh * (a.hidden[(r0 + i) * h + j] - a.proj[h + j]);
    }
    m.value(kC1, i) = c1;
    m.value(kC2, i) = c2;
  }
  __syncthreads();
  if (thread() < rows) {
    w.c12[(r0 + thread()) * 2] = m.value(kC1, thread());
    w.c12[(r0 + thread()) * 2 + 1] = m.value(kC2, thread());
  }
  if (a.dx == nullptr) return;
  float e[kMaxRows];
  for (int64_t c = thread(); c < d; c += kThreads) {
    times_weight(m.acc, a.down_weight, 1, d, h, c, rows, e);  // e = dh Wd
    FA_UNROLL for (int i = 0; i < kMaxRows && i < rows; ++i) {
      float dx = e[i];
      if (s.pre_norm) {
        const float r = m.value(kRstd, i);
        const float x_hat = ((x_at(i, c) - m.value(kShift, i)) - m.value(kMeanC, i)) * r;
        dx = r * (e[i] * load(a.ln_weight, c) - (m.value(kC1, i) + x_hat * m.value(kC2, i)) * inv_d);
      }
      if (s.residual) dx += dout_at(i, c);
      a.dx[(r0 + i) * d + c] = from_float<T>(dx);
    }
  }
}

// Shared memory of the columns pass, for `cols` columns per CTA: accumulators of dWd and dWu (H × cols
// each), rows staged from the workspace (dh and a, kColumnRows × H each), per (row, column) values
// (v, g, l, x̂: kColumnRows × cols each) and the per-row values (kRowValues × kColumnRows).
struct ColumnsShared {
  float *acc_down, *acc_up, *dh, *act, *v, *g, *l, *x_hat, *row;

  static size_t bytes(int64_t h, int64_t cols) {
    return sizeof(float) * static_cast<size_t>(2 * h * cols + 2 * kColumnRows * h + 4 * kColumnRows * cols +
                                               kRowValues * kColumnRows);
  }
  // The most columns per CTA (32, 16 or 8) whose shared memory fits; 0 when none does.
  static int columns(int64_t h) {
    for (int cols = kMaxColumns; cols >= 8; cols /= 2)
      if (bytes(h, cols) <= kSharedLimit) return cols;
    return 0;
  }
  __device__ static ColumnsShared carve(float* base, int64_t h, int cols) {
    Carve next{base};
    ColumnsShared m;
    m.acc_down = next(h * cols);
    m.acc_up = next(h * cols);
    m.dh = next(kColumnRows * h);
    m.act = next(kColumnRows * h);
    m.v = next(kColumnRows * cols);
    m.g = next(kColumnRows * cols);
    m.l = next(kColumnRows * cols);
    m.x_hat = next(kColumnRows * cols);
    m.row = next(kRowValues * kColumnRows);
    return m;
  }
  __device__ float& value(RowValue k, int i) const { return row[k * kColumnRows + i]; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_columns_kernel(BackwardArgs<T> a, const float* workspace, int cols) {
  FA_DYNAMIC_SHARED(float, base);
  const AdapterShape& s = a.shape;
  const int64_t n_rows = s.n, d = s.d, h = s.h, c0 = static_cast<int64_t>(blockIdx.x) * cols;
  const int width = static_cast<int>(d - c0 < cols ? d - c0 : cols);
  const ColumnsShared m = ColumnsShared::carve(base, h, cols);
  const BackwardWorkspace w = BackwardWorkspace::carve(const_cast<float*>(workspace), n_rows, h);
  const DropScale ds = drop_scale_of(s);
  const float inv_d = 1.0f / static_cast<float>(d);
  const bool need_y = a.grad_row_sq != nullptr || !s.pre_norm, need_e = s.pre_norm && a.d_ln_weight != nullptr;

  for (int64_t p = thread(); p < h * cols; p += kThreads) m.acc_down[p] = m.acc_up[p] = 0.0f;
  float d_gamma = 0.0f, d_beta = 0.0f;  // of column c0 + thread()
  for (int64_t r0 = 0; r0 < n_rows; r0 += kColumnRows) {
    const int rows = static_cast<int>(n_rows - r0 < kColumnRows ? n_rows - r0 : kColumnRows);
    for (int64_t p = thread(); p < kColumnRows * h; p += kThreads) {
      const bool valid = p / h < rows;
      m.dh[p] = valid ? w.dh[r0 * h + p] : 0.0f;
      m.act[p] = valid ? w.act[r0 * h + p] : 0.0f;
    }
    if (thread() < rows) {
      const int i = thread();
      m.value(kShift, i) = a.mean[r0 + i];
      m.value(kMeanC, i) = a.mean[n_rows + r0 + i];
      m.value(kRstd, i) = a.rstd[r0 + i];
      m.value(kQ, i) = a.grad_row_sq ? a.grad_row_sq[r0 + i] : 0.0f;
      m.value(kC1, i) = w.c12[(r0 + i) * 2];
      m.value(kC2, i) = w.c12[(r0 + i) * 2 + 1];
    }
    __syncthreads();
    for (int p = thread(); p < kColumnRows * cols; p += kThreads) {
      const int i = p / cols, cc = p % cols;
      const int64_t c = c0 + cc, n = r0 + i;
      float v = 0.0f, g = 0.0f, l = 0.0f, x_hat = 0.0f;
      if (i < rows && cc < width) {
        const float x = load(a.x, n * a.x_stride_row + c * a.x_stride_col);
        const float gamma = load(a.ln_weight, c), beta = load(a.ln_bias, c), r = m.value(kRstd, i);
        float y = 0.0f;
        if (need_y)
          for (int64_t j = 0; j < h; ++j) y += m.act[i * h + j] * load(a.up_weight, c * h + j);
        if (s.pre_norm) {
          x_hat = ((x - m.value(kShift, i)) - m.value(kMeanC, i)) * r;
          v = x_hat * gamma + beta;
        } else {
          x_hat = ((y - m.value(kShift, i)) - m.value(kMeanC, i)) * r;  // û
          y = x_hat * gamma + beta;
          v = x;
        }
        const float factor = ds.factor(row_hash_of(s, n), c);
        const float dy = factor * grad_z(load(a.grad_out, n * a.g_stride_row + c * a.g_stride_col), m.value(kQ, i),
                                         factor * y);
        if (s.pre_norm) {
          g = dy;
          if (need_e)
            for (int64_t j = 0; j < h; ++j) l += m.dh[i * h + j] * load(a.down_weight, j * d + c);
        } else {
          g = r * (dy * gamma - (m.value(kC1, i) + x_hat * m.value(kC2, i)) * inv_d);  // du
          l = dy;
        }
      }
      m.v[p] = v;
      m.g[p] = g;
      m.l[p] = l;
      m.x_hat[p] = x_hat;
    }
    __syncthreads();
    for (int64_t p = thread(); p < h * cols; p += kThreads) {
      const int64_t j = p / cols;
      const int cc = static_cast<int>(p % cols);
      float down = 0.0f, up = 0.0f;
      for (int i = 0; i < rows; ++i) {
        down += m.dh[i * h + j] * m.v[i * cols + cc];
        up += m.g[i * cols + cc] * m.act[i * h + j];
      }
      m.acc_down[p] += down;
      m.acc_up[p] += up;
    }
    if (thread() < cols) {
      for (int i = 0; i < rows; ++i) {
        d_gamma += m.l[i * cols + thread()] * m.x_hat[i * cols + thread()];
        d_beta += m.l[i * cols + thread()];
      }
    }
    __syncthreads();
  }
  for (int64_t p = thread(); p < h * cols; p += kThreads) {
    const int64_t j = p / cols;
    const int cc = static_cast<int>(p % cols);
    if (cc >= width) continue;
    if (a.d_down) a.d_down[j * d + c0 + cc] = m.acc_down[p];
    if (a.d_up) a.d_up[(c0 + cc) * h + j] = m.acc_up[p];
  }
  if (a.d_ln_weight && thread() < width) {
    a.d_ln_weight[c0 + thread()] = d_gamma;
    a.d_ln_bias[c0 + thread()] = d_beta;
  }
}

constexpr int kUnsupported = static_cast<int>(cudaErrorInvalidValue);

}  // namespace

const char* linear_adapter_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

bool linear_adapter_cuda_supports(int64_t h) {
  return RowsShared::bytes(h) <= kSharedLimit && ColumnsShared::columns(h) > 0;
}

int64_t linear_adapter_forward_cuda_workspace(int64_t n, int64_t d, int64_t h) {
  return n >= 1 && n <= kDecodeMaxRows ? linear_adapter_decode_workspace_floats(n, d, h) : 0;
}

template <typename T>
int linear_adapter_forward_cuda(const ForwardArgs<T>& args, float* workspace, void* stream) {
  const AdapterShape& s = args.shape;
  if (s.n == 0) return 0;
  if (!linear_adapter_cuda_supports(s.h)) return kUnsupported;
  if (s.n <= kDecodeMaxRows) return linear_adapter_decode_forward_cuda(args, workspace, stream);
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (major >= 9) {
    const ClusterPlan plan = linear_adapter_cluster_forward_plan<T>(s.d, s.h);
    if (plan.cluster > 0) return linear_adapter_cluster_forward_cuda(args, plan, stream);
  }
  if (s.pre_norm) {
    const int err = launch(&proj_kernel<T>, dim3(static_cast<unsigned>(s.h)), dim3(kThreads),
                           sizeof(float) * kScratch, stream, args);
    if (err != 0) return err;
  }
  const auto blocks = static_cast<unsigned>((s.n + kMaxRows - 1) / kMaxRows);
  return launch(&forward_rows_kernel<T>, dim3(blocks), dim3(kThreads), RowsShared::bytes(s.h), stream, args);
}

int64_t linear_adapter_backward_cuda_workspace(int64_t n, int64_t, int64_t h) { return BackwardWorkspace::floats(n, h); }

template <typename T>
int linear_adapter_backward_cuda(const BackwardArgs<T>& args, float* workspace, void* stream) {
  const AdapterShape& s = args.shape;
  if (!linear_adapter_cuda_supports(s.h)) return kUnsupported;
  if (s.n > 0) {
    const auto blocks = static_cast<unsigned>((s.n + kMaxRows - 1) / kMaxRows);
    const int err = launch(&backward_rows_kernel<T>, dim3(blocks), dim3(kThreads), RowsShared::bytes(s.h), stream,
                           args, workspace);
    if (err != 0) return err;
  }
  if (args.d_down == nullptr && args.d_up == nullptr && args.d_ln_weight == nullptr) return 0;
  const int cols = ColumnsShared::columns(s.h);
  const auto slices = static_cast<unsigned>((s.d + cols - 1) / cols);
  return launch(&backward_columns_kernel<T>, dim3(slices), dim3(kThreads), ColumnsShared::bytes(s.h, cols), stream,
                args, static_cast<const float*>(workspace), cols);
}

#define FA_INSTANTIATE(T)                                                                      \
  template int linear_adapter_forward_cuda<T>(const ForwardArgs<T>&, float*, void*);          \
  template int linear_adapter_backward_cuda<T>(const BackwardArgs<T>&, float*, void*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(Half)
FA_INSTANTIATE(BFloat16)
#undef FA_INSTANTIATE

}  // namespace fa
