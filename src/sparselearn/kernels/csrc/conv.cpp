// Direct sparse convolution (NCHW) and its gradients.
//
// CSR rows are output channels; a column index encodes (input channel, ky, kx) as
// c * kh * kw + ky * kw + kx; each non-zero adds a scaled, shifted input plane to an output plane.
// Three forms: a stride-1 convolution of a batch of 16 samples or more runs on batch panels (one
// vector of samples per position; section "stride 1 on batch panels"), a smaller stride-1 batch
// on shifted flat planes of each sample, other strides by the direct kernels just below (the
// layers run a strided convolution as a stride-1 one over its phase planes, except on steps that
// need the dense weight gradient).

#include "common.h"
#include "kernels.h"

using namespace slk;

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

// out_s[b] (+)= sum over the non-zeros k in [begin, end) of val[k] * X_s[off[k] + b], b < W,
// for S samples s at once (X_s = X + s * Xs, out_s = out + s * Os; ``first``: out is written,
// else added to); a separate always-inlined function so that the accumulators stay in registers.
template <typename T, int W, int S = 1>
inline __attribute__((always_inline)) void shifted_chunk(int64_t begin, int64_t end,
                                                         const int64_t* off, const T* val,
                                                         const T* X, int64_t Xs,
                                                         T* __restrict__ out, int64_t Os,
                                                         bool first) {
  constexpr int L = kLanes<T>, NV = W / L;
  vec_t<T> acc[S][NV];
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc[s][i] = first ? vec_t<T>{} : loadv<T>(out + s * Os + i * L);
  for (int64_t k = begin; k < end; ++k) {
    const T v = val[k];
    const T* x = X + off[k];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i) acc[s][i] += v * loadv<T>(x + s * Xs + i * L);
  }
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) storev<T>(out + s * Os + i * L, acc[s][i]);
}

// Where the values of grid positions go. The grid is Wg wide; the output keeps its first OW
// columns (OW == Wg: every position, stored in place), plus bias[r] when a bias is given.
// Writing the output directly spares a grid-sized temporary and a compacting copy: two passes
// over fresh memory, and fresh memory page-faults on first touch.
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

// Rows whose partial sums wait between channel blocks (kRowGroup chunks, on the stack). Fewer
// rows per group would keep them in L1 beside the window, but each group reads the window
// again, and that cost more than it saved (32 and 64 rows were both slower than 128).
constexpr int64_t kRowGroup = 128;

// What the passes of one thread over one convolution share: the rows [r_begin, r_end), the
// non-zeros (blk: where each row's non-zeros of each block of input channels begin), sample
// planes Xb floats apart in X and Yb in Y, and ``acc``, kRowGroup * kChunk values.
template <typename T>
struct Shifted {
  const int64_t *blk, NB, *off;
  const T *val, *X;
  int64_t Xb;
  T* Y;
  int64_t Yb, r_begin, r_end, Lo;
  const GridStore<T>& st;
  bool direct;  // the grid is the output: partial sums wait in it, not in acc
  T* acc;
};

// One chunk of W grid positions from n0, for S samples from sample b at once: group by group of
// rows, block by block of input channels (see shifted_rows). Uses kRowGroup * S * W of acc.
template <typename T, int W, int S>
inline void shifted_pass(const Shifted<T>& a, int64_t b, int64_t n0) {
  const T* X = a.X + b * a.Xb + n0;
  T* Y = a.Y + b * a.Yb;
  for (int64_t g0 = a.r_begin; g0 < a.r_end; g0 += kRowGroup) {
    const int64_t g1 = std::min(g0 + kRowGroup, a.r_end);
    for (int64_t bl = 0; bl < a.NB; ++bl) {
      for (int64_t r = g0; r < g1; ++r) {
        const int64_t* kb = a.blk + r * (a.NB + 1) + bl;
        if (bl > 0 && kb[0] == kb[1]) continue;  // nothing to add
        if (a.direct)
          shifted_chunk<T, W, S>(kb[0], kb[1], a.off, a.val, X, a.Xb, Y + r * a.Lo + n0, a.Yb,
                                 bl == 0);
        else
          shifted_chunk<T, W, S>(kb[0], kb[1], a.off, a.val, X, a.Xb, a.acc + (r - g0) * S * W,
                                 W, bl == 0);
      }
    }
    if (!a.direct)
      for (int64_t r = g0; r < g1; ++r)
        for (int s = 0; s < S; ++s)
          a.st.put(a.acc + ((r - g0) * S + s) * W, W, n0, Y + s * a.Yb + r * a.Lo,
                   a.st.bias ? a.st.bias[r] : T(0));
  }
}

// Y_b[r * Lo + n] = sum_k val[k] * X_b[off[k] + n], n < N, for every sample b (X_b = X + b * Xb,
// Y_b = Y + b * Yb) and the rows r this thread is given. ``blk`` (rows x (NB + 1)) splits each
// row's non-zeros by block of input channels.
template <typename T, int W>
inline void shifted_rows(const int64_t* crow, const int64_t* blk, int64_t NB, const int64_t* off,
                         const T* val, const T* X, T* Y, int64_t B, int64_t rows, int64_t N,
                         int64_t Lo, int64_t Xb, int64_t Yb, const GridStore<T>& st) {
  // this thread's rows (a static split, as an omp for would make), then chunk by chunk of the
  // plane, and within a chunk block by block of input channels: for one chunk and one block,
  // every row of a group reads the same window of those channels' planes (chunk + halo per
  // channel), which is sized to stay in L1 across the rows (the whole window of every channel
  // would not: read from L2, it capped the kernel at one vector load per cycle). Each row's
  // partial sums wait in ``acc`` (or in the output itself) between blocks.
  static_assert(W % 4 == 0 && (W / 4) % kLanes<T> == 0, "W must be four whole vectors or more");
  const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t r_begin = rows * tid / nt, r_end = rows * (tid + 1) / nt;
  const bool direct = st.OW == st.Wg && st.bias == nullptr;
  alignas(64) T acc[kRowGroup * W];
  const Shifted<T> a{blk, NB, off, val, X, Xb, Y, Yb, r_begin, r_end, Lo, st, direct, acc};
  int64_t b = 0;
  if (N >= W) {
    // Whole chunks, then one more that ends at N and overlaps the chunk before it: it computes
    // the positions there again, in the same order, so that they come out the same (a scalar
    // loop over the rest cost several times its share of the work). A rest that fits in a
    // quarter chunk takes a quarter one (fewer sums in flight, but a quarter of the work).
    for (; b < B; ++b) {
      int64_t n0 = 0;
      for (; n0 + W <= N; n0 += W) shifted_pass<T, W, 1>(a, b, n0);
      if (N - n0 > W / 4)
        shifted_pass<T, W, 1>(a, b, N - W);
      else if (N > n0)
        shifted_pass<T, W / 4, 1>(a, b, N - W / 4);
    }
  } else if (N >= W / 2) {
    // a plane under one chunk: half chunks of two samples at once (as many sums in flight as a
    // whole chunk), the second ending at N
    for (; b + 2 <= B; b += 2) {
      shifted_pass<T, W / 2, 2>(a, b, 0);
      if (N > W / 2) shifted_pass<T, W / 2, 2>(a, b, N - W / 2);
    }
  } else if (N >= W / 4) {
    for (; b + 4 <= B; b += 4) {  // quarter chunks of four samples at once
      shifted_pass<T, W / 4, 4>(a, b, 0);
      if (N > W / 4) shifted_pass<T, W / 4, 4>(a, b, N - W / 4);
    }
  }
  // samples left over from the groups above, one at a time; planes under a quarter chunk
  // position by position
  for (; b < B; ++b) {
    if (N >= W / 4) {
      for (int64_t n0 = 0; n0 < N; n0 += W / 4)
        shifted_pass<T, W / 4, 1>(a, b, std::min(n0, N - W / 4));
      continue;
    }
    for (int64_t r = r_begin; r < r_end; ++r) {
      T* __restrict__ y = direct ? Y + b * Yb + r * Lo : acc;
      for (int64_t n = 0; n < N; ++n) y[n] = T(0);
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        const T v = val[k];
        const T* __restrict__ x = X + b * Xb + off[k];
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) y[n] += v * x[n];
      }
      if (!direct) st.put(acc, N, 0, Y + b * Yb + r * Lo, st.bias ? st.bias[r] : T(0));
    }
  }
}

