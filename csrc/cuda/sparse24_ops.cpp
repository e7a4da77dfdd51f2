// ATen wrappers of the CUDA 2:4 format kernels (csrc/cuda/sparse24.cu):
// sparse_kernels::mask_2to4_cuda, compress_2to4_cuda, decompress_2to4_cuda and
// decompress_2to4_unchecked_cuda (no metadata check, no host sync: see decompress_impl).
// Schemas live in sparse_kernels/ops/sparse24.py; this file only validates, launches and
// turns the kernels' error flag into the reference's ValueError text.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>

#include "cuda/sparse24.h"
#include "sparse24_errors.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name, bool allow_f64 = false) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return sk::kF16;
    case at::kBFloat16:
      return sk::kBF16;
    case at::kFloat:
      return sk::kF32;
    case at::kDouble:
      if (allow_f64) return sk::kF64;
      break;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, name, ": dtype ", t.scalar_type(), " is not supported; expected one of float16, bfloat16, float32",
                   allow_f64 ? ", float64" : "");
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

at::Tensor new_flag(const at::Tensor& like) {
  return at::full({}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor mask_2to4_cuda(const at::Tensor& w, const std::optional<at::Tensor>& scores) {
  check_cuda(w, "w");
  TORCH_CHECK_VALUE(w.dim() >= 1, "w: expected at least 1 dims, got shape ", w.sizes());
  const int wd = dtype_code(w, "w");
  TORCH_CHECK_VALUE(w.size(-1) % 4 == 0, "w: the last dim must be a multiple of 4, got ", w.size(-1),
                    " (groups of 4 run along the last dim)");
  int sd = -1;
  at::Tensor s;
  if (scores.has_value()) {
    s = *scores;
    sd = dtype_code(s, "scores", /*allow_f64=*/true);
    TORCH_CHECK_VALUE(s.sizes() == w.sizes(), "scores: shape ", s.sizes(), " must equal w's shape ", w.sizes());
    TORCH_CHECK_VALUE(s.device() == w.device(), "scores: is on ", s.device(), " but w is on ", w.device(),
                      "; all tensors must share one device");
    s = s.contiguous();
  }
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t groups = w.numel() / 4;
  if (groups == 0) return out;
  at::Tensor flag = new_flag(w);
  check_launch(sk::mask_2to4_launch(wc.data_ptr(), wd, s.defined() ? s.data_ptr() : nullptr, sd,
                                    out.data_ptr<bool>(), groups, flag.data_ptr<int64_t>(),
                                    c10::cuda::getCurrentCUDAStream()),
               "mask_2to4_cuda");
  if (flag.item<int64_t>() != std::numeric_limits<int64_t>::max()) {
    sparse_kernels::raise_mask_nan(s.defined() ? "scores" : "w");
  }
  return out;
}

void check_2d_w(const at::Tensor& w) {
  check_cuda(w, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, "w: expected a 2-D tensor, got ", w.dim(), "-D with shape ", w.sizes());
  TORCH_CHECK_VALUE(w.size(1) % 16 == 0,
                    "w: the number of columns (w.shape[1]) must be a multiple of 16, got ", w.size(1),
                    "; pad the columns with zeros to a multiple of 16 (e.g. torch.nn.functional.pad) first");
}

std::tuple<at::Tensor, at::Tensor> compress_2to4_cuda(const at::Tensor& w, bool prune) {
  check_2d_w(w);
  const int d = dtype_code(w, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = w.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, cols / 16}, w.options().dtype(at::kShort));
  if (rows == 0 || cols == 0) return {values, meta};
  at::Tensor flag = new_flag(w);
  check_launch(sk::compress_2to4_launch(wc.data_ptr(), d, rows, cols, prune, values.data_ptr(),
                                        meta.data_ptr<int16_t>(), flag.data_ptr<int64_t>(),
                                        c10::cuda::getCurrentCUDAStream()),
               "compress_2to4_cuda");
  const int64_t bad = flag.item<int64_t>();
  if (bad != std::numeric_limits<int64_t>::max()) {
    if (prune) sparse_kernels::raise_mask_nan("w");
    const int64_t r = bad / (cols / 4), c = 4 * (bad % (cols / 4));
    const int64_t n = wc.index({r, at::indexing::Slice(c, c + 4)}).ne(0).sum().item<int64_t>();
    sparse_kernels::raise_not_2to4(r, c, n);
  }
  return {values, meta};
}

// check = false: the same kernel, but its error flag is never read back, so the call never
// waits for the GPU (CUDA-graph capturable).  A corrupt nibble then gives wrong numbers, never an
// access outside its group of 4 (each index is 2 bits).  For sparse_linear's "decompress" backend.
at::Tensor decompress_impl(const at::Tensor& values, const at::Tensor& meta, bool check) {
  check_cuda(values, "values");
  const int d = dtype_code(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 2, "values: expected a 2-D tensor, got ", values.dim(), "-D with shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(meta.dim() == 2, "meta: expected a 2-D tensor, got ", meta.dim(), "-D with shape ", meta.sizes());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "meta: dtype ", meta.scalar_type(),
                   " is not supported; expected one of int16");
  TORCH_CHECK_VALUE(meta.device() == values.device(), "meta: is on ", meta.device(), " but values is on ",
                    values.device(), "; all tensors must share one device");
  const int64_t rows = values.size(0), half = values.size(1);
  TORCH_CHECK_VALUE(half % 8 == 0, "values: the number of columns (values.shape[1]) must be a multiple of 8, got ", half,
                    " (it holds cols/2 values for a weight whose cols is a multiple of 16)");
  TORCH_CHECK_VALUE(meta.size(0) == rows && meta.size(1) == half / 8, "meta: shape ", meta.sizes(),
                    " does not match values ", values.sizes(), "; expected (", rows, ", ", half / 8, ") = (rows, cols/16)");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor vc = values.contiguous(), mc = meta.contiguous();
  const int64_t cols = 2 * half;
  at::Tensor out = at::empty({rows, cols}, values.options());
  if (rows == 0 || cols == 0) return out;
  at::Tensor flag = new_flag(values);
  check_launch(sk::decompress_2to4_launch(vc.data_ptr(), mc.data_ptr<int16_t>(), d, rows, cols, out.data_ptr(),
                                          flag.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               "decompress_2to4_cuda");
  if (!check) return out;
  const int64_t bad = flag.item<int64_t>();
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t r = bad / (cols / 4), g = bad % (cols / 4);
    const int64_t word = mc.index({r, g / 4}).item<int64_t>() & 0xFFFF;
    const int64_t nib = (word >> (4 * (g % 4))) & 0xF;
    sparse_kernels::raise_bad_nibble(r, g, nib);
  }
  return out;
}

at::Tensor decompress_2to4_cuda(const at::Tensor& values, const at::Tensor& meta) {
  return decompress_impl(values, meta, true);
}

at::Tensor decompress_2to4_unchecked_cuda(const at::Tensor& values, const at::Tensor& meta) {
  return decompress_impl(values, meta, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CUDA, m) {
  m.impl("mask_2to4_cuda", &mask_2to4_cuda);
  m.impl("compress_2to4_cuda", &compress_2to4_cuda);
  m.impl("decompress_2to4_cuda", &decompress_2to4_cuda);
  m.impl("decompress_2to4_unchecked_cuda", &decompress_2to4_unchecked_cuda);
}
