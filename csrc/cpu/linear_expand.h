// GEMM-path tile expansion of the linear family (included by csrc/cpu/linear.cpp only): rows of the
// dense weight, formed a tile at a time for blocked_gemm (blocked_gemm.h).
//
// expand_2to4_rows: W from values [N, K/2] + meta [N, K/16] int16 (the canonical 2:4 format).
// expand_masked_rows: W*M from weight [N, K] + mask bool [N, K] | uint8 [N, ceil(K/8)].
// Scalar everywhere, AVX-512 when best_isa() says so.
#pragma once

#include <cstdint>
#include <cstring>

#include "linear_kernels.h"  // mask_bit
#include "simd.h"

namespace sk_linear {

// ------------------------------------------------------------------ large-M path (blocked expand + GEMM)
// Rows [n0, n1) of the dense W (2:4) or W*M (masked) into dst [n1-n0, K], bits copied as stored.
// AVX-512: one int16 of meta -> a 16-bit lane mask (bit 4j+i set for kept position i of group j),
// then vpexpandd places the 8 values in their lanes and zeroes the rest.
static const uint8_t kNibbleLanes[16] = {0, 0, 0, 0, 0x3, 0, 0, 0, 0x5, 0x6, 0, 0, 0x9, 0xA, 0xC, 0};

template <typename T>
static void expand_2to4_rows_scalar(const T* values, const int16_t* meta, T* dst, int64_t K, int64_t n0, int64_t n1) {
  const int64_t half = K / 2, mcols = K / 16;
  for (int64_t n = n0; n < n1; ++n) {
    T* d = dst + (n - n0) * K;
    std::memset(static_cast<void*>(d), 0, sizeof(T) * K);
    const T* v = values + n * half;
    const uint16_t* mt = reinterpret_cast<const uint16_t*>(meta) + n * mcols;
    for (int64_t g = 0; g < K / 4; ++g) {
      const uint32_t nib = (mt[g >> 2] >> (4 * (g & 3))) & 0xF;
      d[4 * g + (nib & 3)] = v[2 * g];
      d[4 * g + (nib >> 2)] = v[2 * g + 1];
    }
  }
}

#if SK_X86
template <typename T>
SK_AVX512 static void expand_2to4_rows_avx512(const T* values, const int16_t* meta, T* dst, int64_t K, int64_t n0,
                                              int64_t n1) {
  const int64_t half = K / 2, mcols = K / 16;
  for (int64_t n = n0; n < n1; ++n) {
    T* d = dst + (n - n0) * K;
    const T* v = values + n * half;
    const uint16_t* mt = reinterpret_cast<const uint16_t*>(meta) + n * mcols;
    for (int64_t q = 0; q < mcols; ++q) {
      const uint32_t w = mt[q];
      const __mmask16 lanes = static_cast<__mmask16>(kNibbleLanes[w & 0xF] | kNibbleLanes[(w >> 4) & 0xF] << 4 |
                                                     kNibbleLanes[(w >> 8) & 0xF] << 8 | kNibbleLanes[w >> 12] << 12);
      if (sizeof(T) == 4) {
        __m512i src = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 8 * q)));
        _mm512_storeu_si512(reinterpret_cast<void*>(d + 16 * q), _mm512_maskz_expand_epi32(lanes, src));
      } else {
        __m512i src = _mm512_cvtepu16_epi32(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8 * q))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16 * q),
                            _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(lanes, src)));
      }
    }
  }
}

template <typename T>
SK_AVX512 static void expand_masked_rows_avx512(const T* w, const uint8_t* mask, bool packed, T* dst, int64_t K,
                                                int64_t n0, int64_t n1) {
  const int64_t mstride = packed ? (K + 7) / 8 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    const uint8_t* mr = mask + n * mstride;
    T* d = dst + (n - n0) * K;
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) {
      const __mmask16 mk = mask16(mr, packed, c);
      if (sizeof(T) == 4)
        _mm512_storeu_si512(reinterpret_cast<void*>(d + c),
                            _mm512_maskz_loadu_epi32(mk, reinterpret_cast<const void*>(wr + c)));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c),
                            _mm256_maskz_loadu_epi16(mk, reinterpret_cast<const void*>(wr + c)));
    }
    for (; c < K; ++c) d[c] = mask_bit(mr, packed, c) ? wr[c] : T(0);
  }
}
#endif

template <typename T>
static void expand_2to4_rows(Isa isa, const T* values, const int16_t* meta, T* dst, int64_t K, int64_t n0, int64_t n1) {
#if SK_X86
  if (isa == Isa::Avx512) return expand_2to4_rows_avx512<T>(values, meta, dst, K, n0, n1);
#endif
  expand_2to4_rows_scalar<T>(values, meta, dst, K, n0, n1);
}

template <typename T>
static void expand_masked_rows(Isa isa, const T* w, const uint8_t* mask, bool packed, T* dst, int64_t K, int64_t n0,
                               int64_t n1) {
#if SK_X86
  if (isa == Isa::Avx512) return expand_masked_rows_avx512<T>(w, mask, packed, dst, K, n0, n1);
#endif
  const int64_t mstride = packed ? (K + 7) / 8 : K;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < K; ++c)
      dst[(n - n0) * K + c] = mask_bit(mask + n * mstride, packed, c) ? w[n * K + c] : T(0);
}

}  // namespace sk_linear
