// ATen wrappers of csrc/cuda/linear.cu:
//   sparse_kernels::reorder_meta_mma_cuda(Tensor meta) -> Tensor meta_dev
//   sparse_kernels::unreorder_meta_mma_cuda(Tensor meta_dev, int rows, int cols) -> Tensor meta
//   sparse_kernels::sparse_linear_cuda(Tensor x, Tensor values, Tensor meta, Tensor? bias,
//                                      Tensor? meta_dev) -> Tensor
//   sparse_kernels::sparse_linear_cuda_kernel(..., str kernel) -> Tensor: the same with the kernel
//     named (auto | gemv | gemm | splitk | wgmma; csrc/cuda/linear.h), for benchmarks and tests.
// Schemas live in Python (sparse_kernels/ops/mma_layout.py; the linear family's module).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cuda/linear.h"

namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; all tensors must share one device");
}

std::vector<int64_t> meta_dev_shape(int64_t rows, int64_t cols16) {
  return {(rows + 15) / 16, (cols16 + 3) / 4, 32};
}

void check_meta(const at::Tensor& meta) {
  TORCH_CHECK_VALUE(meta.is_cuda(), "meta: expected a CUDA tensor, got one on ", meta.device());
  TORCH_CHECK_VALUE(meta.dim() == 2, "meta: expected a 2-D tensor, got ", meta.dim(), "-D with shape ", meta.sizes());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "meta: dtype ", meta.scalar_type(),
                   " is not supported; expected one of int16");
}

at::Tensor reorder_meta_mma_cuda(const at::Tensor& meta) {
  check_meta(meta);
  const c10::cuda::CUDAGuard guard(meta.device());
  const at::Tensor mc = meta.contiguous();
  const int64_t rows = meta.size(0), cols16 = meta.size(1);
  at::Tensor out = at::empty(meta_dev_shape(rows, cols16), meta.options().dtype(at::kInt));
  check_launch(sk::reorder_meta_mma_launch(mc.data_ptr<int16_t>(), rows, cols16, out.data_ptr<int32_t>(),
                                           c10::cuda::getCurrentCUDAStream()),
               "reorder_meta_mma_cuda");
  return out;
}

void check_meta_dev(const at::Tensor& md, int64_t rows, int64_t cols16) {
  TORCH_CHECK_VALUE(md.is_cuda(), "meta_dev: expected a CUDA tensor, got one on ", md.device());
  TORCH_CHECK_TYPE(md.scalar_type() == at::kInt, "meta_dev: dtype ", md.scalar_type(),
                   " is not supported; expected int32 (made by reorder_meta_mma)");
  const auto want = meta_dev_shape(rows, cols16);
  TORCH_CHECK_VALUE(md.sizes() == at::IntArrayRef(want), "meta_dev: shape ", md.sizes(), " does not match a ", rows,
                    " x ", 16 * cols16, " weight; expected ", at::IntArrayRef(want),
                    " = (ceil(rows/16), ceil(cols/64), 32), as made by reorder_meta_mma");
}

at::Tensor unreorder_meta_mma_cuda(const at::Tensor& meta_dev, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(rows >= 0, "rows: must be >= 0, got ", rows);
  TORCH_CHECK_VALUE(cols >= 0 && cols % 16 == 0, "cols: must be a non-negative multiple of 16, got ", cols);
  check_meta_dev(meta_dev, rows, cols / 16);
  const c10::cuda::CUDAGuard guard(meta_dev.device());
  const at::Tensor mc = meta_dev.contiguous();
  at::Tensor out = at::empty({rows, cols / 16}, meta_dev.options().dtype(at::kShort));
  check_launch(sk::unreorder_meta_mma_launch(mc.data_ptr<int32_t>(), rows, cols / 16, out.data_ptr<int16_t>(),
                                             c10::cuda::getCurrentCUDAStream()),
               "unreorder_meta_mma_cuda");
  return out;
}

// Contiguous and 16-byte aligned (the kernels use 16-byte vector loads and cp.async).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if ((reinterpret_cast<uintptr_t>(c.data_ptr()) & 15u) != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

