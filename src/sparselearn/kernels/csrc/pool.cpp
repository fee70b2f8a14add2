// Max pooling over non-overlapping k x k windows (stride k, no padding), with PyTorch's rule
// for which input a window's gradient goes to: the first maximum in row-major order, a NaN
// counting as a maximum (the last NaN wins). The same outputs and gradients as F.max_pool2d.

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"
#include "kernels.h"

using namespace slk;

namespace {

// One plane: the maximum of each window and its place (row-major in the window). Branch-free
// selections (a branch per comparison mispredicts on most data), so that the loop over a row's
// windows vectorises; K > 0 fixes the window size at compile time, K == 0 takes k.
template <typename T, int K>
inline void pool_plane(const T* in, T* out, uint8_t* at, int64_t OH, int64_t OW, int64_t W,
                       int64_t k_) {
  const int64_t k = K > 0 ? K : k_;
  for (int64_t oy = 0; oy < OH; ++oy) {
    const T* top = in + oy * k * W;
    T* o = out + oy * OW;
    uint8_t* a = at ? at + oy * OW : nullptr;
#pragma omp simd
    for (int64_t ox = 0; ox < OW; ++ox) {
      T best = -std::numeric_limits<T>::infinity();
      int where = 0;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) {
          const T v = top[ky * W + ox * k + kx];
          const bool take = v > best || v != v;  // v != v: a NaN, which PyTorch takes
          best = take ? v : best;
          where = take ? int(ky * k + kx) : where;
        }
      o[ox] = best;
      if (a) a[ox] = uint8_t(where);
    }
  }
}

// One plane's input gradient: each window's output gradient at its maximum's place, 0 elsewhere
// (and in the rows and columns past the last whole window).
template <typename T, int K>
inline void unpool_plane(const T* g, const uint8_t* at, T* out, int64_t H, int64_t W, int64_t OH,
                         int64_t OW, int64_t k_) {
  const int64_t k = K > 0 ? K : k_;
  for (int64_t oy = 0; oy < OH; ++oy)
    for (int64_t ky = 0; ky < k; ++ky) {
      T* row = out + (oy * k + ky) * W;
      const T* gr = g + oy * OW;
      const uint8_t* ar = at + oy * OW;
#pragma omp simd
      for (int64_t ox = 0; ox < OW; ++ox)
        for (int64_t kx = 0; kx < k; ++kx)
          row[ox * k + kx] = ar[ox] == ky * k + kx ? gr[ox] : T(0);
      std::fill(row + OW * k, row + W, T(0));
    }
  std::fill(out + OH * k * W, out + H * W, T(0));
}

// 2 x 2 windows of float, 16 at a time: the two input rows of 32 floats each split into even
// and odd columns, then the four candidates taken in PyTorch's order.
typedef int v16i_t __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

inline void pool_rows2(const float* r0, const float* r1, float* out, uint8_t* at, int64_t OW) {
  const v16i_t even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const v16i_t odd = even + 1;
  int64_t ox = 0;
  for (; ox + 16 <= OW; ox += 16) {
    const v16f t0 = load16(r0 + 2 * ox), t1 = load16(r0 + 2 * ox + 16);
    const v16f b0 = load16(r1 + 2 * ox), b1 = load16(r1 + 2 * ox + 16);
    const v16f cand[4] = {__builtin_shuffle(t0, t1, even), __builtin_shuffle(t0, t1, odd),
                          __builtin_shuffle(b0, b1, even), __builtin_shuffle(b0, b1, odd)};
    v16f best = v16f{} - std::numeric_limits<float>::infinity();
    v16i_t where = v16i_t{};
    for (int i = 0; i < 4; ++i) {
      const v16i_t take = (cand[i] > best) | (cand[i] != cand[i]);
      best = take ? cand[i] : best;
      where = take ? v16i_t{} + i : where;
    }
    store16(out + ox, best);
    if (at) {
      const v16u8 w = __builtin_convertvector(where, v16u8);
      __builtin_memcpy(at + ox, &w, sizeof w);
    }
  }
  for (; ox < OW; ++ox) {  // the rest, one window at a time
    const float cand[4] = {r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]};
    float best = -std::numeric_limits<float>::infinity();
    int where = 0;
    for (int i = 0; i < 4; ++i) {
      const bool take = cand[i] > best || cand[i] != cand[i];
      best = take ? cand[i] : best;
      where = take ? i : where;
    }
    out[ox] = best;
    if (at) at[ox] = uint8_t(where);
  }
}

