// The one file that knows torch: registers the kernels as the `fusedadapters_native` operators
// (CPU kernels always; CUDA kernels in a CUDA build, FA_WITH_CUDA), turning tensors into the
// pointers, sizes and strides of linear_adapter.h. fusedadapters/ops/native.py loads the library and
// calls these operators from the `fusedadapters::linear_adapter_fwd/bwd` custom ops.
//
// With FA_CUDA_SIM (tests only), the library is `fusedadapters_cudasim` instead and its CPU operators
// run the CUDA kernels on the CPU simulator of cuda_sim.h, CPU tensors standing in for device memory.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(FA_WITH_CUDA) && !defined(FA_CUDA_SIM)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <optional>
#include <string>
#include <tuple>

#include "linear_adapter.h"

namespace {

using at::Tensor;

fa::Activation activation_from_name(c10::string_view name) {
  if (name == "identity") return fa::Activation::Identity;
  if (name == "hardtanh") return fa::Activation::Hardtanh;
  if (name == "relu") return fa::Activation::Relu;
  if (name == "selu") return fa::Activation::Selu;
  if (name == "swish" || name == "silu") return fa::Activation::Swish;
  if (name == "gelu") return fa::Activation::Gelu;
  TORCH_CHECK(false, "unknown activation '", std::string(name), "'");
}

const fa::ParallelFor& cpu_parallel_for() {
  static const fa::ParallelFor run = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, 1, body);
  };
  return run;
}

// Calls fn(T{}) with T the kernel storage type of `dtype`.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(fa::Half{});
    case at::kBFloat16: return fn(fa::BFloat16{});
    default: TORCH_CHECK(false, "the native backend takes float32, float16 and bfloat16, got ", dtype);
  }
}

template <typename T>
const T* ptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

struct Prepared {
  fa::AdapterShape shape;
  Tensor x2, ln_weight, ln_bias, down_weight, up_weight, seed, scale;  // kept alive for the pointers
};

Prepared prepare(const Tensor& x, const Tensor& ln_weight, const Tensor& ln_bias, const Tensor& down_weight,
                 const Tensor& up_weight, const std::optional<Tensor>& dropout_seed,
                 const std::optional<Tensor>& scale, c10::string_view activation, c10::string_view norm_position,
                 double eps, double dropout_p, bool residual) {
  TORCH_CHECK(x.dim() >= 1 && down_weight.dim() == 2, "x must be (..., D) and down_weight (H, D)");
  const int64_t d = x.size(-1), h = down_weight.size(0);
  TORCH_CHECK(ln_weight.numel() == d && ln_bias.numel() == d && down_weight.size(1) == d &&
                  up_weight.dim() == 2 && up_weight.size(0) == d && up_weight.size(1) == h,
              "linear_adapter shapes do not match x (..., ", d, ")");
  for (const Tensor* t : {&ln_weight, &ln_bias, &down_weight, &up_weight})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "every parameter must have x's dtype and device");
  TORCH_CHECK(norm_position == "pre" || norm_position == "post", "norm_position must be 'pre' or 'post'");
  Prepared p;
  p.x2 = x.reshape({-1, d});
  p.ln_weight = ln_weight.contiguous();
  p.ln_bias = ln_bias.contiguous();
  p.down_weight = down_weight.contiguous();
  p.up_weight = up_weight.contiguous();
  fa::AdapterShape& s = p.shape;
  s.n = p.x2.size(0);
  s.d = d;
  s.h = h;
  s.activation = activation_from_name(activation);
  s.pre_norm = norm_position == "pre";
  s.residual = residual;
  s.eps = static_cast<float>(eps);
  s.dropout_p = dropout_p > 0.0 ? static_cast<float>(dropout_p) : 0.0f;
  s.seed = nullptr;
  s.scale = nullptr;
  if (s.dropout_p > 0.0f) {
    TORCH_CHECK(dropout_seed.has_value() && dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                "dropout_p > 0 needs a one-element int64 dropout_seed");
    p.seed = dropout_seed->reshape({1}).contiguous();
    s.seed = ptr<int64_t>(p.seed);
  }
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == 1, "scale must have one element");
    p.scale = scale->reshape({1}).to(at::kFloat).contiguous();
    s.scale = ptr<float>(p.scale);
  }
  return p;
}

// The fields ForwardArgs and BackwardArgs share: the shape, x and the four weights.
template <typename T, typename Args>
void set_inputs(Args& a, const Prepared& p) {
  a.shape = p.shape;
  a.x = ptr<T>(p.x2);
  a.x_stride_row = p.x2.stride(0);
  a.x_stride_col = p.x2.stride(1);
  a.ln_weight = ptr<T>(p.ln_weight);
  a.ln_bias = ptr<T>(p.ln_bias);
  a.down_weight = ptr<T>(p.down_weight);
  a.up_weight = ptr<T>(p.up_weight);
}

