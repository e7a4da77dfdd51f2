// CPU kernel of sparse_linear_int4 (sparse_kernels/ops/int4.py defines the schema; the format is in
// sparse_kernels/reference/int4.py).
//
// sparse_linear_int4_cpp(x [M,K], qvalues [N,K/4] uint8, meta [N,K/16] int16, scales [N,K/G], bias [N]?)
//   -> y [M,N] in x's dtype.  Per block of 16 output rows (parallel over blocks of 64) the codes are
//   dequantized into a float32 values buffer [16, K/2] that stays in L1/L2 (32 KB at K=1024, 128 KB
//   at K=4096), w = (code - 8) * scale (exact in float32), and the 2:4 row kernels of
//   linear_kernels.h (AVX-512 / AVX2 / scalar, chosen at run time) multiply it with fp32 x.  So the
//   weight streamed from memory is the 4-bit codes, the meta and the scales: 1/3 of a 16-bit 2:4
//   weight's bytes (plus the scales).  x is converted to fp32 once per call; accumulation is fp32.
//   Every shape and dtype is validated before any pointer arithmetic (the Python wrapper checks the
//   same things first, with friendlier messages).  Corrupt meta (i0 >= i1) cannot read out of
//   bounds: a nibble always indexes inside its group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "linear_kernels.h"
#include "simd.h"

namespace sk_int4 {

using namespace sk_cpu;

constexpr int64_t kRows = 16;  // rows dequantized at a time (the buffer: kRows * K/2 floats)

template <typename S>
static void dequantize_rows(const uint8_t* q, const S* scales, float* out, int64_t rows, int64_t K, int64_t G) {
  const int64_t qcols = K / 4, half = K / 2, ngroups = K / G, per_group = G / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qr = q + r * qcols;
    const S* sr = scales + r * ngroups;
    float* o = out + r * half;
    for (int64_t g = 0; g < ngroups; ++g) {
      const float s = to_f32(sr[g]);
      const uint8_t* qg = qr + g * (per_group / 2);
      float* og = o + g * per_group;
      for (int64_t b = 0; b < per_group / 2; ++b) {  // two codes per byte, low nibble first
        og[2 * b] = static_cast<float>(static_cast<int>(qg[b] & 0xF) - 8) * s;
        og[2 * b + 1] = static_cast<float>(static_cast<int>(qg[b] >> 4) - 8) * s;
      }
    }
  }
}

at::Tensor sparse_linear_int4_cpp(const at::Tensor& x, const at::Tensor& qvalues, const at::Tensor& meta,
                                  const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(qvalues.dim() == 2, "qvalues: expected a 2-D tensor [N, K/4], got ", qvalues.dim(), "-D");
  TORCH_CHECK_TYPE(qvalues.scalar_type() == at::kByte, "qvalues: dtype ", qvalues.scalar_type(),
                   " is not supported; expected uint8");
  const int64_t N = qvalues.size(0), K = 4 * qvalues.size(1);
  TORCH_CHECK_VALUE(K % 16 == 0, "qvalues: ", K, " columns; the 2:4 int4 format needs a multiple of 16");
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "meta: dtype ", meta.scalar_type(), " is not supported; expected int16");
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == K / 16, "meta: expected shape (", N, ", ",
                    K / 16, "), got ", meta.sizes());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16 ||
                       scales.scalar_type() == at::kHalf,
                   "scales: dtype ", scales.scalar_type(), " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0 &&
                        (K / scales.size(1)) % 16 == 0,
                    "scales: shape ", scales.sizes(), " does not fit a [", N, ", ", K,
                    "] weight; expected (N, K/G) with G a multiple of 16 dividing K");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K] at the op level, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x: dtype ", x.scalar_type(), " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK_VALUE(x.size(1) == K, "x: last dim is ", x.size(1), " but the weight has ", K, " input features");
  TORCH_CHECK_VALUE(x.device().is_cpu() && qvalues.device().is_cpu() && meta.device().is_cpu() &&
                        scales.device().is_cpu(),
                    "x, qvalues, meta and scales must be CPU tensors");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "bias: expected shape (", N, "), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "bias: dtype ", b.scalar_type(), " does not match x's dtype ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(b.device().is_cpu(), "bias: must be a CPU tensor");
  }
  const int64_t M = x.size(0), G = N > 0 ? K / scales.size(1) : K;
  at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));  // every element written below
  if (M > 0 && N > 0 && K > 0) {
    at::Tensor x32 = x.to(at::kFloat).contiguous(), q = qvalues.contiguous(), mt = meta.contiguous(),
               sc = scales.contiguous();
    const float* xp = x32.data_ptr<float>();
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const int16_t* mp = mt.data_ptr<int16_t>();
    float* yp = y32.data_ptr<float>();
    const Isa isa = best_isa();
    const int64_t half = K / 2, mcols = K / 16;
    dispatch_float(sc.scalar_type(), [&](auto tag) {
      using S = decltype(tag);
      const S* sp = sc.data_ptr<S>();
      const int64_t ng = K / G;
      at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> buf(static_cast<size_t>(kRows * half));
        for (int64_t n = b0 * 64; n < std::min<int64_t>(N, b1 * 64); n += kRows) {
          const int64_t rows = std::min<int64_t>(kRows, N - n);
          dequantize_rows<S>(qp + n * (K / 4), sp + n * ng, buf.data(), rows, K, G);
          // the row kernels index values/meta/out by row inside the block: pass the block's base
          sk_linear::sl_rows<float>(isa, xp, buf.data(), mp + n * mcols, yp + n, M, K, N, 0, rows);
        }
      });
    });
  } else {
    y32.zero_();
  }
  if (bias.has_value()) y32.add_(bias->to(at::kFloat).unsqueeze(0));
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

}  // namespace sk_int4

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("sparse_linear_int4_cpp", &sk_int4::sparse_linear_int4_cpp);
}
