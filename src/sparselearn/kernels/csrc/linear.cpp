// Linear layers: a CSR weight (rows: output units) times dense activations, its transposed
// product and the sampled weight gradient.
//
// Linear layout. Activations are packed into panels: XP (nb, features, W) holds batch rows
// p*W .. p*W+W-1 of x transposed, zero-padded to a whole panel. Each non-zero weight then scales
// one contiguous W-float row of a panel (vectorised over the batch, held in registers), and one
// panel (features * W floats) stays in L2 while every non-zero reads it. A plain (features, batch)
// transpose would not: its rows are a whole batch apart (1 KiB for 256 floats), so a batch block
// of them maps to a fraction of the cache sets and thrashes L2 (docs/performance.md).

#include "common.h"
#include "kernels.h"

using namespace slk;

namespace {

// XP[p, f, b] = x[p * W + b, f] (0 past the batch), x read through strides (sb, sf) so that an
// expanded or transposed input needs no copy first. With psum (nb, F) given, also
// psum[p, f] = sum of x[p * W + b, f] over the panel's rows (the column sums, for a bias).
// pack_block does one block: panel p, features f0 .. f0 + kPackF - 1.
constexpr int64_t kPackF = 64;  // features per block: W x kPackF reads, kPackF x W writes

template <typename T>
inline void pack_block(const T* x, int64_t sb, int64_t sf, T* XP, T* psum, int64_t B, int64_t F,
                       int64_t W, int64_t p, int64_t f0) {
  constexpr int64_t kF = kPackF;
  const int64_t nf = std::min(kF, F - f0);
  T* out = XP + (p * F + f0) * W;
  T acc[kF] = {};
  int64_t done = 0;  // features packed by the vector path
  if (sf == 0) {
    // constant along the features (an expanded tensor, e.g. the gradient of a sum): each
    // panel row is one vector of W batch values, stored contiguously nf times
    constexpr int L = kLanes<T>, kMaxV = 64 / L;  // W <= 64 (panel_width)
    alignas(64) T colv[64] = {};
    T total = T(0);
    for (int64_t b = 0; b < W; ++b) {
      const int64_t row = p * W + b;
      colv[b] = row < B ? x[row * sb] : T(0);
      total += colv[b];
    }
    vec_t<T> cv[kMaxV];
#pragma GCC unroll 8
    for (int i = 0; i < kMaxV; ++i) cv[i] = loadv<T>(colv + i * L);
    // vector stores unrolled over the widest panel (std::copy made a memmove call per row)
    for (int64_t f = 0; f < nf; ++f) {
#pragma GCC unroll 8
      for (int i = 0; i < kMaxV; ++i)
        if (i * L < W) storev<T>(out + f * W + i * L, cv[i]);
      acc[f] = total;
    }
    done = nf;
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (sf == 1) {
      // 16 x 16 blocks transposed in registers: 16 vector loads, 16 vector stores (the
      // scalar loop below stores one float per cache line touched)
      done = nf / 16 * 16;
      __m512 sums[kF / 16];
      for (int64_t fb = 0; fb < done; fb += 16) sums[fb / 16] = _mm512_setzero_ps();
      // batch blocks outside, features inside: consecutive blocks read the next cache line
      // of the same rows (features outside, with rows 4 KiB apart, ran at half the speed)
      for (int64_t b0 = 0; b0 < W; b0 += 16) {
        for (int64_t fb = 0; fb < done; fb += 16) {
          __m512 r[16];
          for (int i = 0; i < 16; ++i) {
            const int64_t row = p * W + b0 + i;
            r[i] = row < B ? _mm512_loadu_ps(x + row * sb + f0 + fb) : _mm512_setzero_ps();
            sums[fb / 16] = _mm512_add_ps(sums[fb / 16], r[i]);
          }
          transpose16(r);
          for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (fb + i) * W + b0, r[i]);
        }
      }
      for (int64_t fb = 0; fb < done; fb += 16) _mm512_storeu_ps(acc + fb, sums[fb / 16]);
    }
  }
#endif
  if (done < nf) {
    for (int64_t b = 0; b < W; ++b) {
      const int64_t row = p * W + b;
      if (row < B) {
        const T* in = x + row * sb + f0 * sf;
        if (sf == 1) {
          for (int64_t f = done; f < nf; ++f) out[f * W + b] = in[f];
          if (psum)
            for (int64_t f = done; f < nf; ++f) acc[f] += in[f];
        } else {
          for (int64_t f = done; f < nf; ++f) out[f * W + b] = in[f * sf];
          if (psum)
            for (int64_t f = done; f < nf; ++f) acc[f] += in[f * sf];
        }
      } else {
        for (int64_t f = done; f < nf; ++f) out[f * W + b] = T(0);
      }
    }
  }
  if (psum)
    for (int64_t f = 0; f < nf; ++f) psum[p * F + f0 + f] = acc[f];
}