constexpr int kChunk = 64;  // grid positions per chunk of shifted_rows

// shifted_rows for every sample: X planes of Xb floats per sample, Y of Yb.
template <typename T>
void shifted_spmm(const int64_t* crow, const int64_t* blk, int64_t NB, const int64_t* off,
                  const T* val, const T* X, T* Y, int64_t B, int64_t rows, int64_t N, int64_t Lo,
                  int64_t Xb, int64_t Yb, const GridStore<T>& st) {
  const int nt = team();
#pragma omp parallel if (nt > 1) num_threads(nt)
  shifted_rows<T, kChunk>(crow, blk, NB, off, val, X, Y, B, rows, N, Lo, Xb, Yb, st);
}

// Where each row's non-zeros of each block of ``per`` input channels begin: (rows, NB + 1)
// indices into the non-zeros (col encodes (channel, ky, kx) as channel * khw + ...; ascending
// within a row, as CSR built from a mask keeps them). A row out of order gets one block.
torch::Tensor channel_blocks(const torch::Tensor& crow, const torch::Tensor& col, int64_t khw,
                             int64_t channels, int64_t per, int64_t* NB) {
  const int64_t rows = crow.numel() - 1;
  const int64_t nb = std::max<int64_t>(1, (channels + per - 1) / per);
  auto blk = torch::empty({rows, nb + 1}, crow.options());
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  int64_t* o = blk.data_ptr<int64_t>();
  bool sorted = true;
  for (int64_t r = 0; r < rows && sorted; ++r)
    for (int64_t k = cr[r] + 1; k < cr[r + 1]; ++k)
      if (c[k] < c[k - 1]) {
        sorted = false;
        break;
      }
  const int64_t used = sorted ? nb : 1;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t* row = o + r * (used + 1);
    int64_t k = cr[r];
    row[0] = k;
    for (int64_t b = 1; b < used; ++b) {
      while (k < cr[r + 1] && c[k] / khw < b * per) ++k;
      row[b] = k;
    }
    row[used] = cr[r + 1];
  }
  *NB = used;
  return blk;
}

// Input channels per block: their windows (a chunk plus the halo of the kernel's reach) fill
// about half of a 48 KiB L1 data cache.
template <typename T>
int64_t channels_per_block(int64_t kh, int64_t kw, int64_t Wp) {
  const int64_t window = (kChunk + (kh - 1) * Wp + kw - 1) * int64_t(sizeof(T));
  return std::max<int64_t>(1, (24 * 1024) / window);
}

// part[k] += lane-wise sum of G[r, n] * X[off[k] + n] over the NV vectors of positions from n0,
// for the non-zeros k of the rows [r_begin, r_end), with G taken as zero at the first ``seen``
// positions (counted by the chunk before: a chunk that ends at the plane's end overlaps it).
template <typename T, int NV>
inline void sampled_chunk(const int64_t* crow, const int64_t* off, const T* G, const T* X,
                          vec_t<T>* part, int64_t r_begin, int64_t r_end, int64_t Lg, int64_t n0,
                          int64_t seen) {
  constexpr int L = kLanes<T>;
  alignas(64) T gt[NV * L];
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* gr = G + r * Lg + n0;
    if (seen > 0) {
      for (int64_t i = 0; i < NV * L; ++i) gt[i] = i < seen ? T(0) : gr[i];
      gr = gt;
    }
    vec_t<T> g[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) g[i] = loadv<T>(gr + i * L);
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      const T* x = X + off[k] + n0;
      vec_t<T> d = g[0] * loadv<T>(x);
#pragma GCC unroll 4
      for (int i = 1; i < NV; ++i) d += g[i] * loadv<T>(x + i * L);
      part[k] += d;
    }
  }
}

// sampled_chunk over a whole plane of N >= NV * lanes positions: chunk by chunk, the last ending
// at N (its overlap with the chunk before weighted by zero).
template <typename T, int NV>
inline void sampled_plane(const int64_t* crow, const int64_t* off, const T* G, const T* X,
                          vec_t<T>* part, int64_t r_begin, int64_t r_end, int64_t Lg, int64_t N) {
  constexpr int64_t CW = NV * kLanes<T>;
  int64_t n0 = 0;
  for (; n0 + CW <= N; n0 += CW)
    sampled_chunk<T, NV>(crow, off, G, X, part, r_begin, r_end, Lg, n0, 0);
  if (n0 < N)
    sampled_chunk<T, NV>(crow, off, G, X, part, r_begin, r_end, Lg, N - CW, n0 - (N - CW));
}

