// CPU kernels of the sparse matmul family (sparse_kernels/ops/linear.py defines the schemas).
//
// sparse_linear_cpp(x [M,K], values [N,K/2], meta [N,K/16] int16, bias [N]?, meta_dev?) -> y [M,N]
//   Two paths chosen by batch size and dtype (gemm_min_m, with the measurements): the direct
//   kernel (linear_kernels.h), or for large M a blocked expand (256 rows of W at a time,
//   linear_expand.h) + BLAS GEMM.
//   y[m,n] = bias[n] + sum_g values[n,2g]*x[m,4g+i0] + values[n,2g+1]*x[m,4g+i1], where the nibble
//   i0 | i1<<2 of group g sits at bits 4*(g%4) of meta[n, g/4] (the canonical 2:4 format).
//   The dense weight is never formed: per output row we stream values+meta once and pick x's
//   entries with the nibbles.  x is converted to fp32 once per call; accumulation is fp32.
//   x86-64: bf16 on AVX512-BF16 CPUs with K % 64 == 0: vpermt2w + vdpbf16ps on bf16 x (32 values per
//   step); otherwise AVX-512 (16 values, 8 groups, one permutex2var per step) or AVX2 (8 values,
//   two permutevar8x32 + blend), chosen at run time with __builtin_cpu_supports (the build stays
//   portable: no -march flags); elsewhere a scalar loop.  SPARSE_KERNELS_CPU_ISA=avx512|avx2|scalar
//   forces a lower path (tests use it to cover every path on one machine).
//   Corrupt meta (i0 >= i1) is refused (ValueError naming the group) before the kernel runs.
//
// masked_linear_cpp(x [M,K], weight [N,K], mask bool [N,K] | uint8 [N,ceil(K/8)], bias?) -> [M,N]
// pack_mask_cpp / unpack_mask_cpp: bit c%8 of byte c/8 holds mask[..., c] (little bit order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "blocked_gemm.h"
#include "linear_checks.h"
#include "linear_expand.h"
#include "linear_kernels.h"
#include "simd.h"

namespace sk_linear {

using namespace sk_cpu;

// The GEMM path: blocked_gemm (blocked_gemm.h) with the 2:4 or masked row expansion (linear_expand.h).

// Break-even batch sizes: direct kernel below, blocked GEMM from this M on.  Measured at 4096x4096
// on the 2-core AMD EPYC (Zen 5) dev box, torch 2.13, ms per call (dense F.linear | direct | GEMM
// path), 2 weight copies rotated, load average ~10 (other jobs running, so +-30%):
//   fp32: M=1 10.8|2.0|18.6  M=16 25.2|12.9|32.5  M=64 80|43|88  M=512 407|296|444 -> direct always
//         (the CPU's fp32 GEMM does the dense 2x the FLOPs; the direct kernel does half).
//   bf16: M=4 2.1|1.6|14.8  M=8 6.3|6.4|18.1  M=16 6.7|11.9|18.9  M=64 17.0|30.3|27.0
//         M=512 96.5|257.8|78.7 -> GEMM from M=9 (oneDNN's bf16 dot products outrun our fp32 FMAs).
//   fp16: M=8 34.1|7.1|38.5  M=64 203|35|230 -> direct always (no fast fp16 GEMM on this CPU).
//   bf16 with the vdpbf16ps kernel (AVX512-BF16 CPUs, K % 64 == 0), 4096x4096, load ~9:
//         M=1 2.1|1.6  M=4 1.9|2.2 (noise: 3.6|1.0 on a rerun)  M=8 2.3|1.6..3.3  M=16 6.8|6.4|8.5
//         M=32 7.9|7.8|10.5  M=64 12.9|14.5|15.9  M=128 21.9|25.5|24.6 -> GEMM from M=64.
// masked_linear: the direct kernel streams the weight and the mask once per 4 rows of x, with a
// software prefetch.  Quiet box, OpenMP (2 threads), 4096x4096, ms (dense | direct | GEMM path):
//   fp32: M=1 2.7|2.0|-  M=4 5.6|4.4|7.8  M=8 6.7|6.5|8.9  M=16 9.2|10.4|12.0  M=32 14.1|16.7|17.5
//         M=64 23.5|37.9|26.3 -> GEMM from M=64.
//   bf16: M=4 1.8|2.7|4.6  M=8 2.1|4.8|4.8  M=16 2.5|8.3|5.6  M=64 5.7|33.2|8.9 -> GEMM from M=8.
//   bf16 with vdpbf16ps (AVX512-BF16, K % 32 == 0): M=1 1.8|1.09  M=4 1.7|2.3|5.3  M=8 2.0|3.7|5.5
//         M=16 2.6|5.9|6.0  M=32 3.7|10.5|7.0 -> GEMM from M=16.
//   fp16 stays direct.
// SPARSE_KERNELS_CPU_GEMM_MIN_M overrides (tests use it to cover both paths).
static int64_t measured_gemm_min_m(at::ScalarType t, bool masked, bool bf16_dot) {
  constexpr int64_t kNever = INT64_MAX;
  if (t == at::kHalf) return kNever;
  if (masked) return t == at::kBFloat16 ? (bf16_dot ? 16 : 8) : 64;
  if (t == at::kBFloat16) return bf16_dot ? 64 : 9;
  return kNever;
}
static int64_t gemm_min_m(at::ScalarType t, bool masked, bool bf16_dot = false) {
  return gemm_min_m_or(measured_gemm_min_m(t, masked, bf16_dot));
}

// ------------------------------------------------------------------ ATen wrappers
#define SK_DISPATCH_F32_BF16_F16(TYPE, BODY) dispatch_float(TYPE, [&](auto tag) { using scalar_t = decltype(tag); BODY(); })
static at::Tensor finish(at::Tensor y32, const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  if (bias.has_value()) y32.add_(bias->to(at::kFloat).unsqueeze(0));
  return dtype == at::kFloat ? y32 : y32.to(dtype);
}

at::Tensor sparse_linear_cpp(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& meta_dev) {
  (void)meta_dev;  // device layout for the CUDA backend only
  TORCH_CHECK_VALUE(values.dim() == 2, "values: expected a 2-D tensor [N, K/2], got ", values.dim(), "-D");
  TORCH_CHECK_VALUE(values.size(1) % 8 == 0, "values: the number of columns must be a multiple of 8 (K % 16 == 0), got ",
                    values.size(1));
  const int64_t N = values.size(0), K = sk_linear::packed_cols(values, 2, "values");
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "meta: dtype ", meta.scalar_type(), " is not supported; expected int16");
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == K / 16, "meta: expected shape (", N, ", ",
                    K / 16, "), got ", meta.sizes());
  TORCH_CHECK_VALUE(meta.device().is_cpu(), "meta: must be a CPU tensor");
  check_x_and_bias(x, bias, N, K, values, "values");
  const int64_t M = x.size(0);
  at::Tensor v = values.contiguous(), mt = meta.contiguous();
  sk_linear::check_meta_nibbles(mt);
