// An allocator for the layouts the CPU kernels prepare once and then stream at every call: on Linux the
// memory is aligned to 2 MiB and marked MADV_HUGEPAGE, so transparent huge pages back it where the system
// allows them ("madvise" or "always" in /sys/kernel/mm/transparent_hugepage/enabled).
//
// Why: a 4096 x 4096 layer's prepared codes span ~1800 4 KiB pages, one TLB miss each per call; in decode the
// layers before evict those translations, so each call pays the page walks again.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qcompile {

template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t(2) << 20;  // 2 MiB, the x86-64 and common aarch64 huge page
  static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller buffers take plain cache-line alignment

  HugePageAllocator() noexcept = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    if (n > size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T);
    const size_t align = bytes >= kMinBytes ? kHuge : 64;
    void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHuge) madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);  // a hint: failure is fine
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }

  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const noexcept { return false; }
};

}  // namespace qcompile