enum class Kernels { Cpu, Cuda };

#if defined(FA_WITH_CUDA) || defined(FA_CUDA_SIM)
// Where the CUDA kernels run: x's device (made current while this lives) and its current stream.
struct CudaLaunch {
#if defined(FA_CUDA_SIM)
  explicit CudaLaunch(const Tensor&) {}
  void* stream() const { return nullptr; }
#else
  explicit CudaLaunch(const Tensor& x) : guard(x.device()) {}
  void* stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  c10::cuda::CUDAGuard guard;
#endif
};

// Runs launch(workspace, stream) for the kernels of `what` on x's device, with `workspace_floats`
// floats of workspace from torch's allocator; a failed launch is an error that names it.
template <typename Launch>
void run_cuda(const Tensor& x, int64_t h, int64_t workspace_floats, const char* what, Launch&& launch) {
  TORCH_CHECK(fa::linear_adapter_cuda_supports(h), "the native CUDA kernels hold H × 16 rows of the hidden layer in "
              "shared memory, which H = ", h, " does not fit; use backend='triton'");
  const CudaLaunch where(x);
  Tensor workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));
  const int error = launch(mut_ptr<float>(workspace), where.stream());
  TORCH_CHECK(error == 0, "the native CUDA ", what, " failed: ", fa::linear_adapter_cuda_error_string(error));
}
#endif

template <Kernels K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& x, const Tensor& ln_weight, const Tensor& ln_bias, const Tensor& down_weight,
    const Tensor& up_weight, const std::optional<Tensor>& dropout_seed, const std::optional<Tensor>& scale,
    c10::string_view activation, c10::string_view norm_position, double eps, double dropout_p, bool residual,
    bool compute_row_sq) {
  Prepared p = prepare(x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation,
                       norm_position, eps, dropout_p, residual);
  const fa::AdapterShape& s = p.shape;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor row_sq = compute_row_sq ? at::empty(x.sizes().slice(0, x.dim() - 1), f32) : at::empty({0}, f32);
  Tensor hidden = at::empty({s.n, s.h}, f32);
  Tensor mean = at::empty({2, s.n}, f32);
  Tensor rstd = at::empty({s.n}, f32);
  Tensor proj = s.pre_norm ? at::empty({2, s.h}, f32) : at::empty({0}, f32);
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fa::ForwardArgs<T> a;
    set_inputs<T>(a, p);
    a.out = mut_ptr<T>(out);
    a.row_sq = compute_row_sq ? mut_ptr<float>(row_sq) : nullptr;
    a.hidden = mut_ptr<float>(hidden);
    a.mean = mut_ptr<float>(mean);
    a.rstd = mut_ptr<float>(rstd);
    a.proj = s.pre_norm ? mut_ptr<float>(proj) : nullptr;
    if constexpr (K == Kernels::Cpu) {
      fa::linear_adapter_forward_cpu<T>(a, cpu_parallel_for());
    } else {
#if defined(FA_WITH_CUDA) || defined(FA_CUDA_SIM)
      run_cuda(x, s.h, fa::linear_adapter_forward_cuda_workspace(s.n, s.d, s.h), "forward",
               [&](float* workspace, void* stream) { return fa::linear_adapter_forward_cuda<T>(a, workspace, stream); });
#endif
    }
  });
  return {out, row_sq, hidden, mean, rstd, proj};
}

