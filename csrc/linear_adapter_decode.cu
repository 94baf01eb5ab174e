// CUDA decode forward of the fused adapter: N <= kDecodeMaxRows rows in one cooperative launch that
// spreads D over every CTA (a row-block design would leave the GPU idle at N = 1..64).
//
// Never run on a GPU: CI compiles it for sm_80 and sm_90 and runs it on the CPU simulator (cuda_sim.h);
// linear_adapter_cuda.cu launches it for N <= kDecodeMaxRows.
//
// Each CTA owns a slice of D. Phases, separated by grid-wide barriers (cooperative groups):
//   1. per row n and slice s: pre norm: the slice's statistics of x - c (c = x[n][0]) and the partial
//      products A = Σ (x - c)(Wd∘γ)ᵀ, g = Σ Wd γ, b = Σ Wd β; post norm: A = Σ x Wdᵀ;
//   2. the partials summed in slice order (deterministic): pre norm h = r (A - (μ - c) g) + b with the
//      statistics merged as in fa_math.h; post norm h = A; a = act(h);
//   3. pre norm: y = a Wuᵀ on the slice, then the epilogue; post norm: the slice's statistics of
//      u - c (c = u[n][0], which every CTA computes the same way), a barrier, then û γ + β and the
//      epilogue; with row_sq, a last barrier and CTA 0 sums the slices' Σ z² in slice order.
#include "fa_cuda.h"
#include "linear_adapter.h"

namespace fa {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Workspace of floats, sliced per CTA: partial products, statistics, g and b, activations, row_sq.
struct DecodeWorkspace {
  float* partial;   // S × N × H
  float* stats;     // S × N × 3 (count, mean, M2)
  float* proj;      // S × 2 × H (partial g, b)
  float* act;       // N × H
  float* row_sq;    // S × N