// Every block. The loops are an orphaned worksharing construct: they split among the threads of
// the enclosing parallel region (see pack_panels, linear_forward), and end with its barrier.
template <typename T>
void pack_body(const T* x, int64_t sb, int64_t sf, T* XP, T* psum, int64_t B, int64_t F,
               int64_t W) {
  const int64_t nb = (B + W - 1) / W;
#pragma omp for collapse(2) schedule(static)
  for (int64_t p = 0; p < nb; ++p)
    for (int64_t f0 = 0; f0 < F; f0 += kPackF) pack_block<T>(x, sb, sf, XP, psum, B, F, W, p, f0);
}

template <typename T>
void pack_panels(const T* x, int64_t sb, int64_t sf, T* XP, T* psum, int64_t B, int64_t F,
                 int64_t W) {
  const int nt = team(B * F);
#pragma omp parallel if (nt > 1) num_threads(nt)
  pack_body<T>(x, sb, sf, XP, psum, B, F, W);
}

// Y[b * ld + j] = tile[j][b] (+ bias[j]) for j < nr, b < nvalid: a tile of nr rows of W
// batch values each, written back in the (batch, rows) layout. Whole 16 x 16 blocks go through
// registers into a staging block of 16 batch rows (in L1), which is then stored row after row,
// each row's nr / 16 cache lines consecutively. With ld a multiple of 1024 floats (4096- and
// 1024-wide layers) the same column of every row falls in one L1 set, and storing 16-float
// pieces row by row down a column evicts the lines it has just written; through the staging
// rows those widths store as fast as any other (docs/performance.md, "Output and packing by
// width").
constexpr int64_t kMaxTileRows = 64;  // the tiles' rows (spmm_body, backward_body)

template <typename T, int W>
inline void store_tile(const T (*tile)[W], int64_t nr, int64_t nvalid, const T* bias, T* Y,
                       int64_t ld) {
  int64_t b0 = 0, whole = 0;  // batch rows / tile rows written by the vector path
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && W % 16 == 0) {
    whole = nr / 16 * 16;
    if (whole > 0) {
      alignas(64) float stage[16][kMaxTileRows];
      for (; b0 + 16 <= nvalid; b0 += 16) {
        for (int64_t j0 = 0; j0 < whole; j0 += 16) {
          const __m512 bv = bias ? _mm512_loadu_ps(bias + j0) : _mm512_setzero_ps();
          __m512 r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(tile[j0 + i] + b0);
          transpose16(r);
          for (int i = 0; i < 16; ++i) _mm512_store_ps(stage[i] + j0, _mm512_add_ps(r[i], bv));
        }
        // (unrolled over the most vectors a row can hold: a loop bounded by `whole` alone
        // became a call to memmove per 256-byte row)
        for (int i = 0; i < 16; ++i) {
#pragma GCC unroll 4
          for (int64_t j0 = 0; j0 < kMaxTileRows; j0 += 16)
            if (j0 < whole) _mm512_storeu_ps(Y + (b0 + i) * ld + j0, _mm512_load_ps(stage[i] + j0));
        }
      }
    }
  }
#endif
  // what the vector path left: the last batch rows (all tile rows), then the last tile rows
  for (int64_t b = 0; b < nvalid; ++b) {
    const int64_t j_begin = b < b0 ? whole : 0;
    T* y = Y + b * ld;
    if (bias)
      for (int64_t j = j_begin; j < nr; ++j) y[j] = tile[j][b] + bias[j];
    else
      for (int64_t j = j_begin; j < nr; ++j) y[j] = tile[j][b];
  }
}

// out[b] = sum over the non-zeros k in [begin, end) of val[k] * X[col[k], b]. Bound by L2
// bandwidth (W / 16 cache lines per non-zero; a second accumulator set does not help).
// No software prefetch: the out-of-order window already covers the L2 latency, and the
// prefetch instructions compete with the loads for the load ports.
template <typename T, int W, typename I>
inline __attribute__((always_inline)) void row_times_panel(int64_t begin, int64_t end,
                                                           const I* col, const T* val,
                                                           const T* X, T* __restrict__ out) {
  constexpr int L = kLanes<T>, NV = W / L;
  vec_t<T> acc[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) acc[i] = vec_t<T>{};
  for (int64_t k = begin; k < end; ++k) {
    const T v = val[k];
    const T* x = X + int64_t(col[k]) * W;
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc[i] += v * loadv<T>(x + i * L);
  }
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) storev<T>(out + i * L, acc[i]);
}

