// Batch normalisation of an (N, C, *) input over all but the channels, optionally followed by a
// ReLU, in few passes over memory.
//
// PyTorch's CPU BatchNorm and the ReLU after it make about ten passes over an activation for a
// training step, most of them over memory that just came fresh from the allocator. Here each
// channel is one task: its N planes are summed (one pass over memory), then summed again around
// the mean and normalised from the caches (a channel of a CIFAR-sized activation is a few
// hundred KiB, and stays in L2); the backward likewise sums the output gradient and its product
// with the centred input, then writes the input gradient. The ReLU's mask is recomputed from the
// input (y = fma(x, scale, shift) > 0, the forward's own rounding), so nothing but the input is
// kept for the backward. Every channel's sums run in one order on one thread: the same bits on
// any number of threads.

#include "common.h"
#include "kernels.h"

#include <cmath>

using namespace slk;

namespace {

// A channel's planes are summed position by position into arrays of at most kSumBlock partial
// sums (vectorised along the plane, with no horizontal sum per plane, which would cost more
// than a small plane), a plane larger than that block by block; every kSumCount pieces the
// partial sums go into a double, few enough values for a float sum to keep its precision.
constexpr int64_t kSumBlock = 512, kSumCount = 64;

// The affine map of channel c from its (stored) mean and inverse deviation: y = x * scale + shift,
// computed the same way in the forward and the backward.
template <typename T>
inline std::pair<T, T> channel_affine(T mean, T invstd, const T* w, const T* b, int64_t c) {
  const double scale = double(invstd) * (w ? double(w[c]) : 1.0);
  return {T(scale), T((b ? double(b[c]) : 0.0) - double(mean) * scale)};
}

// Calls add(plane n, first position, count, partial sums) for every plane n < N of a channel
// in pieces of at most kSumBlock positions, and flush(partial sums, width) after every
// kSumCount pieces and the last. acc: P arrays of partial sums, kSumBlock apart, each zero at
// the start and after each flush.
template <typename T, int P, typename Add, typename Flush>
inline void channel_pieces(int64_t N, int64_t HW, T* acc, Add&& add, Flush&& flush) {
  const int64_t width = std::min(HW, kSumBlock);
  auto zero = [&] {
    for (int j = 0; j < P; ++j) std::fill(acc + j * kSumBlock, acc + j * kSumBlock + width, T(0));
  };
  zero();
  int64_t pending = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i0 = 0; i0 < HW; i0 += kSumBlock) {
      add(n, i0, std::min(kSumBlock, HW - i0), acc);
      if (++pending == kSumCount) {
        flush(acc, width);
        zero();
        pending = 0;
      }
    }
  }
  if (pending > 0) flush(acc, width);
}

template <typename T>
inline double total(const T* acc, int64_t width) {
  double s = 0;
  for (int64_t i = 0; i < width; ++i) s += double(acc[i]);
  return s;
}

// y = x * scale + shift (one rounding), then the ReLU if RELU (NaN stays NaN, as in torch.relu)
template <typename T, bool RELU>
void normalise_plane(const T* __restrict__ x, T* __restrict__ y, int64_t HW, T scale, T shift) {
#pragma omp simd
  for (int64_t i = 0; i < HW; ++i) {
    const T v = std::fma(x[i], scale, shift);
    y[i] = RELU && v < T(0) ? T(0) : v;
  }
}

template <typename T, bool RELU>
void bn_forward_kernel(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const T* w, const T* b,
                       double eps, T* mean, T* var, T* invstd) {
  const int nt = team(N * C * HW);
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1) num_threads(nt)
  for (int64_t c = 0; c < C; ++c) {
    const double count = double(N * HW);
    T acc[kSumBlock];
    double sx = 0, sxx = 0;
    const T* xc = x + c * HW;  // plane n: xc + n * C * HW
    channel_pieces<T, 1>(
        N, HW, acc,
        [&](int64_t n, int64_t i0, int64_t cnt, T* __restrict__ a) {
          const T* __restrict__ p = xc + n * C * HW + i0;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) a[i] += p[i];
        },
        [&](const T* a, int64_t width) { sx += total(a, width); });
    const T m = T(sx / count);
    channel_pieces<T, 1>(
        N, HW, acc,
        [&](int64_t n, int64_t i0, int64_t cnt, T* __restrict__ a) {
          const T* __restrict__ p = xc + n * C * HW + i0;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) a[i] += (p[i] - m) * (p[i] - m);
        },
        [&](const T* a, int64_t width) { sxx += total(a, width); });
    const double v = sxx / count;
    mean[c] = m;
    var[c] = T(v);
    invstd[c] = T(1.0 / std::sqrt(v + eps));
    const auto [scale, shift] = channel_affine<T>(m, invstd[c], w, b, c);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * HW;
      normalise_plane<T, RELU>(x + base, y + base, HW, scale, shift);
    }
  }
}

