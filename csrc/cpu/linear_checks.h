// Shared by the ATen wrappers of the linear family (linear.cpp, int4.cpp): the checks on x and the
// bias, made before any pointer arithmetic.
#pragma once

#include <ATen/ATen.h>

namespace sk_linear {

// x [M, K] float32/bfloat16/float16 on the CPU (with the weight tensor ``w``, named ``wname``, also
// on the CPU and, when ``w_dtype_is_x``, in x's dtype); bias [N] in x's dtype on the CPU, if given.
inline void check_x_and_bias(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                             const at::Tensor& w, const char* wname, bool w_dtype_is_x = true) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K] at the op level, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu(), "x and ", wname, " must be CPU tensors");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x: dtype ", x.scalar_type(), " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK_TYPE(!w_dtype_is_x || w.scalar_type() == x.scalar_type(), wname, ": dtype ", w.scalar_type(),
                   " does not match x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == K, "x: last dim is ", x.size(1), " but the weight has ", K, " input features");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "bias: expected shape (", N, "), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "bias: dtype ", b.scalar_type(), " does not match x's dtype ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(b.device().is_cpu(), "bias: must be a CPU tensor");
  }
}

}  // namespace sk_linear
