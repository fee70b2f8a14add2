// What one file of the extension uses of another's, and what bindings.cpp exports to Python.
// (The kernels themselves are operators, each registered beside its definition with
// TORCH_LIBRARY_FRAGMENT(sparselearn_cpu, ...); kernels/ops.py declares the public ones.)
#pragma once

// the tensor API only: torch/extension.h (pybind11, the C++ frontend) is for bindings.cpp
#include <torch/types.h>

#include <cstdint>
#include <vector>

// linear.cpp: the panel width of a batch
int64_t panel_width(int64_t batch);

// conv.cpp: whether a stride-1 convolution of this batch and kernel runs on batch panels, and the
// shapes of what the forward operators save for the backward
bool uses_panels(int64_t batch, int64_t kh, int64_t kw, bool is_double);
std::vector<int64_t> conv2d_saved_shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                                        int64_t kw, int64_t stride, int64_t ph, int64_t pw,
                                        bool is_double, bool contiguous);
std::vector<int64_t> conv2d_phases_saved_shape(int64_t B, int64_t C, int64_t s, int64_t hq,
                                               int64_t wq, int64_t kh, int64_t kw,
                                               bool is_double);

// layouts.cpp: the first count of the s*s phase planes of x padded by (ph, pw) (conv.cpp builds
// them for a strided convolution off panels)
torch::Tensor phase_planes(torch::Tensor x, int64_t s, int64_t ph, int64_t pw, int64_t hq,
                           int64_t wq, int64_t count);
