// Input layouts the convolution kernels compute over: the phase planes of a strided convolution,
// and patches (im2col) as matrix rows.

#include "common.h"
#include "kernels.h"

using namespace slk;

// A stride-s convolution is a stride-1 one over the s*s phase planes of its padded input:
// P[n, (py*s + px)*C + c, i, j] = x[n, c, s*i + py - ph, s*j + px - pw] (0 outside x). Built in
// one pass (padding, cropping and the reordering of a pad + reshape, which took three passes
// over fresh memory), and its adjoint: every input position lies on exactly one phase plane, so
// the input gradient is a gather (0 where a position is never read: rows and columns cropped).
// ``count`` < s*s builds only the first ``count`` planes (a pointwise convolution reads plane
// (0, 0) alone); the adjoint then takes the others' gradient as zero.

namespace {

// Calls f with the stride as a compile-time constant where it is 2 (the common case: the
// strided loops below then vectorise), else as 0, meaning "read it at run time".
template <typename F>
void with_stride(int64_t s, F&& f) {
  if (s == 2) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 0>{});
}

// The columns j of a phase plane whose input column s*j + px - pw lies in [0, W): [j0, j1).
inline std::pair<int64_t, int64_t> phase_columns(int64_t s, int64_t px, int64_t pw, int64_t W,
                                                 int64_t wq) {
  const int64_t j0 = std::min(wq, std::max<int64_t>(0, (pw - px + s - 1) / s));
  const int64_t last = W - 1 + pw - px;  // (no column at all when negative)
  return {j0, last < 0 ? j0 : std::max(j0, std::min(wq, last / s + 1))};
}

template <typename T, int S>
void phase_planes_kernel(const T* X, T* out, int64_t N, int64_t C, int64_t H, int64_t W,
                         int64_t s_, int64_t ph, int64_t pw, int64_t hq, int64_t wq,
                         int64_t count) {
  const int64_t s = S ? S : s_;
  const int nt = team(N * C * count * hq * wq);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const T* src = X + (n * C + c) * H * W;
      for (int64_t f = 0; f < count; ++f) {
        const int64_t py = f / s, px = f % s;
        T* dst = out + ((n * count + f) * C + c) * hq * wq;
        const auto [j0, j1] = phase_columns(s, px, pw, W, wq);
        for (int64_t i = 0; i < hq; ++i) {
          T* __restrict__ row = dst + i * wq;
          const int64_t y = s * i + py - ph;
          if (y < 0 || y >= H) {
            std::fill(row, row + wq, T(0));
            continue;
          }
          const T* __restrict__ in = src + y * W + px - pw;
          std::fill(row, row + j0, T(0));
          for (int64_t j = j0; j < j1; ++j) row[j] = in[s * j];
          std::fill(row + j1, row + wq, T(0));
        }
      }
    }
  }
}

template <typename T, int S>
void phase_planes_grad_kernel(const T* G, T* out, int64_t N, int64_t C, int64_t H, int64_t W,
                              int64_t s_, int64_t ph, int64_t pw, int64_t hq, int64_t wq,
                              int64_t count) {
  const int64_t s = S ? S : s_;
  const int nt = team(N * C * H * W);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      // the input plane (in L1) zeroed, then each phase plane's rows scattered into it
      T* dst = out + (n * C + c) * H * W;
      std::fill(dst, dst + H * W, T(0));
      for (int64_t f = 0; f < count; ++f) {
        const int64_t py = f / s, px = f % s;
        const T* src = G + ((n * count + f) * C + c) * hq * wq;
        const auto [j0, j1] = phase_columns(s, px, pw, W, wq);
        for (int64_t i = 0; i < hq; ++i) {
          const int64_t y = s * i + py - ph;
          if (y < 0 || y >= H) continue;
          const T* __restrict__ row = src + i * wq;
          T* __restrict__ o = dst + y * W + px - pw;
          for (int64_t j = j0; j < j1; ++j) o[s * j] = row[j];
        }
      }
    }
  }
}

}  // namespace

torch::Tensor phase_planes(torch::Tensor x, int64_t s, int64_t ph, int64_t pw, int64_t hq,
                           int64_t wq, int64_t count) {
  TORCH_CHECK(x.dim() == 4 && s >= 1 && ph >= 0 && pw >= 0,
              "x must be (N, C, H, W), the stride >= 1 and the padding >= 0");
  TORCH_CHECK(count >= 1 && count <= s * s, "count must be between 1 and stride**2");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto P = empty_output({N, count * C, hq, wq}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "phase_planes", [&] {
    with_stride(s, [&](auto S) {
      phase_planes_kernel<scalar_t, S>(x.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N, C, H,
                                       W, s, ph, pw, hq, wq, count);
    });
  });
  return P;
}