// The frame of a product sampled at the non-zeros (a weight gradient): each thread takes a share
// of the rows, so that every sum has one order on any number of threads; each non-zero keeps a
// vector of lane-wise partial sums (part, nnz x lanes) while accumulate(part, r_begin, r_end)
// adds to those of the thread's rows, then one horizontal sum gives dval.
template <typename T, typename Accumulate>
void sampled_rows(const int64_t* crow, int64_t rows, T* dval, Accumulate&& accumulate) {
  constexpr int L = kLanes<T>;
  std::vector<vec_t<T>> part(crow[rows]);
  const int nt = team();
#pragma omp parallel if (nt > 1) num_threads(nt)
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t r_begin = rows * tid / nth, r_end = rows * (tid + 1) / nth;
    vec_t<T>* pt = part.data();
    for (int64_t k = crow[r_begin]; k < crow[r_end]; ++k) pt[k] = vec_t<T>{};
    accumulate(pt, r_begin, r_end);
    for (int64_t k = crow[r_begin]; k < crow[r_end]; ++k) {
      T total = T(0);
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) total += pt[k][l];
      dval[k] = total;
    }
  }
}

// dval[k] = sum_b sum_{n < N} G[b, r, n] * X[b, off[k] + n] for the non-zeros k of row r.
// Chunk-outer as in shifted_rows: for one chunk of the plane, the input window of every channel
// stays in L1 while this thread's rows and their non-zeros go by. Chunks of four vectors, the
// last ending at N (its overlap with the chunk before weighted by zero: a scalar loop over the
// rest cost several times its share); a plane under four vectors in one-vector chunks, one under
// one vector position by position.
template <typename T>
void shifted_sampled(const int64_t* crow, const int64_t* off, const T* G, const T* X, T* dval,
                     int64_t B, int64_t rows, int64_t N, int64_t Lg, int64_t Gb, int64_t Xb) {
  constexpr int L = kLanes<T>, CW = 4 * L;
  sampled_rows<T>(crow, rows, dval, [&](vec_t<T>* pt, int64_t r_begin, int64_t r_end) {
    for (int64_t b = 0; b < B; ++b) {
      const T* Gs = G + b * Gb;
      const T* Xs = X + b * Xb;
      if (N >= CW) {
        sampled_plane<T, 4>(crow, off, Gs, Xs, pt, r_begin, r_end, Lg, N);
      } else if (N >= L) {
        sampled_plane<T, 1>(crow, off, Gs, Xs, pt, r_begin, r_end, Lg, N);
      } else {
        for (int64_t r = r_begin; r < r_end; ++r) {
          const T* __restrict__ g = Gs + r * Lg;
          for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
            const T* __restrict__ x = Xs + off[k];
            T acc = T(0);
            for (int64_t n = 0; n < N; ++n) acc += g[n] * x[n];
            pt[k][0] += acc;
          }
        }
      }
    }
  });
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

// Gm[p, M + oy * Wp + ox] = g[p, oy, ox] for every plane p, zero elsewhere in the Lg = M + Hp * Wp
// values of each plane (see margin_grid); plane by plane, in parallel.
template <typename T>
void margin_fill(const T* g, T* Gm, int64_t planes, int64_t OH, int64_t OW, int64_t Hp,
                 int64_t Wp, int64_t M) {
  const int64_t Lg = M + Hp * Wp;
  const int nt = team(planes * Lg);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t p = 0; p < planes; ++p) {
    const T* in = g + p * OH * OW;
    T* out = Gm + p * Lg;
    std::fill(out, out + M, T(0));
    for (int64_t oy = 0; oy < OH; ++oy) {
      T* row = out + M + oy * Wp;
      std::copy(in + oy * OW, in + (oy + 1) * OW, row);
      std::fill(row + OW, row + Wp, T(0));
    }
    std::fill(out + M + OH * Wp, out + Lg, T(0));
  }
}

// The output gradient on the padded-width grid, zero in the dropped columns, after a margin of
// M = (kh - 1) * Wp + kw - 1 zeros: Gm[b, o, M + oy * Wp + ox] = g[b, o, oy, ox]; planes of
// M + Hp * Wp floats, so that the input gradient can read Gm[n + M - ky * Wp - kx] for every n.
torch::Tensor margin_grid(const torch::Tensor& g, int64_t Hp, int64_t Wp, int64_t kh, int64_t kw) {
  const int64_t B = g.size(0), O = g.size(1), OH = g.size(2), OW = g.size(3);
  const int64_t M = (kh - 1) * Wp + kw - 1, Lg = M + Hp * Wp;
  auto Gm = empty_output({B, O, Lg}, g.options());  // every entry is written
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "margin_grid", [&] {
    margin_fill<scalar_t>(g.data_ptr<scalar_t>(), Gm.data_ptr<scalar_t>(), B * O, OH, OW, Hp, Wp,
                          M);
  });
  return Gm;
}


// ----------------------------------------------- stride 1 on batch panels
//
// A batch of at least kPanelMin samples runs on *batch panels*: the planes (B, C, H, W) are
// packed as Pn[p][c][q], one vector of kLanes samples (p * L .. p * L + L - 1) of plane c at
// position q of a flat grid Wg wide, zero wherever nothing is placed (padding, the samples past
// the batch). On the padded input's grid (Wg = Wp) a non-zero (c, ky, kx) adds v * Pn[p][c][n +
// ky * Wp + kx] to output position n, as in the shifted planes above, but each position is one
// aligned vector: loads never straddle two cache lines, no plane is too small to fill a vector,
// and a chunk of positions has no edges to special-case. The price is a wider window per channel
// (L samples of every position), so the kernel blocks the input channels; the partial sums wait
// between blocks in an output on panels, which goes to the NCHW output at the end.

constexpr int64_t kPanelMin = 16;  // fewer samples: the per-sample planes above
constexpr int kPanelChunk = 12;    // positions per chunk: accumulators in registers
constexpr int64_t kPanelRows = 16;  // rows taken together through the channel blocks
constexpr int64_t kPanelTail = kPanelChunk;  // zeros after each packed plane: a chunk may
                                             // run past the grid's last position

// Positions per row of panel_spmm's product on panels for N grid positions: whole chunks.
inline int64_t panel_rows_z(int64_t N) {
  return (N + kPanelChunk - 1) / kPanelChunk * kPanelChunk;
}

// Whether a stride-1 convolution of B samples with a kh x kw kernel runs on panels: at least
// kPanelMin samples, at most a fifth of the panels' lanes left empty, and a kernel larger than
// 1 x 1 (a pointwise convolution without padding reads its input where it lies, where panels
// would copy it first).
template <typename T>
bool use_panels(int64_t B, int64_t kh, int64_t kw) {
  constexpr int64_t L = kLanes<T>;
  return B >= kPanelMin && ((B + L - 1) / L) * L * 4 <= 5 * B && kh * kw > 1;
}