// Y[b, r] = sum_k val[k] * XP[p, col[k], b - p W] over the non-zeros k of row r. Y is written in
// the ordinary (batch, rows) layout through a small tile, so that its stores stay contiguous.
template <typename T, int W, typename I>
void spmm_tile(const int64_t* crow, const I* col, const T* val, const T* XP, const T* bias,
               T* Y, int64_t rows, int64_t F, int64_t B, int64_t p, int64_t t) {
  constexpr int64_t kRows = kMaxTileRows;  // rows per tile (see store_tile)
  const T* X = XP + p * F * W;
  const int64_t nvalid = std::min<int64_t>(W, B - p * W);
  alignas(64) T tile[kRows][W];
  const int64_t r0 = t * kRows, nr = std::min(kRows, rows - r0);
  for (int64_t j = 0; j < nr; ++j) {
    const int64_t r = r0 + j;
    row_times_panel<T, W, I>(crow[r], crow[r + 1], col, val, X, tile[j]);
  }
  store_tile<T, W>(tile, nr, nvalid, bias ? bias + r0 : nullptr, Y + p * W * rows + r0, rows);
}

template <typename T, int W, typename I>
void spmm_body(const int64_t* crow, const I* col, const T* val, const T* XP, const T* bias,
               T* Y, int64_t rows, int64_t F, int64_t B) {
  const int64_t nb = (B + W - 1) / W;
  const int64_t ntiles = (rows + kMaxTileRows - 1) / kMaxTileRows;
  // (orphaned, in the caller's parallel region) a static tile schedule gives each thread the
  // same rows in every panel, so threads never wait for each other between panels (nowait)
  for (int64_t p = 0; p < nb; ++p) {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < ntiles; ++t)
      spmm_tile<T, W, I>(crow, col, val, XP, bias, Y, rows, F, B, p, t);
  }
}

template <typename T, int W, typename I>
void spmm_panels(const int64_t* crow, const I* col, const T* val, const T* XP, const T* bias,
                 T* Y, int64_t rows, int64_t F, int64_t B) {
  const int nt = team(B * (rows + crow[rows]));
#pragma omp parallel if (nt > 1) num_threads(nt)
  spmm_body<T, W, I>(crow, col, val, XP, bias, Y, rows, F, B);
}


// The transposing reduction of N = kLanes<float> vectors of lane-wise partial sums: one vector
// whose lane j is the sum of the lanes of s[bitreverse(j)] (no horizontal sum per vector). Each
// level folds pairs: lanes of a and b summed pairwise over blocks of 2H.
constexpr int kFloatLanes = kLanes<float>;
typedef int vNi __attribute__((vector_size(kVecBytes)));

template <int H>
inline vNf fold(vNf a, vNf b) {
  constexpr int N = kFloatLanes;
  vNi lo, hi;
  for (int i = 0, n = 0; i < N; i += 2 * H)
    for (int side = 0; side < 2; ++side)
      for (int j = 0; j < H; ++j, ++n) {
        lo[n] = side * N + i + j;
        hi[n] = side * N + i + H + j;
      }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

template <int M>
inline __attribute__((always_inline)) vNf transposed_sums(const vNf* s) {
  if constexpr (M == 1) {
    return s[0];
  } else {
    vNf t[M / 2];
#pragma GCC unroll 8
    for (int i = 0; i < M / 2; ++i) t[i] = fold<M / 2>(s[2 * i], s[2 * i + 1]);
    return transposed_sums<M / 2>(t);
  }
}

// The slot of the j-th of N non-zeros in transposed_sums, so that the sums come out in order.
constexpr int slot(int j) {
  int r = 0;
  for (int b = 1; b < kFloatLanes; b <<= 1) r = (r << 1) | ((j & b) ? 1 : 0);
  return r;
}

// dval[k] = sum_b GP[p, r, b] * XP[p, col[k], b] summed over the panels p, for each non-zero
// k = (r, col[k]). The same thread owns row r (and its dval entries) in every panel.
template <typename T, int W, typename I>
void sampled_panels(const int64_t* crow, const I* col, const T* GP, const T* XP, T* dval,
                    int64_t rows, int64_t F, int64_t nb) {
  const int nt = team(nb * W * (rows + crow[rows]));
#pragma omp parallel if (nt > 1) num_threads(nt)
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
      if constexpr (std::is_same_v<T, float> && W % kFloatLanes == 0) {
        // N = kFloatLanes non-zeros at a time: N lane-wise partial dot products, then one
        // transposing reduction gives their N sums in one register (no horizontal sum per
        // non-zero)
        constexpr int N = kFloatLanes, NV = W / N;
        vNf gv[NV];
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) gv[c] = loadv<float>(g + N * c);
        for (; k + N <= end; k += N) {
          vNf s[N];
#pragma GCC unroll 16
          for (int j = 0; j < N; ++j) {
            if (k + j + kPrefetch < end) {
              const T* q = X + int64_t(col[k + j + kPrefetch]) * W;
#pragma GCC unroll 4
              for (int l = 0; l < W; l += 16) __builtin_prefetch(q + l);
            }
            const T* x = X + int64_t(col[k + j]) * W;
            vNf t = gv[0] * loadv<float>(x);
#pragma GCC unroll 8
            for (int c = 1; c < NV; ++c) t += gv[c] * loadv<float>(x + N * c);
            s[slot(j)] = t;
          }
          vNf sum = transposed_sums<N>(s);
          if (p > 0) sum += loadv<float>(dval + k);
          storev<float>(dval + k, sum);
        }
      }
      for (; k < end; ++k) {
        if (k + kPrefetch < end) {
          const T* q = X + int64_t(col[k + kPrefetch]) * W;
#pragma GCC unroll 8
          for (int l = 0; l < W; l += 64 / int(sizeof(T))) __builtin_prefetch(q + l);
        }
        const T* __restrict__ x = X + int64_t(col[k]) * W;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int b = 0; b < W; ++b) acc += g[b] * x[b];
        dval[k] = (p == 0 ? T(0) : dval[k]) + acc;
      }
    }
  }
}


