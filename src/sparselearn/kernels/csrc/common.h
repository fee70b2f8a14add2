// Shared by the kernel families: 64-byte vectors, the thread team of a parallel region, and
// the thread cap that a layer sets around its kernels.
#pragma once

// the tensor API only: torch/extension.h (pybind11, the C++ frontend) is for bindings.cpp
#include <torch/types.h>

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace slk {

// 64-byte vectors (one AVX-512 register; GCC splits them where the CPU has narrower ones).
// Written out explicitly: left to itself, GCC vectorised some of these loops across non-zeros,
// with gathers, at a twentieth of the speed.
typedef float v16f __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = v16f;
};
template <>
struct Vec<double> {
  using type = v8d;
};
template <typename T>
using vec_t = typename Vec<T>::type;
template <typename T>
constexpr int kLanes = 64 / int(sizeof(T));

template <typename T>
inline vec_t<T> loadv(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void storev(T* p, vec_t<T> v) {
  __builtin_memcpy(p, &v, sizeof v);
}

inline v16f load16(const float* p) { return loadv<float>(p); }

// Work (multiply-adds plus elements moved) below which a kernel runs on the calling thread alone:
// with OMP_WAIT_POLICY=PASSIVE each parallel region, and each barrier in one, wakes the pool's
// sleeping threads (see tl_thread_limit), which costs what one thread needs for several hundred
// thousand multiply-adds (docs/performance.md measures it).
constexpr int64_t kParallelWork = int64_t(1) << 20;

// The most threads that kernels called from this thread may use (0: all of OpenMP's). A layer
// sets it around its kernels (set_thread_limit, from the Python side): under
// OMP_WAIT_POLICY=PASSIVE every parallel region and every barrier in it puts the other threads
// to sleep and wakes them again, and for a small layer that costs more than a second core saves
// (docs/performance.md has the cost of a region and of a barrier).
// sl.accelerate times such a layer on one thread and on all of them, and keeps the faster.
// Only speed changes: every kernel gives the same result, bit for bit, on any number of threads.
inline thread_local int tl_thread_limit = 0;

// Threads for a parallel region of `work` units: one below kParallelWork (regions that are
// always worth their wake-up leave out the work).
inline int team(int64_t work = kParallelWork) {
  if (work < kParallelWork) return 1;
  const int all = omp_get_max_threads();
  return tl_thread_limit > 0 ? std::min(tl_thread_limit, all) : all;
}

// Large tensors the kernels write from scratch are backed by transparent huge pages where Linux
// offers them (THP "always" or "madvise"): an allocation of tens of MiB comes fresh from mmap and
// page-faults on first touch, one 4 KiB page at a time, which cost about as much as the kernel's
// own work on it; 2 MiB pages fault 512 times less often. (PyTorch does the same for every
// allocation under THP_MEM_ALLOC_ENABLE=1.) Only advice: where there is no THP nothing changes.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (uintptr_t(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (uintptr_t(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// torch::empty for a large output (see advise_huge_pages).
inline torch::Tensor empty_output(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  auto t = torch::empty(sizes, options);
  if (t.device().is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

constexpr int64_t kPrefetch = 8;  // non-zeros ahead whose panel rows are prefetched

// dst[k] = src[idx[k]]
template <typename T, typename I>
void gather(const T* src, const I* idx, T* dst, int64_t n) {
  const int nt = team(n);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t k = 0; k < n; ++k) dst[k] = src[idx[k]];
}

}  // namespace slk
