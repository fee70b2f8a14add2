// CPU kernels for sparse training: CSR weight times dense activations, the sampled weight
// gradient, and direct sparse convolution (NCHW).
//
// Linear layout. Activations are packed into panels: XP (nb, features, W) holds batch rows
// p*W .. p*W+W-1 of x transposed, zero-padded to a whole panel. Each non-zero weight then scales
// one contiguous W-float row of a panel (vectorised over the batch, held in registers), and one
// panel (features * W floats) stays in L2 while every non-zero reads it. A plain (features, batch)
// transpose is 3.5x slower here: its rows are 1 KiB apart, so a batch block of them maps to a
// quarter of the cache sets and thrashes L2 (docs/performance.md).
// Convolution: CSR rows are output channels; a column index encodes (input channel, ky, kx) as
// c * kh * kw + ky * kw + kx; each non-zero adds a scaled, shifted input plane to an output plane.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kPrefetch = 8;  // non-zeros ahead whose panel rows are prefetched

// dst[k] = src[idx[k]]
template <typename T>
void gather(const T* src, const int64_t* idx, T* dst, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k) dst[k] = src[idx[k]];
}

// XP[p, f, b] = x[p * W + b, f] (0 past the batch)
template <typename T>
void pack_panels(const T* x, T* XP, int64_t B, int64_t F, int64_t W) {
  const int64_t nb = (B + W - 1) / W;
  constexpr int64_t kF = 64;  // features per tile: W x kF reads, kF x W writes
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t p = 0; p < nb; ++p) {
    for (int64_t f0 = 0; f0 < F; f0 += kF) {
      const int64_t nf = std::min(kF, F - f0);
      T* out = XP + (p * F + f0) * W;
      for (int64_t b = 0; b < W; ++b) {
        const int64_t row = p * W + b;
        if (row < B) {
          const T* in = x + row * F + f0;
          for (int64_t f = 0; f < nf; ++f) out[f * W + b] = in[f];
        } else {
          for (int64_t f = 0; f < nf; ++f) out[f * W + b] = T(0);
        }
      }
    }
  }
}

// out[b] = sum over the non-zeros k in [begin, end) of val[k] * X[col[k], b]. Bound by L2
// bandwidth here (W / 16 cache lines per non-zero; a second accumulator set does not help).
template <typename T, int W>
inline __attribute__((always_inline)) void row_times_panel(int64_t begin, int64_t end,
                                                           const int64_t* col, const T* val,
                                                           const T* X, T* __restrict__ out) {
  T acc[W];
#pragma GCC unroll 64
  for (int b = 0; b < W; ++b) acc[b] = T(0);
  for (int64_t k = begin; k < end; ++k) {
    if (k + kPrefetch < end) {
      const T* q = X + col[k + kPrefetch] * W;
#pragma GCC unroll 8
      for (int l = 0; l < W; l += 64 / int(sizeof(T))) __builtin_prefetch(q + l);
    }
    const T v = val[k];
    const T* __restrict__ x = X + col[k] * W;
#pragma GCC unroll 64
    for (int b = 0; b < W; ++b) acc[b] += v * x[b];
  }
#pragma GCC unroll 64
  for (int b = 0; b < W; ++b) out[b] = acc[b];
}

// Y[b, r] = sum_k val[k] * XP[p, col[k], b - p W] over the non-zeros k of row r. Y is written in
// the ordinary (batch, rows) layout through a small tile, so that its stores stay contiguous.
template <typename T, int W>
void spmm_panels(const int64_t* crow, const int64_t* col, const T* val, const T* XP, T* Y,
                 int64_t rows, int64_t F, int64_t B) {
  const int64_t nb = (B + W - 1) / W;
  constexpr int64_t kRows = 16;  // rows per tile
  const int64_t ntiles = (rows + kRows - 1) / kRows;
  // one parallel region; a static tile schedule gives each thread the same rows in every panel,
  // so threads never wait for each other between panels (nowait)
#pragma omp parallel
  for (int64_t p = 0; p < nb; ++p) {
    const T* X = XP + p * F * W;
    const int64_t nvalid = std::min<int64_t>(W, B - p * W);
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < ntiles; ++t) {
      alignas(64) T tile[kRows][W];
      const int64_t r0 = t * kRows, nr = std::min(kRows, rows - r0);
      for (int64_t j = 0; j < nr; ++j) {
        const int64_t r = r0 + j;
        row_times_panel<T, W>(crow[r], crow[r + 1], col, val, X, tile[j]);
      }
      for (int64_t b = 0; b < nvalid; ++b) {
        T* y = Y + (p * W + b) * rows + r0;
        for (int64_t j = 0; j < nr; ++j) y[j] = tile[j][b];
      }
    }
  }
}