// The gradient of 2 x 2 windows of float, 16 at a time: each window's gradient at its place,
// interleaved back into the two input rows.
inline void unpool_rows2(const float* g, const uint8_t* at, float* r0, float* r1, int64_t OW) {
  const v16i_t lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const v16i_t hi = lo + 8;
  int64_t ox = 0;
  for (; ox + 16 <= OW; ox += 16) {
    const v16f gv = load16(g + ox);
    v16u8 w8;
    __builtin_memcpy(&w8, at + ox, sizeof w8);
    const v16i_t w = __builtin_convertvector(w8, v16i_t);
    const v16f z = v16f{};
    const v16f c0 = w == 0 ? gv : z, c1 = w == 1 ? gv : z;
    const v16f c2 = w == 2 ? gv : z, c3 = w == 3 ? gv : z;
    store16(r0 + 2 * ox, __builtin_shuffle(c0, c1, lo));
    store16(r0 + 2 * ox + 16, __builtin_shuffle(c0, c1, hi));
    store16(r1 + 2 * ox, __builtin_shuffle(c2, c3, lo));
    store16(r1 + 2 * ox + 16, __builtin_shuffle(c2, c3, hi));
  }
  for (; ox < OW; ++ox) {
    r0[2 * ox] = at[ox] == 0 ? g[ox] : 0.0f;
    r0[2 * ox + 1] = at[ox] == 1 ? g[ox] : 0.0f;
    r1[2 * ox] = at[ox] == 2 ? g[ox] : 0.0f;
    r1[2 * ox + 1] = at[ox] == 3 ? g[ox] : 0.0f;
  }
}

#if defined(__AVX512F__)
// Planes of float whose output rows are narrower than a vector (OW < 16), where a vector along
// a row would hold a few windows: the outputs of G planes at a time (G * OH * OW a multiple of
// 16), 16 at a time, each window position's 16 candidates gathered through a table of where
// each output's window begins (from the group's first plane). start[] is int32: the planes of a
// group must span fewer than 2^31 values (narrow_fits).
struct NarrowGroups {
  int64_t G, Q;                // planes per group, outputs per plane
  std::vector<int32_t> start;  // G * Q window origins, padded to a multiple of 16
};

bool narrow_fits(int64_t H, int64_t W, int64_t k) {
  return W / k < 16 && H * W * 16 < (int64_t(1) << 31);
}

NarrowGroups narrow_groups(int64_t H, int64_t W, int64_t k) {
  const int64_t OW = W / k, Q = (H / k) * OW, G = 16 / std::gcd(Q, int64_t(16));
  NarrowGroups n{G, Q, std::vector<int32_t>((G * Q + 15) / 16 * 16, 0)};
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < Q; ++j)
      n.start[g * Q + j] = int32_t(g * H * W + (j / OW) * k * W + (j % OW) * k);
  return n;
}

// f(in, o, m, origin) for every vector of 16 outputs, in parallel over groups of planes: ``in``
// where the group's first input plane begins (values from the input's start), o the index of
// the vector's first output, m the mask of its outputs (the last of a group may hold fewer),
// origin their windows' origins from ``in``. before(in, planes) runs on each group first.
template <typename Before, typename F>
void narrow_vectors(int64_t planes, int64_t H, int64_t W, int64_t k, Before&& before, F&& f) {
  const NarrowGroups n = narrow_groups(H, W, k);
  const int64_t groups = (planes + n.G - 1) / n.G;
  const int nt = team(planes * H * W);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t in = grp * n.G * H * W, first = grp * n.G * n.Q;
    const int64_t count = std::min(n.G, planes - grp * n.G) * n.Q;
    before(in, count / n.Q);
    for (int64_t v = 0; v < count; v += 16) {
      const __mmask16 m = count - v >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (count - v)) - 1);
      f(in, first + v, m, _mm512_loadu_si512(n.start.data() + v));
    }
  }
}

void pool_narrow(const float* x, float* y, uint8_t* idx, int64_t planes, int64_t H, int64_t W,
                 int64_t k) {
  narrow_vectors(
      planes, H, W, k, [](int64_t, int64_t) {},
      [&](int64_t in, int64_t o, __mmask16 m, __m512i origin) {
        __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512i where = _mm512_setzero_si512();
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx) {
            const __m512i at = _mm512_add_epi32(origin, _mm512_set1_epi32(int32_t(ky * W + kx)));
            const __m512 c = _mm512_mask_i32gather_ps(best, m, at, x + in, sizeof(float));
            // PyTorch's rule: a larger value, or a NaN, takes the window
            const __mmask16 take =
                _mm512_cmp_ps_mask(c, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, take, c);
            where = _mm512_mask_mov_epi32(where, take, _mm512_set1_epi32(int32_t(ky * k + kx)));
          }
        _mm512_mask_storeu_ps(y + o, m, best);
        if (idx) _mm512_mask_cvtepi32_storeu_epi8(idx + o, m, where);
      });
}

