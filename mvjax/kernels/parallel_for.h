// Work split over XLA's intra-op thread pool, shared by the CPU kernels (int8_matmul.cc,
// cache_attention.cc): items are claimed from an atomic counter by the calling thread and by up
// to num_threads - 1 pool helpers; the caller returns once every helper that claimed work is done.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace mvjax {

struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> running{0};
  std::mutex mu;
  std::condition_variable done;
};

// Runs body(i) for every i in [0, items). Helpers that start after the caller has taken every
// item find no work; the shared state outlives the call for them.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Body body) {
  if (items <= 0) return;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1) - 1, items - 1);
  auto shared = std::make_shared<ParallelState>();
  auto work = [=](ParallelState* s) {
    for (int64_t i = s->next.fetch_add(1); i < items; i = s->next.fetch_add(1)) body(i);
  };
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([shared, work]() {
      shared->running.fetch_add(1);
      work(shared.get());
      if (shared->running.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->done.notify_all();
      }
    });
  }
  work(shared.get());
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done.wait(lock, [&] { return shared->running.load() == 0; });
}

}  // namespace mvjax
