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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

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
// sleeping threads (about 27 us each on this VM, see tl_thread_limit), what one thread needs for
// several hundred thousand multiply-adds.
constexpr int64_t kParallelWork = int64_t(1) << 20;

// The most threads that kernels called from this thread may use (0: all of OpenMP's). A layer
// sets it around its kernels (set_thread_limit, from the Python side): under
// OMP_WAIT_POLICY=PASSIVE every parallel region and every barrier in it puts the other threads
// to sleep and wakes them again, about 27 us each on the 2-core VM (an empty region with three
// barriers took 110 us), and for a small layer that costs more than a second core saves.
// sl.accelerate times such a layer on one thread and on all of them, and keeps the faster.
// Only speed changes: every kernel gives the same result, bit for bit, on any number of threads.
thread_local int tl_thread_limit = 0;

// Threads for a parallel region of `work` units: one below kParallelWork (regions that are
// always worth their wake-up leave out the work).
inline int team(int64_t work = kParallelWork) {
  if (work < kParallelWork) return 1;
  const int all = omp_get_max_threads();
  return tl_thread_limit > 0 ? std::min(tl_thread_limit, all) : all;
}

constexpr int64_t kPrefetch = 8;  // non-zeros ahead whose panel rows are prefetched

// dst[k] = src[idx[k]]
template <typename T, typename I>
void gather(const T* src, const I* idx, T* dst, int64_t n) {
  const int nt = team(n);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t k = 0; k < n; ++k) dst[k] = src[idx[k]];
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
// 1024-wide layers) the same column of every row falls in one L1 set: storing 16-float pieces
// row by row down a column ran 5x slower than for other widths with 16-row tiles, 2.5x with
// 64-row tiles, and about as fast through the staging rows (docs/performance.md).
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
// bandwidth here (W / 16 cache lines per non-zero; a second accumulator set does not help).
// No software prefetch: the out-of-order window already covers the L2 latency, and the
// prefetch instructions competed with the loads for the load ports (5-10% slower with them).
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
              const T* q = X + int64_t(col[k + j + kPrefetch]) * W;
#pragma GCC unroll 4
              for (int l = 0; l < W; l += 16) __builtin_prefetch(q + l);
            }
            const T* x = X + int64_t(col[k + j]) * W;
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
// arithmetic per row read, prefetching the row kPrefetch non-zeros ahead pays here (3-7%),
// where in spmm it cost more load slots than it saved.
// In the caller's parallel region (backward_region, which has made valT = val[perm]): the
// products, then dval = dvalT[perm_inv], W's CSR order (a gather: scattering through perm,
// random writes, took 2-4x longer).
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
          // sixteen non-zeros at a time (the last group padded with zeros): their sixteen
          // lane-wise partial dot products reduce to one register of sums (see sampled_panels)
          constexpr int kRev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
          for (int64_t k = begin; k < end; k += 16) {
            const int m = int(std::min<int64_t>(16, end - k));
            v16f s[16];
#pragma GCC unroll 16
            for (int q = 0; q < 16; ++q) {
              if (q < m) {
                if (k + q + kPrefetch < end) {
                  const float* next = G + int64_t(colT[k + q + kPrefetch]) * W;
#pragma GCC unroll 4
                  for (int i = 0; i < NV; ++i) __builtin_prefetch(next + 16 * i);
                }
                const float* g = G + int64_t(colT[k + q]) * W;
                const float v = valT[k + q];
                v16f d = v16f{};
#pragma GCC unroll 4
                for (int i = 0; i < NV; ++i) {
                  const v16f gi = load16(g + 16 * i);
                  acc[i] += v * gi;
                  d += gi * xc[i];
                }
                s[kRev[q]] = d;
              } else {
                s[kRev[q]] = v16f{};
              }
            }
            v16f s8[8], s4[4], s2[2];
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) s8[i] = fold<8>(s[2 * i], s[2 * i + 1]);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) s4[i] = fold<4>(s8[2 * i], s8[2 * i + 1]);
            s2[0] = fold<2>(s4[0], s4[1]);
            s2[1] = fold<2>(s4[2], s4[3]);
            v16f sum = fold<1>(s2[0], s2[1]);
            if (m == 16) {
              if (p > 0) sum += load16(dvalT + k);
              __builtin_memcpy(dvalT + k, &sum, sizeof sum);
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

int64_t panel_width(int64_t batch) { return batch >= 64 ? 64 : batch > 16 ? 32 : 16; }

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

torch::Tensor spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor val, torch::Tensor XP,
                   int64_t rows, int64_t batch, c10::optional<torch::Tensor> perm,
                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(XP.dim() == 3 && XP.is_contiguous(), "XP must be contiguous panels (nb, F, W)");
  TORCH_CHECK(crow.numel() == rows + 1, "crow must have rows + 1 entries");
  const int64_t W = XP.size(2);
  TORCH_CHECK(W == panel_width(batch) && XP.size(0) == (batch + W - 1) / W, "XP/batch mismatch");
  auto Y = torch::empty({batch, rows}, XP.options());
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == rows && b.scalar_type() == XP.scalar_type(),
                "bias must have one entry per row, of the panels' dtype");
  }
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
            XP.data_ptr<scalar_t>(), bias.has_value() ? b.data_ptr<scalar_t>() : nullptr,
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
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == rows && b.scalar_type() == x.scalar_type(),
                "bias must have one entry per row, of x's dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_forward", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "linear_forward", [&] {
      with_panel_width(W, [&](auto w) {
        forward_region<scalar_t, decltype(w)::value, index_t>(
            x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), XP.data_ptr<scalar_t>(),
            crow.data_ptr<int64_t>(), col.data_ptr<index_t>(), v.data_ptr<scalar_t>(),
            bias.has_value() ? b.data_ptr<scalar_t>() : nullptr, Y.data_ptr<scalar_t>(), rows, F,
            B);
      });
    });
  });
  return {Y, XP};
}

