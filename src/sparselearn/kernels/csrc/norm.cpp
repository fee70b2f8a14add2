// Batch normalisation of an (N, C, *) input over all but the channels, optionally followed by a
// ReLU, in few passes over memory.
//
// PyTorch's CPU BatchNorm and the ReLU after it make about ten passes over an activation for a
// training step, most of them over memory that just came fresh from the allocator. Here each
// task takes a block of channels: their N sample slabs are summed (one pass over memory), then
// summed again around the mean and normalised from the caches (a block's values of a CIFAR-sized
// activation are a few hundred KiB at most, and stay in L2); the backward likewise sums the
// output gradient and its product with the centred input, then writes the input gradient. The
// ReLU's mask is recomputed from the input (y = fma(x, scale, shift) > 0, the forward's own
// rounding), so nothing but the input is kept for the backward. Every channel's sums run in one
// order on one thread: the same bits on any number of threads.

#include "common.h"
#include "kernels.h"

#include <cmath>
#include <tuple>

using namespace slk;

namespace {

// Each task takes a block of channels; a sample's values of a block (its slab, block * HW values)
// are contiguous, and the N slabs are summed value by value into an array of partial sums,
// vectorised along the slab with no horizontal sum per plane (which would cost more than a small
// plane). Blocks hold about kBlockValues values of a slab (one plane where a plane is larger)
// and there are at least kMinTasks of them where there are channels enough. Every kSumCount
// samples the partial sums go into one double per channel: few enough values for a float sum
// to keep its precision. A channel's sums do not depend on its block or on the threads.
constexpr int64_t kBlockValues = 512, kSumCount = 64, kMinTasks = 8;

inline int64_t block_channels(int64_t C, int64_t HW) {
  return std::max<int64_t>(1, std::min(kBlockValues / std::max<int64_t>(1, HW), C / kMinTasks));
}

// The affine map of channel c from its (stored) mean and inverse deviation: y = x * scale + shift,
// computed the same way in the forward and the backward.
template <typename T>
inline std::pair<T, T> channel_affine(T mean, T invstd, const T* w, const T* b, int64_t c) {
  const double scale = double(invstd) * (w ? double(w[c]) : 1.0);
  return {T(scale), T((b ? double(b[c]) : 0.0) - double(mean) * scale)};
}

// sums[p * nc + k] = the sum over the N samples of what add(n, acc) adds to the partial sums
// acc[p * width + k * HW + i] (P arrays, width = nc * HW) for channel k of the block, in double.
template <typename T, int P, typename Add>
void block_sums(int64_t N, int64_t nc, int64_t HW, T* acc, double* sums, Add&& add) {
  const int64_t width = nc * HW;
  std::fill(acc, acc + P * width, T(0));
  std::fill(sums, sums + P * nc, 0.0);
  int64_t pending = 0;
  for (int64_t n = 0; n < N; ++n) {
    add(n, acc);
    if (++pending < kSumCount && n + 1 < N) continue;
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t k = 0; k < nc; ++k) {
        const T* a = acc + p * width + k * HW;
        double s = 0;
        for (int64_t i = 0; i < HW; ++i) s += double(a[i]);
        sums[p * nc + k] += s;
      }
    }
    std::fill(acc, acc + P * width, T(0));
    pending = 0;
  }
}

// out[k * HW + i] = v[k] for the nc channels of a block: per-channel values along a slab
template <typename T>
inline void spread(const T* v, int64_t nc, int64_t HW, T* out) {
  for (int64_t k = 0; k < nc; ++k) std::fill(out + k * HW, out + (k + 1) * HW, v[k]);
}

// y = x * scale + shift (one rounding), then the ReLU if RELU (NaN stays NaN, as in torch.relu)
template <typename T, bool RELU>
inline void normalise_slab(const T* __restrict__ x, T* __restrict__ y, int64_t width,
                           const T* __restrict__ scale, const T* __restrict__ shift) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const T v = std::fma(x[j], scale[j], shift[j]);
    y[j] = RELU && v < T(0) ? T(0) : v;
  }
}

