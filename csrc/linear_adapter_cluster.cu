// The single-read CUDA forward for sm_90: a thread-block cluster of C CTAs shares each block of rows.
// linear_adapter_cuda.cu launches it for N > kDecodeMaxRows on devices of compute capability 9 or
// more, when a CTA's share fits in shared memory (linear_adapter_cluster_forward_plan).
//
// Never run on a GPU: CI compiles it for sm_90 and runs it on the CPU simulator (cuda_sim.h). It reads
// x once and the weights once per cluster. For 16-bit types both projections run on the tensor cores
// (WarpTile: bf16/fp16 operands, float sums), as the Triton kernels' dots do; float32 uses float FMAs.
// No TMA yet: x moves through registers.
//
// CTA r of a cluster owns the columns [r W, (r + 1) W) of D (W = ceil(D / C), for the tensor cores
// rounded up to a multiple of 16) and keeps its slices of Wd (H × W), Wu (W × H), γ and β in shared
// memory for the whole launch; for the tensor cores, W and H are padded to multiples of 16 with zeros, and for pre norm the Wd slice holds Wg = Wd ∘ γ rounded to
// T. The clusters take row blocks of kRows rows in turn (persistent). Per row block, every CTA:
//   1. loads its slice of x (kRows × W) into shared memory: x is read from memory once. In 16 bits,
//      with aligned rows and D a multiple of 8, in 16-byte chunks, and the next block's chunks are
//      loaded into registers while this block computes (cluster_forward_vectorized);
//   2. pre norm: the slice's statistics of x - c (c = x[n][0], two exact passes: mean m_r, M2) and
//      the partial products A_r = Σ_slice (x - c) γ Wdᵀ (tensor cores: T(x - c - m_r) Wgᵀ + m_r G_r,
//      the operand centred on the slice's mean so that its rounding stays small, G_r = Σ_slice Wg);
//      post norm: A_r = Σ_slice x Wdᵀ;
//   3. cluster barrier; reads every CTA's partials over distributed shared memory and merges them in
//      rank order (the same bits in every CTA): pre norm h = r (A - (μ - c) G) + b, with (g, b) = proj
//      and G (= g for float) merged the same way once at the start; post norm h = A; a = act(h),
//      rounded to T (round_to: the backward takes the same a);
//   4. the up-projection of its slice, a Wuᵀ (tensor cores: T(a) Wuᵀ); post norm: u, the slice's
//      statistics of u - c (c = u[n][0] in float, computed alike by every CTA), a cluster barrier, the
//      merged statistics, then y = û γ + β; then the epilogue z = s m y, out = [x +] z on its slice
//      (x from shared memory);
//   5. its partial Σ z², a cluster barrier, and CTA 0 sums them in rank order into row_sq. This
//      barrier also keeps the next block from overwriting partials that a peer still reads.
// Two cluster barriers per block (three for post norm), one after each exchange.
#include <type_traits>

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
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;            // rows per block: one tensor-core tile
constexpr int kTile = 16;            // the tensor cores' tile edge
constexpr int kMaxCluster = 16;      // CTAs per cluster at most (above 8: a non-portable size)
constexpr int kScratch = 36;
constexpr int kVector = 8;           // 16-bit elements per 16-byte access
constexpr int kMaxChunks = 8;        // 16-byte chunks of a row block's x slice per thread (W <= 1024)
constexpr size_t kSharedLimit = 227 * 1024;  // sm_90's opt-in limit per CTA

template <typename T>
constexpr bool kTensorCores = !std::is_same<T, float>::value;

// Shared memory of a CTA, for H and its slice width W. Rows of the W-long pieces are ldw apart and
// rows of the H-long ones ldh apart (W and H padded to tiles for the tensor cores); every piece starts
// 32-byte aligned.
template <typename T>
struct ClusterShared {
  int64_t ldw, ldh;
  T *wd, *wu, *xs;                  // H × W (Wg for pre norm on the tensor cores), W × H, kRows × W
  T *xa, *act_t;                    // tensor cores: kRows × W (T(x - c), pre norm), kRows × H (T(a))
  float *gamma, *beta;              // W
  float *part, *act;                // kRows × H: partial A (exchanged), a
  float *stats, *u_stats, *sq;      // kRows × 2 (slice mean of v - c, M2; exchanged), kRows (exchanged)
  float *ys;                        // kRows × W: the up-projection
  float *row;                       // 3 × kRows: shift c, μ - c, rstd
  float *proj;                      // 3 × H: (g, b, G), merged (G = Σ Wg as rounded to T; g for float)
  float *g_slice;                   // H: the slice's share of G
  float *tiles;                     // tensor cores: kWarps 16 × 16 tiles of partial sums
  float* scratch;