// Both backward products in one pass over the CSR of W^T (rows c: input features; non-zeros
// k = (c, r = colT[k]) with values valT in that order):
//   GX[b, c] = sum_k valT[k] * GP[p, r, b - p W]  (the input gradient, G @ W)
//   dvalT[k] = sum_b GP[p, r, b] * XP[p, c, b]    (the weight gradient at the non-zeros)
// Each non-zero reads one random row of the G panel (from L2: the limit, as in spmm); here that
// one read serves both products, where two separate kernels read a row each. With twice the
// arithmetic per row read, prefetching the row kPrefetch non-zeros ahead pays here, where in
// spmm it costs more load slots than it saves.
// In the caller's parallel region (backward_region, which has made valT = val[perm]): the
// products, then dval = dvalT[perm_inv], W's CSR order (a gather with sequential writes, where
// scattering through perm would write at random).
template <typename T, int W, typename I>
void backward_body(const int64_t* crowT, const I* colT, const I* perm_inv, const T* valT,
                   const T* GP, const T* XP, T* GX, T* dvalT, T* dval, int64_t rows, int64_t F,
                   int64_t B) {
  constexpr int L = kLanes<T>, NV = W / L;
  const int64_t nb = (B + W - 1) / W, nnz = crowT[F];
  constexpr int64_t kRows = kMaxTileRows;  // rows of W^T per tile (see store_tile)
  const int64_t ntiles = (F + kRows - 1) / kRows;
  for (int64_t p = 0; p < nb; ++p) {
    const T* G = GP + p * rows * W;
    const T* X = XP + p * F * W;
    const int64_t nvalid = std::min<int64_t>(W, B - p * W);
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < ntiles; ++t) {
      alignas(64) T tile[kRows][W];
      const int64_t c0 = t * kRows, nr = std::min(kRows, F - c0);
      for (int64_t j = 0; j < nr; ++j) {
        const int64_t c = c0 + j;
        vec_t<T> xc[NV], acc[NV];
#pragma GCC unroll 16
        for (int i = 0; i < NV; ++i) {
          xc[i] = loadv<T>(X + c * W + i * L);
          acc[i] = vec_t<T>{};
        }
        const int64_t begin = crowT[c], end = crowT[c + 1];
        if constexpr (std::is_same_v<T, float>) {
          // N = kFloatLanes non-zeros at a time (the last group padded with zeros): their N
          // lane-wise partial dot products reduce to one register of sums (see sampled_panels)
          constexpr int N = kFloatLanes;
          for (int64_t k = begin; k < end; k += N) {
            const int m = int(std::min<int64_t>(N, end - k));
            vNf s[N];
#pragma GCC unroll 16
            for (int q = 0; q < N; ++q) {
              if (q < m) {
                if (k + q + kPrefetch < end) {
                  const float* next = G + int64_t(colT[k + q + kPrefetch]) * W;
#pragma GCC unroll 4
                  for (int i = 0; i < W; i += 16) __builtin_prefetch(next + i);
                }
                const float* g = G + int64_t(colT[k + q]) * W;
                const float v = valT[k + q];
                vNf d = vNf{};
#pragma GCC unroll 8
                for (int i = 0; i < NV; ++i) {
                  const vNf gi = loadv<float>(g + N * i);
                  acc[i] += v * gi;
                  d += gi * xc[i];
                }
                s[slot(q)] = d;
              } else {
                s[slot(q)] = vNf{};
              }
            }
            vNf sum = transposed_sums<N>(s);
            if (m == N) {
              if (p > 0) sum += loadv<float>(dvalT + k);
              storev<float>(dvalT + k, sum);
            } else {
#if defined(__AVX512F__)
              // a short group (at 1% density most rows of W^T hold about ten non-zeros): one
              // masked load and store instead of m scalar read-modify-writes
              const __mmask16 first = __mmask16((1u << m) - 1);
              __m512 out = __m512(sum);
              if (p > 0) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(first, dvalT + k));
              _mm512_mask_storeu_ps(dvalT + k, first, out);
#else
              for (int q = 0; q < m; ++q) dvalT[k + q] = (p > 0 ? dvalT[k + q] : 0.0f) + sum[q];
#endif
            }
          }
        } else {
          for (int64_t k = begin; k < end; ++k) {
            const T* g = G + int64_t(colT[k]) * W;
            const T v = valT[k];
            vec_t<T> d = vec_t<T>{};
#pragma GCC unroll 16
            for (int i = 0; i < NV; ++i) {
              const vec_t<T> gi = loadv<T>(g + i * L);
              acc[i] += v * gi;
              d += gi * xc[i];
            }
            T dot = T(0);
#pragma GCC unroll 16
            for (int l = 0; l < L; ++l) dot += d[l];
            dvalT[k] = (p > 0 ? dvalT[k] : T(0)) + dot;
          }
        }
#pragma GCC unroll 16
        for (int i = 0; i < NV; ++i) storev<T>(tile[j] + i * L, acc[i]);
      }
      store_tile<T, W>(tile, nr, nvalid, nullptr, GX + p * W * F + c0, F);
    }
  }
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t k = 0; k < nnz; ++k) dval[k] = dvalT[perm_inv[k]];
}

}  // namespace