// (grad_x (batch, F), dval (nnz,) in the CSR order of W, and the bias gradient when want_bias)
// for y = x @ W.T (+ bias), from the output gradient (any strides) and the panels of x; W^T's
// CSR with perm (valT[k] = val[perm[k]]) and its inverse.
std::vector<torch::Tensor> linear_backward(torch::Tensor crowT, torch::Tensor colT,
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
  if (want_bias) return {GX, dval, gbias};
  return {GX, dval};
}

// ------------------------------------------------------------------ direct sparse convolution

namespace {

template <typename T>
void conv_forward(const int64_t* crow, const int64_t* col, const T* val, const T* xp, T* y,
                  int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t O, int64_t OH,
                  int64_t OW, int64_t kh, int64_t kw, int64_t stride) {
  const int64_t khw = kh * kw;
  const int nt = team();
#pragma omp parallel for collapse(2) schedule(dynamic, 4) if (nt > 1) num_threads(nt)
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
  const int nt = team();
#pragma omp parallel for collapse(2) schedule(dynamic, 4) if (nt > 1) num_threads(nt)
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
  const int nt = team();
#pragma omp parallel for schedule(dynamic, 8) if (nt > 1) num_threads(nt)
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

// ----------------------------------------------- stride-1 convolution on shifted flat planes
//
// With stride 1, output (oy, ox) reads the padded input at (oy + ky, ox + kx). On a grid as wide
// as the padded input (Wp), flat output index n = oy * Wp + ox reads flat input index
// n + ky * Wp + kx: each non-zero (c, ky, kx) adds a *contiguous* slice of one input plane to the
// output plane. The convolution becomes a sparse matrix times shifted slices, vectorised along
// whole planes with the accumulator in registers; the Wp - OW extra columns of each output row
// are computed and dropped. Only n < N = (OH - 1) * Wp + OW is computed, so that no read passes
// the end of a plane.

// out[b] = sum over the non-zeros k in [begin, end) of val[k] * X[off[k] + b], b < W; a
// separate always-inlined function so that the accumulator stays in registers.
template <typename T, int W>
inline __attribute__((always_inline)) void shifted_chunk(int64_t begin, int64_t end,
                                                         const int64_t* off, const T* val,
                                                         const T* X, T* __restrict__ out) {
  constexpr int L = kLanes<T>, NV = W / L;
  vec_t<T> acc[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) acc[i] = vec_t<T>{};
  for (int64_t k = begin; k < end; ++k) {
    const T v = val[k];
    const T* x = X + off[k];
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc[i] += v * loadv<T>(x + i * L);
  }
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) storev<T>(out + i * L, acc[i]);
}

// Where the values of grid positions go. The grid is Wg wide; the output keeps its first OW
// columns (OW == Wg: every position, stored in place), plus bias[r] when a bias is given.
// Writing the output directly spares a grid-sized temporary and a compacting copy: two passes
// over fresh memory, which page-faults on this VM (about 9 ms per 35 MB).
template <typename T>
struct GridStore {
  int64_t Wg, OW;
  const T* bias;