torch::Tensor phase_planes_grad(torch::Tensor gP, int64_t s, int64_t ph, int64_t pw, int64_t H,
                                int64_t W, int64_t count) {
  TORCH_CHECK(count >= 1 && count <= s * s, "count must be between 1 and stride**2");
  TORCH_CHECK(gP.dim() == 4 && s >= 1 && gP.size(1) % count == 0,
              "gP must be (N, count*C, hq, wq)");
  gP = gP.contiguous();
  const int64_t N = gP.size(0), C = gP.size(1) / count, hq = gP.size(2), wq = gP.size(3);
  auto gx = empty_output({N, C, H, W}, gP.options());
  AT_DISPATCH_FLOATING_TYPES(gP.scalar_type(), "phase_planes_grad", [&] {
    with_stride(s, [&](auto S) {
      phase_planes_grad_kernel<scalar_t, S>(gP.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), N,
                                            C, H, W, s, ph, pw, hq, wq, count);
    });
  });
  return gx;
}

// ----------------------------------------------------------- patches (im2col) as matrix rows
// R[(n*OH + oy)*OW + ox, (c*kh + ky)*kw + kx] = x[n, c, s*oy + ky - ph, s*ox + kx - pw] (0 in
// the padding): each output position's patch as one row, the layout the Linear kernels take,
// in one pass (unfold and a transposing copy took two). The adjoint adds each row back.

namespace {

template <typename T>
void patches_kernel(const T* X, T* R, int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh,
                    int64_t kw, int64_t s, int64_t ph, int64_t pw, int64_t OH, int64_t OW) {
  const int64_t K = C * kh * kw;
  const int nt = team(N * OH * OW * K);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t oy = 0; oy < OH; ++oy) {
      for (int64_t ox = 0; ox < OW; ++ox) {
        T* row = R + ((n * OH + oy) * OW + ox) * K;
        for (int64_t c = 0; c < C; ++c) {
          const T* plane = X + (n * C + c) * H * W;
          for (int64_t ky = 0; ky < kh; ++ky) {
            const int64_t y = s * oy + ky - ph;
            T* out = row + (c * kh + ky) * kw;
            if (y < 0 || y >= H) {
              std::fill(out, out + kw, T(0));
              continue;
            }
            for (int64_t kx = 0; kx < kw; ++kx) {
              const int64_t x = s * ox + kx - pw;
              out[kx] = (x >= 0 && x < W) ? plane[y * W + x] : T(0);
            }
          }
        }
      }
    }
  }
}

template <typename T>
void patches_grad_kernel(const T* G, T* GX, int64_t N, int64_t C, int64_t H, int64_t W,
                         int64_t kh, int64_t kw, int64_t s, int64_t ph, int64_t pw, int64_t OH,
                         int64_t OW) {
  const int64_t K = C * kh * kw;
  const int nt = team(N * OH * OW * K);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      T* plane = GX + (n * C + c) * H * W;
      std::fill(plane, plane + H * W, T(0));
      for (int64_t oy = 0; oy < OH; ++oy) {
        for (int64_t ox = 0; ox < OW; ++ox) {
          const T* g = G + ((n * OH + oy) * OW + ox) * K + c * kh * kw;
          for (int64_t ky = 0; ky < kh; ++ky) {
            const int64_t y = s * oy + ky - ph;
            if (y < 0 || y >= H) continue;
            for (int64_t kx = 0; kx < kw; ++kx) {
              const int64_t x = s * ox + kx - pw;
              if (x >= 0 && x < W) plane[y * W + x] += g[ky * kw + kx];
            }
          }
        }
      }
    }
  }
}

}  // namespace

torch::Tensor patches(torch::Tensor x, int64_t kh, int64_t kw, int64_t s, int64_t ph, int64_t pw,
                      int64_t OH, int64_t OW) {
  TORCH_CHECK(x.dim() == 4 && s >= 1, "x must be (N, C, H, W) and the stride >= 1");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  auto R = torch::empty({N * OH * OW, C * kh * kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patches", [&] {
    patches_kernel<scalar_t>(x.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), N, C, x.size(2),
                             x.size(3), kh, kw, s, ph, pw, OH, OW);
  });
  return R;
}

torch::Tensor patches_grad(torch::Tensor G, int64_t N, int64_t C, int64_t H, int64_t W,
                           int64_t kh, int64_t kw, int64_t s, int64_t ph, int64_t pw, int64_t OH,
                           int64_t OW) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == N * OH * OW && G.size(1) == C * kh * kw,
              "G must be (N * OH * OW, C * kh * kw)");
  G = G.contiguous();
  auto GX = torch::empty({N, C, H, W}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "patches_grad", [&] {
    patches_grad_kernel<scalar_t>(G.data_ptr<scalar_t>(), GX.data_ptr<scalar_t>(), N, C, H, W, kh,
                                  kw, s, ph, pw, OH, OW);
  });
  return GX;
}

// The compiled implementations of the layout operators of kernels/ops.py.
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) {
  m.def("phase_planes", &Capped<&phase_planes>::call);
  m.def("phase_planes_grad", &Capped<&phase_planes_grad>::call);
  m.def("patches", &Capped<&patches>::call);
  m.def("patches_grad", &Capped<&patches_grad>::call);
}
