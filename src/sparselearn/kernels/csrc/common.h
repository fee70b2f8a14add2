// Shared by the kernel families: 64-byte vectors, the thread team of a parallel region, and
// the thread cap that a layer sets around its kernels.
#pragma once

// the tensor API only: torch/extension.h (pybind11, the C++ frontend) is for bindings.cpp
#include <torch/library.h>
#include <torch/types.h>

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace slk {

// The kernels' vectors are one register of the CPU they are built for: 64 bytes with AVX-512,
// 32 with AVX2 (x86-64-v3), 16 elsewhere (ARM64's NEON, SSE). Written out explicitly: left to
// itself, GCC vectorised some of these loops across non-zeros, with gathers, at a twentieth of
// the speed. Wider than a register they cost far more than the split: GCC keeps arrays of them
// (the accumulators) in memory, and on AVX2 each 64-byte multiply-add became stack stores and
// reloads, ten times slower than 32-byte vectors in registers.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float vNf __attribute__((vector_size(kVecBytes)));
typedef double vNd __attribute__((vector_size(kVecBytes)));
// 64-byte vectors, for the code written for sixteen float lanes (transposing reductions, the
// narrow pooling kernels)
typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vNf;
};
template <>
struct Vec<double> {
  using type = vNd;
};
template <typename T>
using vec_t = typename Vec<T>::type;
// elements per vector: the samples of a batch panel's vector in the convolutions' layout
template <typename T>
constexpr int kLanes = kVecBytes / int(sizeof(T));

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

inline v16f load16(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, v16f v) { __builtin_memcpy(p, &v, sizeof v); }

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

// F with the thread cap as one more, last, argument (`threads`: tl_thread_limit for the call,
// restored after it): how the kernels are registered as operators (TORCH_LIBRARY_FRAGMENT
// beside each kernel; kernels/ops.py declares the public operators that call them).
template <auto F>
struct Capped;
template <typename R, typename... A, R (*F)(A...)>
struct Capped<F> {
  static R call(A... args, int64_t threads) {
    struct Restore {
      int previous;
      ~Restore() { tl_thread_limit = previous; }
    } restore{tl_thread_limit};
    tl_thread_limit = threads > 0 ? int(std::min<int64_t>(threads, 1 << 20)) : 0;
    return F(std::move(args)...);
  }
};

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

// The memory of the kernels' large outputs, kept when PyTorch frees it and given again to the
// next output of the same size. A training step allocates the same outputs every step (padded
// inputs, outputs, input gradients of tens of MiB); fresh from the system, each one faults on
// first touch and the kernel zeroes every page of it (huge pages included: their zeroing shows
// in profiles of a sparse convolution's step), and glibc serves allocations of 32 MiB and more
// from mmap every time, so nothing is reused by default. Reused memory is already
// mapped. Blocks are kept up to kCacheBytes in all, in sizes rounded up to 2 MiB (the huge page
// size, which the blocks are aligned to and advised as); release_cached_blocks() frees them.
class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(2) << 20;  // smaller: PyTorch's allocator
  static constexpr size_t kCacheBytes = size_t(1) << 30;

  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks outlive exit order
    return *cache;
  }

  c10::DataPtr allocate(size_t bytes) override {
    const size_t size = round_up(std::max<size_t>(bytes, 1));
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        p = it->second;
        free_.erase(it);
        held_ -= size;
      }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(kMinBytes, size);
      TORCH_CHECK(p != nullptr, "out of memory: could not allocate ", size, " bytes");
      advise_huge_pages(p, size);
    }
    return {p, new Block{p, size}, &BlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // frees every kept block; returns the bytes freed
  size_t release() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      held_ = 0;
    }
    size_t bytes = 0;
    for (auto& [size, p] : blocks) {
      bytes += size;
      std::free(p);
    }
    return bytes;
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  struct Block {
    void* p;
    size_t size;
  };

  static size_t round_up(size_t bytes) { return (bytes + kMinBytes - 1) / kMinBytes * kMinBytes; }

  static void give_back(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    get().keep(block->p, block->size);
    delete block;
  }

  void keep(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + size <= kCacheBytes) {
        free_.emplace(size, p);
        held_ += size;
        return;
      }
    }
    std::free(p);
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0;
};

// torch::empty for a large output: on the CPU, in memory of the BlockCache (see there).
inline torch::Tensor empty_output(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  if (!options.device().is_cpu()) return torch::empty(sizes, options);
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < BlockCache::kMinBytes) return torch::empty(sizes, options);
  return at::detail::empty_generic(sizes, &BlockCache::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

#if defined(__AVX512F__)
// r[i][j] -> r[j][i] for a 16 x 16 block of floats: per 128-bit lane 4 x 4 transposes
// (unpack 32-bit, then 64-bit), then the lanes regrouped (two rounds of shuffle_f32x4).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // s[4i + c], lane l: column 4l + c of rows 4i .. 4i + 3
  __m512 s[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    s[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    s[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    s[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    s[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // column 4l + c: lane l of s[c], s[4 + c], s[8 + c], s[12 + c]
  for (int c = 0; c < 4; ++c) {
    const __m512 lo01 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x44);
    const __m512 hi23 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xEE);
    const __m512 lo01b = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x44);
    const __m512 hi23b = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(lo01, lo01b, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(lo01, lo01b, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(hi23, hi23b, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(hi23, hi23b, 0xDD);
  }
}
#endif

constexpr int64_t kPrefetch = 8;  // non-zeros ahead whose panel rows are prefetched

// dst[k] = src[idx[k]]
template <typename T, typename I>
void gather(const T* src, const I* idx, T* dst, int64_t n) {
  const int nt = team(n);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t k = 0; k < n; ++k) dst[k] = src[idx[k]];
}

}  // namespace slk
