// Dropout whose mask is a hash of (seed, element index): no random state to advance, so the
// mask is made in parallel, vectorised, and made again in the backward instead of being stored.
//
// Element i is kept when dropout_hash(seed, i) < threshold (threshold = keep probability *
// 2^32); a kept element is x * scale, a dropped one 0. torch_backend.py computes the same hash
// with int64 tensor operations, so both backends give the same bits.

#include "common.h"
#include "kernels.h"

using namespace slk;

namespace {

// A 32-bit integer finaliser (Wellons' "lowbias32"): a bijection in which every input bit flips
// each output bit with probability close to 1/2.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The keys of the 2^32 indices from block * 2^32: two words derived from the seed and the block.
inline void block_keys(uint64_t seed, uint64_t block, uint32_t* k1, uint32_t* k2) {
  *k1 = mix32(uint32_t(seed) ^ mix32(uint32_t(block) + 0x9e3779b9U));
  *k2 = mix32(uint32_t(seed >> 32) ^ *k1);
}

template <typename T>
void dropout_kernel(const T* x, T* y, int64_t n, uint64_t seed, uint32_t threshold, T scale) {
  const int nt = team(n);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t start = 0; start < n; start += int64_t(1) << 16) {
    const int64_t end = std::min(n, start + (int64_t(1) << 16));
    uint32_t k1, k2;  // the blocks of 2^16 never straddle a 2^32 boundary
    block_keys(seed, uint64_t(start) >> 32, &k1, &k2);
#pragma omp simd
    for (int64_t i = start; i < end; ++i) {
      const uint32_t h = mix32(mix32(uint32_t(i) ^ k1) ^ k2);
      y[i] = h < threshold ? x[i] * scale : T(0);
    }
  }
}

}  // namespace

torch::Tensor dropout(torch::Tensor x, double keep, int64_t seed) {
  TORCH_CHECK(keep > 0.0 && keep < 1.0, "dropout: the keep probability must be in (0, 1), got ",
              keep);
  x = x.contiguous();
  auto y = empty_output(x.sizes(), x.options());
  // keep * 2^32 rounded, in [1, 2^32 - 1]: P(h < threshold) = threshold / 2^32
  const double t = std::nearbyint(keep * 4294967296.0);
  const uint32_t threshold = uint32_t(std::min(std::max(t, 1.0), 4294967295.0));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout", [&] {
    dropout_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(),
                             uint64_t(seed), threshold, scalar_t(1.0 / keep));
  });
  return y;
}

namespace {

// dropout as an operator: the seed a 0-d int64 tensor (which a compiled graph draws as it runs)
torch::Tensor dropout_op(torch::Tensor x, double keep, torch::Tensor seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == torch::kLong,
              "dropout: the seed must be one int64");
  return dropout(x, keep, seed.item<int64_t>());
}

}  // namespace

// The compiled implementations of the dropout operators of kernels/ops.py.
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) {
  m.def("dropout", &Capped<&dropout_op>::call);
}