// Panels of 64 samples where a row of one is at most four vectors (AVX-512); with narrower
// vectors, 32: the one-pass backward keeps a panel row of the input and of its product in
// registers (2 x 8 vectors at 64 with AVX2's 32-byte ones would take all 16 of its registers)
constexpr int64_t kWidestPanel = kVecBytes == 64 ? 64 : 32;

int64_t panel_width(int64_t batch) {
  return batch >= kWidestPanel ? kWidestPanel : batch > 16 ? 32 : 16;
}

// Panels of x (any strides) and, with want_sum, the column sums of x (sum over the batch).
std::vector<torch::Tensor> pack_impl(const torch::Tensor& x, bool want_sum) {
  TORCH_CHECK(x.dim() == 2, "pack expects a (batch, features) matrix");
  const int64_t B = x.size(0), F = x.size(1), W = panel_width(B), nb = (B + W - 1) / W;
  auto XP = torch::empty({nb, F, W}, x.options());
  auto psum = want_sum ? torch::empty({nb, F}, x.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pack", [&] {
    pack_panels<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                          XP.data_ptr<scalar_t>(),
                          want_sum ? psum.data_ptr<scalar_t>() : nullptr, B, F, W);
  });
  if (!want_sum) return {XP};
  return {XP, psum.sum(0)};
}

torch::Tensor pack(torch::Tensor x) { return pack_impl(x, false)[0]; }

std::vector<torch::Tensor> pack_sum(torch::Tensor x) { return pack_impl(x, true); }

namespace {

// The bias of a product with `rows` outputs, contiguous (undefined where there is none).
torch::Tensor checked_bias(const c10::optional<torch::Tensor>& bias, int64_t rows,
                           const torch::Tensor& x) {
  if (!bias.has_value()) return torch::Tensor();
  auto b = bias->contiguous();
  TORCH_CHECK(b.numel() == rows && b.scalar_type() == x.scalar_type(),
              "bias must have one entry per row, of the input's dtype");
  return b;
}

}  // namespace

torch::Tensor spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor val, torch::Tensor XP,
                   int64_t rows, int64_t batch, c10::optional<torch::Tensor> perm,
                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(XP.dim() == 3 && XP.is_contiguous(), "XP must be contiguous panels (nb, F, W)");
  TORCH_CHECK(crow.numel() == rows + 1, "crow must have rows + 1 entries");
  const int64_t W = XP.size(2);
  TORCH_CHECK(W == panel_width(batch) && XP.size(0) == (batch + W - 1) / W, "XP/batch mismatch");
  auto Y = torch::empty({batch, rows}, XP.options());
  const torch::Tensor b = checked_bias(bias, rows, XP);
  // values in this CSR's order: a gather for the transposed matrix (cheaper than reading
  // val[perm[k]] at random inside the kernel)
  auto v = perm.has_value() ? torch::empty_like(val) : val.contiguous();
  TORCH_CHECK(!perm.has_value() || perm->scalar_type() == col.scalar_type(),
              "perm and col must have the same index dtype");
  AT_DISPATCH_FLOATING_TYPES(XP.scalar_type(), "spmm", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "spmm", [&] {
      if (perm.has_value())
        gather<scalar_t, index_t>(val.data_ptr<scalar_t>(), perm->data_ptr<index_t>(),
                                  v.data_ptr<scalar_t>(), v.numel());
      auto run = [&](auto w) {
        spmm_panels<scalar_t, decltype(w)::value, index_t>(
            crow.data_ptr<int64_t>(), col.data_ptr<index_t>(), v.data_ptr<scalar_t>(),
            XP.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
            Y.data_ptr<scalar_t>(), rows, XP.size(1), batch);
      };
      if (W == 64) run(std::integral_constant<int, 64>{});
      else if (W == 32) run(std::integral_constant<int, 32>{});
      else run(std::integral_constant<int, 16>{});
    });
  });
  return Y;
}