// Sixteen float lanes (one AVX-512 register; GCC splits it where the CPU has narrower ones).
typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// One level of a transposing reduction: lanes of a and b, summed pairwise over blocks of 2h.
template <int H>
inline v16f fold(v16f a, v16f b) {
  v16i lo, hi;
  for (int i = 0, n = 0; i < 16; i += 2 * H)
    for (int side = 0; side < 2; ++side)
      for (int j = 0; j < H; ++j, ++n) {
        lo[n] = side * 16 + i + j;
        hi[n] = side * 16 + i + H + j;
      }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// dval[k] = sum_b GP[p, r, b] * XP[p, col[k], b] summed over the panels p, for each non-zero
// k = (r, col[k]). The same thread owns row r (and its dval entries) in every panel.
template <typename T, int W>
void sampled_panels(const int64_t* crow, const int64_t* col, const T* GP, const T* XP, T* dval,
                    int64_t rows, int64_t F, int64_t nb) {
#pragma omp parallel
  for (int64_t p = 0; p < nb; ++p) {
    const T* X = XP + p * F * W;
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      T g[W];
      const T* gs = GP + (p * rows + r) * W;
#pragma GCC unroll 64
      for (int b = 0; b < W; ++b) g[b] = gs[b];
      const int64_t end = crow[r + 1];
      int64_t k = crow[r];
      if constexpr (std::is_same_v<T, float> && W % 16 == 0) {
        // sixteen non-zeros at a time: sixteen lane-wise partial dot products, then one
        // transposing reduction gives their sixteen sums in one register (no horizontal sum
        // per non-zero). Non-zero j goes to slot bitreverse(j) so that the sums come out in order.
        constexpr int kRev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
        v16f gv[W / 16];
#pragma GCC unroll 4
        for (int c = 0; c < W / 16; ++c) gv[c] = load16(g + 16 * c);
        for (; k + 16 <= end; k += 16) {
          v16f s[16];
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j) {
            if (k + j + kPrefetch < end) {
              const T* q = X + col[k + j + kPrefetch] * W;
#pragma GCC unroll 4
              for (int l = 0; l < W; l += 16) __builtin_prefetch(q + l);
            }
            const T* x = X + col[k + j] * W;
            v16f t = gv[0] * load16(x);
#pragma GCC unroll 4
            for (int c = 1; c < W / 16; ++c) t += gv[c] * load16(x + 16 * c);
            s[kRev[j]] = t;
          }
          v16f s8[8], s4[4], s2[2];
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) s8[i] = fold<8>(s[2 * i], s[2 * i + 1]);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) s4[i] = fold<4>(s8[2 * i], s8[2 * i + 1]);
          s2[0] = fold<2>(s4[0], s4[1]);
          s2[1] = fold<2>(s4[2], s4[3]);
          v16f sum = fold<1>(s2[0], s2[1]);
          if (p > 0) sum += load16(dval + k);
          __builtin_memcpy(dval + k, &sum, sizeof sum);
        }
      }
      for (; k < end; ++k) {
        if (k + kPrefetch < end) {
          const T* q = X + col[k + kPrefetch] * W;
#pragma GCC unroll 8
          for (int l = 0; l < W; l += 64 / int(sizeof(T))) __builtin_prefetch(q + l);
        }
        const T* __restrict__ x = X + col[k] * W;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int b = 0; b < W; ++b) acc += g[b] * x[b];
        dval[k] = (p == 0 ? T(0) : dval[k]) + acc;
      }
    }
  }
}

}  // namespace

int64_t panel_width(int64_t batch) { return batch >= 64 ? 64 : batch > 16 ? 32 : 16; }

torch::Tensor pack(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2, "pack expects a (batch, features) matrix");
  auto xc = x.contiguous();
  const int64_t B = xc.size(0), F = xc.size(1), W = panel_width(B);
  auto XP = torch::empty({(B + W - 1) / W, F, W}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "pack", [&] {
    pack_panels<scalar_t>(xc.data_ptr<scalar_t>(), XP.data_ptr<scalar_t>(), B, F, W);
  });
  return XP;
}