template <Kernels K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_row_sq, const Tensor& x, const Tensor& ln_weight,
    const Tensor& ln_bias, const Tensor& down_weight, const Tensor& up_weight,
    const std::optional<Tensor>& dropout_seed, const std::optional<Tensor>& scale, const Tensor& hidden,
    const Tensor& mean, const Tensor& rstd, const Tensor& proj, c10::string_view activation,
    c10::string_view norm_position, double dropout_p, bool residual, bool need_dx, bool need_dln, bool need_dwd,
    bool need_dwu) {
  Prepared p = prepare(x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation,
                       norm_position, /*eps=*/0.0, dropout_p, residual);
  const fa::AdapterShape& s = p.shape;
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must have x's shape and dtype");
  const Tensor g2 = grad_out.reshape({-1, s.d});
  const Tensor q = grad_row_sq.has_value() ? grad_row_sq->reshape({-1}).to(at::kFloat).contiguous() : Tensor();
  const Tensor saved[] = {hidden.contiguous(), mean.contiguous(), rstd.contiguous(), proj.contiguous()};
  const auto f32 = x.options().dtype(at::kFloat);
  auto grad_buffer = [&](bool needed, at::IntArrayRef shape) { return at::empty(needed ? shape : at::IntArrayRef{0}, f32); };
  Tensor dx = at::empty(need_dx ? x.sizes() : at::IntArrayRef{0}, x.options());
  Tensor dlnw = grad_buffer(need_dln, {s.d}), dlnb = grad_buffer(need_dln, {s.d});
  Tensor dwd = grad_buffer(need_dwd, {s.h, s.d}), dwu = grad_buffer(need_dwu, {s.d, s.h});
  if (need_dx || need_dln || need_dwd || need_dwu) {
    dispatch_storage(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      fa::BackwardArgs<T> a;
      set_inputs<T>(a, p);
      a.grad_out = ptr<T>(g2);
      a.g_stride_row = g2.stride(0);
      a.g_stride_col = g2.stride(1);
      a.grad_row_sq = q.defined() ? ptr<float>(q) : nullptr;
      a.hidden = ptr<float>(saved[0]);
      a.mean = ptr<float>(saved[1]);
      a.rstd = ptr<float>(saved[2]);
      a.proj = s.pre_norm ? ptr<float>(saved[3]) : nullptr;
      a.dx = need_dx ? mut_ptr<T>(dx) : nullptr;
      a.d_ln_weight = need_dln ? mut_ptr<float>(dlnw) : nullptr;
      a.d_ln_bias = need_dln ? mut_ptr<float>(dlnb) : nullptr;
      a.d_down = need_dwd ? mut_ptr<float>(dwd) : nullptr;
      a.d_up = need_dwu ? mut_ptr<float>(dwu) : nullptr;
      if constexpr (K == Kernels::Cpu) {
        fa::linear_adapter_backward_cpu<T>(a, cpu_parallel_for());
      } else {
#if defined(FA_WITH_CUDA) || defined(FA_CUDA_SIM)
        run_cuda(x, s.h, fa::linear_adapter_backward_cuda_workspace(s.n, s.d, s.h), "backward",
                 [&](float* workspace, void* stream) { return fa::linear_adapter_backward_cuda<T>(a, workspace, stream); });
#endif
      }
    });
  }
  const auto dtype = x.scalar_type();
  return {dx, dlnw.to(dtype), dlnb.to(dtype), dwd.to(dtype), dwu.to(dtype)};
}

}  // namespace

#if defined(FA_CUDA_SIM)
#define FA_LIBRARY fusedadapters_cudasim
#else
#define FA_LIBRARY fusedadapters_native
#endif
// One level of indirection, so that FA_LIBRARY expands before TORCH_LIBRARY pastes it.
#define FA_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FA_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

FA_TORCH_LIBRARY(FA_LIBRARY, m) {
  m.def(
      "linear_adapter_forward(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor down_weight, Tensor up_weight, "
      "Tensor? dropout_seed, Tensor? scale, str activation, str norm_position, float eps, float dropout_p, "
      "bool residual, bool compute_row_sq) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_adapter_backward(Tensor grad_out, Tensor? grad_row_sq, Tensor x, Tensor ln_weight, Tensor ln_bias, "
      "Tensor down_weight, Tensor up_weight, Tensor? dropout_seed, Tensor? scale, Tensor hidden, Tensor mean, "
      "Tensor rstd, Tensor proj, str activation, str norm_position, float dropout_p, bool residual, bool need_dx, "
      "bool need_dln, bool need_dwd, bool need_dwu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Which devices have kernels, for fusedadapters/ops/native.py.
  m.def("devices() -> str[]");
}

#if defined(FA_CUDA_SIM)
constexpr Kernels kCpuTensorKernels = Kernels::Cuda;  // on the simulator, CPU tensors stand in for device memory
#else
constexpr Kernels kCpuTensorKernels = Kernels::Cpu;
#endif

FA_TORCH_LIBRARY_IMPL(FA_LIBRARY, CPU, m) {
  m.impl("linear_adapter_forward", &forward<kCpuTensorKernels>);
  m.impl("linear_adapter_backward", &backward<kCpuTensorKernels>);
}

#if defined(FA_WITH_CUDA) && !defined(FA_CUDA_SIM)
FA_TORCH_LIBRARY_IMPL(FA_LIBRARY, CUDA, m) {
  m.impl("linear_adapter_forward", &forward<Kernels::Cuda>);
  m.impl("linear_adapter_backward", &backward<Kernels::Cuda>);
}
#endif

FA_TORCH_LIBRARY_IMPL(FA_LIBRARY, CompositeExplicitAutograd, m) {
  m.impl("devices", []() -> std::vector<std::string> {
#if defined(FA_WITH_CUDA) && !defined(FA_CUDA_SIM)
    return {"cpu", "cuda"};
#else
    return {"cpu"};
#endif
  });
}