template <typename T, bool RELU>
void bn_forward_kernel(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const T* w, const T* b,
                       double eps, T* mean, T* var, T* invstd) {
  const int64_t cb = block_channels(C, HW), blocks = (C + cb - 1) / cb, slab = C * HW;
  const double count = double(N * HW);
  const int nt = team(N * C * HW);
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1) num_threads(nt)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * cb, nc = std::min(cb, C - c0), width = nc * HW;
    std::vector<T> acc(width), per(2 * width), sc(nc), sh(nc);
    std::vector<double> sums(nc);
    const T* xb = x + c0 * HW;  // sample n's slab: xb + n * slab
    block_sums<T, 1>(N, nc, HW, acc.data(), sums.data(), [&](int64_t n, T* __restrict__ a) {
      const T* __restrict__ p = xb + n * slab;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) a[j] += p[j];
    });
    for (int64_t k = 0; k < nc; ++k) mean[c0 + k] = T(sums[k] / count);
    T* m = per.data();
    spread(mean + c0, nc, HW, m);
    block_sums<T, 1>(N, nc, HW, acc.data(), sums.data(), [&](int64_t n, T* __restrict__ a) {
      const T* __restrict__ p = xb + n * slab;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) a[j] += (p[j] - m[j]) * (p[j] - m[j]);
    });
    for (int64_t k = 0; k < nc; ++k) {
      const double v = sums[k] / count;
      var[c0 + k] = T(v);
      invstd[c0 + k] = T(1.0 / std::sqrt(v + eps));
      std::tie(sc[k], sh[k]) = channel_affine<T>(mean[c0 + k], invstd[c0 + k], w, b, c0 + k);
    }
    spread(sc.data(), nc, HW, per.data());
    spread(sh.data(), nc, HW, per.data() + width);
    for (int64_t n = 0; n < N; ++n)
      normalise_slab<T, RELU>(xb + n * slab, y + c0 * HW + n * slab, width, per.data(),
                              per.data() + width);
  }
}

template <typename T, bool RELU>
void bn_apply_kernel(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const T* scale,
                     const T* shift) {
  const int64_t cb = block_channels(C, HW), blocks = (C + cb - 1) / cb, slab = C * HW;
  const int nt = team(N * C * HW);
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1) num_threads(nt)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * cb, nc = std::min(cb, C - c0), width = nc * HW;
    std::vector<T> per(2 * width);
    spread(scale + c0, nc, HW, per.data());
    spread(shift + c0, nc, HW, per.data() + width);
    for (int64_t n = 0; n < N; ++n)
      normalise_slab<T, RELU>(x + c0 * HW + n * slab, y + c0 * HW + n * slab, width, per.data(),
                              per.data() + width);
  }
}

// The output gradient where the ReLU (if RELU) passed it: where fma(x, scale, shift) > 0, the
// forward's output, rounded as the forward rounds it.
template <typename T, bool RELU>
inline T relu_passed(T g, T x, T scale, T shift) {
  return RELU && !(std::fma(x, scale, shift) > T(0)) ? T(0) : g;
}

// gw, gb: the weight's and bias's gradients (the sums of g' * xhat and of g', g' the output
// gradient where the ReLU passed it: where fma(x, scale, shift) > 0, the forward's output);
// gx (if given): the input's, through the batch statistics.
template <typename T, bool RELU>
void bn_backward_kernel(const T* g, const T* x, T* gx, int64_t N, int64_t C, int64_t HW,
                        const T* mean, const T* invstd, const T* w, const T* b, T* gw, T* gb) {
  const int64_t cb = block_channels(C, HW), blocks = (C + cb - 1) / cb, slab = C * HW;
  const double count = double(N * HW);
  const int nt = team(N * C * HW);
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1) num_threads(nt)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * cb, nc = std::min(cb, C - c0), width = nc * HW;
    // per value of a slab: scale, shift, mean, then the input gradient's k, mg, mgx
    std::vector<T> acc(2 * width), per(6 * width), sck(nc), shk(nc);
    std::vector<double> sums(2 * nc);
    T *sc = per.data(), *sh = sc + width, *m = sh + width;
    for (int64_t k = 0; k < nc; ++k)
      std::tie(sck[k], shk[k]) = channel_affine<T>(mean[c0 + k], invstd[c0 + k], w, b, c0 + k);
    spread(sck.data(), nc, HW, sc);
    spread(shk.data(), nc, HW, sh);
    spread(mean + c0, nc, HW, m);
    const int64_t off = c0 * HW;  // sample n's slab: off + n * slab
    block_sums<T, 2>(N, nc, HW, acc.data(), sums.data(), [&](int64_t n, T* __restrict__ a) {
      const T* __restrict__ gp = g + off + n * slab;
      const T* __restrict__ xp = x + off + n * slab;
      T* __restrict__ ax = a + width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T gi = relu_passed<T, RELU>(gp[j], xp[j], sc[j], sh[j]);
        a[j] += gi;
        ax[j] += gi * (xp[j] - m[j]);
      }
    });
    T *kk = m + width, *mg = kk + width, *mgx = mg + width;
    for (int64_t k = 0; k < nc; ++k) {
      const int64_t c = c0 + k;
      const double sg = sums[k], sgx = sums[nc + k], is = double(invstd[c]);
      gb[c] = T(sg);
      gw[c] = T(sgx * is);
      std::fill(kk + k * HW, kk + (k + 1) * HW, T(is * (w ? double(w[c]) : 1.0)));
      std::fill(mg + k * HW, mg + (k + 1) * HW, T(sg / count));
      std::fill(mgx + k * HW, mgx + (k + 1) * HW, T(sgx / count * is * is));
    }
    if (gx == nullptr) continue;
    for (int64_t n = 0; n < N; ++n) {
      const T* __restrict__ gp = g + off + n * slab;
      const T* __restrict__ xp = x + off + n * slab;
      T* __restrict__ out = gx + off + n * slab;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T gi = relu_passed<T, RELU>(gp[j], xp[j], sc[j], sh[j]);
        out[j] = (gi - mg[j] - (xp[j] - m[j]) * mgx[j]) * kk[j];
      }
    }
  }
}