torch::Tensor spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor val, torch::Tensor XP,
                   int64_t rows, int64_t batch, c10::optional<torch::Tensor> perm) {
  TORCH_CHECK(XP.dim() == 3 && XP.is_contiguous(), "XP must be contiguous panels (nb, F, W)");
  TORCH_CHECK(crow.numel() == rows + 1, "crow must have rows + 1 entries");
  const int64_t W = XP.size(2);
  TORCH_CHECK(W == panel_width(batch) && XP.size(0) == (batch + W - 1) / W, "XP/batch mismatch");
  auto Y = torch::empty({batch, rows}, XP.options());
  // values in this CSR's order: a gather for the transposed matrix (cheaper than reading
  // val[perm[k]] at random inside the kernel)
  auto v = perm.has_value() ? torch::empty_like(val) : val.contiguous();
  AT_DISPATCH_FLOATING_TYPES(XP.scalar_type(), "spmm", [&] {
    if (perm.has_value())
      gather<scalar_t>(val.data_ptr<scalar_t>(), perm->data_ptr<int64_t>(), v.data_ptr<scalar_t>(),
                       v.numel());
    auto run = [&](auto w) {
      spmm_panels<scalar_t, decltype(w)::value>(
          crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), v.data_ptr<scalar_t>(),
          XP.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), rows, XP.size(1), batch);
    };
    if (W == 64) run(std::integral_constant<int, 64>{});
    else if (W == 32) run(std::integral_constant<int, 32>{});
    else run(std::integral_constant<int, 16>{});
  });
  return Y;
}

torch::Tensor sampled(torch::Tensor crow, torch::Tensor col, torch::Tensor GP, torch::Tensor XP) {
  TORCH_CHECK(GP.is_contiguous() && XP.is_contiguous(), "GP and XP must be contiguous panels");
  TORCH_CHECK(GP.size(0) == XP.size(0) && GP.size(2) == XP.size(2), "GP and XP panels differ");
  const int64_t rows = crow.numel() - 1, W = XP.size(2);
  TORCH_CHECK(GP.size(1) == rows, "GP must have one row per CSR row");
  auto dval = torch::empty({col.numel()}, GP.options());
  AT_DISPATCH_FLOATING_TYPES(GP.scalar_type(), "sampled", [&] {
    auto run = [&](auto w) {
      sampled_panels<scalar_t, decltype(w)::value>(
          crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), GP.data_ptr<scalar_t>(),
          XP.data_ptr<scalar_t>(), dval.data_ptr<scalar_t>(), rows, XP.size(1), XP.size(0));
    };
    if (W == 64) run(std::integral_constant<int, 64>{});
    else if (W == 32) run(std::integral_constant<int, 32>{});
    else if (W == 16) run(std::integral_constant<int, 16>{});
    else TORCH_CHECK(false, "panel width must be 16, 32 or 64");
  });
  return dval;
}

// ------------------------------------------------------------------ direct sparse convolution

namespace {

template <typename T>
void conv_forward(const int64_t* crow, const int64_t* col, const T* val, const T* xp, T* y,
                  int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t O, int64_t OH,
                  int64_t OW, int64_t kh, int64_t kw, int64_t stride) {
  const int64_t khw = kh * kw;
#pragma omp parallel for collapse(2) schedule(dynamic, 4)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t o = 0; o < O; ++o) {
      T* __restrict__ out = y + (b * O + o) * OH * OW;
      for (int64_t i = 0; i < OH * OW; ++i) out[i] = T(0);
      for (int64_t k = crow[o]; k < crow[o + 1]; ++k) {
        const int64_t c = col[k] / khw, ky = (col[k] % khw) / kw, kx = col[k] % kw;
        const T v = val[k];
        const T* plane = xp + (b * C + c) * Hp * Wp;
        for (int64_t oy = 0; oy < OH; ++oy) {
          const T* __restrict__ src = plane + (oy * stride + ky) * Wp + kx;
          T* __restrict__ dst = out + oy * OW;
          if (stride == 1) {
#pragma omp simd
            for (int64_t ox = 0; ox < OW; ++ox) dst[ox] += v * src[ox];
          } else {
            for (int64_t ox = 0; ox < OW; ++ox) dst[ox] += v * src[ox * stride];
          }
        }
      }
    }
  }
}

// grad of the padded input: colT lists, per input channel c, the non-zeros (o, ky, kx) that read
// it (as o * kh * kw + ky * kw + kx), with their values in valT.
template <typename T>
void conv_grad_input(const int64_t* crowT, const int64_t* colT, const T* valT, const T* g, T* gxp,
                     int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t O, int64_t OH,
                     int64_t OW, int64_t kh, int64_t kw, int64_t stride) {
  const int64_t khw = kh * kw;
#pragma omp parallel for collapse(2) schedule(dynamic, 4)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      T* plane = gxp + (b * C + c) * Hp * Wp;
      for (int64_t i = 0; i < Hp * Wp; ++i) plane[i] = T(0);
      for (int64_t k = crowT[c]; k < crowT[c + 1]; ++k) {
        const int64_t o = colT[k] / khw, ky = (colT[k] % khw) / kw, kx = colT[k] % kw;
        const T v = valT[k];
        const T* gplane = g + (b * O + o) * OH * OW;
        for (int64_t oy = 0; oy < OH; ++oy) {
          const T* __restrict__ src = gplane + oy * OW;
          T* __restrict__ dst = plane + (oy * stride + ky) * Wp + kx;
          if (stride == 1) {
#pragma omp simd
            for (int64_t ox = 0; ox < OW; ++ox) dst[ox] += v * src[ox];
          } else {
            for (int64_t ox = 0; ox < OW; ++ox) dst[ox * stride] += v * src[ox];
          }
        }
      }
    }
  }
}

