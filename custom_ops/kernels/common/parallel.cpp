// std::thread backend for Parallel: a fixed number of workers pull task indices from an atomic counter.
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "qcompile/parallel.h"

namespace qcompile {

ThreadParallel::ThreadParallel(int threads) : threads_(threads) {
  if (threads_ <= 0) threads_ = std::max(1u, std::thread::hardware_concurrency());
}

void ThreadParallel::for_each(std::size_t n, const std::function<void(std::size_t)>& fn) const {
  const std::size_t workers = std::min<std::size_t>(static_cast<std::size_t>(threads_), n);
  if (workers <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  auto work = [&] {
    for (std::size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

}  // namespace qcompile