#if SK_X86_BF16
  const bool bf16_dot = x.scalar_type() == at::kBFloat16 && K % 64 == 0 && has_avx512bf16();
#else
  const bool bf16_dot = false;
#endif
  if (M >= gemm_min_m(x.scalar_type(), false, bf16_dot) && N > 0 && K > 0) {
    const Isa isa = best_isa();
    at::Tensor y;
    SK_DISPATCH_F32_BF16_F16(v.scalar_type(), [&] {
      const scalar_t* vp = v.data_ptr<scalar_t>();
      const int16_t* mp = mt.data_ptr<int16_t>();
      y = blocked_gemm(x.contiguous(), bias, N, K, [&](at::Tensor& t, int64_t a, int64_t b, int64_t off) {
        expand_2to4_rows<scalar_t>(isa, vp, mp, t.data_ptr<scalar_t>() + off * K, K, a, b);
      });
    });
    return y;
  }
  at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
#if SK_X86_BF16
  if (bf16_dot && M > 0 && N > 0) {
    at::Tensor xb = x.contiguous();
    const c10::BFloat16* xp = xb.data_ptr<c10::BFloat16>();
    const c10::BFloat16* vp = v.data_ptr<c10::BFloat16>();
    const int16_t* mp = mt.data_ptr<int16_t>();
    float* yp = y32.data_ptr<float>();
    at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
      sl_rows_bf16(xp, vp, mp, yp, M, K, N, b0 * 64, std::min<int64_t>(N, b1 * 64));
    });
    return finish(y32, bias, x.scalar_type());
  }
#endif
  at::Tensor x32 = x.to(at::kFloat).contiguous();
  if (M > 0 && N > 0 && K > 0) {
    SK_DISPATCH_F32_BF16_F16(v.scalar_type(), [&] {
      sparse_linear_kernel<scalar_t>(x32.data_ptr<float>(), v.data_ptr<scalar_t>(), mt.data_ptr<int16_t>(),
                                     y32.data_ptr<float>(), M, K, N);
    });
  } else {
    y32.zero_();
  }
  return finish(y32, bias, x.scalar_type());
}