  // yrow[position n of the grid] = v[i] (+ bias) for the count positions from n0, if kept
  void put(const T* v, int64_t count, int64_t n0, T* yrow, T b) const {
    int64_t i = 0;
    while (i < count) {
      const int64_t n = n0 + i, oy = n / Wg, ox = n % Wg;
      const int64_t seg = std::min(count - i, Wg - ox);
      const int64_t keep = std::max<int64_t>(0, std::min(seg, OW - ox));
      T* dst = yrow + oy * OW + ox;
      for (int64_t j = 0; j < keep; ++j) dst[j] = v[i + j] + b;
      i += seg;
    }
  }
};

// Y[r * Lo + n] = sum_k val[k] * X[off[k] + n], n < N, for the rows r this thread is given.
template <typename T, int W>
inline void shifted_rows(const int64_t* crow, const int64_t* off, const T* val, const T* X, T* Y,
                         int64_t rows, int64_t N, int64_t Lo, const GridStore<T>& st) {
  // this thread's rows (a static split, as an omp for would make), then chunk by chunk of the
  // plane: for one chunk, every row reads the same window of the input planes (chunk + halo
  // per channel), which stays in L1 across the rows; row by row, each row swept the whole
  // sample's input, from L2
  const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t r_begin = rows * tid / nt, r_end = rows * (tid + 1) / nt;
  const bool direct = st.OW == st.Wg && st.bias == nullptr;
  alignas(64) T tmp[W];
  int64_t n0 = 0;
  for (; n0 + W <= N; n0 += W) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      if (direct) {
        shifted_chunk<T, W>(crow[r], crow[r + 1], off, val, X + n0, Y + r * Lo + n0);
      } else {
        shifted_chunk<T, W>(crow[r], crow[r + 1], off, val, X + n0, tmp);
        st.put(tmp, W, n0, Y + r * Lo, st.bias ? st.bias[r] : T(0));
      }
    }
  }
  if (n0 < N) {
    const int64_t nr = N - n0;
    for (int64_t r = r_begin; r < r_end; ++r) {
      T* __restrict__ y = direct ? Y + r * Lo + n0 : tmp;
      for (int64_t b = 0; b < nr; ++b) y[b] = T(0);
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        const T v = val[k];
        const T* __restrict__ x = X + off[k] + n0;
#pragma omp simd
        for (int64_t b = 0; b < nr; ++b) y[b] += v * x[b];
      }
      if (!direct) st.put(tmp, nr, n0, Y + r * Lo, st.bias ? st.bias[r] : T(0));
    }
  }
}

// Y[b] = shifted_rows(X[b]) for every sample b: X planes of Xb floats per sample, Y of Yb.
template <typename T>
void shifted_spmm(const int64_t* crow, const int64_t* off, const T* val, const T* X, T* Y,
                  int64_t B, int64_t rows, int64_t N, int64_t Lo, int64_t Xb, int64_t Yb,
                  const GridStore<T>& st) {
  const int nt = team();
#pragma omp parallel if (nt > 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b)
    shifted_rows<T, 64>(crow, off, val, X + b * Xb, Y + b * Yb, rows, N, Lo, st);
}

