// The extension module: the operations of kernels.h, and the thread cap. (The Linear kernels are
// operators, registered beside them: kernels/ops.py.)

#include <torch/extension.h>

#include "common.h"
#include "kernels.h"

using namespace slk;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("panel_width", &panel_width, "the panel width W used for a batch size");
  m.def("conv2d_forward", &conv2d_forward,
        "(direct sparse convolution of the padded input (+ bias), what the backward reads)",
        py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("x"), py::arg("out_channels"),
        py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("ph"), py::arg("pw"),
        py::arg("bias") = py::none());
  m.def("conv2d_forward_phases", &conv2d_forward_phases,
        "(the stride-1 convolution of the phase planes of the padded input (+ bias), what the "
        "backward reads)",
        py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("x"), py::arg("out_channels"),
        py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("ph"), py::arg("pw"),
        py::arg("hq"), py::arg("wq"), py::arg("bias") = py::none());
  m.def("conv2d_backward", &conv2d_backward,
        "(gradient of the input inside the padding or None, gradient at the non-zeros or None), "
        "from what the forward saved");
  m.def("uses_panels", &uses_panels,
        "whether a stride-1 convolution of this batch and kernel runs on batch panels");
  m.def("phase_planes", &phase_planes,
        "the first count of the s*s phase planes of the padded input (stride s)");
  m.def("phase_planes_grad", &phase_planes_grad,
        "the input gradient from the gradient of the first count phase planes");
  m.def("patches", &patches, "each output position's input patch as a row (im2col)");
  m.def("patches_grad", &patches_grad, "the input gradient from the patch rows' gradient");
  m.def("batch_norm_forward", &batch_norm_forward,
        "(y, mean, biased variance, inverse deviation): batch normalisation over all but the "
        "channels with the batch's statistics, then an optional ReLU");
  m.def("batch_norm_apply", &batch_norm_apply, "x * scale + shift per channel, then an optional ReLU");
  m.def("batch_norm_backward", &batch_norm_backward,
        "(grad_x or None, grad_weight, grad_bias) of batch_norm_forward");
  m.def("dropout", &dropout,
        "x * scale where hash(seed, index) < keep * 2^32, else 0 (scale = 1 / keep)");
  m.def("max_pool2d", &max_pool2d,
        "(max over non-overlapping k x k windows, each maximum's place in its window or empty)");
  m.def("max_pool2d_backward", &max_pool2d_backward,
        "the input gradient: each window's output gradient at its maximum's place");
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