  __host__ __device__ static int64_t floats(int64_t slices, int64_t n, int64_t h) {
    return slices * n * h + slices * n * 3 + slices * 2 * h + n * h + slices * n;
  }
  __host__ __device__ static DecodeWorkspace carve(float* base, int64_t slices, int64_t n, int64_t h) {
    DecodeWorkspace w;
    w.partial = base;
    w.stats = w.partial + slices * n * h;
    w.proj = w.stats + slices * n * 3;
    w.act = w.proj + slices * 2 * h;
    w.row_sq = w.act + n * h;
    return w;
  }
};

// Statistics of v(d) - shift over [d0, d1), one warp: exact mean, then M2 (fa_math.h's part_stats,
// spread over the lanes).
template <typename Load>
__device__ RowStats warp_stats(int64_t d0, int64_t d1, float shift, Load load) {
  const int lane = threadIdx.x % 32;
  float sum = 0.0f;
  for (int64_t d = d0 + lane; d < d1; d += 32) sum += load(d) - shift;
  const float count = static_cast<float>(d1 - d0);
  const float mean = count > 0.0f ? warp_sum(sum) / count : 0.0f;
  float m2 = 0.0f;
  for (int64_t d = d0 + lane; d < d1; d += 32) {
    const float c = (load(d) - shift) - mean;
    m2 += c * c;
  }
  RowStats s;
  s.count = count;
  s.mean = mean;
  s.m2 = warp_sum(m2);
  return s;
}

// A D slice's statistics of row n, written by lane 0 (``stats``: (slices, n_rows, 3) of count, mean, M2).
__device__ void store_slice_stats(float* stats, int64_t slice, int64_t n_rows, int64_t n, const RowStats& st) {
  float* out = stats + (slice * n_rows + n) * 3;
  out[0] = st.count;
  out[1] = st.mean;
  out[2] = st.m2;
}

// Row n's statistics over the whole row: the slices' merged in slice order.
__device__ RowStats merged_stats(const float* stats, int64_t slices, int64_t n_rows, int64_t n) {
  RowStats st{0.0f, 0.0f, 0.0f};
  for (int64_t t = 0; t < slices; ++t) {
    const float* part = stats + (t * n_rows + n) * 3;
    st = merge_stats(st, RowStats{part[0], part[1], part[2]});
  }
  return st;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_forward_kernel(ForwardArgs<T> a, float* workspace) {
  cg::grid_group grid = cg::this_grid();
  const AdapterShape& s = a.shape;
  const int64_t n_rows = s.n, d = s.d, h = s.h, slices = gridDim.x;
  const int64_t slice = blockIdx.x, width = (d + slices - 1) / slices;
  const int64_t d0 = slice * width < d ? slice * width : d, d1 = d0 + width < d ? d0 + width : d;
  const DecodeWorkspace w = DecodeWorkspace::carve(workspace, slices, n_rows, h);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto x_at = [&](int64_t n, int64_t c) { return to_float(a.x[n * a.x_stride_row + c * a.x_stride_col]); };

  // 1. Partials of this slice.
  for (int64_t p = threadIdx.x; p < n_rows * h; p += kThreads) {
    const int64_t n = p / h, j = p % h;
    const float shift = s.pre_norm ? x_at(n, 0) : 0.0f;
    float acc = 0.0f;
    for (int64_t c = d0; c < d1; ++c) {
      const float wd = to_float(a.down_weight[j * d + c]);
      acc += (x_at(n, c) - shift) * (s.pre_norm ? wd * to_float(a.ln_weight[c]) : wd);
    }
    w.partial[(slice * n_rows + n) * h + j] = acc;
  }
  if (s.pre_norm) {
    for (int64_t j = threadIdx.x; j < h; j += kThreads) {
      float g = 0.0f, b = 0.0f;
      for (int64_t c = d0; c < d1; ++c) {
        const float wd = to_float(a.down_weight[j * d + c]);
        g += wd * to_float(a.ln_weight[c]);
        b += wd * to_float(a.ln_bias[c]);
      }
      w.proj[(slice * 2) * h + j] = g;
      w.proj[(slice * 2 + 1) * h + j] = b;
    }
    for (int64_t n = warp; n < n_rows; n += kWarps) {
      const RowStats st = warp_stats(d0, d1, x_at(n, 0), [&](int64_t c) { return x_at(n, c); });
      if (lane == 0) store_slice_stats(w.stats, slice, n_rows, n, st);
    }
  }
  grid.sync();

  // 2. h and a = act(h), each (n, j) by one thread of the grid; partials summed in slice order.
  for (int64_t p = blockIdx.x * kThreads + threadIdx.x; p < n_rows * h; p += slices * kThreads) {
    const int64_t n = p / h, j = p % h;
    float acc = 0.0f;
    for (int64_t t = 0; t < slices; ++t) acc += w.partial[(t * n_rows + n) * h + j];
    float hv = acc;
    if (s.pre_norm) {
      const RowStats st = merged_stats(w.stats, slices, n_rows, n);
      float g = 0.0f, b = 0.0f;
      for (int64_t t = 0; t < slices; ++t) {
        g += w.proj[(t * 2) * h + j];
        b += w.proj[(t * 2 + 1) * h + j];
      }
      const float r = inv_std(st, s.eps);
      hv = r * (acc - st.mean * g) + b;
      if (j == 0) {
        a.mean[n] = x_at(n, 0);
        a.mean[n_rows + n] = st.mean;
        a.rstd[n] = r;
      }
      if (n == 0) {
        a.proj[j] = g;
        a.proj[h + j] = b;
      }
    }
    a.hidden[n * h + j] = hv;
    w.act[n * h + j] = round_to<T>(activate(s.activation, hv));
  }
  grid.sync();

  const DropScale ds = make_drop_scale(s.dropout_p, s.scale ? *s.scale : 1.0f);
  auto u_at = [&](int64_t n, int64_t c) {  // (a Wuᵀ)[n][c]
    float acc = 0.0f;
    for (int64_t j = 0; j < h; ++j) acc += w.act[n * h + j] * to_float(a.up_weight[c * h + j]);
    return acc;
  };

  // 3. Post norm: statistics of u - c on the slice, then a barrier.
  if (!s.pre_norm) {
    for (int64_t n = warp; n < n_rows; n += kWarps) {
      const RowStats st = warp_stats(d0, d1, u_at(n, 0), [&](int64_t c) { return u_at(n, c); });
      if (lane == 0) store_slice_stats(w.stats, slice, n_rows, n, st);
    }
    grid.sync();
  }

  // The epilogue on the slice, one warp per row: z = s m y, out = [x +] z, Σ z² of the slice.
  for (int64_t n = warp; n < n_rows; n += kWarps) {
    float shift = 0.0f, mean_c = 0.0f, r = 0.0f;
    if (!s.pre_norm) {
      const RowStats st = merged_stats(w.stats, slices, n_rows, n);
      shift = u_at(n, 0);
      mean_c = st.mean;
      r = inv_std(st, s.eps);
      if (slice == 0 && lane == 0) {
        a.mean[n] = shift;
        a.mean[n_rows + n] = mean_c;
        a.rstd[n] = r;
      }
    }
    const uint32_t row_hash = ds.has_dropout ? dropout_row_hash(*s.seed, n) : 0u;
    float sq = 0.0f;
    for (int64_t c = d0 + lane; c < d1; c += 32) {
      float y = u_at(n, c);
      if (!s.pre_norm) y = ((y - shift) - mean_c) * r * to_float(a.ln_weight[c]) + to_float(a.ln_bias[c]);
      const float z = y * ds.factor(row_hash, c);
      sq += z * z;
      a.out[n * d + c] = from_float<T>(output_value(x_at(n, c), z, s.residual));
    }
    sq = warp_sum(sq);
    if (lane == 0) w.row_sq[slice * n_rows + n] = sq;
  }
  if (a.row_sq == nullptr) return;
  grid.sync();
  if (blockIdx.x == 0) {
    for (int64_t n = threadIdx.x; n < n_rows; n += kThreads) {
      float sq = 0.0f;
      for (int64_t t = 0; t < slices; ++t) sq += w.row_sq[t * n_rows + n];
      a.row_sq[n] = sq;
    }
  }
}

// CTAs of the launch: all must be resident at once (a cooperative launch), and each owns at least
// one column. The same for every storage type, so that one workspace size serves them all.
int decode_slices(int64_t d) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const void* kernels[] = {reinterpret_cast<const void*>(&decode_forward_kernel<float>),
                           reinterpret_cast<const void*>(&decode_forward_kernel<Half>),
                           reinterpret_cast<const void*>(&decode_forward_kernel<BFloat16>)};
  int per_sm = 1 << 30;
  for (const void* kernel : kernels) {
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0);
    per_sm = blocks < per_sm ? blocks : per_sm;
  }
  const int64_t co_resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  return static_cast<int>(d < co_resident ? d : co_resident);
}

}  // namespace

int64_t linear_adapter_decode_workspace_floats(int64_t n, int64_t d, int64_t h) {
  return DecodeWorkspace::floats(decode_slices(d), n, h);
}

template <typename T>
int linear_adapter_decode_forward_cuda(const ForwardArgs<T>& args, float* workspace, void* stream) {
  if (args.shape.n < 1 || args.shape.n > kDecodeMaxRows) return static_cast<int>(cudaErrorInvalidValue);
  return launch_cooperative(&decode_forward_kernel<T>, dim3(decode_slices(args.shape.d)), dim3(kThreads), 0, stream,
                            args, workspace);
}

template int linear_adapter_decode_forward_cuda<float>(const ForwardArgs<float>&, float*, void*);
template int linear_adapter_decode_forward_cuda<Half>(const ForwardArgs<Half>&, float*, void*);
template int linear_adapter_decode_forward_cuda<BFloat16>(const ForwardArgs<BFloat16>&, float*, void*);

}  // namespace fa