torch::Tensor sampled(torch::Tensor crow, torch::Tensor col, torch::Tensor GP, torch::Tensor XP) {
  TORCH_CHECK(GP.is_contiguous() && XP.is_contiguous(), "GP and XP must be contiguous panels");
  TORCH_CHECK(GP.size(0) == XP.size(0) && GP.size(2) == XP.size(2), "GP and XP panels differ");
  const int64_t rows = crow.numel() - 1, W = XP.size(2);
  TORCH_CHECK(GP.size(1) == rows, "GP must have one row per CSR row");
  auto dval = torch::empty({col.numel()}, GP.options());
  TORCH_CHECK(W == 16 || W == 32 || W == 64, "panel width must be 16, 32 or 64");
  AT_DISPATCH_FLOATING_TYPES(GP.scalar_type(), "sampled", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "sampled", [&] {
      auto run = [&](auto w) {
        sampled_panels<scalar_t, decltype(w)::value, index_t>(
            crow.data_ptr<int64_t>(), col.data_ptr<index_t>(), GP.data_ptr<scalar_t>(),
            XP.data_ptr<scalar_t>(), dval.data_ptr<scalar_t>(), rows, XP.size(1), XP.size(0));
      };
      if (W == 64) run(std::integral_constant<int, 64>{});
      else if (W == 32) run(std::integral_constant<int, 32>{});
      else run(std::integral_constant<int, 16>{});
    });
  });
  return dval;
}

namespace {

// y = x @ W.T (+ bias) and the panels of x, in one parallel region (packing, its barrier, the
// product; no barrier where the panels divide evenly among the threads): one wake-up of the
// threads instead of two.
template <typename T, int W, typename I>
void forward_region(const T* x, int64_t sb, int64_t sf, T* XP, const int64_t* crow, const I* col,
                    const T* val, const T* bias, T* Y, int64_t rows, int64_t F, int64_t B) {
  const int nt = team(B * (F + rows + crow[rows]));
  const int64_t nb = (B + W - 1) / W;
#pragma omp parallel if (nt > 1) num_threads(nt)
  {
    const int64_t threads = omp_get_num_threads();
    if (threads > 1 && nb % threads == 0) {
      // as many panels for every thread: each packs the panels it multiplies, so that no
      // thread waits for another's packing (a barrier: a wake-up of sleeping threads under
      // OMP_WAIT_POLICY=PASSIVE); each output is computed as in spmm_body, bit for bit
      const int64_t per = nb / threads, first = omp_get_thread_num() * per;
      const int64_t ntiles = (rows + kMaxTileRows - 1) / kMaxTileRows;
      for (int64_t p = first; p < first + per; ++p) {
        for (int64_t f0 = 0; f0 < F; f0 += kPackF)
          pack_block<T>(x, sb, sf, XP, nullptr, B, F, W, p, f0);
        for (int64_t t = 0; t < ntiles; ++t)
          spmm_tile<T, W, I>(crow, col, val, XP, bias, Y, rows, F, B, p, t);
      }
    } else {
      pack_body<T>(x, sb, sf, XP, nullptr, B, F, W);
      spmm_body<T, W, I>(crow, col, val, XP, bias, Y, rows, F, B);
    }
  }
}

// The backward in one parallel region: the output gradient packed (with its column sums, the
// bias gradient, when asked), then both products (backward_body).
template <typename T, int W, typename I>
void backward_region(const T* g, int64_t sb, int64_t sf, T* GP, T* psum, T* gbias,
                     const int64_t* crowT, const I* colT, const I* perm, const I* perm_inv,
                     const T* val, T* valT, const T* XP, T* GX, T* dvalT, T* dval, int64_t rows,
                     int64_t F, int64_t B) {
  const int64_t nb = (B + W - 1) / W;
  const int nt = team(B * (F + rows + 2 * crowT[F]));
#pragma omp parallel if (nt > 1) num_threads(nt)
  {
    // valT = val[perm] before packing, without a barrier of its own: the packing's barrier
    // ends both (each barrier wakes the sleeping threads under OMP_WAIT_POLICY=PASSIVE)
    const int64_t nnz = crowT[F];
#pragma omp for schedule(static) nowait
    for (int64_t k = 0; k < nnz; ++k) valT[k] = val[perm[k]];
    pack_body<T>(g, sb, sf, GP, psum, B, rows, W);
    if (gbias) {
#pragma omp for schedule(static) nowait
      for (int64_t r = 0; r < rows; ++r) {
        T total = T(0);
        for (int64_t p = 0; p < nb; ++p) total += psum[p * rows + r];
        gbias[r] = total;
      }
    }
    backward_body<T, W, I>(crowT, colT, perm_inv, valT, GP, XP, GX, dvalT, dval, rows, F, B);
  }
}

template <typename F>
void with_panel_width(int64_t W, F&& run) {
  if (W == 64) run(std::integral_constant<int, 64>{});
  else if (W == 32) run(std::integral_constant<int, 32>{});
  else run(std::integral_constant<int, 16>{});
}

}  // namespace