// f with the ReLU flag as a compile-time constant
template <typename F>
void with_relu(bool relu, F&& f) {
  if (relu) f(std::true_type{});
  else f(std::false_type{});
}

// (N, C, rest) of a contiguous input of at least two dimensions
std::tuple<int64_t, int64_t, int64_t> channel_shape(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "batch_norm: x must be a contiguous (N, C, ...)");
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, N * C == 0 ? 0 : x.numel() / (N * C)};
}

const void* optional_ptr(const c10::optional<torch::Tensor>& t, const torch::Tensor& x) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->numel() == x.size(1) && t->scalar_type() == x.scalar_type(),
              "batch_norm: weight and bias must be contiguous, one value per channel, in x's dtype");
  return t->data_ptr();
}

}  // namespace

std::vector<torch::Tensor> batch_norm_forward(torch::Tensor x, c10::optional<torch::Tensor> w,
                                              c10::optional<torch::Tensor> b, double eps,
                                              bool relu) {
  const auto [N, C, HW] = channel_shape(x);
  TORCH_CHECK(N * HW > 0, "batch_norm: no values per channel");
  auto y = empty_output(x.sizes(), x.options());
  auto mean = torch::empty({C}, x.options()), var = torch::empty({C}, x.options());
  auto invstd = torch::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_forward", [&] {
    with_relu(relu, [&](auto R) {
      bn_forward_kernel<scalar_t, R>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, HW,
                                     static_cast<const scalar_t*>(optional_ptr(w, x)),
                                     static_cast<const scalar_t*>(optional_ptr(b, x)), eps,
                                     mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
                                     invstd.data_ptr<scalar_t>());
    });
  });
  return {y, mean, var, invstd};
}

torch::Tensor batch_norm_apply(torch::Tensor x, torch::Tensor scale, torch::Tensor shift,
                               bool relu) {
  const auto [N, C, HW] = channel_shape(x);
  TORCH_CHECK(scale.is_contiguous() && shift.is_contiguous() && scale.numel() == C &&
                  shift.numel() == C && scale.scalar_type() == x.scalar_type() &&
                  shift.scalar_type() == x.scalar_type(),
              "batch_norm_apply: scale and shift must hold one value per channel, in x's dtype");
  auto y = empty_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_apply", [&] {
    with_relu(relu, [&](auto R) {
      bn_apply_kernel<scalar_t, R>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, HW,
                                   scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>());
    });
  });
  return y;
}

std::vector<torch::Tensor> batch_norm_backward(
    torch::Tensor g, torch::Tensor x, torch::Tensor mean, torch::Tensor invstd,
    c10::optional<torch::Tensor> w, c10::optional<torch::Tensor> b, bool relu, bool want_input) {
  const auto [N, C, HW] = channel_shape(x);
  g = g.contiguous();
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "batch_norm_backward: the gradient must match x");
  TORCH_CHECK(mean.numel() == C && invstd.numel() == C && mean.is_contiguous() &&
                  invstd.is_contiguous(),
              "batch_norm_backward: one mean and inverse deviation per channel");
  // empty unless want_input
  auto gx = want_input ? empty_output(x.sizes(), x.options()) : torch::empty({0}, x.options());
  auto gw = torch::empty({C}, x.options()), gb = torch::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_backward", [&] {
    with_relu(relu, [&](auto R) {
      bn_backward_kernel<scalar_t, R>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          want_input ? gx.data_ptr<scalar_t>() : nullptr, N, C, HW, mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), static_cast<const scalar_t*>(optional_ptr(w, x)),
          static_cast<const scalar_t*>(optional_ptr(b, x)), gw.data_ptr<scalar_t>(),
          gb.data_ptr<scalar_t>());
    });
  });
  return {gx, gw, gb};
}

// The compiled implementations of the batch normalisation operators of kernels/ops.py.
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) {
  m.def("batch_norm_forward", &Capped<&batch_norm_forward>::call);
  m.def("batch_norm_apply", &Capped<&batch_norm_apply>::call);
  m.def("batch_norm_backward", &Capped<&batch_norm_backward>::call);
}
