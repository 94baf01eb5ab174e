// The single-read CUDA forward for sm_90: a thread-block cluster of C CTAs shares each block of rows.
// linear_adapter_cuda.cu launches it for N > kDecodeMaxRows on devices of compute capability 9 or
// more, when a CTA's share fits in shared memory (linear_adapter_cluster_forward_plan).
//
// Never run on a GPU: CI compiles it for sm_90 and runs it on the CPU simulator (cuda_sim.h). A first
// design: float FMAs, no tensor cores, no TMA; it reads x once and the weights once per cluster, but
// its FMAs, not the memory, will likely bound it (a GPU run will tell).
//
// CTA r of a cluster owns the columns [r W, (r + 1) W) of D (W = ceil(D / C)) and keeps its slices of
// Wd (H × W), Wu (W × H), γ and β in shared memory for the whole launch. The clusters take row blocks
// of kRows rows in turn (persistent). Per row block, every CTA:
//   1. loads its slice of x (kRows × W) into shared memory: x is read from memory once;
//   2. pre norm: the slice's statistics of x - c (c = x[n][0], two exact passes) and the partial
//      products A_r = Σ_slice (x - c) γ Wdᵀ; post norm: A_r = Σ_slice x Wdᵀ;
//   3. cluster barrier; reads every CTA's partials over distributed shared memory and merges them in
//      rank order (the same bits in every CTA): pre norm h = r (A - (μ - c) g) + b, with (g, b) = proj
//      merged the same way once at the start; post norm h = A; a = act(h);
//   4. pre norm: y = a Wuᵀ on its slice; post norm: u = a Wuᵀ on its slice, the slice's statistics of
//      u - c (c = u[n][0], computed alike by every CTA), a cluster barrier, the merged statistics, then
//      y = û γ + β; then the epilogue z = s m y, out = [x +] z on its slice (x from shared memory);
//   5. its partial Σ z², a cluster barrier, and CTA 0 sums them in rank order into row_sq. This
//      barrier also keeps the next block from overwriting partials that a peer still reads.
// Two cluster barriers per block (three for post norm), one after each exchange.
#include "fa_cuda.h"
#include "linear_adapter.h"

namespace fa {
namespace {

// Thread-block clusters exist from sm_90 on: the device code below is compiled there and on the
// simulator, and the kernel is empty elsewhere (the launcher never picks it there).
#if defined(FA_CUDA_SIM) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define FA_CLUSTERS 1
#endif

constexpr int kThreads = 256;
constexpr int kRows = 16;            // rows per block
constexpr int kMaxCluster = 16;      // CTAs per cluster at most (above 8: a non-portable size)
constexpr int kScratch = 36;
constexpr size_t kSharedLimit = 227 * 1024;  // sm_90's opt-in limit per CTA

// Shared memory of a CTA, for H and its slice width W; T arrays first (16-byte aligned pieces).
template <typename T>
struct ClusterShared {
  T *wd, *wu, *xs;                  // H × W, W × H, kRows × W
  float *gamma, *beta;              // W
  float *part, *act;                // kRows × H: partial A (exchanged), a
  float *stats, *u_stats, *sq;      // kRows × 2 (slice mean of v - c, M2; exchanged), kRows (exchanged)
  float *ys;                        // kRows × W: post norm's u
  float *row;                       // 3 × kRows: shift c, μ - c, rstd
  float *proj;                      // 2 × H: (g, b), merged
  float* scratch;