// dst[p][c][base + y * Wg + x] = src[p * L + l][c][y][x] (lane l), zero at every other of the Pl
// positions of a plane and in the lanes past the batch. src is contiguous (B, C, H, W).
template <typename T>
void pack_panels(const T* src, int64_t B, int64_t C, int64_t H, int64_t W, T* dst, int64_t Pl,
                 int64_t base, int64_t Wg) {
  constexpr int64_t L = kLanes<T>;
  const int64_t NP = (B + L - 1) / L, plane = H * W;
  const int nt = team(NP * C * Pl * L);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t p = 0; p < NP; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      T* out = dst + (p * C + c) * Pl * L;
      const int64_t lanes = std::min(L, B - p * L);
      const T* in = src + (p * L * C + c) * plane;  // lane l: in + l * C * plane
      auto zero = [&](int64_t q0, int64_t q1) {
        if (q1 > q0) std::memset(out + q0 * L, 0, size_t(q1 - q0) * L * sizeof(T));
      };
      zero(0, base);
      for (int64_t y = 0; y < H; ++y) {
        T* row = out + (base + y * Wg) * L;
        int64_t x = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<T, float>) {
          for (; x + 16 <= W; x += 16) {
            __m512 r[16];
            for (int l = 0; l < 16; ++l)
              r[l] = l < lanes ? _mm512_loadu_ps(in + l * C * plane + y * W + x)
                               : _mm512_setzero_ps();
            transpose16(r);
            for (int j = 0; j < 16; ++j) _mm512_storeu_ps(row + (x + j) * L, r[j]);
          }
        }
#endif
        for (; x < W; ++x) {
          for (int64_t l = 0; l < L; ++l)
            row[x * L + l] = l < lanes ? in[l * C * plane + y * W + x] : T(0);
        }
        if (y + 1 < H) zero(base + y * Wg + W, base + (y + 1) * Wg);
      }
      zero(base + (H - 1) * Wg + W, Pl);
    }
  }
}

// The phase planes of a stride-s convolution's padded input (layouts.cpp, phase_planes) packed
// straight into panels: dst[p][(py * s + px) * C + c][i * wq + j] = lane l of x[p * L + l][c]
// [s * i + py - ph][s * j + px - pw], zero where that lies in the padding, at the positions from
// hq * wq to Pl and in the lanes past the batch. One pass where building the phase planes and
// then packing them took two. The positions of a phase plane are read through a table of their
// offsets in an input plane (-1 in the padding), 16 at a time for each of 16 samples by a masked
// gather from planes that stay in L1, then turned into 16 panel vectors by a transpose.
template <typename T>
void pack_phase_panels(const T* src, int64_t B, int64_t C, int64_t H, int64_t W, int64_t s,
                       int64_t ph, int64_t pw, int64_t hq, int64_t wq, T* dst, int64_t Pl) {
  constexpr int64_t L = kLanes<T>;
  const int64_t NP = (B + L - 1) / L, plane = H * W, Q = hq * wq, S2 = s * s;
  std::vector<int32_t> where(S2 * Q);
  for (int64_t f = 0; f < S2; ++f) {
    for (int64_t i = 0; i < hq; ++i) {
      for (int64_t j = 0; j < wq; ++j) {
        const int64_t y = s * i + f / s - ph, x = s * j + f % s - pw;
        where[f * Q + i * wq + j] = y >= 0 && y < H && x >= 0 && x < W ? int32_t(y * W + x) : -1;
      }
    }
  }
  const int nt = team(NP * S2 * C * Pl * L);
#pragma omp parallel for collapse(2) schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t p = 0; p < NP; ++p) {
    for (int64_t cc = 0; cc < S2 * C; ++cc) {
      const int32_t* wh = where.data() + (cc / C) * Q;
      T* out = dst + (p * S2 * C + cc) * Pl * L;
      const int64_t lanes = std::min(L, B - p * L);
      const T* in = src + (p * L * C + cc % C) * plane;  // lane l: in + l * C * plane
      int64_t q = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        for (; q + 16 <= Q; q += 16) {
          const __m512i idx = _mm512_loadu_si512(wh + q);
          const __mmask16 inside = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
          __m512 r[16];
          for (int l = 0; l < 16; ++l)
            r[l] = l < lanes ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, idx,
                                                        in + l * C * plane, sizeof(float))
                             : _mm512_setzero_ps();
          transpose16(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + (q + j) * L, r[j]);
        }
      }
#endif
      for (; q < Q; ++q) {
        for (int64_t l = 0; l < L; ++l)
          out[q * L + l] = l < lanes && wh[q] >= 0 ? in[l * C * plane + wh[q]] : T(0);
      }
      std::memset(out + Q * L, 0, size_t(Pl - Q) * L * sizeof(T));
    }
  }
}

// Planes (B, C, H, W) as panels of Pl positions per plane, each placed at ``base`` on a grid Wg
// wide: (NP, C, Pl * L), in memory of the BlockCache.
torch::Tensor panels(const torch::Tensor& x, int64_t Pl, int64_t base, int64_t Wg) {
  TORCH_CHECK(x.dim() == 4, "panels: expected (B, C, H, W)");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(base >= 0 && W <= Wg && base + (H - 1) * Wg + W <= Pl,
              "panels: the planes do not fit the grid");
  auto src = x.contiguous();
  int64_t L = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "panels", [&] { L = kLanes<scalar_t>; });
  auto out = empty_output({(B + L - 1) / L, C, Pl * L}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "panels", [&] {
    pack_panels<scalar_t>(src.data_ptr<scalar_t>(), B, C, H, W, out.data_ptr<scalar_t>(), Pl,
                          base, Wg);
  });
  return out;
}

// The s*s phase planes (hq x wq) of x (B, C, H, W) padded by (ph, pw), as panels of Pl positions
// per plane (pack_phase_panels): (NP, s * s * C, Pl * L), in memory of the BlockCache.
torch::Tensor phase_panels(const torch::Tensor& x, int64_t s, int64_t ph, int64_t pw, int64_t hq,
                           int64_t wq, int64_t Pl) {
  TORCH_CHECK(x.dim() == 4, "phase_panels: expected (B, C, H, W)");
  TORCH_CHECK(hq * wq <= Pl, "phase_panels: the planes do not fit the panels");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto src = x.contiguous();
  int64_t L = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "phase_panels", [&] { L = kLanes<scalar_t>; });
  auto out = empty_output({(B + L - 1) / L, s * s * C, Pl * L}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "phase_panels", [&] {
    pack_phase_panels<scalar_t>(src.data_ptr<scalar_t>(), B, C, H, W, s, ph, pw, hq, wq,
                                out.data_ptr<scalar_t>(), Pl);
  });
  return out;
}