// The gradient of pool_narrow: each group's input planes zeroed, then each output's gradient
// scattered to its window's place.
void unpool_narrow(const float* g, const uint8_t* idx, float* gx, int64_t planes, int64_t H,
                   int64_t W, int64_t k) {
  narrow_vectors(
      planes, H, W, k,
      [&](int64_t in, int64_t count) {
        std::memset(gx + in, 0, size_t(count * H * W) * sizeof(float));
      },
      [&](int64_t in, int64_t o, __mmask16 m, __m512i origin) {
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + o);
        const __m512i place = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, idx + o));
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx) {
            const __mmask16 here =
                _mm512_mask_cmpeq_epi32_mask(m, place, _mm512_set1_epi32(int32_t(ky * k + kx)));
            if (!here) continue;
            const __m512i at = _mm512_add_epi32(origin, _mm512_set1_epi32(int32_t(ky * W + kx)));
            _mm512_mask_i32scatter_ps(gx + in, here, at, gv, sizeof(float));
          }
      });
}
#endif

template <typename T>
void pool_forward(const T* x, T* y, uint8_t* idx, int64_t planes, int64_t H, int64_t W,
                  int64_t k) {
  const int64_t OH = H / k, OW = W / k;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (narrow_fits(H, W, k)) return pool_narrow(x, y, idx, planes, H, W, k);
  }
#endif
  const int nt = team(planes * H * W);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t p = 0; p < planes; ++p) {
    const T* in = x + p * H * W;
    T* out = y + p * OH * OW;
    uint8_t* at = idx ? idx + p * OH * OW : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      if (k == 2) {
        for (int64_t oy = 0; oy < OH; ++oy)
          pool_rows2(in + 2 * oy * W, in + (2 * oy + 1) * W, out + oy * OW,
                     at ? at + oy * OW : nullptr, OW);
        continue;
      }
    }
    if (k == 2)
      pool_plane<T, 2>(in, out, at, OH, OW, W, k);
    else
      pool_plane<T, 0>(in, out, at, OH, OW, W, k);
  }
}

template <typename T>
void pool_backward(const T* g, const uint8_t* idx, T* gx, int64_t planes, int64_t H, int64_t W,
                   int64_t k) {
  const int64_t OH = H / k, OW = W / k;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (narrow_fits(H, W, k)) return unpool_narrow(g, idx, gx, planes, H, W, k);
  }
#endif
  const int nt = team(planes * H * W);
#pragma omp parallel for schedule(static) if (nt > 1) num_threads(nt)
  for (int64_t p = 0; p < planes; ++p) {
    const T* gp = g + p * OH * OW;
    const uint8_t* at = idx + p * OH * OW;
    T* out = gx + p * H * W;
    if constexpr (std::is_same_v<T, float>) {
      if (k == 2) {
        for (int64_t oy = 0; oy < OH; ++oy) {
          float* r0 = out + 2 * oy * W;
          float* r1 = r0 + W;
          unpool_rows2(gp + oy * OW, at + oy * OW, r0, r1, OW);
          std::fill(r0 + 2 * OW, r0 + W, 0.0f);  // the column past the last window
          std::fill(r1 + 2 * OW, r1 + W, 0.0f);
        }
        std::fill(out + 2 * OH * W, out + H * W, 0.0f);  // the row past the last window
        continue;
      }
    }
    if (k == 2)
      unpool_plane<T, 2>(gp, at, out, H, W, OH, OW, k);
    else
      unpool_plane<T, 0>(gp, at, out, H, W, OH, OW, k);
  }
}

}  // namespace

std::vector<torch::Tensor> max_pool2d(torch::Tensor x, int64_t k, bool want_index) {
  TORCH_CHECK(x.dim() == 4, "max_pool2d: expected (B, C, H, W)");
  TORCH_CHECK(k >= 1 && k * k <= 256 && x.size(2) >= k && x.size(3) >= k,
              "max_pool2d: the window must fit the plane and hold at most 256 positions");
  x = x.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto y = empty_output({B, C, H / k, W / k}, x.options());
  torch::Tensor idx = want_index ? torch::empty({B, C, H / k, W / k}, x.options().dtype(torch::kUInt8))
                                 : torch::empty({0}, x.options().dtype(torch::kUInt8));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2d", [&] {
    pool_forward<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                           want_index ? idx.data_ptr<uint8_t>() : nullptr, B * C, H, W, k);
  });
  return {y, idx};
}

torch::Tensor max_pool2d_backward(torch::Tensor g, torch::Tensor idx, int64_t H, int64_t W,
                                  int64_t k) {
  TORCH_CHECK(g.dim() == 4 && idx.sizes() == g.sizes() && g.size(2) == H / k &&
                  g.size(3) == W / k,
              "max_pool2d_backward: the gradient and the window indices must match the output");
  g = g.contiguous();
  auto gx = empty_output({g.size(0), g.size(1), H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "max_pool2d_backward", [&] {
    pool_backward<scalar_t>(g.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(),
                            gx.data_ptr<scalar_t>(), g.size(0) * g.size(1), H, W, k);
  });
  return gx;
}

// The compiled implementations of the max pooling operators of kernels/ops.py.
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) {
  m.def("max_pool2d", &Capped<&max_pool2d>::call);
  m.def("max_pool2d_backward", &Capped<&max_pool2d_backward>::call);
}