// dval[k] = sum_b sum_{n < N} G[b, r, n] * X[b, off[k] + n] for the non-zeros k of row r.
// Chunk-outer as in shifted_rows: for one chunk of the plane, the input window of every channel
// stays in L1 while this thread's rows and their non-zeros go by; each non-zero keeps a vector of
// lane-wise partial sums (part, nnz x lanes) until the end, then one horizontal sum.
template <typename T>
void shifted_sampled(const int64_t* crow, const int64_t* off, const T* G, const T* X, T* dval,
                     int64_t B, int64_t rows, int64_t N, int64_t Lg, int64_t Gb, int64_t Xb) {
  constexpr int L = kLanes<T>, NV = 4, CW = NV * L;  // a chunk: four vectors
  std::vector<vec_t<T>> part(crow[rows]);
  const int nt = team();
#pragma omp parallel if (nt > 1) num_threads(nt)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t r_begin = rows * tid / nt, r_end = rows * (tid + 1) / nt;
    for (int64_t k = crow[r_begin]; k < crow[r_end]; ++k) part[k] = vec_t<T>{};
    for (int64_t b = 0; b < B; ++b) {
      const T* Gs = G + b * Gb;
      const T* Xs = X + b * Xb;
      int64_t n0 = 0;
      for (; n0 + CW <= N; n0 += CW) {
        for (int64_t r = r_begin; r < r_end; ++r) {
          vec_t<T> g[NV];
#pragma GCC unroll 4
          for (int i = 0; i < NV; ++i) g[i] = loadv<T>(Gs + r * Lg + n0 + i * L);
          for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
            const T* x = Xs + off[k] + n0;
            vec_t<T> d = g[0] * loadv<T>(x);
#pragma GCC unroll 4
            for (int i = 1; i < NV; ++i) d += g[i] * loadv<T>(x + i * L);
            part[k] += d;
          }
        }
      }
      if (n0 < N) {  // the last, partial chunk: into lane 0
        for (int64_t r = r_begin; r < r_end; ++r) {
          const T* __restrict__ g = Gs + r * Lg;
          for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
            const T* __restrict__ x = Xs + off[k];
            T acc = T(0);
            for (int64_t n = n0; n < N; ++n) acc += g[n] * x[n];
            part[k][0] += acc;
          }
        }
      }
    }
    for (int64_t k = crow[r_begin]; k < crow[r_end]; ++k) {
      T total = T(0);
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) total += part[k][l];
      dval[k] = total;
    }
  }
}

// Offsets of the non-zeros: col encodes (channel, ky, kx); off = channel * plane + sign *
// (ky * Wp + kx) + base.
torch::Tensor plane_offsets(const torch::Tensor& col, int64_t kh, int64_t kw, int64_t Wp,
                            int64_t plane, int64_t sign, int64_t base) {
  auto off = torch::empty_like(col);
  const int64_t* c = col.data_ptr<int64_t>();
  int64_t* o = off.data_ptr<int64_t>();
  const int64_t khw = kh * kw, n = col.numel();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t ch = c[k] / khw, ky = (c[k] % khw) / kw, kx = c[k] % kw;
    o[k] = ch * plane + sign * (ky * Wp + kx) + base;
  }
  return off;
}

// The output gradient on the padded-width grid, zero in the dropped columns, after a margin of
// M = (kh - 1) * Wp + kw - 1 zeros: Gm[b, o, M + oy * Wp + ox] = g[b, o, oy, ox]; planes of
// M + Hp * Wp floats, so that the input gradient can read Gm[n + M - ky * Wp - kx] for every n.
torch::Tensor margin_grid(const torch::Tensor& g, int64_t Hp, int64_t Wp, int64_t kh, int64_t kw) {
  const int64_t B = g.size(0), O = g.size(1), OH = g.size(2), OW = g.size(3);
  const int64_t M = (kh - 1) * Wp + kw - 1;
  auto Gm = torch::zeros({B, O, M + Hp * Wp}, g.options());
  Gm.narrow(2, M, OH * Wp).view({B, O, OH, Wp}).narrow(3, 0, OW).copy_(g);
  return Gm;
}

}  // namespace

