// ATen wrapper of csrc/cuda/sparsegpt.cu:
//   sparse_kernels::sparsegpt_block_update_cuda(Tensor W1, Tensor Hinv1, Tensor? mask1, int n, int m)
//       -> (Tensor Q1, Tensor Err1, Tensor losses)
//   sparse_kernels::sparsegpt_block_update_int4_cuda(..., int group_size, ScalarType scale_dtype)
//       -> (Q1, Err1, losses, keep, codes, scales)
// The schema lives in Python (the SparseGPT family's module).  W1 is not mutated.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/sparsegpt.h"

namespace {

// The checks both block ops share; returns mask1 made contiguous (undefined when m > 0).
at::Tensor check_block(const at::Tensor& W1, const at::Tensor& Hinv1, const std::optional<at::Tensor>& mask1,
                       int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(W1.is_cuda(), "W1: expected a CUDA tensor, got one on ", W1.device());
  TORCH_CHECK_VALUE(W1.dim() == 2, "W1: expected a 2-D tensor [rows, B], got ", W1.dim(), "-D with shape ", W1.sizes());
  TORCH_CHECK_TYPE(W1.scalar_type() == at::kFloat, "W1: dtype ", W1.scalar_type(),
                   " is not supported; expected float32");
  const int64_t B = W1.size(1);
  TORCH_CHECK_VALUE(B <= 256, "W1: the block has ", B,
                    " columns; the cuda backend supports at most 256 (use blocksize <= 256)");
  TORCH_CHECK_VALUE(Hinv1.dim() == 2 && Hinv1.size(0) == B && Hinv1.size(1) == B, "Hinv1: expected shape (", B, ", ",
                    B, "), got ", Hinv1.sizes());
  TORCH_CHECK_TYPE(Hinv1.scalar_type() == at::kFloat, "Hinv1: dtype ", Hinv1.scalar_type(),
                   " is not supported; expected float32");
  TORCH_CHECK_VALUE(Hinv1.device() == W1.device(), "Hinv1: is on ", Hinv1.device(), " but W1 is on ", W1.device(),
                    "; all tensors must share one device");
  TORCH_CHECK_VALUE(m >= 0 && m <= 32, "m: expected 0 (use mask1) or 1..32 (N:M), got ", m);
  TORCH_CHECK_VALUE(m == 0 || (n >= 0 && n <= m), "n: expected 0 <= n <= m = ", m, ", got ", n);
  at::Tensor mk;
  if (m == 0) {
    TORCH_CHECK_VALUE(mask1.has_value(), "mask1: required when m == 0 (unstructured pruning)");
    mk = *mask1;
    TORCH_CHECK_TYPE(mk.scalar_type() == at::kBool, "mask1: dtype ", mk.scalar_type(),
                     " is not supported; expected bool (True = keep)");
    TORCH_CHECK_VALUE(mk.sizes() == W1.sizes(), "mask1: shape ", mk.sizes(), " must equal W1's shape ", W1.sizes());
    TORCH_CHECK_VALUE(mk.device() == W1.device(), "mask1: is on ", mk.device(), " but W1 is on ", W1.device(),
                      "; all tensors must share one device");
    mk = mk.contiguous();
  }
  return mk;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_block_update_cuda(const at::Tensor& W1,
                                                                           const at::Tensor& Hinv1,
                                                                           const std::optional<at::Tensor>& mask1,
                                                                           int64_t n, int64_t m) {
  const at::Tensor mk = check_block(W1, Hinv1, mask1, n, m);
  const int64_t rows = W1.size(0), B = W1.size(1);
  const c10::cuda::CUDAGuard guard(W1.device());
  const at::Tensor wc = W1.contiguous(), hc = Hinv1.contiguous();
  at::Tensor Q1 = at::empty_like(wc), Err1 = at::empty_like(wc);
  at::Tensor losses = at::zeros({rows}, wc.options());
  const cudaError_t err = sk::sparsegpt_block_update_launch(
      wc.data_ptr<float>(), hc.data_ptr<float>(), mk.defined() ? mk.data_ptr<bool>() : nullptr, rows,
      static_cast<int>(B), static_cast<int>(n), static_cast<int>(m), Q1.data_ptr<float>(), Err1.data_ptr<float>(),
      losses.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sparsegpt_block_update_cuda: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {Q1, Err1, losses};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparsegpt_block_update_int4_cuda(
    const at::Tensor& W1, const at::Tensor& Hinv1, const std::optional<at::Tensor>& mask1, int64_t n, int64_t m,
    int64_t group_size, at::ScalarType scale_dtype) {
  const at::Tensor mk = check_block(W1, Hinv1, mask1, n, m);
  const int64_t rows = W1.size(0), B = W1.size(1);
  TORCH_CHECK_VALUE(group_size > 0 && B % group_size == 0, "group_size: got ", group_size,
                    "; it must be a positive int dividing the block width (W1.shape[1]) ", B);
  TORCH_CHECK_TYPE(scale_dtype == at::kFloat || scale_dtype == at::kHalf || scale_dtype == at::kBFloat16,
                   "scale_dtype: got ", scale_dtype, ", expected float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(W1.device());
  const at::Tensor wc = W1.contiguous(), hc = Hinv1.contiguous();
  at::Tensor Q1 = at::empty_like(wc), Err1 = at::empty_like(wc);
  at::Tensor losses = at::zeros({rows}, wc.options());
  at::Tensor keep = at::empty({rows, B}, wc.options().dtype(at::kBool));
  at::Tensor codes = at::empty({rows, B}, wc.options().dtype(at::kChar));
  at::Tensor scales = at::empty({rows, B / group_size}, wc.options());
  sk::Int4Out q4;
  q4.G = static_cast<int>(group_size);
  q4.scale_kind = scale_dtype == at::kHalf ? 1 : (scale_dtype == at::kBFloat16 ? 2 : 0);
  q4.keep = keep.data_ptr<bool>();
  q4.codes = codes.data_ptr<int8_t>();
  q4.scales = scales.data_ptr<float>();
  const cudaError_t err = sk::sparsegpt_block_update_int4_launch(
      wc.data_ptr<float>(), hc.data_ptr<float>(), mk.defined() ? mk.data_ptr<bool>() : nullptr, rows,
      static_cast<int>(B), static_cast<int>(n), static_cast<int>(m), Q1.data_ptr<float>(), Err1.data_ptr<float>(),
      losses.data_ptr<float>(), q4, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sparsegpt_block_update_int4_cuda: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {Q1, Err1, losses, keep, codes, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CUDA, m) {
  m.impl("sparsegpt_block_update_cuda", &sparsegpt_block_update_cuda);
  m.impl("sparsegpt_block_update_int4_cuda", &sparsegpt_block_update_int4_cuda);
}