  __host__ __device__ static int64_t padded(int64_t v) {
    const int64_t to = kTensorCores<T> ? kTile : 1;
    return (v + to - 1) / to * to;
  }
  template <typename U>
  __host__ __device__ static U* take(uintptr_t base, size_t& offset, int64_t count) {
    offset = (offset + 31) / 32 * 32;
    U* piece = reinterpret_cast<U*>(base + offset);
    offset += sizeof(U) * static_cast<size_t>(count);
    return piece;
  }
  // Lays the pieces out from `base`; returns the bytes they take.
  __host__ __device__ size_t layout(uintptr_t base, int64_t h, int64_t w) {
    ldw = padded(w);
    ldh = padded(h);
    const int64_t tc = kTensorCores<T> ? 1 : 0;
    size_t offset = 0;
    wd = take<T>(base, offset, ldh * ldw);
    wu = take<T>(base, offset, ldw * ldh);
    xs = take<T>(base, offset, kRows * ldw);
    xa = take<T>(base, offset, tc * kRows * ldw);
    act_t = take<T>(base, offset, tc * kRows * ldh);
    gamma = take<float>(base, offset, w);
    beta = take<float>(base, offset, w);
    part = take<float>(base, offset, kRows * ldh);
    act = take<float>(base, offset, kRows * ldh);
    stats = take<float>(base, offset, 2 * kRows);
    u_stats = take<float>(base, offset, 2 * kRows);
    sq = take<float>(base, offset, kRows);
    ys = take<float>(base, offset, kRows * ldw);
    row = take<float>(base, offset, 3 * kRows);
    proj = take<float>(base, offset, 3 * h);
    g_slice = take<float>(base, offset, h);
    tiles = take<float>(base, offset, tc * kWarps * kTile * kTile);
    scratch = take<float>(base, offset, kScratch);
    return offset;
  }
  static size_t bytes(int64_t h, int64_t w) {
    ClusterShared m;
    return m.layout(0, h, w);
  }
};

#if defined(FA_CLUSTERS)
namespace cg = cooperative_groups;

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

// part (kRows × H, rows ldh apart) = A Bᵀ on the tensor cores, A kRows × K (rows lda apart) and
// B H × K (rows ldb apart), K a multiple of kTile: each warp owns one output tile and a fixed share
// of K (every warp busy when H has fewer tiles than there are warps); the shares are added in a
// fixed order, so the result does not depend on timing. Ends with the CTA's barrier.
template <typename T>
__device__ void tile_products(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t k, int64_t ldh, float* part,
                              float* tiles) {
  const int warp = threadIdx.x / 32;
  const int64_t out_tiles = ldh / kTile, steps = k / kTile;
  const int64_t split = out_tiles < kWarps ? kWarps / out_tiles : 1;
  for (int64_t item = warp; item < out_tiles * split; item += kWarps) {
    const int64_t t = item % out_tiles, share = item / out_tiles;
    WarpTile<T> tile;
    tile.zero();
    for (int64_t step = share; step < steps; step += split)
      tile.multiply_add(a + step * kTile, lda, b + t * kTile * ldb + step * kTile, ldb);
    if (split == 1) {
      tile.store(part + t * kTile, ldh);
    } else {
      tile.store(tiles + item * kTile * kTile, kTile);
    }
  }
  __syncthreads();
  if (split > 1) {
    for (int64_t p = threadIdx.x; p < kRows * ldh; p += kThreads) {
      const int64_t i = p / ldh, j = p % ldh, t = j / kTile;
      float sum = 0.0f;
      for (int64_t share = 0; share < split; ++share) sum += tiles[(share * out_tiles + t) * kTile * kTile + i * kTile + j % kTile];
      part[p] = sum;
    }
    __syncthreads();
  }
}

