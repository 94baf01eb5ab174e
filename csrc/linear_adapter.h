// Kernel interface of the fused bottleneck adapter (torch-free: plain pointers, sizes, strides).
//
// Notation as in fusedadapters/ops/reference.py: x is N×D (row stride, column stride), Wd is H×D,
// Wu is D×H, gamma/beta the LayerNorm weight and bias (D); weights are contiguous. T is the storage
// type of x, out, dout, dx and the weights (float, Half or BFloat16); everything else is float.
//
//   pre norm:  y = act(LN(x) Wdᵀ) Wuᵀ          post norm:  y = LN(act(x Wdᵀ) Wuᵀ)
//   z = s m y,  out = [x +] z,  row_sq = Σ_d z²   (m: the dropout multiplier, s: the scale)
//
// Saved for backward (float): hidden h (N×H, before the activation), mean (2×N: a shift c and μ - c,
// so that v - μ = (v - c) - (μ - c)), rstd (N: of x for pre norm, of u = a Wuᵀ for post norm), and
// for pre norm proj (2×H) = (Wd γ, Wd β).
#pragma once

#include <cstdint>
#include <functional>

#include "fa_math.h"

namespace fa {

// Runs body(begin, end) over disjoint ranges covering [0, n), possibly on several threads. The
// binding supplies it (at::parallel_for); the kernels never depend on how the range is cut.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;

struct AdapterShape {
  int64_t n, d, h;
  Activation activation;
  bool pre_norm;
  bool residual;
  float eps;
  float dropout_p;
  const int64_t* seed;  // one value; null without dropout
  const float* scale;   // one value; null for s = 1
};

template <typename T>
struct ForwardArgs {
  AdapterShape shape;
  const T* x;
  int64_t x_stride_row, x_stride_col;
  const T *ln_weight, *ln_bias, *down_weight, *up_weight;
  T* out;            // N×D contiguous
  float* row_sq;     // N, or null
  float* hidden;     // N×H
  float* mean;       // 2×N
  float* rstd;       // N
  float* proj;       // 2×H (pre norm only)
};

template <typename T>
struct BackwardArgs {
  AdapterShape shape;
  const T* grad_out;
  int64_t g_stride_row, g_stride_col;
  const float* grad_row_sq;  // N (contiguous), or null
  const T* x;
  int64_t x_stride_row, x_stride_col;
  const T *ln_weight, *ln_bias, *down_weight, *up_weight;
  const float *hidden, *mean, *rstd, *proj;  // as saved by the forward
  T* dx;              // N×D contiguous, or null
  float* d_ln_weight;  // D, or null (null together with d_ln_bias)
  float* d_ln_bias;    // D, or null
  float* d_down;       // H×D, or null
  float* d_up;         // D×H, or null
};

// CPU kernels (linear_adapter_cpu.cpp). Weight gradients are deterministic: rows are cut into a
// number of groups that depends on N only, each group sums its rows in order, and the groups'
// partial sums are added in group order.
template <typename T>
void linear_adapter_forward_cpu(const ForwardArgs<T>& args, const ParallelFor& parallel_for);
template <typename T>
void linear_adapter_backward_cpu(const BackwardArgs<T>& args, const ParallelFor& parallel_for);

// CUDA kernels (linear_adapter_cuda.cu; linear_adapter_decode.cu for N <= kDecodeMaxRows;
// linear_adapter_cluster.cu for larger N on compute capability 9 or more, where it fits), on
// `stream` (a cudaStream_t); `workspace` holds the number of floats the *_workspace function gives, on
// the device. They return a cudaError_t (0 on success; cudaErrorInvalidValue for an H that the shared
// memory of the row-block kernels cannot hold, see linear_adapter_cuda_supports). The weight gradients
// are deterministic: the columns pass sums every row in row order. Never run on a GPU yet; CI runs them
// on the CPU simulator (cuda_sim.h).
constexpr int64_t kDecodeMaxRows = 64;
bool linear_adapter_cuda_supports(int64_t h);
const char* linear_adapter_cuda_error_string(int error);
int64_t linear_adapter_forward_cuda_workspace(int64_t n, int64_t d, int64_t h);
template <typename T>
int linear_adapter_forward_cuda(const ForwardArgs<T>& args, float* workspace, void* stream);
int64_t linear_adapter_backward_cuda_workspace(int64_t n, int64_t d, int64_t h);
template <typename T>
int linear_adapter_backward_cuda(const BackwardArgs<T>& args, float* workspace, void* stream);

// The single-read forward for sm_90 alone (linear_adapter_cluster.cu): a cluster of `cluster` CTAs
// shares each block of rows, CTA r holding columns [r width, (r + 1) width); `cluster` is 0 when no
// cluster size up to 16 fits a CTA's share in shared memory.
struct ClusterPlan {
  int cluster;
  int64_t width;
  size_t shared_bytes;
};
template <typename T>
ClusterPlan linear_adapter_cluster_forward_plan(int64_t d, int64_t h);
template <typename T>
int linear_adapter_cluster_forward_cuda(const ForwardArgs<T>& args, const ClusterPlan& plan, void* stream);

// The decode forward alone (one cooperative launch that spreads D over the whole GPU).
int64_t linear_adapter_decode_workspace_floats(int64_t n, int64_t d, int64_t h);
template <typename T>
int linear_adapter_decode_forward_cuda(const ForwardArgs<T>& args, float* workspace, void* stream);

}  // namespace fa
