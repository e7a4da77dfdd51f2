// Shared by the ATen wrappers of the linear family (linear.cpp, int4.cpp, linear_grad.cpp): the
// checks on x and the bias, made before any pointer arithmetic, and on the contents of 2:4 meta.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "simd.h"
#include "sparse24_errors.h"

namespace sk_linear {

// x [M, K] float32/bfloat16/float16 on the CPU (with the weight tensor ``w``, named ``wname``, also
// on the CPU and, when ``w_dtype_is_x``, in x's dtype); bias [N] in x's dtype on the CPU, if given.
inline void check_x_and_bias(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                             const at::Tensor& w, const char* wname, bool w_dtype_is_x = true) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K] at the op level, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu(), "x and ", wname, " must be CPU tensors, got ",
                    x.device(), " and ", w.device());
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

// The input features K = per * t.size(1) of a packed weight operand, refused before the product could
// overflow (a 0-stride tensor can claim any width).
inline int64_t packed_cols(const at::Tensor& t, int64_t per, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) <= (int64_t{1} << 48), name, ": ", t.size(1), " columns; no weight has that many");
  return per * t.size(1);
}

// Bit 4k of the result is set where nibble k of x (16 nibbles i0 | i1 << 2) has i0 >= i1: per
// nibble, (i1 | 4) - i0 lies in 1..7 (no borrow between nibbles) and in 5..7 exactly when i0 < i1.
inline uint64_t bad_nibbles(uint64_t x) {
  const uint64_t lo = x & 0x3333333333333333ULL, hi = (x >> 2) & 0x3333333333333333ULL;
  const uint64_t d = (hi | 0x4444444444444444ULL) - lo;
  return ~((d >> 2) & (d | (d >> 1))) & 0x1111111111111111ULL;
}

// meta [N, K/16] int16, contiguous: ValueError naming the first group whose nibble is not one of the
// six valid ones.  The 2:4 kernels pick x's entries by the nibbles; a corrupt one cannot read out of
// bounds (each index is 2 bits) but gives a wrong answer, so they check first: one branch-free pass
// over meta, 1/16 of the bytes of a 16-bit weight's values + meta.
#if SK_X86
// bad_nibbles over the first multiple of 32 of ``n`` words, 8 x 64 bits at a time; ``done``: how many.
SK_AVX512 inline uint64_t bad_nibbles_avx512(const uint16_t* w, int64_t n, int64_t& done) {
  const __m512i m1 = _mm512_set1_epi64(0x1111111111111111LL), m3 = _mm512_set1_epi64(0x3333333333333333LL),
                m4 = _mm512_set1_epi64(0x4444444444444444LL);
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i x = _mm512_loadu_si512(w + i);
    const __m512i lo = _mm512_and_si512(x, m3), hi = _mm512_and_si512(_mm512_srli_epi64(x, 2), m3);
    const __m512i d = _mm512_sub_epi64(_mm512_or_si512(hi, m4), lo);
    const __m512i ok = _mm512_and_si512(_mm512_srli_epi64(d, 2), _mm512_or_si512(d, _mm512_srli_epi64(d, 1)));
    acc = _mm512_or_si512(acc, _mm512_andnot_si512(ok, m1));
  }
  done = i;
  return _mm512_reduce_or_epi64(acc);
}
#endif

inline void check_meta_nibbles(const at::Tensor& meta) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(meta.const_data_ptr<int16_t>());
  const int64_t n = meta.numel(), words = meta.size(1);
  const bool avx512 = sk_cpu::best_isa() == sk_cpu::Isa::Avx512;
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, (n + 3) / 4, 16384, [&](int64_t c0, int64_t c1) {
    uint64_t acc = 0;
    int64_t i = 4 * c0;
    const int64_t end = std::min(n, 4 * c1);
#if SK_X86
    if (avx512) {
      int64_t done;
      acc = bad_nibbles_avx512(w + i, end - i, done);
      i += done;
    }
#else
    (void)avx512;
#endif
    for (; i + 4 <= end; i += 4) {
      uint64_t x;
      std::memcpy(&x, w + i, 8);
      acc |= bad_nibbles(x);
    }
    for (; i < end; ++i) acc |= bad_nibbles(w[i]) & 0x1111;
    if (acc) any_bad.store(true, std::memory_order_relaxed);
  });
  if (!any_bad.load()) return;
  for (int64_t i = 0; i < n; ++i) {  // (only on error) the first bad group
    const uint64_t b = bad_nibbles(w[i]) & 0x1111;
    if (b) {
      const int j = __builtin_ctzll(b) / 4;
      sparse_kernels::raise_bad_nibble(i / words, (i % words) * 4 + j, (w[i] >> (4 * j)) & 0xF);
    }
  }
}

}  // namespace sk_linear