// (y, panels of x) for y = x @ W.T (+ bias); x of any strides.
std::vector<torch::Tensor> linear_forward(torch::Tensor x, torch::Tensor crow, torch::Tensor col,
                                          torch::Tensor val, int64_t rows,
                                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2, "x must be (batch, features)");
  TORCH_CHECK(crow.numel() == rows + 1, "crow must have rows + 1 entries");
  const int64_t B = x.size(0), F = x.size(1), W = panel_width(B);
  auto XP = torch::empty({(B + W - 1) / W, F, W}, x.options());
  auto Y = torch::empty({B, rows}, x.options());
  auto v = val.contiguous();
  const torch::Tensor b = checked_bias(bias, rows, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_forward", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "linear_forward", [&] {
      with_panel_width(W, [&](auto w) {
        forward_region<scalar_t, decltype(w)::value, index_t>(
            x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), XP.data_ptr<scalar_t>(),
            crow.data_ptr<int64_t>(), col.data_ptr<index_t>(), v.data_ptr<scalar_t>(),
            b.defined() ? b.data_ptr<scalar_t>() : nullptr, Y.data_ptr<scalar_t>(), rows, F,
            B);
      });
    });
  });
  return {Y, XP};
}

// (grad_x (batch, F), dval (nnz,) in the CSR order of W, and the bias gradient: empty unless
// want_bias)
// for y = x @ W.T (+ bias), from the output gradient (any strides) and the panels of x; W^T's
// CSR with perm (valT[k] = val[perm[k]]) and its inverse. (W's own CSR, crow and col, is not
// read: the values' gradient is gathered in its order through perm_inv.)
std::vector<torch::Tensor> linear_backward(torch::Tensor /*crow*/, torch::Tensor /*col*/,
                                           torch::Tensor crowT, torch::Tensor colT,
                                           torch::Tensor perm, torch::Tensor perm_inv,
                                           torch::Tensor val, torch::Tensor grad_y,
                                           torch::Tensor XP, bool want_bias) {
  TORCH_CHECK(XP.dim() == 3 && XP.is_contiguous(), "XP must be contiguous panels (nb, F, W)");
  TORCH_CHECK(grad_y.dim() == 2, "grad_y must be (batch, rows)");
  const int64_t B = grad_y.size(0), rows = grad_y.size(1);
  const int64_t F = XP.size(1), W = XP.size(2), nb = XP.size(0), nnz = colT.numel();
  TORCH_CHECK(W == panel_width(B) && nb == (B + W - 1) / W, "XP/batch mismatch");
  TORCH_CHECK(crowT.numel() == F + 1, "crowT must have one row per input feature (+1)");
  TORCH_CHECK(perm.numel() == nnz && perm_inv.numel() == nnz && val.numel() == nnz,
              "perm, perm_inv and val must have nnz entries");
  TORCH_CHECK(perm.scalar_type() == colT.scalar_type() &&
                  perm_inv.scalar_type() == colT.scalar_type(),
              "perm, perm_inv and colT must have the same index dtype");
  TORCH_CHECK(grad_y.scalar_type() == XP.scalar_type(), "grad_y and XP dtypes differ");
  auto opts = XP.options();
  auto GP = torch::empty({nb, rows, W}, opts);
  auto psum = want_bias ? torch::empty({nb, rows}, opts) : torch::Tensor();
  auto gbias = want_bias ? torch::empty({rows}, opts) : torch::Tensor();
  auto GX = torch::empty({B, F}, opts);
  auto valT = torch::empty({nnz}, opts);
  auto dvalT = torch::empty({nnz}, opts);
  auto dval = torch::empty({nnz}, opts);
  auto v = val.contiguous();
  AT_DISPATCH_FLOATING_TYPES(XP.scalar_type(), "linear_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(colT.scalar_type(), "linear_backward", [&] {
      with_panel_width(W, [&](auto w) {
        backward_region<scalar_t, decltype(w)::value, index_t>(
            grad_y.data_ptr<scalar_t>(), grad_y.stride(0), grad_y.stride(1),
            GP.data_ptr<scalar_t>(), want_bias ? psum.data_ptr<scalar_t>() : nullptr,
            want_bias ? gbias.data_ptr<scalar_t>() : nullptr, crowT.data_ptr<int64_t>(),
            colT.data_ptr<index_t>(), perm.data_ptr<index_t>(), perm_inv.data_ptr<index_t>(),
            v.data_ptr<scalar_t>(), valT.data_ptr<scalar_t>(), XP.data_ptr<scalar_t>(),
            GX.data_ptr<scalar_t>(), dvalT.data_ptr<scalar_t>(), dval.data_ptr<scalar_t>(), rows,
            F, B);
      });
    });
  });
  return {GX, dval, want_bias ? gbias : torch::empty({0}, opts)};
}