// y_{p*L + l}[q] = lane l of Zr[grid position of q] (+ bias) for the positions q < OH * OW of an
// output plane (grid position (q / OW) * Wg + q % OW), for the lanes of the batch: one plane of
// the panel product's rows, (grid positions x samples), turned into a row of the (B, rows, OH,
// OW) output, 16 consecutive positions at a time through a transpose in registers, so that each
// sample's plane is written in whole cache lines, one after the other.
template <typename T>
inline void unpanel_plane(const T* Zr, int64_t Wg, int64_t OH, int64_t OW, T* y, int64_t lanes,
                          int64_t sample_stride, T bias) {
  constexpr int64_t L = kLanes<T>;
  const int64_t Q = OH * OW;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 b = _mm512_set1_ps(bias);
    int64_t oy = 0, ox = 0;  // of position q0
    for (int64_t q0 = 0; q0 < Q; q0 += 16) {
      const int cnt = int(std::min<int64_t>(16, Q - q0));
      __m512 t[16];
      for (int j = 0; j < 16; ++j) {
        if (j < cnt) {
          t[j] = _mm512_add_ps(_mm512_loadu_ps(Zr + (oy * Wg + ox) * L), b);
          if (++ox == OW) ox = 0, ++oy;
        } else {
          t[j] = _mm512_setzero_ps();
        }
      }
      transpose16(t);  // t[l]: the cnt positions of sample l
      const __mmask16 keep = __mmask16((1u << cnt) - 1);
      for (int64_t l = 0; l < lanes; ++l)
        _mm512_mask_storeu_ps(y + l * sample_stride + q0, keep, t[l]);
    }
    return;
  }
#endif
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t q = 0; q < Q; ++q)
      y[l * sample_stride + q] = Zr[((q / OW) * Wg + q % OW) * L + l] + bias;
}

// Y_b[r][kept grid positions] = sum over the non-zeros k of row r of val[k] * X_p[off[k] + n]
// (+ bias[r]), n < N on a grid Wg wide that keeps OH x OW, for every sample b = p * L + l of a
// batch of B: X panels (NP, planes, Pl * L) Xps values apart, Y (B, rows, OH, OW). blk (rows x
// (NB + 1)): where each row's non-zeros of each block of input channels begin. Z (NP, rows,
// panel_rows_z(N) * L) holds the product on panels before it is written to Y.
// Each thread takes a contiguous share of the (panel, chunk) pairs and for each, group by group
// of rows, block by block of channels, adds the block's non-zeros to the rows' partial sums and
// stores them in Z; then each thread writes a share of Z's planes to Y (unpanel_plane). Why not
// each chunk straight into Y: its lanes would write parts of cache lines in 16 planes that lie
// a power of two apart, in the same cache sets, and the lines would leave the caches before the
// chunks that complete them came; that costs more than the product itself at 5% density.
template <typename T>
void panel_spmm(const int64_t* blk, int64_t NB, const int64_t* off, const T* val, const T* X,
                int64_t Xps, int64_t B, T* Z, T* Y, int64_t rows, int64_t OH, int64_t OW,
                int64_t Wg, int64_t N, const T* bias) {
  constexpr int L = kLanes<T>, R = kPanelChunk;
  const int64_t NP = (B + L - 1) / L, chunks = (N + R - 1) / R, items = NP * chunks;
  const int64_t Yb = rows * OH * OW, Nz = panel_rows_z(N);
  const int nt = team();
#pragma omp parallel if (nt > 1) num_threads(nt)
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    for (int64_t it = items * tid / nth; it < items * (tid + 1) / nth; ++it) {
      const int64_t p = it / chunks;
      // The last chunk runs past N, into the planes' tails (kPanelTail) and Z's own. A last
      // chunk that ended at N would overlap the chunk before it, which another thread may hold:
      // between blocks of channels each would read back partial sums the other stored there.
      const int64_t n0 = (it % chunks) * R;
      const T* Xn = X + p * Xps + n0 * L;
      for (int64_t g0 = 0; g0 < rows; g0 += kPanelRows) {
        const int64_t g1 = std::min(rows, g0 + kPanelRows);
        for (int64_t bl = 0; bl < NB; ++bl) {
          for (int64_t r = g0; r < g1; ++r) {
            const int64_t* kb = blk + r * (NB + 1) + bl;
            if (bl > 0 && kb[0] == kb[1]) continue;  // nothing to add
            T* pr = Z + ((p * rows + r) * Nz + n0) * L;
            vec_t<T> acc[R];
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i) acc[i] = bl == 0 ? vec_t<T>{} : loadv<T>(pr + i * L);
            for (int64_t k = kb[0]; k < kb[1]; ++k) {
              const T v = val[k];
              const T* x = Xn + off[k] * L;
#pragma GCC unroll 16
              for (int i = 0; i < R; ++i) acc[i] += v * loadv<T>(x + i * L);
            }
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i) storev<T>(pr + i * L, acc[i]);
          }
        }
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t pr = 0; pr < NP * rows; ++pr) {
      const int64_t p = pr / rows, r = pr % rows;
      unpanel_plane<T>(Z + pr * Nz * L, Wg, OH, OW, Y + p * L * Yb + r * OH * OW,
                       std::min<int64_t>(L, B - p * L), Yb, bias ? bias[r] : T(0));
    }
  }
}

