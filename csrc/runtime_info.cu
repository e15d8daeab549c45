// Plain C entry points for ctypes (molora_ops/impl/cuda_backend.py): which CUDA runtime this library carries
// (cudart is linked statically) and what the installed driver supports, so status() can say "the driver is
// too old" instead of letting the first launch fail.
#include <cuda_runtime.h>

#define MOLORA_EXPORT extern "C" __attribute__((visibility("default")))

MOLORA_EXPORT int molora_cuda_runtime_version() { return CUDART_VERSION; }

// 0 when no driver is installed.
MOLORA_EXPORT int molora_cuda_driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}