at::Tensor run_sparse_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& meta_dev,
                             int kernel, const std::string& kernel_name) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K], got ", x.dim(), "-D with shape ", x.sizes());
  int dtype = -1;
  if (x.scalar_type() == at::kHalf) dtype = sk::kF16;
  if (x.scalar_type() == at::kBFloat16) dtype = sk::kBF16;
  TORCH_CHECK_TYPE(dtype >= 0, "x: dtype ", x.scalar_type(),
                   " is not supported by the cuda backend of sparse_linear (sparse tensor cores); expected one of "
                   "float16, bfloat16 (use the triton or reference backend for float32)");
  TORCH_CHECK_VALUE(values.dim() == 2, "values: expected a 2-D tensor, got ", values.dim(), "-D with shape ",
                    values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "values: dtype ", values.scalar_type(),
                   " does not match x's dtype ", x.scalar_type());
  check_same_device(values, "values", x, "x");
  check_meta(meta);
  check_same_device(meta, "meta", x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK_VALUE(values.size(1) * 2 == K, "values: shape ", values.sizes(), " does not match x's last dim ", K,
                    "; expected (out_features, ", K / 2, ")");
  TORCH_CHECK_VALUE(K % 16 == 0, "x: the last dim (in_features) must be a multiple of 16, got ", K,
                    "; pad the weight and x with zeros to a multiple of 16");
  TORCH_CHECK_VALUE(meta.size(0) == N && meta.size(1) == K / 16, "meta: shape ", meta.sizes(),
                    " does not match values ", values.sizes(), "; expected (", N, ", ", K / 16, ") = (rows, cols/16)");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (", N, "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias: dtype ", bias->scalar_type(),
                     " does not match x's dtype ", x.scalar_type());
    check_same_device(*bias, "bias", x, "x");
  }
  const c10::cuda::CUDAGuard guard(x.device());  // before the plan: it reads this device's SM count
  if (kernel == sk::kLinWgmma) {
    TORCH_CHECK_VALUE(sk::sparse_linear_wgmma_supported(), "kernel: 'wgmma' needs an sm_90 GPU (H100/H200) and a build ",
                      "with sm_90a code (TORCH_CUDA_ARCH_LIST containing 9.0a); ", x.device(), " cannot run it here");
  }
  sk::LinearPlan plan;
  TORCH_CHECK_VALUE(sk::sparse_linear_plan(M, N, K, kernel, &plan) == cudaSuccess, "kernel: '", kernel_name,
                    "' cannot run x of shape ", x.sizes(), kernel == sk::kLinGemv ? " (gemv takes at most 16 rows)" : "",
                    "; use kernel='auto', 'gemm', 'splitk' or 'wgmma'");
  at::Tensor md;
  if (meta_dev.has_value()) {
    check_same_device(*meta_dev, "meta_dev", x, "x");
    check_meta_dev(*meta_dev, N, K / 16);
    md = aligned(*meta_dev);  // the GEMM kernel cp.async's 16-byte chunks of it
  } else {
    md = reorder_meta_mma_cuda(meta);
  }
  const at::Tensor xc = aligned(x), vc = aligned(values);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // Split-K partials (fp32, from the caching allocator: no sync, capturable in a CUDA graph).
  const at::Tensor ws = plan.ws_elems > 0 ? at::empty({plan.ws_elems}, x.options().dtype(at::kFloat)) : at::Tensor();
  check_launch(sk::sparse_linear_launch(xc.data_ptr(), vc.data_ptr(), md.data_ptr<int32_t>(),
                                        bc.defined() ? bc.data_ptr() : nullptr, y.data_ptr(), M, N, K, dtype, plan,
                                        ws.defined() ? ws.data_ptr<float>() : nullptr, plan.ws_elems,
                                        c10::cuda::getCurrentCUDAStream()),
               "sparse_linear_cuda");
  return y;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& meta_dev) {
  return run_sparse_linear(x, values, meta, bias, meta_dev, sk::kLinAuto, "auto");
}

at::Tensor sparse_linear_cuda_kernel(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& meta_dev, c10::string_view kernel) {
  const std::string name(kernel.data(), kernel.size());
  int code = -1;
  if (name == "auto") code = sk::kLinAuto;
  if (name == "gemv") code = sk::kLinGemv;
  if (name == "gemm") code = sk::kLinGemm;
  if (name == "splitk") code = sk::kLinSplitK;
  if (name == "wgmma") code = sk::kLinWgmma;
  TORCH_CHECK_VALUE(code >= 0, "kernel: got '", name, "', expected one of auto, gemv, gemm, splitk, wgmma");
  return run_sparse_linear(x, values, meta, bias, meta_dev, code, name);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CUDA, m) {
  m.impl("reorder_meta_mma_cuda", &reorder_meta_mma_cuda);
  m.impl("unreorder_meta_mma_cuda", &unreorder_meta_mma_cuda);
  m.impl("sparse_linear_cuda", &sparse_linear_cuda);
  m.impl("sparse_linear_cuda_kernel", &sparse_linear_cuda_kernel);
}
