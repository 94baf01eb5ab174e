// A CPU simulator for the CUDA kernels of csrc/, so that machines without a GPU (CI) run them.
//
// A .cu file compiled by the host compiler with FA_CUDA_SIM defined (fa_cuda.h then includes this
// header instead of the CUDA runtime) becomes plain C++: every CUDA thread of a launch is a fiber
// (ucontext) on the calling thread, and the builtins the kernels use are defined here:
//   threadIdx, blockIdx, blockDim, gridDim; __syncthreads(); __syncwarp(); __shfl_xor_sync and
//   __shfl_sync (full warps); cooperative_groups::this_grid().sync(); thread-block clusters
//   (cooperative_groups::this_cluster(): sync, block_rank, num_blocks, map_shared_rank); atomicAdd;
//   dynamic shared memory (FA_DYNAMIC_SHARED in fa_cuda.h: one buffer per CTA, filled with NaN at the
//   launch so that a read before a write shows); fa::launch, fa::launch_cooperative and
//   fa::launch_cluster (fa_cuda.h).
// A plain launch runs its CTAs one after another, a cluster launch one cluster after another (its
// CTAs together); a cooperative launch runs all of them at once, as the hardware must. The fibers of
// the CTAs in flight run in rounds: each runs until its next barrier, in an order shuffled at every
// round ($FA_SIM_SEED seeds it), and with several CTAs in flight every other round holds one of them
// back, so that CTAs drift apart. A value read before the barrier that should have published it (a
// __syncthreads, a cluster or grid sync) then comes out wrong in some order. A barrier that not every
// thread of its scope reaches (a divergent __syncthreads, a grid sync in a plain launch) is reported
// as a deadlock: the launch returns cudaErrorLaunchFailure with the reason in fa_sim::last_error().
// Not simulated: static __shared__ arrays (not defined here, so they do not compile), memory spaces
// (every pointer is host memory), warp-synchronous code without __syncwarp, timing. The tensor cores
// (fa::WarpTile in fa_cuda.h) are emulated in float. The alignment of tile operands and of 16-byte
// accesses (fa::load16, fa::store16) is checked: a misaligned one fails the launch with
// cudaErrorMisalignedAddress.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719
};
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 11
};

namespace fa_sim {

constexpr int kWarpSize = 32;
constexpr int kSimulatedSMs = 4;            // what cudaDevAttrMultiProcessorCount reports
constexpr int kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in limit per CTA
constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread_idx, block_idx;
  int block_slot = 0;  // which CTA in flight
  int warp = 0;        // index into the launch's warps in flight
  int lane = 0;
  bool done = false;
};

struct Launch {
  dim3 grid, block;
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<Barrier> block_barriers, warp_barriers;
  Barrier grid_barrier;
  std::vector<std::vector<unsigned char>> shared;  // per CTA in flight
  std::vector<uint64_t> exchange;                   // one slot per thread in flight, for the shuffles
  bool cooperative = false;
  int cluster = 1;  // CTAs per thread-block cluster (they run together; 1: no cluster)
  ucontext_t scheduler;
  Fiber* current = nullptr;
  uint64_t progress = 0;
  std::string fault;  // the first misuse a kernel made (the launch then fails with it)
};

inline thread_local Launch* active = nullptr;
inline thread_local std::string error_message;

inline const std::string& last_error() { return error_message; }

inline Fiber& current() { return *active->current; }

inline void yield() {
  Fiber& f = current();
  swapcontext(&f.context, &active->scheduler);
}

inline void wait(Barrier& b) {
  const uint64_t generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++active->progress;
    return;
  }
  while (b.generation == generation) yield();
}

inline void sync_block() { wait(active->block_barriers[current().block_slot]); }
inline void sync_warp() { wait(active->warp_barriers[current().warp]); }
inline void sync_grid() { wait(active->grid_barrier); }

inline void fault(const std::string& what) {
  if (active->fault.empty()) active->fault = what;
}

// Whether `pointer` is `bytes`-aligned (in shared memory: from the CTA's base, as on the device).
inline bool aligned(const void* pointer, uintptr_t bytes) {
  const auto& shared = active->shared[current().block_slot];
  const auto address = reinterpret_cast<uintptr_t>(pointer), base = reinterpret_cast<uintptr_t>(shared.data());
  const uintptr_t offset = address >= base && address < base + shared.size() ? address - base : address;
  return offset % bytes == 0;
}

