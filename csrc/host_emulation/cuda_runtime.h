// A host-side stand-in for <cuda_runtime.h> that runs the molora kernels on the CPU, for machines with CUDA
// headers but no GPU (CI). Testing only: the extension never includes it.
//
// Put this directory first on the include path and define MOLORA_HOST_LAUNCH; the kernels then compile as
// plain C++ (g++ -std=c++20 -x c++), and host::launch runs every block as one fiber per CUDA thread on one OS
// thread (ucontext). A fiber runs until it reaches __syncthreads or a warp shuffle; a block barrier releases
// when every live thread of the block waits on it, a warp barrier when every thread of the warp does. What
// this checks: indexing, bounds, tile loops, the reductions and the barrier structure. It aborts with a
// message when a barrier or shuffle is reached divergently (a deadlock on a GPU) or a full-mask shuffle meets
// a lane that already exited. It does not model the memory system, so it says nothing about speed, and
// shared memory (`static` here) is visible to one block at a time because blocks run one after another.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <ucontext.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "host emulation"; }

namespace molora_host_launch {

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::kRunnable;
  uint3 tid;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  std::function<void()> body;
  float shfl[1024];
};

inline Block& block() {
  static Block b;
  return b;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host emulation: %s (block %u,%u,%u thread %d)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               block().current);
  std::abort();
}

inline void wait(State s) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.state = s;
  swapcontext(&f.ctx, &b.scheduler);
}

inline void entry() {
  Block& b = block();
  b.body();
  b.fibers[b.current].state = State::kDone;
  swapcontext(&b.fibers[b.current].ctx, &b.scheduler);
}

template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, cudaStream_t, Args&&... args) {
  Block& b = block();
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  if (n > 1024) fail("more than 1024 threads per block");
  gridDim = grid;
  blockDim = threads;
  b.fibers.resize(n);
  b.body = [&] { kernel(static_cast<Params>(args)...); };
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        for (int t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.stack.resize(256 * 1024);
          f.state = State::kRunnable;
          f.tid = uint3{static_cast<unsigned>(t) % threads.x, static_cast<unsigned>(t) / threads.x % threads.y,
                        static_cast<unsigned>(t) / (threads.x * threads.y)};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, entry, 0);
        }
        for (;;) {
          bool ran = false;
          for (int t = 0; t < n; ++t) {
            if (b.fibers[t].state != State::kRunnable) continue;
            b.current = t;
            threadIdx = b.fibers[t].tid;
            swapcontext(&b.scheduler, &b.fibers[t].ctx);
            ran = true;
          }
          int live = 0, at_block = 0;
          for (const Fiber& f : b.fibers) {
            live += f.state != State::kDone;
            at_block += f.state == State::kBlockBarrier;
          }
          if (live == 0) break;
          bool released = false;
          if (at_block == live) {
            for (Fiber& f : b.fibers) f.state = State::kRunnable;
            released = true;
          }
          for (int w = 0; w * 32 < n && !released; ++w) {
            int waiting = 0, done = 0, width = n - w * 32 < 32 ? n - w * 32 : 32;
            for (int l = 0; l < width; ++l) {
              waiting += b.fibers[w * 32 + l].state == State::kWarpBarrier;
              done += b.fibers[w * 32 + l].state == State::kDone;
            }
            if (waiting > 0 && waiting + done == width) {
              if (done > 0) {
                b.current = w * 32;
                fail("full-mask warp shuffle with lanes that already exited");
              }
              for (int l = 0; l < width; ++l) b.fibers[w * 32 + l].state = State::kRunnable;
              released = true;
            }
          }
          if (!ran && !released) fail("deadlock: __syncthreads or a warp shuffle reached divergently");
        }
      }
    }
  }
  b.current = -1;
}

}  // namespace molora_host_launch

inline void __syncthreads() { molora_host_launch::wait(molora_host_launch::State::kBlockBarrier); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  using namespace molora_host_launch;
  if (mask != 0xffffffffu) fail("only full-mask shuffles are emulated");
  Block& b = block();
  const int me = b.current, lane = me % 32;
  b.shfl[me] = v;
  wait(State::kWarpBarrier);
  const float r = b.shfl[me - lane + (lane ^ lane_mask)];
  wait(State::kWarpBarrier);
  return r;
}