// dval[k] = sum over panels p, positions n < N and lanes of G_p[r][n] * X_p[off[k] + n], for
// the non-zeros k of each row r: G panels (NP, rows, Lg * L) Gps apart, zero from position N
// on, X panels Xps apart; blk as in panel_spmm. The loops are panel_spmm's: chunk by chunk of
// kPanelChunk positions, block by block of input channels (their windows stay in L1 while the
// rows go by), row by row with the row's gradient for the chunk held in registers, so that
// each multiply-add loads one vector, as in the product. (A row's gradient held in L1 while its
// non-zeros go by would cost two loads per multiply-add, one of them from L2.)
template <typename T>
void panel_sampled(const int64_t* crow, const int64_t* blk, int64_t NB, const int64_t* off,
                   const T* G, int64_t Gps, int64_t Lg, const T* X, int64_t Xps, T* dval,
                   int64_t NP, int64_t rows, int64_t N) {
  constexpr int L = kLanes<T>, R = kPanelChunk;
  static_assert(R % 2 == 0, "two chains of sums per non-zero");
  sampled_rows<T>(crow, rows, dval, [&](vec_t<T>* pt, int64_t r_begin, int64_t r_end) {
    for (int64_t p = 0; p < NP; ++p) {
      for (int64_t n0 = 0; n0 < N; n0 += R) {  // the last chunk reads G's zeros past N
        const T* Xn = X + p * Xps + n0 * L;
        for (int64_t bl = 0; bl < NB; ++bl) {
          for (int64_t r = r_begin; r < r_end; ++r) {
            const int64_t* kb = blk + r * (NB + 1) + bl;
            if (kb[0] == kb[1]) continue;
            const T* g = G + p * Gps + (r * Lg + n0) * L;
            vec_t<T> gv[R];
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i) gv[i] = loadv<T>(g + i * L);
            for (int64_t k = kb[0]; k < kb[1]; ++k) {
              const T* x = Xn + off[k] * L;
              vec_t<T> a0 = gv[0] * loadv<T>(x), a1 = gv[1] * loadv<T>(x + L);
#pragma GCC unroll 16
              for (int i = 2; i < R; i += 2) {
                a0 += gv[i] * loadv<T>(x + i * L);
                a1 += gv[i + 1] * loadv<T>(x + (i + 1) * L);
              }
              pt[k] += a0 + a1;
            }
          }
        }
      }
    }
  });
}

// Input channels per block of the panel kernels: enough that a row has about kBlockNonZeros
// non-zeros in a block (each visit of a row and block costs a round trip of its partial sums or
// a load of its gradient, and a mispredicted loop exit), and at least as many as fill two
// thirds of a 48 KiB L1 data cache with their windows (kh rows of a chunk plus the kernel's
// reach, one vector of lanes per position).
template <typename T>
int64_t panel_block_channels(int64_t kh, int64_t kw, int64_t rows, int64_t planes, int64_t nnz) {
  constexpr int64_t kBlockNonZeros = 16;
  const int64_t window = kh * (kPanelChunk + kw - 1) * int64_t(sizeof(vec_t<T>));
  return std::max<int64_t>({int64_t(1), (32 * 1024) / window,
                            (kBlockNonZeros * rows * planes + std::max<int64_t>(1, nnz) - 1) /
                                std::max<int64_t>(1, nnz)});
}

// The product of panel_spmm for a CSR (crow, col) whose columns encode (channel, ky, kx), on
// panels X of planes Pl long: off[k] = channel * Pl + sign * (ky * Wg + kx) + base.
torch::Tensor panel_product(const torch::Tensor& crow, const torch::Tensor& col,
                            const torch::Tensor& val, const torch::Tensor& X, int64_t B,
                            int64_t rows, int64_t kh, int64_t kw, int64_t Pl, int64_t sign,
                            int64_t base, int64_t OH, int64_t OW, int64_t Wg,
                            const c10::optional<torch::Tensor>& bias) {
  const int64_t planes = X.size(1), N = (OH - 1) * Wg + OW;
  auto off = plane_offsets(col, kh, kw, Wg, Pl, sign, base);
  auto y = empty_output({B, rows, OH, OW}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "panel_product", [&] {
    const int64_t per = panel_block_channels<scalar_t>(kh, kw, rows, planes, col.numel());
    int64_t NB = 1;
    auto blk = channel_blocks(crow, col, kh * kw, planes, per, &NB);
    constexpr int64_t L = kLanes<scalar_t>;
    auto z = empty_output({(B + L - 1) / L, rows, panel_rows_z(N) * L}, X.options());
    panel_spmm<scalar_t>(blk.data_ptr<int64_t>(), NB, off.data_ptr<int64_t>(),
                         val.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(), planes * X.size(2), B,
                         z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, OH, OW, Wg, N,
                         bias ? bias->data_ptr<scalar_t>() : nullptr);
  });
  return y;
}

// The bias the kernels add as they write the output: contiguous, one value per output channel,
// in x's dtype.
c10::optional<torch::Tensor> checked_conv_bias(const c10::optional<torch::Tensor>& bias,
                                               int64_t out_channels, const torch::Tensor& x) {
  if (!bias.has_value()) return bias;
  TORCH_CHECK(bias->numel() == out_channels && bias->scalar_type() == x.scalar_type(),
              "bias must hold one value per output channel, in the input's dtype");
  return bias->contiguous();
}

}  // namespace

// The convolution of x (B, C, H, W) padded by (ph, pw) (+ bias), and what its backward reads:
// with stride 1 and a batch that fills panels (use_panels), the input as panels (NP, C, Pl * L);
// else the padded input (B, C, Hp, Wp).
std::vector<torch::Tensor> conv2d_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor val,
                                          torch::Tensor x, int64_t out_channels, int64_t kh,
                                          int64_t kw, int64_t stride, int64_t ph, int64_t pw,
                                          c10::optional<torch::Tensor> bias_opt) {
  TORCH_CHECK(x.dim() == 4, "x must be a (B, C, H, W) tensor");
  TORCH_CHECK(ph >= 0 && pw >= 0 && stride >= 1, "the padding and stride must be valid");
  const auto bias = checked_conv_bias(bias_opt, out_channels, x);
  col = col.to(torch::kLong);  // the convolution kernels index with int64
  const int64_t B = x.size(0), Hp = x.size(2) + 2 * ph, Wp = x.size(3) + 2 * pw;
  const int64_t OH = (Hp - kh) / stride + 1, OW = (Wp - kw) / stride + 1;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "the kernel is larger than the padded input");
  bool on_panels = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward",
                             [&] { on_panels = stride == 1 && use_panels<scalar_t>(B, kh, kw); });
  if (on_panels) {
    const int64_t Pl = Hp * Wp + kPanelTail;
    auto xs = panels(x, Pl, ph * Wp + pw, Wp);
    auto y = panel_product(crow, col, val, xs, B, out_channels, kh, kw, Pl, 1, 0, OH, OW, Wp,
                           bias);
    return {y, xs};
  }
  // the padded input: the one phase plane of stride 1, written in parallel
  auto xp = ph == 0 && pw == 0 ? x.contiguous()
                                : phase_planes(x.contiguous(), 1, ph, pw, Hp, Wp, 1);
  if (stride == 1) {
    const int64_t plane = Hp * Wp;
    auto off = plane_offsets(col, kh, kw, Wp, plane, 1, 0);
    auto y = empty_output({B, out_channels, OH, OW}, xp.options());
    const int64_t N = (OH - 1) * Wp + OW;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv2d_forward", [&] {
      const GridStore<scalar_t> st{Wp, OW, bias ? bias->data_ptr<scalar_t>() : nullptr};
      int64_t NB = 1;
      auto blk = channel_blocks(crow, col, kh * kw, xp.size(1),
                                channels_per_block<scalar_t>(kh, kw, Wp), &NB);
      shifted_spmm<scalar_t>(crow.data_ptr<int64_t>(), blk.data_ptr<int64_t>(), NB,
                             off.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
                             xp.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), B, out_channels, N,
                             OH * OW, xp.size(1) * plane, out_channels * OH * OW, st);
    });
    return {y, xp};
  }
  auto y = empty_output({B, out_channels, OH, OW}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv2d_forward", [&] {
    conv_forward<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                           val.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
                           y.data_ptr<scalar_t>(), B, xp.size(1), Hp, Wp, out_channels, OH, OW,
                           kh, kw, stride);
  });
  if (bias) y.add_(bias->view({1, out_channels, 1, 1}));  // (its own output: in place)
  return {y, xp};
}