namespace {

// y[b, r] = sum over the non-zeros k of row r of val[k] * x[b, col[k]] (+ bias[r]) for a batch
// of a few samples (inference). The panels of linear_forward hold at least 16 samples, so a
// batch of one would compute 15 lanes of padding; here the weight is streamed once per sample
// and each non-zero gathers its input from x, which stays in L1. Rows are split statically
// over the threads: rows of equal length (constant fan-in) balance by themselves.
//
// The sum over a row: four scalar accumulators in general; for float32 with 32-bit columns,
// vector gathers of x (AVX-512: 16 lanes, AVX2: 8), the row's tail under a mask. (GCC does not
// emit gathers for these loops by itself when it tunes for AMD's cores.)
template <typename T, typename I>
inline T row_dot(const T* x, const I* col, const T* val, int64_t n) {
  T acc[4] = {T(0), T(0), T(0), T(0)};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) acc[j] += val[k + j] * x[col[k + j]];
  for (; k < n; ++k) acc[0] += val[k] * x[col[k]];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

#if defined(__AVX512F__)
template <>
inline float row_dot<float, int32_t>(const float* x, const int32_t* col, const float* val,
                                     int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m512i i0 = _mm512_loadu_si512(col + k), i1 = _mm512_loadu_si512(col + k + 16);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k), _mm512_i32gather_ps(i0, x, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k + 16), _mm512_i32gather_ps(i1, x, 4), a1);
  }
  for (; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
    const __m512i i = _mm512_maskz_loadu_epi32(m, col + k);
    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i, x, 4);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + k), g, a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#elif defined(__AVX2__)
template <>
inline float row_dot<float, int32_t>(const float* x, const int32_t* col, const float* val,
                                     int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
    const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k + 8));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, i0, 4), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), _mm256_i32gather_ps(x, i1, 4), a1);
  }
  for (; k < n; k += 8) {
    const int64_t left = std::min<int64_t>(n - k, 8);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(left)), lane);
    const __m256i i = _mm256_maskload_epi32(col + k, m);
    const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, i,
                                              _mm256_castsi256_ps(m), 4);
    a0 = _mm256_fmadd_ps(_mm256_maskload_ps(val + k, m), g, a0);
  }
  const __m256 s = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#endif

template <typename T, typename I>
void rows_product(const T* x, int64_t sb, const int64_t* crow, const I* col, const T* val,
                  const T* bias, T* Y, int64_t rows, int64_t B) {
  // a gathered non-zero costs several multiply-adds' time: worth the threads' wake-up sooner
  const int nt = team(16 * B * (rows + crow[rows]));
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t begin = crow[r], n = crow[r + 1] - begin;
    for (int64_t b = 0; b < B; ++b) {
      const T acc = row_dot<T, I>(x + b * sb, col + begin, val + begin, n);
      Y[b * rows + r] = bias ? acc + bias[r] : acc;
    }
  }
}

}  // namespace

// y = x @ W.T (+ bias) for a batch of a few samples, without panels (rows_product).
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor crow, torch::Tensor col,
                          torch::Tensor val, int64_t rows, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2, "x must be (batch, features)");
  TORCH_CHECK(crow.numel() == rows + 1, "crow must have rows + 1 entries");
  auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t B = xc.size(0);
  auto Y = torch::empty({B, rows}, x.options());
  auto v = val.contiguous();
  const torch::Tensor b = checked_bias(bias, rows, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_rows", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "linear_rows", [&] {
      rows_product<scalar_t, index_t>(xc.data_ptr<scalar_t>(), xc.stride(0),
                                      crow.data_ptr<int64_t>(), col.data_ptr<index_t>(),
                                      v.data_ptr<scalar_t>(),
                                      b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                      Y.data_ptr<scalar_t>(), rows, B);
    });
  });
  return Y;
}

// The compiled implementations of the Linear operators of kernels/ops.py, for float32 and float64
// on the CPU, each with the thread cap last (Capped).
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) {
  m.def("pack", &Capped<&pack>::call);
  m.def("pack_sum", &Capped<&pack_sum>::call);
  m.def("spmm", &Capped<&spmm>::call);
  m.def("sampled", &Capped<&sampled>::call);
  m.def("linear_forward", &Capped<&linear_forward>::call);
  m.def("linear_backward", &Capped<&linear_backward>::call);
  m.def("linear_rows", &Capped<&linear_rows>::call);
}
