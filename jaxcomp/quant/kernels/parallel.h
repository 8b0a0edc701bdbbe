// Work sharing for the jaxcomp CPU kernels: body(i) for i in [0, n) on the calling
// thread and the helpers XLA's intra-op thread pool lends.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxcomp {

// Runs body(i) for every i in [0, n). Items are handed out one at a time from an
// atomic counter, so a helper that starts late (or never) only takes fewer
// items; the caller takes items too and returns once all n are done. A helper
// that finds no item left never touches `body`, which may then be gone.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& body) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, &body] {
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      body(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < n) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace jaxcomp