  __host__ __device__ static size_t align(size_t bytes) { return (bytes + 15) / 16 * 16; }
  static size_t bytes(int64_t h, int64_t w) {
    const size_t t = align(sizeof(T) * static_cast<size_t>(h * w)) * 2 + align(sizeof(T) * static_cast<size_t>(kRows * w));
    const size_t f = static_cast<size_t>(2 * w + 2 * kRows * h + 4 * kRows + kRows + kRows * w + 3 * kRows + 2 * h +
                                         kScratch);
    return t + sizeof(float) * f;
  }
  __device__ static ClusterShared carve(unsigned char* base, int64_t h, int64_t w) {
    ClusterShared m;
    m.wd = reinterpret_cast<T*>(base);
    base += align(sizeof(T) * static_cast<size_t>(h * w));
    m.wu = reinterpret_cast<T*>(base);
    base += align(sizeof(T) * static_cast<size_t>(h * w));
    m.xs = reinterpret_cast<T*>(base);
    base += align(sizeof(T) * static_cast<size_t>(kRows * w));
    float* f = reinterpret_cast<float*>(base);
    auto next = [&f](int64_t count) {
      float* piece = f;
      f += count;
      return piece;
    };
    m.gamma = next(w);
    m.beta = next(w);
    m.part = next(kRows * h);
    m.act = next(kRows * h);
    m.stats = next(2 * kRows);
    m.u_stats = next(2 * kRows);
    m.sq = next(kRows);
    m.ys = next(kRows * w);
    m.row = next(3 * kRows);
    m.proj = next(2 * h);
    m.scratch = next(kScratch);
    return m;
  }
};

#if defined(FA_CLUSTERS)
namespace cg = cooperative_groups;
constexpr int kWarps = kThreads / 32;

// Row i's statistics merged over the cluster's slices in rank order (slice r has width count_r).
__device__ RowStats merged_row_stats(const cg::cluster_group& cluster, float* stats, int i, int64_t d, int64_t w) {
  RowStats st{0.0f, 0.0f, 0.0f};
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    const int64_t c0 = r * w < d ? r * w : d, c1 = c0 + w < d ? c0 + w : d;
    const float* peer = cluster.map_shared_rank(stats, r);
    st = merge_stats(st, RowStats{static_cast<float>(c1 - c0), peer[2 * i], peer[2 * i + 1]});
  }
  return st;
}

// The slice's (mean, M2) of v(cc) - shift over cc < width, one warp: exact mean, then M2.
template <typename Value>
__device__ void warp_slice_stats(int64_t width, float shift, float* out, Value value) {
  const int lane = threadIdx.x % 32;
  float sum = 0.0f;
  for (int64_t cc = lane; cc < width; cc += 32) sum += value(cc) - shift;
  const float mean = width > 0 ? warp_sum(sum) / static_cast<float>(width) : 0.0f;
  float m2 = 0.0f;
  for (int64_t cc = lane; cc < width; cc += 32) {
    const float v = (value(cc) - shift) - mean;
    m2 += v * v;
  }
  m2 = warp_sum(m2);
  if (lane == 0) {
    out[0] = mean;
    out[1] = m2;
  }
}

#endif  // FA_CLUSTERS

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) cluster_forward_kernel(ForwardArgs<T> a, int64_t w) {
#if defined(FA_CLUSTERS)
  FA_DYNAMIC_SHARED(unsigned char, base);
  const cg::cluster_group cluster = cg::this_cluster();
  const AdapterShape& s = a.shape;
  const int64_t n_rows = s.n, d = s.d, h = s.h;
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  const int64_t c0 = rank * w < d ? rank * w : d, width = c0 + w < d ? w : d - c0;
  const ClusterShared<T> m = ClusterShared<T>::carve(base, h, w);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tid = threadIdx.x;

  // Once: the weight slices, and (pre norm) proj merged over the slices.
  for (int64_t p = tid; p < h * width; p += kThreads) {
    const int64_t j = p / width, cc = p % width;
    m.wd[j * w + cc] = a.down_weight[j * d + c0 + cc];
    m.wu[cc * h + j] = a.up_weight[(c0 + cc) * h + j];
  }
  for (int64_t cc = tid; cc < width; cc += kThreads) {
    m.gamma[cc] = to_float(a.ln_weight[c0 + cc]);
    m.beta[cc] = to_float(a.ln_bias[c0 + cc]);
  }
  __syncthreads();
  if (s.pre_norm) {
    for (int64_t j = tid; j < h; j += kThreads) {  // partial (g, b) into part, merged below
      float g = 0.0f, b = 0.0f;
      for (int64_t cc = 0; cc < width; ++cc) {
        const float wd = to_float(m.wd[j * w + cc]);
        g += wd * m.gamma[cc];
        b += wd * m.beta[cc];
      }
      m.part[j] = g;
      m.part[h + j] = b;
    }
    cluster.sync();
    for (int64_t j = tid; j < 2 * h; j += kThreads) {
      float sum = 0.0f;
      for (unsigned r = 0; r < size; ++r) sum += cluster.map_shared_rank(m.part, r)[j];
      m.proj[j] = sum;
      if (rank == 0 && blockIdx.x == 0) a.proj[j] = sum;
    }
    cluster.sync();  // every CTA has read the partials before part is written again
  }

  const DropScale ds = make_drop_scale(s.dropout_p, s.scale ? *s.scale : 1.0f);
  const int64_t blocks = (n_rows + kRows - 1) / kRows;
  for (int64_t blk = blockIdx.x / size; blk < blocks; blk += gridDim.x / size) {
    const int64_t r0 = blk * kRows;
    const int rows = static_cast<int>(n_rows - r0 < kRows ? n_rows - r0 : kRows);
    // 1. x's slice, read once.
    for (int64_t p = tid; p < rows * width; p += kThreads) {
      const int64_t i = p / width, cc = p % width;
      m.xs[i * w + cc] = a.x[(r0 + i) * a.x_stride_row + (c0 + cc) * a.x_stride_col];
    }
    if (tid < rows) m.row[tid] = s.pre_norm ? to_float(a.x[(r0 + tid) * a.x_stride_row]) : 0.0f;  // c = x[n][0]
    __syncthreads();
    // 2. the slice's statistics and partial products.
    if (s.pre_norm) {
      for (int i = warp; i < rows; i += kWarps)
        warp_slice_stats(width, m.row[i], m.stats + 2 * i, [&](int64_t cc) { return to_float(m.xs[i * w + cc]); });
    }
    for (int64_t p = tid; p < rows * h; p += kThreads) {
      const int64_t i = p / h, j = p % h;
      const float shift = m.row[i];
      float acc = 0.0f;
      for (int64_t cc = 0; cc < width; ++cc) {
        const float v = to_float(m.xs[i * w + cc]);
        acc += s.pre_norm ? (v - shift) * m.gamma[cc] * to_float(m.wd[j * w + cc]) : v * to_float(m.wd[j * w + cc]);
      }
      m.part[i * h + j] = acc;
    }
    cluster.sync();
    // 3. h and a, the same in every CTA.
    if (s.pre_norm && tid < rows) {
      const RowStats st = merged_row_stats(cluster, m.stats, static_cast<int>(tid), d, w);
      m.row[kRows + tid] = st.mean;
      m.row[2 * kRows + tid] = inv_std(st, s.eps);
    }
    __syncthreads();
    for (int64_t p = tid; p < rows * h; p += kThreads) {
      const int64_t i = p / h, j = p % h;
      float acc = 0.0f;
      for (unsigned r = 0; r < size; ++r) acc += cluster.map_shared_rank(m.part, r)[p];
      float hv = acc;
      if (s.pre_norm) hv = m.row[2 * kRows + i] * (acc - m.row[kRows + i] * m.proj[j]) + m.proj[h + j];
      m.act[p] = activate(s.activation, hv);
      if (rank == 0) a.hidden[(r0 + i) * h + j] = hv;
    }
    __syncthreads();
    // 4. y on the slice (post norm: u, its statistics, û γ + β).
    auto up = [&](int64_t i, int64_t cc) {
      float acc = 0.0f;
      for (int64_t j = 0; j < h; ++j) acc += m.act[i * h + j] * to_float(m.wu[cc * h + j]);
      return acc;
    };
    if (!s.pre_norm) {
      if (tid < rows) {  // c = u[n][0] from Wu's first row in memory: the same bits in every CTA
        float acc = 0.0f;
        for (int64_t j = 0; j < h; ++j) acc += m.act[tid * h + j] * to_float(a.up_weight[j]);
        m.row[tid] = acc;
      }
      for (int64_t p = tid; p < rows * width; p += kThreads) m.ys[(p / width) * w + p % width] = up(p / width, p % width);
      __syncthreads();
      for (int i = warp; i < rows; i += kWarps)
        warp_slice_stats(width, m.row[i], m.u_stats + 2 * i, [&](int64_t cc) { return m.ys[i * w + cc]; });
      cluster.sync();
      if (tid < rows) {
        const RowStats st = merged_row_stats(cluster, m.u_stats, static_cast<int>(tid), d, w);
        m.row[kRows + tid] = st.mean;
        m.row[2 * kRows + tid] = inv_std(st, s.eps);
      }
      __syncthreads();
    }
    if (rank == 0 && tid < rows) {
      a.mean[r0 + tid] = m.row[tid];
      a.mean[n_rows + r0 + tid] = m.row[kRows + tid];
      a.rstd[r0 + tid] = m.row[2 * kRows + tid];
    }
    for (int i = warp; i < rows; i += kWarps) {  // the epilogue, one warp per row
      const uint32_t row_hash = ds.has_dropout ? dropout_row_hash(*s.seed, r0 + i) : 0u;
      float sq = 0.0f;
      for (int64_t cc = lane; cc < width; cc += 32) {
        float y;
        if (s.pre_norm) {
          y = up(i, cc);
        } else {
          y = ((m.ys[i * w + cc] - m.row[i]) - m.row[kRows + i]) * m.row[2 * kRows + i] * m.gamma[cc] + m.beta[cc];
        }
        const float z = y * ds.factor(row_hash, c0 + cc);
        sq += z * z;
        a.out[(r0 + i) * d + c0 + cc] = from_float<T>(output_value(to_float(m.xs[i * w + cc]), z, s.residual));
      }
      sq = warp_sum(sq);
      if (lane == 0) m.sq[i] = sq;
    }
    // 5. row_sq in rank order. This barrier also keeps every CTA from writing the next block's partials
    // (step 2) before its peers have read this block's (step 3); CTA 0 reads the sums before it reaches
    // the next block's first barrier, which its peers pass before they write sums again.
    cluster.sync();
    if (a.row_sq != nullptr && rank == 0 && tid < rows) {
      float total = 0.0f;
      for (unsigned r = 0; r < size; ++r) total += cluster.map_shared_rank(m.sq, r)[tid];
      a.row_sq[r0 + tid] = total;
    }
  }
#else
  (void)a;
  (void)w;
#endif
}

}  // namespace