template <typename T, bool RELU>
void bn_apply_kernel(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const T* scale,
                     const T* shift) {
  const int nt = team(N * C * HW);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t base = (n * C + c) * HW;
      normalise_plane<T, RELU>(x + base, y + base, HW, scale[c], shift[c]);
    }
  }
}

// gw, gb: the weight's and bias's gradients (the sums of g' * xhat and of g', g' the output
// gradient where the ReLU passed it: where fma(x, scale, shift) > 0, the forward's output);
// gx (if given): the input's, through the batch statistics.
template <typename T, bool RELU>
void bn_backward_kernel(const T* g, const T* x, T* gx, int64_t N, int64_t C, int64_t HW,
                        const T* mean, const T* invstd, const T* w, const T* b, T* gw, T* gb) {
  const int nt = team(N * C * HW);
#pragma omp parallel for schedule(dynamic, 1) if (nt > 1) num_threads(nt)
  for (int64_t c = 0; c < C; ++c) {
    const T m = mean[c], is = invstd[c];
    const auto [scale, shift] = channel_affine<T>(m, is, w, b, c);
    double sg = 0, sgx = 0;
    T acc[2 * kSumBlock];
    channel_pieces<T, 2>(
        N, HW, acc,
        [&](int64_t n, int64_t i0, int64_t cnt, T* __restrict__ a) {
          const int64_t base = (n * C + c) * HW + i0;
          const T* __restrict__ gp = g + base;
          const T* __restrict__ xp = x + base;
          T* __restrict__ ax = a + kSumBlock;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) {
            const T gi = RELU && !(std::fma(xp[i], scale, shift) > T(0)) ? T(0) : gp[i];
            a[i] += gi;
            ax[i] += gi * (xp[i] - m);
          }
        },
        [&](const T* a, int64_t width) {
          sg += total(a, width);
          sgx += total(a + kSumBlock, width);
        });
    gb[c] = T(sg);
    gw[c] = T(sgx * double(is));
    if (gx == nullptr) continue;
    const double count = double(N * HW);
    const T k = T(double(is) * (w ? double(w[c]) : 1.0)), mg = T(sg / count);
    const T mgx = T(sgx / count * double(is) * double(is));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * HW;
      const T* __restrict__ gp = g + base;
      const T* __restrict__ xp = x + base;
      T* __restrict__ out = gx + base;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        const T gi = RELU && !(std::fma(xp[i], scale, shift) > T(0)) ? T(0) : gp[i];
        out[i] = (gi - mg - (xp[i] - m) * mgx) * k;
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

std::vector<c10::optional<torch::Tensor>> batch_norm_backward(
    torch::Tensor g, torch::Tensor x, torch::Tensor mean, torch::Tensor invstd,
    c10::optional<torch::Tensor> w, c10::optional<torch::Tensor> b, bool relu, bool want_input) {
  const auto [N, C, HW] = channel_shape(x);
  g = g.contiguous();
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "batch_norm_backward: the gradient must match x");
  TORCH_CHECK(mean.numel() == C && invstd.numel() == C && mean.is_contiguous() &&
                  invstd.is_contiguous(),
              "batch_norm_backward: one mean and inverse deviation per channel");
  c10::optional<torch::Tensor> gx;
  if (want_input) gx = empty_output(x.sizes(), x.options());
  auto gw = torch::empty({C}, x.options()), gb = torch::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_backward", [&] {
    with_relu(relu, [&](auto R) {
      bn_backward_kernel<scalar_t, R>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          gx ? gx->data_ptr<scalar_t>() : nullptr, N, C, HW, mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), static_cast<const scalar_t*>(optional_ptr(w, x)),
          static_cast<const scalar_t*>(optional_ptr(b, x)), gw.data_ptr<scalar_t>(),
          gb.data_ptr<scalar_t>());
    });
  });
  return {gx, gw, gb};
}
