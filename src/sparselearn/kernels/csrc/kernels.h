// The operations the extension exports (bindings.cpp), each defined in its family's file.
#pragma once

// the tensor API only: torch/extension.h (pybind11, the C++ frontend) is for bindings.cpp
#include <torch/types.h>

#include <cstdint>
#include <vector>

// linear.cpp: a CSR weight times packed activations, the sampled gradient, whole layer steps
// (registered as operators there); the panel width its layouts use
int64_t panel_width(int64_t batch);

// conv.cpp: direct sparse convolution of an NCHW input, on batch panels or per sample
std::vector<torch::Tensor> conv2d_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor val,
                                          torch::Tensor x, int64_t out_channels, int64_t kh,
                                          int64_t kw, int64_t stride, int64_t ph, int64_t pw,
                                          c10::optional<torch::Tensor> bias_opt);
std::vector<c10::optional<torch::Tensor>> conv2d_backward(
    torch::Tensor crow, torch::Tensor col, torch::Tensor crowT, torch::Tensor colT,
    torch::Tensor valT, torch::Tensor g, torch::Tensor saved, int64_t kh, int64_t kw,
    int64_t stride, int64_t ph, int64_t pw, bool want_input, bool want_weight);
std::vector<torch::Tensor> conv2d_forward_phases(torch::Tensor crow, torch::Tensor col,
                                                 torch::Tensor val, torch::Tensor x,
                                                 int64_t out_channels, int64_t kh, int64_t kw,
                                                 int64_t s, int64_t ph, int64_t pw, int64_t hq,
                                                 int64_t wq, c10::optional<torch::Tensor> bias);
bool uses_panels(int64_t batch, int64_t kh, int64_t kw, bool is_double);

// layouts.cpp: phase planes of a strided convolution, patches (im2col), and their adjoints
torch::Tensor phase_planes(torch::Tensor x, int64_t s, int64_t ph, int64_t pw, int64_t hq,
                           int64_t wq, int64_t count);
torch::Tensor phase_planes_grad(torch::Tensor gP, int64_t s, int64_t ph, int64_t pw, int64_t H,
                                int64_t W, int64_t count);
torch::Tensor patches(torch::Tensor x, int64_t kh, int64_t kw, int64_t s, int64_t ph, int64_t pw,
                      int64_t OH, int64_t OW);
torch::Tensor patches_grad(torch::Tensor G, int64_t N, int64_t C, int64_t H, int64_t W,
                           int64_t kh, int64_t kw, int64_t s, int64_t ph, int64_t pw, int64_t OH,
                           int64_t OW);

// norm.cpp: batch normalisation over all but the channels, optionally followed by a ReLU
std::vector<torch::Tensor> batch_norm_forward(torch::Tensor x, c10::optional<torch::Tensor> w,
                                              c10::optional<torch::Tensor> b, double eps,
                                              bool relu);
torch::Tensor batch_norm_apply(torch::Tensor x, torch::Tensor scale, torch::Tensor shift,
                               bool relu);
std::vector<c10::optional<torch::Tensor>> batch_norm_backward(
    torch::Tensor g, torch::Tensor x, torch::Tensor mean, torch::Tensor invstd,
    c10::optional<torch::Tensor> w, c10::optional<torch::Tensor> b, bool relu, bool want_input);

// dropout.cpp: dropout with a mask hashed from (seed, element index)
torch::Tensor dropout(torch::Tensor x, double keep, int64_t seed);

// pool.cpp: max pooling over non-overlapping windows, with PyTorch's choice of maximum
std::vector<torch::Tensor> max_pool2d(torch::Tensor x, int64_t k, bool want_index);
torch::Tensor max_pool2d_backward(torch::Tensor g, torch::Tensor idx, int64_t H, int64_t W,
                                  int64_t k);