// A stride-s convolution as the stride-1 one of a kh x kw kernel over the s*s phase planes
// (hq x wq) of x padded by (ph, pw): the CSR (crow, col) is that convolution's, over s*s*C
// channels. On panels, the phase planes are packed from x in one pass (pack_phase_panels); else
// they are built (phase_planes) and convolved as any input. Returns what conv2d_forward returns
// for the phase planes: the output, and what the backward reads, whose input gradient is the
// phase planes' (phase_planes_grad turns it into x's).
std::vector<torch::Tensor> conv2d_forward_phases(torch::Tensor crow, torch::Tensor col,
                                                 torch::Tensor val, torch::Tensor x,
                                                 int64_t out_channels, int64_t kh, int64_t kw,
                                                 int64_t s, int64_t ph, int64_t pw, int64_t hq,
                                                 int64_t wq, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 4, "x must be a (B, C, H, W) tensor");
  TORCH_CHECK(s >= 1 && ph >= 0 && pw >= 0 && hq >= kh && wq >= kw,
              "the stride, padding and phase planes must be valid");
  const int64_t B = x.size(0);
  bool on_panels = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_phases",
                             [&] { on_panels = use_panels<scalar_t>(B, kh, kw); });
  if (!on_panels)
    return conv2d_forward(crow, col, val, phase_planes(x, s, ph, pw, hq, wq, s * s),
                          out_channels, kh, kw, 1, 0, 0, bias);
  const int64_t Pl = hq * wq + kPanelTail;
  auto xs = phase_panels(x, s, ph, pw, hq, wq, Pl);
  auto y = panel_product(crow, col.to(torch::kLong), val, xs, B, out_channels, kh, kw, Pl, 1, 0,
                         hq - kh + 1, wq - kw + 1, wq, checked_conv_bias(bias, out_channels, x));
  return {y, xs};
}

namespace {

// The stride-1 input gradient from the output gradient on its margin grid (margin_grid), for the
// input inside its padding of (ph, pw): the padded input's gradient at the positions the input
// came from. Those are grid positions n = (iy + ph) * Wp + ix + pw; counted from the first,
// n' = n - ph * Wp - pw = iy * Wp + ix on a Wp-wide grid that keeps its first W columns, so the
// kernel writes the (B, C, H, W) gradient directly: the padding ring's gradient is never
// computed, and the caller gets a contiguous tensor instead of a view to copy.
torch::Tensor grad_input_s1(const torch::Tensor& crowT, const torch::Tensor& colT,
                            const torch::Tensor& valT, const torch::Tensor& Gm, int64_t B,
                            int64_t O, int64_t in_channels, int64_t Hp, int64_t Wp, int64_t kh,
                            int64_t kw, int64_t ph, int64_t pw) {
  const int64_t M = (kh - 1) * Wp + kw - 1, Lg = M + Hp * Wp;
  const int64_t H = Hp - 2 * ph, W = Wp - 2 * pw, N = (H - 1) * Wp + W;
  auto off = plane_offsets(colT, kh, kw, Wp, Lg, -1, M + ph * Wp + pw);
  auto gx = empty_output({B, in_channels, H, W}, Gm.options());
  AT_DISPATCH_FLOATING_TYPES(Gm.scalar_type(), "conv2d_grad_input", [&] {
    const GridStore<scalar_t> st{Wp, W, nullptr};
    int64_t NB = 1;  // blocks of output channels, whose gradient planes are read here
    auto blk = channel_blocks(crowT, colT, kh * kw, O, channels_per_block<scalar_t>(kh, kw, Wp),
                              &NB);
    shifted_spmm<scalar_t>(crowT.data_ptr<int64_t>(), blk.data_ptr<int64_t>(), NB,
                           off.data_ptr<int64_t>(), valT.data_ptr<scalar_t>(),
                           Gm.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), B, in_channels, N,
                           H * W, O * Lg, in_channels * H * W, st);
  });
  return gx;
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
  auto gxp = empty_output({g.size(0), in_channels, Hp, Wp}, g.options());
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

// Both gradients of a convolution (each only when asked): the input's, inside the padding
// (ph, pw), and the weight's at the non-zeros, from what the forward saved (conv2d_forward).
// With stride 1 they share one copy of the output gradient on its margin grid (as panels, or per
// sample); other strides take the direct kernels.
std::vector<torch::Tensor> conv2d_backward(
    torch::Tensor crow, torch::Tensor col, torch::Tensor crowT, torch::Tensor colT,
    torch::Tensor valT, torch::Tensor g, torch::Tensor saved, int64_t kh, int64_t kw,
    int64_t stride, int64_t ph, int64_t pw, bool want_input, bool want_weight) {
  TORCH_CHECK(g.dim() == 4 && g.is_contiguous() && saved.is_contiguous(),
              "g and what the forward saved must be contiguous");
  // a gradient not asked for is empty
  torch::Tensor gx = torch::empty({0}, g.options()), dval = torch::empty({0}, g.options());
  if (!want_input && !want_weight) return {gx, dval};
  col = col.to(torch::kLong);  // the convolution kernels index with int64
  colT = colT.to(torch::kLong);
  if (saved.dim() == 3) {
    // panels (NP, C, Pl * L) of the input padded on a grid Wp wide
    TORCH_CHECK(stride == 1, "panels are saved by stride-1 convolutions only");
    const int64_t B = g.size(0), O = g.size(1), OH = g.size(2), OW = g.size(3);
    const int64_t Hp = OH + kh - 1, Wp = OW + kw - 1, H = Hp - 2 * ph, W = Wp - 2 * pw;
    TORCH_CHECK(H > 0 && W > 0, "the padding must leave a non-empty input");
    const int64_t C = saved.size(1), M = (kh - 1) * Wp + kw - 1, Lg = M + Hp * Wp + kPanelTail;
    auto Gs = panels(g, Lg, M, Wp);  // the output gradient after a margin of M zeros
    if (want_input)
      gx = panel_product(crowT, colT, valT, Gs, B, C, kh, kw, Lg, -1, M + ph * Wp + pw, H, W, Wp,
                         c10::nullopt);
    if (want_weight) {
      dval = torch::empty({col.numel()}, g.options());
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_grad_weight", [&] {
        constexpr int64_t L = kLanes<scalar_t>;
        const int64_t Pl = saved.size(2) / L;
        auto off = plane_offsets(col, kh, kw, Wp, Pl, 1, 0);
        int64_t NB = 1;
        auto blk = channel_blocks(crow, col, kh * kw, C,
                                  panel_block_channels<scalar_t>(kh, kw, O, C, col.numel()), &NB);
        panel_sampled<scalar_t>(crow.data_ptr<int64_t>(), blk.data_ptr<int64_t>(), NB,
                                off.data_ptr<int64_t>(),
                                Gs.data_ptr<scalar_t>() + M * L, O * Lg * L, Lg,
                                saved.data_ptr<scalar_t>(), C * Pl * L, dval.data_ptr<scalar_t>(),
                                saved.size(0), O, (OH - 1) * Wp + OW);
      });
    }
    return {gx, dval};
  }
  const torch::Tensor& xp = saved;  // the padded input
  TORCH_CHECK(xp.dim() == 4 && 2 * ph < xp.size(2) && 2 * pw < xp.size(3),
              "the padding must leave a non-empty input inside the padded one");
  const int64_t C = xp.size(1), Hp = xp.size(2), Wp = xp.size(3);
  if (stride != 1) {
    if (want_input)
      gx = grad_input_direct(crowT, colT, valT, g, C, Hp, Wp, kh, kw, stride)
                .narrow(2, ph, Hp - 2 * ph)
                .narrow(3, pw, Wp - 2 * pw);
    if (want_weight) dval = grad_weight_direct(crow, col, g, xp, kh, kw, stride);
    return {gx, dval};
  }
  auto Gm = margin_grid(g, Hp, Wp, kh, kw);
  if (want_input)
    gx = grad_input_s1(crowT, colT, valT, Gm, g.size(0), g.size(1), C, Hp, Wp, kh, kw, ph, pw);
  if (want_weight)
    dval = grad_weight_s1(crow, col, Gm, xp, g.size(1), g.size(2), g.size(3), kh, kw);
  return {gx, dval};
}