// A tensor-core tile operand (fa::WarpTile): 32-byte aligned, with a leading dimension that is a
// multiple of `multiple` elements.
inline void check_tile_operand(const void* pointer, int64_t ld, int64_t multiple) {
  if (!aligned(pointer, 32) || ld % multiple != 0)
    fault("a tensor-core tile operand that is not 32-byte aligned, or whose leading dimension is not a multiple of " +
          std::to_string(multiple) + " elements");
}

// A 16-byte access (fa::load16, fa::store16).
inline void check_vector_access(const void* pointer) {
  if (!aligned(pointer, 16)) fault("a 16-byte access at an address that is not 16-byte aligned");
}

template <typename V>
V shuffle(V value, int source_lane) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  Fiber& f = current();
  const int base = f.warp * kWarpSize;
  std::memcpy(&active->exchange[base + f.lane], &value, sizeof(V));
  sync_warp();
  V out;
  std::memcpy(&out, &active->exchange[base + (source_lane & (kWarpSize - 1))], sizeof(V));
  sync_warp();
  return out;
}

inline void fiber_entry() {
  active->body();
  current().done = true;
  ++active->progress;
  // Returning resumes uc_link: the scheduler.
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(active->shared[current().block_slot].data());
}

// Runs the fibers of `first_block .. first_block + blocks` to completion; false on a deadlock.
inline bool run_blocks(Launch& L, int64_t first_block, int64_t blocks, size_t shared_bytes, std::mt19937& rng) {
  const int64_t threads = static_cast<int64_t>(L.block.x) * L.block.y * L.block.z;
  const int64_t total = threads * blocks;
  const int64_t warps_per_block = (threads + kWarpSize - 1) / kWarpSize;
  L.fibers.resize(static_cast<size_t>(total));
  L.block_barriers.assign(static_cast<size_t>(blocks), Barrier{static_cast<int>(threads), 0, 0});
  L.warp_barriers.assign(static_cast<size_t>(warps_per_block * blocks), Barrier{});
  // The barrier of the CTAs in flight: the grid of a cooperative launch, or one cluster. A grid sync in
  // a plain launch (or a cluster sync without a cluster) never completes: reported as a deadlock.
  const bool group = L.cooperative || L.cluster > 1;
  L.grid_barrier = Barrier{group ? static_cast<int>(total) : std::numeric_limits<int>::max(), 0, 0};
  L.exchange.assign(static_cast<size_t>(warps_per_block * blocks * kWarpSize), 0);
  L.shared.resize(static_cast<size_t>(blocks));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (auto& buffer : L.shared) {
    buffer.resize(shared_bytes + 16);
    for (size_t i = 0; i + sizeof(float) <= buffer.size(); i += sizeof(float)) std::memcpy(&buffer[i], &nan, sizeof(float));
  }
  for (int64_t i = 0; i < total; ++i) {
    Fiber& f = L.fibers[static_cast<size_t>(i)];
    const int64_t slot = i / threads, t = i % threads;
    const int64_t b = first_block + slot;
    f.block_slot = static_cast<int>(slot);
    f.thread_idx = dim3(static_cast<unsigned>(t % L.block.x), static_cast<unsigned>((t / L.block.x) % L.block.y),
                        static_cast<unsigned>(t / (static_cast<int64_t>(L.block.x) * L.block.y)));
    f.block_idx = dim3(static_cast<unsigned>(b % L.grid.x), static_cast<unsigned>((b / L.grid.x) % L.grid.y),
                       static_cast<unsigned>(b / (static_cast<int64_t>(L.grid.x) * L.grid.y)));
    f.warp = static_cast<int>(slot * warps_per_block + t / kWarpSize);
    f.lane = static_cast<int>(t % kWarpSize);
    f.done = false;
    ++L.warp_barriers[static_cast<size_t>(f.warp)].expected;
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &L.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::vector<size_t> order(static_cast<size_t>(total));
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    // With several CTAs in flight, every other round leaves one of them out, so that CTAs drift apart:
    // a CTA that reads another's memory without the barrier that should order it then reads too early.
    const int64_t held_back = blocks > 1 && rng() % 2 ? static_cast<int64_t>(rng() % blocks) : -1;
    const uint64_t before = L.progress;
    bool alive = false;
    for (size_t i : order) {
      Fiber& f = L.fibers[i];
      if (f.done) continue;
      alive = true;
      if (f.block_slot == held_back) continue;
      L.current = &f;
      swapcontext(&L.scheduler, &f.context);
    }
    if (!alive) return true;
    if (L.progress == before && held_back < 0) return false;
  }
}

