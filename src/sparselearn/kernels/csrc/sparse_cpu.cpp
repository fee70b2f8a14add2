// CPU kernels for sparse training: CSR weight times dense activations with the batch contiguous,
// the sampled weight gradient, and direct sparse convolution (NCHW).
//
// Layouts. Linear: activations are passed transposed, (features, batch), so that each non-zero
// weight scales one contiguous batch row: the inner loops vectorise over the batch.
// Convolution: CSR rows are output channels; a column index encodes (input channel, ky, kx) as
// c * kh * kw + ky * kw + kx; each non-zero adds a scaled, shifted input plane to an output plane.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <vector>

namespace {

// Batch block: a block of XT (features x kBlock floats) stays in L2 while every non-zero of W
// reads its row; without blocking, each non-zero streams a whole batch row from L3.
constexpr int64_t kBlock = 64;

// YT[r, :] = sum_k val[idx(k)] * XT[col[k], :] over the non-zeros k of row r, where idx is the
// identity or, for the transposed matrix, perm (so the values need no reordered copy).
template <typename T>
void spmm_rows(const int64_t* crow, const int64_t* col, const T* val, const int64_t* perm,
               const T* XT, T* YT, int64_t rows, int64_t B) {
  // one parallel region; a static row schedule gives each thread the same rows in every batch
  // block, so threads never wait for each other between blocks (nowait)
#pragma omp parallel
  for (int64_t b0 = 0; b0 < B; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, B - b0);
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      T acc[kBlock];
      for (int64_t b = 0; b < nb; ++b) acc[b] = T(0);
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        const T v = perm ? val[perm[k]] : val[k];
        const T* __restrict__ x = XT + col[k] * B + b0;
        if (k + 1 < crow[r + 1]) __builtin_prefetch(XT + col[k + 1] * B + b0);
#pragma omp simd
        for (int64_t b = 0; b < nb; ++b) acc[b] += v * x[b];
      }
      T* __restrict__ y = YT + r * B + b0;
      for (int64_t b = 0; b < nb; ++b) y[b] = acc[b];
    }
  }
}

// dval[k] = <GT[r, :], XT[col[k], :]> for each non-zero k = (r, col[k]), summed block by block.
template <typename T>
void sampled_rows(const int64_t* crow, const int64_t* col, const T* GT, const T* XT, T* dval,
                  int64_t rows, int64_t B) {
  // as above: the same thread owns row r (and its dval entries) in every block, so the
  // accumulation across blocks needs no synchronisation
#pragma omp parallel
  for (int64_t b0 = 0; b0 < B; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, B - b0);
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict__ g = GT + r * B + b0;
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        const T* __restrict__ x = XT + col[k] * B + b0;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t b = 0; b < nb; ++b) acc += g[b] * x[b];
        dval[k] = (b0 == 0 ? T(0) : dval[k]) + acc;
      }
    }
  }
}

}  // namespace

torch::Tensor spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor val, torch::Tensor XT,
                   int64_t rows, c10::optional<torch::Tensor> perm) {
  TORCH_CHECK(XT.dim() == 2 && XT.is_contiguous(), "XT must be a contiguous (features, batch)");
  TORCH_CHECK(crow.numel() == rows + 1, "crow must have rows + 1 entries");
  auto YT = torch::empty({rows, XT.size(1)}, XT.options());
  const int64_t* p = perm.has_value() ? perm->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(XT.scalar_type(), "spmm", [&] {
    spmm_rows<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                        val.data_ptr<scalar_t>(), p, XT.data_ptr<scalar_t>(),
                        YT.data_ptr<scalar_t>(), rows, XT.size(1));
  });
  return YT;
}

torch::Tensor sampled(torch::Tensor crow, torch::Tensor col, torch::Tensor GT, torch::Tensor XT) {
  TORCH_CHECK(GT.is_contiguous() && XT.is_contiguous(), "GT and XT must be contiguous");
  TORCH_CHECK(GT.size(1) == XT.size(1), "GT and XT must share the batch dimension");
  const int64_t rows = crow.numel() - 1;
  auto dval = torch::empty({col.numel()}, GT.options());
  AT_DISPATCH_FLOATING_TYPES(GT.scalar_type(), "sampled", [&] {
    sampled_rows<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                           GT.data_ptr<scalar_t>(), XT.data_ptr<scalar_t>(),
                           dval.data_ptr<scalar_t>(), rows, GT.size(1));
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
  m.def("spmm", &spmm, "YT = CSR(W) @ XT, activations (features, batch); values read through perm",
        py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("XT"), py::arg("rows"),
        py::arg("perm") = py::none());
  m.def("sampled", &sampled, "dW at the non-zeros: <GT[row], XT[col]>");
  m.def("conv2d_forward", &conv2d_forward, "direct sparse convolution");
  m.def("conv2d_grad_input", &conv2d_grad_input, "gradient of the padded input");
  m.def("conv2d_grad_weight", &conv2d_grad_weight, "gradient at the non-zero weights");
  m.def("num_threads", []() { return omp_get_max_threads(); });
}