template <typename T>
void conv_grad_weight(const int64_t* crow, const int64_t* col, const T* g, const T* xp, T* dval,
                      int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t O, int64_t OH,
                      int64_t OW, int64_t kh, int64_t kw, int64_t stride) {
  const int64_t khw = kh * kw;
  const int64_t nnz = crow[O];
  std::vector<int64_t> row_of(nnz);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = crow[o]; k < crow[o + 1]; ++k) row_of[k] = o;
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t o = row_of[k];
    const int64_t c = col[k] / khw, ky = (col[k] % khw) / kw, kx = col[k] % kw;
    T acc = T(0);
    for (int64_t b = 0; b < B; ++b) {
      const T* gplane = g + (b * O + o) * OH * OW;
      const T* plane = xp + (b * C + c) * Hp * Wp;
      for (int64_t oy = 0; oy < OH; ++oy) {
        const T* __restrict__ gs = gplane + oy * OW;
        const T* __restrict__ xs = plane + (oy * stride + ky) * Wp + kx;
        if (stride == 1) {
#pragma omp simd reduction(+ : acc)
          for (int64_t ox = 0; ox < OW; ++ox) acc += gs[ox] * xs[ox];
        } else {
          for (int64_t ox = 0; ox < OW; ++ox) acc += gs[ox] * xs[ox * stride];
        }
      }
    }
    dval[k] = acc;
  }
}

}  // namespace

torch::Tensor conv2d_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor val,
                             torch::Tensor xp, int64_t out_channels, int64_t kh, int64_t kw,
                             int64_t stride, int64_t OH, int64_t OW) {
  TORCH_CHECK(xp.dim() == 4 && xp.is_contiguous(), "xp must be a contiguous (B, C, H, W)");
  auto y = torch::empty({xp.size(0), out_channels, OH, OW}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv2d_forward", [&] {
    conv_forward<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                           val.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
                           y.data_ptr<scalar_t>(), xp.size(0), xp.size(1), xp.size(2),
                           xp.size(3), out_channels, OH, OW, kh, kw, stride);
  });
  return y;
}

torch::Tensor conv2d_grad_input(torch::Tensor crowT, torch::Tensor colT, torch::Tensor valT,
                                torch::Tensor g, int64_t in_channels, int64_t Hp, int64_t Wp,
                                int64_t kh, int64_t kw, int64_t stride) {
  TORCH_CHECK(g.dim() == 4 && g.is_contiguous(), "g must be a contiguous (B, O, OH, OW)");
  auto gxp = torch::empty({g.size(0), in_channels, Hp, Wp}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_grad_input", [&] {
    conv_grad_input<scalar_t>(crowT.data_ptr<int64_t>(), colT.data_ptr<int64_t>(),
                              valT.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                              gxp.data_ptr<scalar_t>(), g.size(0), in_channels, Hp, Wp,
                              g.size(1), g.size(2), g.size(3), kh, kw, stride);
  });
  return gxp;
}

torch::Tensor conv2d_grad_weight(torch::Tensor crow, torch::Tensor col, torch::Tensor g,
                                 torch::Tensor xp, int64_t kh, int64_t kw, int64_t stride) {
  TORCH_CHECK(g.is_contiguous() && xp.is_contiguous(), "g and xp must be contiguous");
  auto dval = torch::empty({col.numel()}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_grad_weight", [&] {
    conv_grad_weight<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                               g.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
                               dval.data_ptr<scalar_t>(), g.size(0), xp.size(1), xp.size(2),
                               xp.size(3), g.size(1), g.size(2), g.size(3), kh, kw, stride);
  });
  return dval;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "x (batch, features) -> panels (nb, features, W), zero-padded");
  m.def("panel_width", &panel_width, "the panel width W used for a batch size");
  m.def("spmm", &spmm, "Y (batch, rows) = X @ CSR(W)^T from panels; values read through perm",
        py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("XP"), py::arg("rows"),
        py::arg("batch"), py::arg("perm") = py::none());
  m.def("sampled", &sampled, "dW at the non-zeros from panels of G and X");
  m.def("conv2d_forward", &conv2d_forward, "direct sparse convolution");
  m.def("conv2d_grad_input", &conv2d_grad_input, "gradient of the padded input");
  m.def("conv2d_grad_weight", &conv2d_grad_weight, "gradient at the non-zero weights");
  m.def("num_threads", []() { return omp_get_max_threads(); });
}