at::Tensor masked_linear_cpp(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor [N, K], got ", weight.dim(), "-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  const bool packed = mask.scalar_type() == at::kByte;
  TORCH_CHECK_TYPE(packed || mask.scalar_type() == at::kBool, "mask: dtype ", mask.scalar_type(),
                   " is not supported; expected bool [N, K] or bit-packed uint8 [N, ceil(K/8)]");
  const int64_t mcols = packed ? (K + 7) / 8 : K;
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == N && mask.size(1) == mcols, "mask: expected shape (", N, ", ",
                    mcols, "), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device().is_cpu(), "mask: must be a CPU tensor");
  check_x_and_bias(x, bias, N, K, weight, "weight");
  const int64_t M = x.size(0);
  at::Tensor w = weight.contiguous(), mk = mask.contiguous();
  const uint8_t* mp0 = packed ? mk.data_ptr<uint8_t>() : reinterpret_cast<const uint8_t*>(mk.data_ptr<bool>());
#if SK_X86_BF16
  const bool bf16_dot = x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && K % 32 == 0 &&
                        has_avx512bf16();
#else
  const bool bf16_dot = false;
#endif
  if (M >= gemm_min_m(x.scalar_type(), true, bf16_dot) && N > 0 && K > 0) {
    const Isa isa = best_isa();
    at::Tensor y;
    SK_DISPATCH_F32_BF16_F16(w.scalar_type(), [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      y = blocked_gemm(x.contiguous(), bias, N, K, [&](at::Tensor& t, int64_t a, int64_t b, int64_t off) {
        expand_masked_rows<scalar_t>(isa, wp, mp0, packed, t.data_ptr<scalar_t>() + off * K, K, a, b);
      });
    });
    return y;
  }
  at::Tensor y32 = at::zeros({M, N}, x.options().dtype(at::kFloat));
#if SK_X86_BF16
  if (bf16_dot && M > 0 && N > 0) {
    at::Tensor xb = x.contiguous();
    const c10::BFloat16* xp = xb.data_ptr<c10::BFloat16>();
    const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
    float* yp = y32.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { ml_rows_bf16(xp, wp, mp0, packed, yp, M, K, N, n0, n1); });
    return finish(y32, bias, x.scalar_type());
  }
#endif
  at::Tensor x32 = x.to(at::kFloat).contiguous();
  if (M > 0 && N > 0 && K > 0) {
    const uint8_t* mp = packed ? mk.data_ptr<uint8_t>() : reinterpret_cast<const uint8_t*>(mk.data_ptr<bool>());
    SK_DISPATCH_F32_BF16_F16(w.scalar_type(), [&] {
      masked_linear_kernel<scalar_t>(x32.data_ptr<float>(), w.data_ptr<scalar_t>(), mp, packed, y32.data_ptr<float>(),
                                     M, K, N);
    });
  }
  return finish(y32, bias, x.scalar_type());
}

at::Tensor pack_mask_cpp(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask: dtype ", mask.scalar_type(), " is not supported; expected bool");
  TORCH_CHECK_VALUE(mask.dim() >= 1, "mask: expected at least 1 dim");
  TORCH_CHECK_VALUE(mask.device().is_cpu(), "mask: must be a CPU tensor");
  const int64_t cols = mask.size(-1), nb = (cols + 7) / 8;
  const int64_t rows = cols == 0 ? 0 : mask.numel() / cols;
  at::Tensor m = mask.contiguous();
  std::vector<int64_t> shape(mask.sizes().begin(), mask.sizes().end());
  shape.back() = nb;
  at::Tensor out = at::zeros(shape, mask.options().dtype(at::kByte));
  if (rows == 0 || nb == 0) return out;
  const bool* src = m.data_ptr<bool>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c)
        if (src[r * cols + c]) dst[r * nb + (c >> 3)] |= static_cast<uint8_t>(1u << (c & 7));
  });
  return out;
}

at::Tensor unpack_mask_cpp(const at::Tensor& packed, int64_t cols) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed: dtype ", packed.scalar_type(),
                   " is not supported; expected uint8");
  TORCH_CHECK_VALUE(packed.dim() >= 1, "packed: expected at least 1 dim");
  TORCH_CHECK_VALUE(cols >= 0 && packed.size(-1) == (cols + 7) / 8, "packed: last dim ", packed.size(-1),
                    " does not hold ", cols, " bits; expected ", (cols + 7) / 8);
  TORCH_CHECK_VALUE(packed.device().is_cpu(), "packed: must be a CPU tensor");
  const int64_t nb = packed.size(-1);
  const int64_t rows = nb == 0 ? 0 : packed.numel() / nb;
  at::Tensor p = packed.contiguous();
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
  shape.back() = cols;
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kBool));
  if (rows == 0 || cols == 0) return out;
  const uint8_t* src = p.data_ptr<uint8_t>();
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = ((src[r * nb + (c >> 3)] >> (c & 7)) & 1) != 0;
  });
  return out;
}

}  // namespace sk_linear

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("sparse_linear_cpp", &sk_linear::sparse_linear_cpp);
  m.impl("masked_linear_cpp", &sk_linear::masked_linear_cpp);
  m.impl("pack_mask_cpp", &sk_linear::pack_mask_cpp);
  m.impl("unpack_mask_cpp", &sk_linear::unpack_mask_cpp);
}
