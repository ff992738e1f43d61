// Where CPU kernels get their threads from. Kernels split work into independent tasks and hand them to a
// Parallel; the ORT adapter backs it with the session's intra-op thread pool (so intra_op_num_threads is
// honoured and nothing oversubscribes), standalone users can use ThreadParallel or SerialParallel.
#pragma once
#include <cstddef>
#include <functional>

namespace qcompile {

class Parallel {
 public:
  virtual ~Parallel() = default;
  // Calls fn(i) once for every i in [0, n), possibly concurrently; returns when all calls have returned.
  // fn must not throw.
  virtual void for_each(std::size_t n, const std::function<void(std::size_t)>& fn) const = 0;
};

// Runs every task on the calling thread.
class SerialParallel final : public Parallel {
 public:
  void for_each(std::size_t n, const std::function<void(std::size_t)>& fn) const override {
    for (std::size_t i = 0; i < n; ++i) fn(i);
  }
};

// Spreads tasks over `threads` std::threads (0 = hardware concurrency) started per call; for tools and
// plugins that have no pool of their own.
class ThreadParallel final : public Parallel {
 public:
  explicit ThreadParallel(int threads = 0);
  void for_each(std::size_t n, const std::function<void(std::size_t)>& fn) const override;

 private:
  int threads_;
};

}  // namespace qcompile