torch::Tensor conv2d_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor val,
                             torch::Tensor xp, int64_t out_channels, int64_t kh, int64_t kw,
                             int64_t stride, int64_t OH, int64_t OW,
                             c10::optional<torch::Tensor> bias_opt) {
  TORCH_CHECK(xp.dim() == 4 && xp.is_contiguous(), "xp must be a contiguous (B, C, H, W)");
  c10::optional<torch::Tensor> bias;
  if (bias_opt.has_value()) {
    bias = bias_opt->contiguous();
    TORCH_CHECK(bias->numel() == out_channels && bias->scalar_type() == xp.scalar_type(),
                "bias must hold one value per output channel, in the input's dtype");
  }
  col = col.to(torch::kLong);  // the convolution kernels index with int64
  if (stride == 1) {
    const int64_t B = xp.size(0), Hp = xp.size(2), Wp = xp.size(3), plane = Hp * Wp;
    auto off = plane_offsets(col, kh, kw, Wp, plane, 1, 0);
    auto y = torch::empty({B, out_channels, OH, OW}, xp.options());
    const int64_t N = (OH - 1) * Wp + OW;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv2d_forward", [&] {
      const GridStore<scalar_t> st{Wp, OW, bias ? bias->data_ptr<scalar_t>() : nullptr};
      shifted_spmm<scalar_t>(crow.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                             val.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), B, out_channels, N, OH * OW,
                             xp.size(1) * plane, out_channels * OH * OW, st);
    });
    return y;
  }
  auto y = torch::empty({xp.size(0), out_channels, OH, OW}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv2d_forward", [&] {
    conv_forward<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                           val.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
                           y.data_ptr<scalar_t>(), xp.size(0), xp.size(1), xp.size(2),
                           xp.size(3), out_channels, OH, OW, kh, kw, stride);
  });
  if (bias) y.add_(bias->view({1, out_channels, 1, 1}));  // (its own output: in place)
  return y;
}

namespace {

// The stride-1 input gradient from the output gradient on its margin grid (margin_grid).
torch::Tensor grad_input_s1(const torch::Tensor& crowT, const torch::Tensor& colT,
                            const torch::Tensor& valT, const torch::Tensor& Gm, int64_t B,
                            int64_t O, int64_t in_channels, int64_t Hp, int64_t Wp, int64_t kh,
                            int64_t kw) {
  const int64_t M = (kh - 1) * Wp + kw - 1, Lg = M + Hp * Wp;
  auto off = plane_offsets(colT, kh, kw, Wp, Lg, -1, M);
  auto gxp = torch::empty({B, in_channels, Hp, Wp}, Gm.options());
  AT_DISPATCH_FLOATING_TYPES(Gm.scalar_type(), "conv2d_grad_input", [&] {
    const GridStore<scalar_t> st{Wp, Wp, nullptr};  // every position, in place
    shifted_spmm<scalar_t>(crowT.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                           valT.data_ptr<scalar_t>(), Gm.data_ptr<scalar_t>(),
                           gxp.data_ptr<scalar_t>(), B, in_channels, Hp * Wp, Hp * Wp, O * Lg,
                           in_channels * Hp * Wp, st);
  });
  return gxp;
}

// The stride-1 weight gradient at the non-zeros, from the margin grid and the padded input.
torch::Tensor grad_weight_s1(const torch::Tensor& crow, const torch::Tensor& col,
                             const torch::Tensor& Gm, const torch::Tensor& xp, int64_t O,
                             int64_t OH, int64_t OW, int64_t kh, int64_t kw) {
  const int64_t B = xp.size(0), Hp = xp.size(2), Wp = xp.size(3), plane = Hp * Wp;
  const int64_t M = (kh - 1) * Wp + kw - 1, Lg = M + plane, N = (OH - 1) * Wp + OW;
  auto off = plane_offsets(col, kh, kw, Wp, plane, 1, 0);
  auto dval = torch::empty({col.numel()}, Gm.options());
  AT_DISPATCH_FLOATING_TYPES(Gm.scalar_type(), "conv2d_grad_weight", [&] {
    shifted_sampled<scalar_t>(crow.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                              Gm.data_ptr<scalar_t>() + M, xp.data_ptr<scalar_t>(),
                              dval.data_ptr<scalar_t>(), B, O, N, Lg, O * Lg, xp.size(1) * plane);
  });
  return dval;
}

// The input gradient of a strided convolution, by the direct kernel (colT int64).
torch::Tensor grad_input_direct(const torch::Tensor& crowT, const torch::Tensor& colT,
                                const torch::Tensor& valT, const torch::Tensor& g,
                                int64_t in_channels, int64_t Hp, int64_t Wp, int64_t kh,
                                int64_t kw, int64_t stride) {
  auto gxp = torch::empty({g.size(0), in_channels, Hp, Wp}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_grad_input", [&] {
    conv_grad_input<scalar_t>(crowT.data_ptr<int64_t>(), colT.data_ptr<int64_t>(),
                              valT.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                              gxp.data_ptr<scalar_t>(), g.size(0), in_channels, Hp, Wp,
                              g.size(1), g.size(2), g.size(3), kh, kw, stride);
  });
  return gxp;
}

