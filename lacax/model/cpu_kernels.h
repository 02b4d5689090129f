// What lacax's CPU custom-call kernels share (cpu_attention.cc, cpu_quant_matmul.cc): work splitting on XLA:CPU's
// intra-op thread pool and shape checks. lacax/model/cpu_kernels.py puts this directory on the include path and
// hashes this header into every kernel's cache key.

#ifndef LACAX_MODEL_CPU_KERNELS_H_
#define LACAX_MODEL_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace lacax {

// Items are claimed from an atomic counter, so the caller never waits for a helper that has not started (no
// deadlock when the pool is busy or has one thread); it waits only for items a helper has claimed.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename F>
void Drain(WorkQueue& queue, int64_t total, const F& fn) {
  for (int64_t i = queue.next.fetch_add(1); i < total; i = queue.next.fetch_add(1)) {
    fn(i);
    queue.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs fn(0..total-1) on the calling thread and on up to (pool threads - 1) helpers. A helper that starts
// after every item is claimed touches only the queue, which its shared_ptr keeps alive.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, const F& fn) {
  auto queue = std::make_shared<WorkQueue>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([queue, total, &fn]() { Drain(*queue, total, fn); });
  }
  Drain(*queue, total, fn);
  while (queue->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// bfloat16 held as uint16_t (the top half of a float32): widening is exact; narrowing rounds to nearest even,
// as XLA's convert does, and keeps a NaN a (quiet) NaN.
inline float Bf16ToFloat(uint16_t b) {
  const uint32_t w = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline uint16_t FloatToBf16(float x) {
  uint32_t w;
  std::memcpy(&w, &x, sizeof(w));
  if ((w & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((w >> 16) | 0x40);
  w += 0x7fffu + ((w >> 16) & 1u);
  return static_cast<uint16_t>(w >> 16);
}

template <typename A, typename B>
bool SameDims(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

}  // namespace lacax

#endif  // LACAX_MODEL_CPU_KERNELS_H_