template <typename T>
ClusterPlan linear_adapter_cluster_forward_plan(int64_t d, int64_t h) {
  for (int cluster = 2; cluster <= kMaxCluster; cluster *= 2) {
    const int64_t w = (d + cluster - 1) / cluster;
    const size_t bytes = ClusterShared<T>::bytes(h, w);
    if (bytes <= kSharedLimit) return ClusterPlan{cluster, w, bytes};
  }
  return ClusterPlan{0, 0, 0};
}

template <typename T>
int linear_adapter_cluster_forward_cuda(const ForwardArgs<T>& args, const ClusterPlan& plan, void* stream) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks = (args.shape.n + kRows - 1) / kRows;
  int64_t clusters = sms / plan.cluster > 0 ? sms / plan.cluster : 1;
  clusters = clusters < blocks ? clusters : blocks;
  return launch_cluster(&cluster_forward_kernel<T>, dim3(static_cast<unsigned>(clusters * plan.cluster)),
                        dim3(kThreads), plan.shared_bytes, stream, plan.cluster, args, plan.width);
}

#define FA_INSTANTIATE(T)                                                                          \
  template ClusterPlan linear_adapter_cluster_forward_plan<T>(int64_t, int64_t);                  \
  template int linear_adapter_cluster_forward_cuda<T>(const ForwardArgs<T>&, const ClusterPlan&, void*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(Half)
FA_INSTANTIATE(BFloat16)
#undef FA_INSTANTIATE

}  // namespace fa