bool uses_panels(int64_t batch, int64_t kh, int64_t kw, bool is_double) {
  return is_double ? use_panels<double>(batch, kh, kw) : use_panels<float>(batch, kh, kw);
}

namespace {

int64_t lanes(bool is_double) { return is_double ? kLanes<double> : kLanes<float>; }

// conv2d_forward as an operator: what the backward reads is empty where it would be x itself
// (an operator's outputs never alias its inputs; the layer hands x to the backward instead).
std::vector<torch::Tensor> conv2d_forward_op(torch::Tensor crow, torch::Tensor col,
                                             torch::Tensor val, torch::Tensor x,
                                             int64_t out_channels, int64_t kh, int64_t kw,
                                             int64_t stride, int64_t ph, int64_t pw,
                                             c10::optional<torch::Tensor> bias) {
  auto out = conv2d_forward(crow, col, val, x, out_channels, kh, kw, stride, ph, pw, bias);
  if (out[1].is_same(x)) out[1] = torch::empty({0}, x.options());
  return out;
}

// conv2d_backward as an operator: given the input's channels and size too (for the shapes of
// torch.compile, which cannot read them from a layout of the kernels'), the input's gradient
// contiguous.
std::vector<torch::Tensor> conv2d_backward_op(torch::Tensor crow, torch::Tensor col,
                                              torch::Tensor crowT, torch::Tensor colT,
                                              torch::Tensor valT, torch::Tensor g,
                                              torch::Tensor saved, int64_t C, int64_t H, int64_t W,
                                              int64_t kh, int64_t kw, int64_t stride, int64_t ph,
                                              int64_t pw, bool want_input, bool want_weight) {
  auto out = conv2d_backward(crow, col, crowT, colT, valT, g, saved, kh, kw, stride, ph, pw,
                             want_input, want_weight);
  if (want_input) {
    TORCH_CHECK(out[0].size(1) == C && out[0].size(2) == H && out[0].size(3) == W,
                "conv2d_backward: the input's channels and size do not match what was saved");
    out[0] = out[0].contiguous();
  }
  return out;
}

}  // namespace

// The shape of what conv2d_forward (as an operator) saves for the backward of an input (B, C,
// H, W): the input on panels, the padded input, or nothing ({0}: x itself, contiguous and
// unpadded). For the shapes torch.compile and torch.export are given (kernels/ops.py).
std::vector<int64_t> conv2d_saved_shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                                        int64_t kw, int64_t stride, int64_t ph, int64_t pw,
                                        bool is_double, bool contiguous) {
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  if (stride == 1 && uses_panels(B, kh, kw, is_double)) {
    const int64_t L = lanes(is_double);
    return {(B + L - 1) / L, C, (Hp * Wp + kPanelTail) * L};
  }
  if (ph == 0 && pw == 0 && contiguous) return {0};
  return {B, C, Hp, Wp};
}

// The same for conv2d_forward_phases: the phase planes (hq x wq, s * s * C of them) on panels,
// or built.
std::vector<int64_t> conv2d_phases_saved_shape(int64_t B, int64_t C, int64_t s, int64_t hq,
                                               int64_t wq, int64_t kh, int64_t kw,
                                               bool is_double) {
  if (uses_panels(B, kh, kw, is_double)) {
    const int64_t L = lanes(is_double);
    return {(B + L - 1) / L, s * s * C, (hq * wq + kPanelTail) * L};
  }
  return {B, s * s * C, hq, wq};
}

// The compiled implementations of the convolution operators of kernels/ops.py (Capped: the
// thread cap last).
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) {
  m.def("conv2d_forward", &Capped<&conv2d_forward_op>::call);
  m.def("conv2d_forward_phases", &Capped<&conv2d_forward_phases>::call);
  m.def("conv2d_backward", &Capped<&conv2d_backward_op>::call);
}