// The weight gradient of a strided convolution at the non-zeros, by the direct kernel.
torch::Tensor grad_weight_direct(const torch::Tensor& crow, const torch::Tensor& col,
                                 const torch::Tensor& g, const torch::Tensor& xp, int64_t kh,
                                 int64_t kw, int64_t stride) {
  auto dval = torch::empty({col.numel()}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_grad_weight", [&] {
    conv_grad_weight<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                               g.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
                               dval.data_ptr<scalar_t>(), g.size(0), xp.size(1), xp.size(2),
                               xp.size(3), g.size(1), g.size(2), g.size(3), kh, kw, stride);
  });
  return dval;
}

}  // namespace

// Both gradients of a convolution (each only when asked): the padded input's and the weight's at
// the non-zeros. With stride 1 they share one margin grid of the output gradient (built once:
// a fresh grid-sized tensor and a copy fewer); other strides take the direct kernels.
std::vector<c10::optional<torch::Tensor>> conv2d_backward(
    torch::Tensor crow, torch::Tensor col, torch::Tensor crowT, torch::Tensor colT,
    torch::Tensor valT, torch::Tensor g, torch::Tensor xp, int64_t kh, int64_t kw, int64_t stride,
    bool want_input, bool want_weight) {
  TORCH_CHECK(g.dim() == 4 && g.is_contiguous() && xp.is_contiguous(),
              "g and xp must be contiguous (B, C, H, W)");
  c10::optional<torch::Tensor> gxp, dval;
  if (!want_input && !want_weight) return {gxp, dval};
  col = col.to(torch::kLong);  // the convolution kernels index with int64
  colT = colT.to(torch::kLong);
  const int64_t C = xp.size(1), Hp = xp.size(2), Wp = xp.size(3);
  if (stride != 1) {
    if (want_input) gxp = grad_input_direct(crowT, colT, valT, g, C, Hp, Wp, kh, kw, stride);
    if (want_weight) dval = grad_weight_direct(crow, col, g, xp, kh, kw, stride);
    return {gxp, dval};
  }
  auto Gm = margin_grid(g, Hp, Wp, kh, kw);
  if (want_input)
    gxp = grad_input_s1(crowT, colT, valT, Gm, g.size(0), g.size(1), C, Hp, Wp, kh, kw);
  if (want_weight)
    dval = grad_weight_s1(crow, col, Gm, xp, g.size(1), g.size(2), g.size(3), kh, kw);
  return {gxp, dval};
}

