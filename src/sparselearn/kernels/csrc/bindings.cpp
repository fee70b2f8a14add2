// The extension module: what the Python side asks of the kernels besides computing (panel
// widths, layouts' shapes, threads, kept memory). The kernels are operators, registered beside
// their definitions (kernels/ops.py declares them).

#include <torch/extension.h>

#include "common.h"
#include "kernels.h"

using namespace slk;

namespace {

int64_t team_size(int64_t work) { return team(work); }

}  // namespace

// The threads a parallel region of this much work gets under a thread cap (Capped, as every
// kernel operator takes it; for tests).
TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, m) { m.def("team_size", &Capped<&team_size>::call); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("panel_width", &panel_width, "the panel width W used for a batch size");
  m.def("uses_panels", &uses_panels,
        "whether a stride-1 convolution of this batch and kernel runs on batch panels");
  m.def("conv2d_saved_shape", &conv2d_saved_shape,
        "the shape of what the conv2d_forward operator saves for the backward");
  m.def("conv2d_phases_saved_shape", &conv2d_phases_saved_shape,
        "the shape of what the conv2d_forward_phases operator saves for the backward");
  m.def("num_threads", []() { return omp_get_max_threads(); });
  m.def("release_cached_blocks", []() { return BlockCache::get().release(); },
        "frees the kept memory of freed large outputs; returns its size in bytes");
  m.def("cached_bytes", []() { return BlockCache::get().held(); },
        "bytes of freed large outputs kept for reuse");
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