// One launch of `body` over grid × block, run to completion before it returns (like a launch
// followed by a stream synchronisation); `cluster` CTAs per thread-block cluster (along x).
inline cudaError_t launch(bool cooperative, dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> body,
                          int cluster = 1) {
  error_message.clear();
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (blocks == 0 || threads == 0 || threads > 1024 || shared_bytes > static_cast<size_t>(kMaxSharedBytes)) {
    error_message = "invalid launch configuration";
    return cudaErrorInvalidValue;
  }
  if (cooperative && blocks > kSimulatedSMs * 2) {
    error_message = "a cooperative launch larger than the simulated device can hold";
    return cudaErrorInvalidValue;
  }
  if (cluster < 1 || cluster > 16 || grid.x % static_cast<unsigned>(cluster) != 0) {
    error_message = "a cluster size that does not divide the grid, or above 16";
    return cudaErrorInvalidValue;
  }
  Launch L;
  L.grid = grid;
  L.block = block;
  L.body = std::move(body);
  L.cooperative = cooperative;
  L.cluster = cluster;
  const char* seed = std::getenv("FA_SIM_SEED");
  std::mt19937 rng(seed ? static_cast<unsigned>(std::strtoul(seed, nullptr, 10)) : 0u);
  Launch* outer = active;
  active = &L;
  bool ok = true;
  if (cooperative) {
    ok = run_blocks(L, 0, blocks, shared_bytes, rng);
  } else {  // one CTA, or one cluster, at a time
    for (int64_t b = 0; b < blocks && ok; b += cluster) ok = run_blocks(L, b, cluster, shared_bytes, rng);
  }
  active = outer;
  if (!ok) {
    error_message = "deadlock: a barrier that not every thread of its scope reaches";
    return cudaErrorLaunchFailure;
  }
  if (!L.fault.empty()) {
    error_message = L.fault;
    return cudaErrorMisalignedAddress;
  }
  return cudaSuccess;
}

struct Builtin {
  enum Kind { kThread, kBlock, kBlockDim, kGridDim } kind;
  dim3 value() const {
    switch (kind) {
      case kThread: return current().thread_idx;
      case kBlock: return current().block_idx;
      case kBlockDim: return active->block;
      case kGridDim: break;
    }
    return active->grid;
  }
};

}  // namespace fa_sim

#define threadIdx (::fa_sim::Builtin{::fa_sim::Builtin::kThread}.value())
#define blockIdx (::fa_sim::Builtin{::fa_sim::Builtin::kBlock}.value())
#define blockDim (::fa_sim::Builtin{::fa_sim::Builtin::kBlockDim}.value())
#define gridDim (::fa_sim::Builtin{::fa_sim::Builtin::kGridDim}.value())

inline void __syncthreads() { ::fa_sim::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::fa_sim::sync_warp(); }
template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  return ::fa_sim::shuffle(value, ::fa_sim::current().lane ^ lane_mask);
}
template <typename V>
V __shfl_sync(unsigned, V value, int source_lane) {
  return ::fa_sim::shuffle(value, source_lane);
}
template <typename V>
V atomicAdd(V* address, V value) {  // fibers never interleave between barriers: a plain add is atomic
  const V old = *address;
  *address = old + value;
  return old;
}

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::fa_sim::sync_grid(); }
};
inline grid_group this_grid() { return {}; }

// The CTAs of one cluster are the CTAs in flight: rank = the slot in flight, and another rank's shared
// memory is its buffer at the same offset.
struct cluster_group {
  void sync() const { ::fa_sim::sync_grid(); }
  unsigned block_rank() const { return static_cast<unsigned>(::fa_sim::current().block_slot); }
  unsigned num_blocks() const { return static_cast<unsigned>(::fa_sim::active->cluster); }
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    auto& shared = ::fa_sim::active->shared;
    const auto offset = reinterpret_cast<unsigned char*>(address) - shared[::fa_sim::current().block_slot].data();
    return reinterpret_cast<T*>(shared[rank].data() + offset);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// The simulated device: kSimulatedSMs SMs, sm_90's shared memory, compute capability $FA_SIM_CC_MAJOR
// (default 9: thread-block clusters).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = fa_sim::kSimulatedSMs; break;
    case cudaDevAttrComputeCapabilityMajor: {
      const char* major = std::getenv("FA_SIM_CC_MAJOR");
      *value = major ? std::atoi(major) : 9;
      break;
    }
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = fa_sim::kMaxSharedBytes; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return ::fa_sim::last_error().c_str(); }
