// What bounds a sparse Linear at batch 1 on a CPU (docs/performance.md, "Structured sparsity"):
// y = W x for a 90%-sparse constant fan-in W, three ways, outside PyTorch and sparselearn:
// a scalar loop, 16-lane AVX-512 gathers along each row (what the row products of
// kernels/csrc/linear.cpp do), and SRigL's layout (the values transposed, vectorised over
// output units). Each time is the best of 300 runs, on 1 and 2 threads.
//
//   g++ -O3 -march=native -fopenmp benchmarks/gather_bound.cpp -o /tmp/gather_bound
//   OMP_WAIT_POLICY=PASSIVE /tmp/gather_bound
//
// Needs AVX-512 (the gathers are written with its intrinsics).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

namespace {

// one row: 16-lane gathers of x, the tail under a mask
float row_gathered(const float* x, const int32_t* col, const float* val, int64_t n) {
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

// one row: scalar loads, eight accumulators
float row_scalar(const float* x, const int32_t* col, const float* val, int64_t n) {
  float a[8] = {0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) a[j] += val[k + j] * x[col[k + j]];
  for (; k < n; ++k) a[0] += val[k] * x[col[k]];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// SRigL's layout: k values per row, stored (k, rows); 16 output units per vector
void rows_transposed(const float* x, const int32_t* colT, const float* valT, float* y,
                     int64_t rows, int64_t k, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m512i i = _mm512_loadu_si512(colT + j * rows + r);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(valT + j * rows + r), _mm512_i32gather_ps(i, x, 4),
                            acc);
    }
    _mm512_storeu_ps(y + r, acc);
  }
}

}  // namespace

int main() {
  const char* names[] = {"scalar", "gathers along rows", "SRigL's transposed layout"};
  for (auto [F, R] : std::vector<std::pair<int64_t, int64_t>>{{768, 3072}, {3072, 768}}) {
    const int64_t K = F / 10;  // 90% sparsity, constant fan-in
    std::vector<int32_t> col(R * K), colT(R * K);
    std::vector<float> val(R * K, 0.5f), valT(R * K, 0.5f), x(F, 1.0f), y(R);
    std::mt19937 g(0);
    std::vector<int32_t> order(F);
    for (int64_t i = 0; i < F; ++i) order[i] = int32_t(i);
    for (int64_t r = 0; r < R; ++r) {
      std::shuffle(order.begin(), order.end(), g);
      std::sort(order.begin(), order.begin() + K);
      for (int64_t j = 0; j < K; ++j) col[r * K + j] = colT[j * R + r] = order[j];
    }
    for (int threads : {1, 2}) {
      for (int way = 0; way < 3; ++way) {
        double best = 1e30;
        for (int rep = 0; rep < 300; ++rep) {
          const auto t0 = std::chrono::steady_clock::now();
          if (way == 2) {
#pragma omp parallel num_threads(threads)
            {
              const int64_t per = R / omp_get_num_threads(), t = omp_get_thread_num();
              rows_transposed(x.data(), colT.data(), valT.data(), y.data(), R, K, t * per,
                              (t + 1) * per);
            }
          } else {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t r = 0; r < R; ++r) {
              const float* v = val.data() + r * K;
              const int32_t* c = col.data() + r * K;
              y[r] = way ? row_gathered(x.data(), c, v, K) : row_scalar(x.data(), c, v, K);
            }
          }
          const auto t1 = std::chrono::steady_clock::now();
          best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
        std::printf("%lld -> %lld at 10%% (%lld non-zeros), %d thread(s), %s: %.1f us\n",
                    (long long)F, (long long)R, (long long)(R * K), threads, names[way], best);
      }
    }
  }
  return 0;
}