#endif  // FA_CLUSTERS

// The 16-byte path for x and out (16-bit T): rows 16-byte aligned with unit column stride, D a
// multiple of kVector (so every slice, W a multiple of 16, ends on a whole chunk), W <= 1024.
template <typename T>
bool cluster_forward_vectorized(const ForwardArgs<T>& a, int64_t w) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(Vec16) == 0; };
  return kTensorCores<T> && a.x_stride_col == 1 && a.x_stride_row % kVector == 0 && a.shape.d % kVector == 0 &&
         aligned(a.x) && aligned(a.out) && w <= static_cast<int64_t>(kThreads) * kMaxChunks * kVector / kRows;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) cluster_forward_kernel(ForwardArgs<T> a, int64_t w, bool vectorized) {
#if defined(FA_CLUSTERS)
  constexpr bool tc = kTensorCores<T>;
  FA_DYNAMIC_SHARED(unsigned char, base);
  const cg::cluster_group cluster = cg::this_cluster();
  const AdapterShape& s = a.shape;
  const int64_t n_rows = s.n, d = s.d, h = s.h;
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  const int64_t c0 = rank * w < d ? rank * w : d, width = c0 + w < d ? w : d - c0;
  ClusterShared<T> m;
  m.layout(reinterpret_cast<uintptr_t>(base), h, w);
  const int64_t ldw = m.ldw, ldh = m.ldh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tid = threadIdx.x;
  const T zero = from_float<T>(0.0f);

  // Once: the weight slices (zero-padded), and (pre norm) proj merged over the slices.
  for (int64_t cc = tid; cc < width; cc += kThreads) {
    m.gamma[cc] = to_float(a.ln_weight[c0 + cc]);
    m.beta[cc] = to_float(a.ln_bias[c0 + cc]);
  }
  for (int64_t p = tid; p < ldh * ldw; p += kThreads) {
    const int64_t j = p / ldw, cc = p % ldw;
    T wd = zero;
    if (j < h && cc < width) {
      wd = a.down_weight[j * d + c0 + cc];
      if (tc && s.pre_norm) wd = from_float<T>(to_float(wd) * to_float(a.ln_weight[c0 + cc]));  // Wg
    }
    m.wd[p] = wd;
  }
  for (int64_t p = tid; p < ldw * ldh; p += kThreads) {
    const int64_t cc = p / ldh, j = p % ldh;
    m.wu[p] = cc < width && j < h ? a.up_weight[(c0 + cc) * h + j] : zero;
  }
  __syncthreads();
  if (s.pre_norm) {
    for (int64_t j = tid; j < h; j += kThreads) {  // partial (g, b, G) into part, merged below
      float g = 0.0f, b = 0.0f, g_operand = 0.0f;
      for (int64_t cc = 0; cc < width; ++cc) {
        const float wd = to_float(a.down_weight[j * d + c0 + cc]);
        g += wd * m.gamma[cc];
        b += wd * m.beta[cc];
        g_operand += tc ? to_float(m.wd[j * ldw + cc]) : wd * m.gamma[cc];
      }
      m.part[j] = g;
      m.part[h + j] = b;
      m.part[2 * h + j] = m.g_slice[j] = g_operand;
    }
    cluster.sync();
    for (int64_t j = tid; j < 3 * h; j += kThreads) {
      float sum = 0.0f;
      for (unsigned r = 0; r < size; ++r) sum += cluster.map_shared_rank(m.part, r)[j];
      m.proj[j] = sum;
      if (rank == 0 && blockIdx.x == 0 && j < 2 * h) a.proj[j] = sum;  // (g, b) unrounded: the backward's
    }
    cluster.sync();  // every CTA has read the partials before part is written again
  }

  const DropScale ds = make_drop_scale(s.dropout_p, s.scale ? *s.scale : 1.0f);
  const int64_t blocks = (n_rows + kRows - 1) / kRows, stride = gridDim.x / size;
  vectorized = tc && vectorized;
  // The 16-byte path holds the next block's x slice in registers, loaded while this block computes.
  const int64_t chunks_per_row = ldw / kVector;
  Vec16 staged[kMaxChunks];
  auto fetch = [&](int64_t blk) {
    const int64_t r0 = blk * kRows;
    FA_UNROLL for (int k = 0; k < kMaxChunks; ++k) {
      const int64_t q = tid + static_cast<int64_t>(k) * kThreads;
      const int64_t i = q / chunks_per_row, cc = q % chunks_per_row * kVector;
      staged[k] = Vec16{{0u, 0u, 0u, 0u}};
      if (blk < blocks && i < kRows && r0 + i < n_rows && cc < width)
        staged[k] = load16(a.x + (r0 + i) * a.x_stride_row + c0 + cc);
    }
  };
  if (vectorized) fetch(blockIdx.x / size);
  for (int64_t blk = blockIdx.x / size; blk < blocks; blk += stride) {
    const int64_t r0 = blk * kRows;
    const int rows = static_cast<int>(n_rows - r0 < kRows ? n_rows - r0 : kRows);
    // 1. x's slice, read once (zeros past the rows and the slice: the tensor cores' padding).
    if (vectorized) {
      FA_UNROLL for (int k = 0; k < kMaxChunks; ++k) {
        const int64_t q = tid + static_cast<int64_t>(k) * kThreads;
        if (q < kRows * chunks_per_row) store16(m.xs + q * kVector, staged[k]);
      }
      fetch(blk + stride);
    } else {
      for (int64_t p = tid; p < kRows * ldw; p += kThreads) {
        const int64_t i = p / ldw, cc = p % ldw;
        m.xs[p] = i < rows && cc < width ? a.x[(r0 + i) * a.x_stride_row + (c0 + cc) * a.x_stride_col] : zero;
      }
    }
    if (tid < rows) m.row[tid] = s.pre_norm ? to_float(a.x[(r0 + tid) * a.x_stride_row]) : 0.0f;  // c = x[n][0]
    __syncthreads();
    // 2. the slice's statistics and partial products.
    if (s.pre_norm) {
      for (int i = warp; i < rows; i += kWarps)
        warp_slice_stats(width, m.row[i], m.stats + 2 * i, [&](int64_t cc) { return to_float(m.xs[i * ldw + cc]); });
    }
    if constexpr (tc) {
      if (s.pre_norm) {  // the operand x - c - m_r, centred on the slice's mean c + m_r: small to round
        __syncthreads();
        for (int64_t p = tid; p < kRows * ldw; p += kThreads) {
          const int64_t i = p / ldw, cc = p % ldw;
          const bool in = i < rows && cc < width;
          m.xa[p] = in ? from_float<T>((to_float(m.xs[p]) - m.row[i]) - m.stats[2 * i]) : zero;
        }
        __syncthreads();
      }
      tile_products(s.pre_norm ? m.xa : m.xs, ldw, m.wd, ldw, ldw, ldh, m.part, m.tiles);
      if (s.pre_norm) {  // A_r = Σ_slice (x - c) Wg: add back m_r G_r
        for (int64_t p = tid; p < rows * ldh; p += kThreads) {
          const int64_t i = p / ldh, j = p % ldh;
          if (j < h) m.part[p] += m.stats[2 * i] * m.g_slice[j];
        }
      }
    } else {
      for (int64_t p = tid; p < rows * h; p += kThreads) {
        const int64_t i = p / h, j = p % h;
        const float shift = m.row[i];
        float acc = 0.0f;
        for (int64_t cc = 0; cc < width; ++cc) {
          const float v = to_float(m.xs[i * ldw + cc]), wd = to_float(m.wd[j * ldw + cc]);
          acc += s.pre_norm ? (v - shift) * m.gamma[cc] * wd : v * wd;
        }
        m.part[i * ldh + j] = acc;
      }
    }
    cluster.sync();
    // 3. h and a, the same in every CTA.
    if (s.pre_norm && tid < rows) {
      const RowStats st = merged_row_stats(cluster, m.stats, static_cast<int>(tid), d, w);
      m.row[kRows + tid] = st.mean;
      m.row[2 * kRows + tid] = inv_std(st, s.eps);
    }
    __syncthreads();
    for (int64_t p = tid; p < kRows * ldh; p += kThreads) {
      const int64_t i = p / ldh, j = p % ldh;
      float av = 0.0f;
      if (i < rows && j < h) {
        float acc = 0.0f;
        for (unsigned r = 0; r < size; ++r) acc += cluster.map_shared_rank(m.part, r)[p];
        float hv = acc;
        if (s.pre_norm) hv = m.row[2 * kRows + i] * (acc - m.row[kRows + i] * m.proj[2 * h + j]) + m.proj[h + j];
        av = activate(s.activation, hv);
        if (rank == 0) a.hidden[(r0 + i) * h + j] = hv;
      }
      m.act[p] = round_to<T>(av);
      if constexpr (tc) m.act_t[p] = from_float<T>(av);
    }
    __syncthreads();
    // 4. the up-projection of the slice into ys (pre norm: y; post norm: u, then its statistics).
    if constexpr (tc) {
      for (int64_t t = warp; t < ldw / kTile; t += kWarps) {
        WarpTile<T> tile;
        tile.zero();
        for (int64_t step = 0; step < ldh / kTile; ++step)
          tile.multiply_add(m.act_t + step * kTile, ldh, m.wu + t * kTile * ldh + step * kTile, ldh);
        tile.store(m.ys + t * kTile, ldw);
      }
    } else {
      for (int64_t p = tid; p < rows * width; p += kThreads) {
        const int64_t i = p / width, cc = p % width;
        float acc = 0.0f;
        for (int64_t j = 0; j < h; ++j) acc += m.act[i * ldh + j] * to_float(m.wu[cc * ldh + j]);
        m.ys[i * ldw + cc] = acc;
      }
    }
    if (!s.pre_norm && tid < rows) {  // c = u[n][0] from Wu's first row in memory: the same bits in every CTA
      float acc = 0.0f;
      for (int64_t j = 0; j < h; ++j) acc += m.act[tid * ldh + j] * to_float(a.up_weight[j]);
      m.row[tid] = acc;
    }
    __syncthreads();
    if (!s.pre_norm) {
      for (int i = warp; i < rows; i += kWarps)
        warp_slice_stats(width, m.row[i], m.u_stats + 2 * i, [&](int64_t cc) { return m.ys[i * ldw + cc]; });
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
      auto out_value = [&](int64_t cc, float& sq) {
        float y = m.ys[i * ldw + cc];
        if (!s.pre_norm) y = ((y - m.row[i]) - m.row[kRows + i]) * m.row[2 * kRows + i] * m.gamma[cc] + m.beta[cc];
        const float z = y * ds.factor(row_hash, c0 + cc);
        sq += z * z;
        return from_float<T>(output_value(to_float(m.xs[i * ldw + cc]), z, s.residual));
      };
      float sq = 0.0f;
      if (vectorized) {  // kVector columns per lane, one 16-byte store
        for (int64_t cc = lane * kVector; cc < width; cc += 32 * kVector) {
          T chunk[kVector];
          FA_UNROLL for (int e = 0; e < kVector; ++e) chunk[e] = out_value(cc + e, sq);
          Vec16 bits;
          memcpy(&bits, chunk, sizeof(bits));
          store16(a.out + (r0 + i) * d + c0 + cc, bits);
        }
      } else {
        for (int64_t cc = lane; cc < width; cc += 32) a.out[(r0 + i) * d + c0 + cc] = out_value(cc, sq);
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
  (void)vectorized;
#endif
}

}  // namespace

template <typename T>
ClusterPlan linear_adapter_cluster_forward_plan(int64_t d, int64_t h) {
  for (int cluster = 2; cluster <= kMaxCluster; cluster *= 2) {
    const int64_t w = ClusterShared<T>::padded((d + cluster - 1) / cluster);
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
                        dim3(kThreads), plan.shared_bytes, stream, plan.cluster, args, plan.width,
                        cluster_forward_vectorized(args, plan.width));
}

#define FA_INSTANTIATE(T)                                                                          \
  template ClusterPlan linear_adapter_cluster_forward_plan<T>(int64_t, int64_t);                  \
  template int linear_adapter_cluster_forward_cuda<T>(const ForwardArgs<T>&, const ClusterPlan&, void*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(Half)
FA_INSTANTIATE(BFloat16)
#undef FA_INSTANTIATE

}  // namespace fa