// ----------------------------------------------------- strided convolution on phase planes
// A stride-s convolution is a stride-1 one over the s*s phase planes of its padded input:
// P[n, (py*s + px)*C + c, i, j] = x[n, c, s*i + py - ph, s*j + px - pw] (0 outside x). Built in
// one pass (padding, cropping and the reordering of a pad + reshape, which took three passes
// over fresh memory), and its adjoint: every input position lies on exactly one phase plane, so
// the input gradient is a gather (0 where a position is never read: rows and columns cropped).

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
                         int64_t s_, int64_t ph, int64_t pw, int64_t hq, int64_t wq) {
  const int64_t s = S ? S : s_;
  const int nt = team(N * C * s * s * hq * wq);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const T* src = X + (n * C + c) * H * W;
      for (int64_t py = 0; py < s; ++py) {
        for (int64_t px = 0; px < s; ++px) {
          T* dst = out + ((n * s * s + py * s + px) * C + c) * hq * wq;
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
}

template <typename T, int S>
void phase_planes_grad_kernel(const T* G, T* out, int64_t N, int64_t C, int64_t H, int64_t W,
                              int64_t s_, int64_t ph, int64_t pw, int64_t hq, int64_t wq) {
  const int64_t s = S ? S : s_;
  const int nt = team(N * C * H * W);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      // the input plane (in L1) zeroed, then each phase plane's rows scattered into it
      T* dst = out + (n * C + c) * H * W;
      std::fill(dst, dst + H * W, T(0));
      for (int64_t py = 0; py < s; ++py) {
        for (int64_t px = 0; px < s; ++px) {
          const T* src = G + ((n * s * s + py * s + px) * C + c) * hq * wq;
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
}

}  // namespace

torch::Tensor phase_planes(torch::Tensor x, int64_t s, int64_t ph, int64_t pw, int64_t hq,
                           int64_t wq) {
  TORCH_CHECK(x.dim() == 4 && s >= 1 && ph >= 0 && pw >= 0,
              "x must be (N, C, H, W), the stride >= 1 and the padding >= 0");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto P = torch::empty({N, s * s * C, hq, wq}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "phase_planes", [&] {
    with_stride(s, [&](auto S) {
      phase_planes_kernel<scalar_t, S>(x.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N, C, H,
                                       W, s, ph, pw, hq, wq);
    });
  });
  return P;
}

torch::Tensor phase_planes_grad(torch::Tensor gP, int64_t s, int64_t ph, int64_t pw, int64_t H,
                                int64_t W) {
  TORCH_CHECK(gP.dim() == 4 && s >= 1 && gP.size(1) % (s * s) == 0,
              "gP must be (N, s*s*C, hq, wq)");
  gP = gP.contiguous();
  const int64_t N = gP.size(0), C = gP.size(1) / (s * s), hq = gP.size(2), wq = gP.size(3);
  auto gx = torch::empty({N, C, H, W}, gP.options());
  AT_DISPATCH_FLOATING_TYPES(gP.scalar_type(), "phase_planes_grad", [&] {
    with_stride(s, [&](auto S) {
      phase_planes_grad_kernel<scalar_t, S>(gP.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), N,
                                            C, H, W, s, ph, pw, hq, wq);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "x (batch, features) -> panels (nb, features, W), zero-padded");
  m.def("pack_sum", &pack_sum, "(panels of x, the column sums of x)");
  m.def("panel_width", &panel_width, "the panel width W used for a batch size");
  m.def("spmm", &spmm, "Y (batch, rows) = X @ CSR(W)^T from panels; values read through perm",
        py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("XP"), py::arg("rows"),
        py::arg("batch"), py::arg("perm") = py::none(), py::arg("bias") = py::none());
  m.def("sampled", &sampled, "dW at the non-zeros from panels of G and X");
  m.def("linear_forward", &linear_forward, "(y, panels of x): packing and product, one region",
        py::arg("x"), py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("rows"),
        py::arg("bias") = py::none());
  m.def("linear_backward", &linear_backward,
        "(grad_x, dW at the non-zeros[, grad_bias]): packing the output gradient and one pass "
        "over the CSR of W^T, one region");
  m.def("conv2d_forward", &conv2d_forward, "direct sparse convolution (+ bias)", py::arg("crow"),
        py::arg("col"), py::arg("val"), py::arg("xp"), py::arg("out_channels"), py::arg("kh"),
        py::arg("kw"), py::arg("stride"), py::arg("OH"), py::arg("OW"),
        py::arg("bias") = py::none());
  m.def("conv2d_backward", &conv2d_backward,
        "(gradient of the padded input or None, gradient at the non-zeros or None)");
  m.def("phase_planes", &phase_planes, "the s*s phase planes of the padded input (stride s)");
  m.def("phase_planes_grad", &phase_planes_grad, "the input gradient from the planes' gradient");
  m.def("patches", &patches, "each output position's input patch as a row (im2col)");
  m.def("patches_grad", &patches_grad, "the input gradient from the patch rows' gradient");
  m.def("num_threads", []() { return omp_get_max_threads(); });
  m.def(
      "set_thread_limit",
      [](int64_t n) {
        TORCH_CHECK(n >= 0, "the thread limit must be 0 (all threads) or positive, got ", n);
        const int previous = tl_thread_limit;
        tl_thread_limit = int(std::min<int64_t>(n, 1 << 20));
        return previous;
      },
      "most threads the kernels called from this thread may use (0: all); returns the "
      "previous limit");
  m.def("thread_limit", []() { return tl_thread_limit; });
  m.def("team_size", [](int64_t work) { return team(work); },
        "threads a parallel region of this much work gets here and now (for tests)");
}
