// Direct-path CPU kernels of the linear family (included by csrc/cpu/linear.cpp and int4.cpp): raw-pointer
// row kernels that write fp32 y [M, N] from fp32 x [M, K] (bf16 x for the vdpbf16ps kernels).
//
// sparse_linear (2:4, values [N, K/2] + meta [N, K/16] int16): sparse_linear_kernel (scalar /
//   AVX2 / AVX-512 by best_isa()) and sl_rows_bf16 (AVX512-BF16, K % 64 == 0).
// masked_linear (weight [N, K] + mask bool [N, K] | uint8 [N, ceil(K/8)]): masked_linear_kernel
//   (scalar / AVX-512) and ml_rows_bf16 (AVX512-BF16, K % 32 == 0).
// The ATen wrappers in linear.cpp (and int4.cpp, which runs sl_rows on dequantized values) validate
// every tensor before calling these.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace sk_linear {

using namespace sk_cpu;

// f(std::integral_constant<int, MB>{}, m0) for m0 = 0, 4, 8, ... < M with MB = min(4, M - m0):
// the kernels below take up to four rows of x per pass over the weight, MB a compile-time count.
template <typename F>
static inline void by_four_rows(int64_t M, const F& f) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: f(std::integral_constant<int, 1>{}, m0); break;
      case 2: f(std::integral_constant<int, 2>{}, m0); break;
      case 3: f(std::integral_constant<int, 3>{}, m0); break;
      default: f(std::integral_constant<int, 4>{}, m0); break;
    }
  }
}

// ------------------------------------------------------------------ scalar sparse_linear
template <typename T>
static void sl_rows_scalar(const float* x, const T* values, const int16_t* meta, float* acc_out, int64_t M,
                           int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t half = K / 2, mcols = K / 16;
  for (int64_t n = n0; n < n1; ++n) {
    const T* v = values + n * half;
    const uint16_t* mt = reinterpret_cast<const uint16_t*>(meta) + n * mcols;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t q = 0; q < mcols; ++q) {
        const uint32_t word = mt[q];
        for (int j = 0; j < 4; ++j) {
          const int64_t g = 4 * q + j;
          const uint32_t nib = (word >> (4 * j)) & 0xF;
          acc += to_f32(v[2 * g]) * xr[4 * g + (nib & 3)] + to_f32(v[2 * g + 1]) * xr[4 * g + (nib >> 2)];
        }
      }
      acc_out[m * N + n] = acc;
    }
  }
}

#if SK_X86
static int64_t prefetch_env() {
  const char* env = std::getenv("SPARSE_KERNELS_CPU_PREFETCH");
  return env ? std::atoll(env) : 1024;
}
static const int64_t kPrefetchBytes = prefetch_env();

// R output rows at once (R independent FMA chains per x row, x loads shared by the R rows),
// MB rows of x at once.  One step = 8 groups = 32 columns of x = 16 values = 32 bits of meta.
template <typename T, int R, int MB>
SK_AVX512 static void sl_block_avx512(const float* x, const T* values, const int16_t* meta, float* out, int64_t K,
                                      int64_t N, int64_t n) {
  const int64_t half = K / 2, mcols = K / 16, steps = K / 32;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i grp = _mm512_srli_epi32(lane, 1);                                      // j = l/2
  const __m512i shift = _mm512_add_epi32(_mm512_slli_epi32(grp, 2), _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 1));
  const __m512i base = _mm512_slli_epi32(grp, 2);                                      // 4j
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i idx[R];
    __m512 v[R];
    for (int r = 0; r < R; ++r) {
      // Software prefetch kPrefetchBytes ahead in each of the R value streams (and meta): rows are
      // only K/2 values long, too short for the hardware prefetcher to ramp up on its own.
      _mm_prefetch(reinterpret_cast<const char*>(values + (n + r) * half + 16 * s) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(meta + (n + r) * mcols + 2 * s) + kPrefetchBytes / 4, _MM_HINT_T0);
      uint32_t word;
      std::memcpy(&word, meta + (n + r) * mcols + 2 * s, 4);
      idx[r] = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)word), shift), three), base);
      v[r] = load16(values + (n + r) * half + 16 * s);
    }
    for (int b = 0; b < MB; ++b) {
      const float* xp = x + b * K + 32 * s;
      const __m512 xa = _mm512_loadu_ps(xp), xb = _mm512_loadu_ps(xp + 16);
      for (int r = 0; r < R; ++r)
        acc[r][b] = _mm512_fmadd_ps(v[r], _mm512_permutex2var_ps(xa, idx[r], xb), acc[r][b]);
    }
  }
  if (K % 32) {  // one int16 of meta left: 4 groups, 8 values, 16 columns
    const int64_t s = steps;
    __m512i idx[R];
    __m512 v[R];
    for (int r = 0; r < R; ++r) {
      const uint32_t word = static_cast<uint16_t>(meta[(n + r) * mcols + 2 * s]);
      idx[r] = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)word), shift), three), base);
      v[r] = load8(values + (n + r) * half + 16 * s);
    }
    for (int b = 0; b < MB; ++b) {
      const __m512 xa = _mm512_loadu_ps(x + b * K + 32 * s);
      for (int r = 0; r < R; ++r)
        acc[r][b] = _mm512_fmadd_ps(v[r], _mm512_permutexvar_ps(idx[r], xa), acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) out[b * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
}

#if SK_X86_BF16
#define SK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,avx2")))
// bf16 weights and bf16 x, K % 64 == 0: one step = 16 groups = 64 columns of x = 32 values = 64 bits
// of meta.  The two kept values of group j already sit in 32-bit lane j of the values vector,
// which is the pair layout vdpbf16ps wants: vpermt2w gathers x[4j+i0], x[4j+i1] into the same
// lane and one vdpbf16ps does 32 multiply-adds (fp32 accumulation).  Twice the work per
// instruction of the fp32 path.
// The x gather of the bf16 kernels (here and in int4.cpp): in a 64-column step, lane l (kept value
// l, group j = l/2) takes x[4j + i0] for even l and x[4j + i1] for odd l, i0/i1 from the step's 64
// bits of meta (16-bit word j/4, nibble j%4).
struct Bf16Gather {
  __m512i widx, shift, base;
};

SK_AVX512BF16 static inline Bf16Gather bf16_gather_tables() {
  alignas(64) int16_t word_i[32], shift_i[32], base_i[32];
  for (int l = 0; l < 32; ++l) {
    const int j = l / 2;
    word_i[l] = static_cast<int16_t>(j / 4);                     // which 16-bit meta word
    shift_i[l] = static_cast<int16_t>(4 * (j % 4) + 2 * (l & 1));  // i0 or i1 of group j
    base_i[l] = static_cast<int16_t>(4 * j);
  }
  return {_mm512_load_si512(word_i), _mm512_load_si512(shift_i), _mm512_load_si512(base_i)};
}

// vpermt2w indices into the step's 64 x values, from the 4 meta words at ``meta4``.
SK_AVX512BF16 static inline __m512i bf16_gather_index(const Bf16Gather& g, const int16_t* meta4) {
  int64_t word;
  std::memcpy(&word, meta4, 8);
  const __m512i w = _mm512_permutexvar_epi16(g.widx, _mm512_set1_epi64(word));
  return _mm512_add_epi16(_mm512_and_si512(_mm512_srlv_epi16(w, g.shift), _mm512_set1_epi16(3)), g.base);
}

template <int R, int MB>
SK_AVX512BF16 static void sl_block_avx512bf16(const c10::BFloat16* x, const c10::BFloat16* values, const int16_t* meta,
                                            float* out, int64_t K, int64_t N, int64_t n) {
  const int64_t half = K / 2, mcols = K / 16, steps = K / 64;
  const Bf16Gather g = bf16_gather_tables();
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i idx[R], v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(values + (n + r) * half + 32 * s) + kPrefetchBytes, _MM_HINT_T0);
      idx[r] = bf16_gather_index(g, meta + (n + r) * mcols + 4 * s);
      v[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(values + (n + r) * half + 32 * s));
    }
    for (int b = 0; b < MB; ++b) {
      const c10::BFloat16* xp = x + b * K + 64 * s;
      const __m512i xa = _mm512_loadu_si512(reinterpret_cast<const void*>(xp));
      const __m512i xb = _mm512_loadu_si512(reinterpret_cast<const void*>(xp + 32));
      for (int r = 0; r < R; ++r) {
        const __m512i sel = _mm512_permutex2var_epi16(xa, idx[r], xb);
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)v[r], (__m512bh)sel);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) out[b * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
}

template <int MB>
static void sl_block_bf16(const c10::BFloat16* x, const c10::BFloat16* values, const int16_t* meta, float* out,
                          int64_t K, int64_t N, int64_t n, int rows) {
  if (rows == 4) return sl_block_avx512bf16<4, MB>(x, values, meta, out, K, N, n);
  for (int r = 0; r < rows; ++r) sl_block_avx512bf16<1, MB>(x, values, meta, out, K, N, n + r);
}

[[maybe_unused]] static void sl_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* values, const int16_t* meta, float* out,
                         int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, n1 - n));
    by_four_rows(M, [&](auto mb, int64_t m0) {
      sl_block_bf16<decltype(mb)::value>(x + m0 * K, values, meta, out + m0 * N, K, N, n, rows);
    });
  }
}

// masked_linear with bf16 weight and bf16 x, K % 32 == 0: 32 columns per step.  The mask zeroes
// the weight lanes it drops (masked load: a dropped NaN never leaks), adjacent bf16 pairs are
// vdpbf16ps's operand layout as they lie, and MB rows of x share each weight load.
template <int MB>
SK_AVX512BF16 static void ml_row_avx512bf16(const c10::BFloat16* x, const c10::BFloat16* w, const uint8_t* mrow,
                                            bool packed, float* out, int64_t K, int64_t N, int64_t n, bool first) {
  __m512 acc[MB];
  for (int b = 0; b < MB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += 32) {
    if (first) _mm_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes, _MM_HINT_T0);
    __mmask32 mk;
    if (packed) {
      uint32_t bits;
      std::memcpy(&bits, mrow + c / 8, 4);
      mk = bits;
    } else {
      mk = _mm256_test_epi8_mask(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mrow + c)), _mm256_set1_epi8(-1));
    }
    const __m512i wv = _mm512_maskz_loadu_epi16(mk, w + c);
    for (int b = 0; b < MB; ++b)
      acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + b * K + c));
  }
  for (int b = 0; b < MB; ++b) out[b * N + n] = _mm512_reduce_add_ps(acc[b]);
}

[[maybe_unused]] static void ml_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* w, const uint8_t* mask, bool packed, float* out,
                         int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t mstride = packed ? K / 8 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const c10::BFloat16* wr = w + n * K;
    const uint8_t* mr = mask + n * mstride;
    by_four_rows(M, [&](auto mb, int64_t m0) {
      ml_row_avx512bf16<decltype(mb)::value>(x + m0 * K, wr, mr, packed, out + m0 * N, K, N, n, m0 == 0);
    });
  }
}
#endif  // SK_X86_BF16

SK_AVX2 static inline __m256 load8_avx2(const float* p) { return _mm256_loadu_ps(p); }
SK_AVX2 static inline __m256 load8_avx2(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
SK_AVX2 static inline __m256 load8_avx2(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SK_AVX2 static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One step = 4 groups = 16 columns of x = 8 values = one int16 of meta.
template <typename T, int R, int MB>
SK_AVX2 static void sl_block_avx2(const float* x, const T* values, const int16_t* meta, float* out, int64_t K,
                                  int64_t N, int64_t n) {
  const int64_t half = K / 2, mcols = K / 16;
  const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i grp = _mm256_srli_epi32(lane, 1);
  const __m256i shift = _mm256_add_epi32(_mm256_slli_epi32(grp, 2), _mm256_slli_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(1)), 1));
  const __m256i base = _mm256_slli_epi32(grp, 2);  // 4j; permutevar8x32 uses it mod 8
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) acc[r][b] = _mm256_setzero_ps();
  for (int64_t s = 0; s < mcols; ++s) {
    __m256i idx[R];
    __m256 v[R];
    for (int r = 0; r < R; ++r) {
      const uint32_t word = static_cast<uint16_t>(meta[(n + r) * mcols + s]);
      idx[r] = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shift), three), base);
      v[r] = load8_avx2(values + (n + r) * half + 8 * s);
    }
    for (int b = 0; b < MB; ++b) {
      const float* xp = x + b * K + 16 * s;
      const __m256 xa = _mm256_loadu_ps(xp), xb = _mm256_loadu_ps(xp + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 sel = _mm256_blend_ps(_mm256_permutevar8x32_ps(xa, idx[r]), _mm256_permutevar8x32_ps(xb, idx[r]), 0xF0);
        acc[r][b] = _mm256_fmadd_ps(v[r], sel, acc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) out[b * N + n + r] = hsum256(acc[r][b]);
}
#endif  // SK_X86

// Rows [n0, n1) for all M rows of x, into out (fp32 [M, N]).  R = 4 output rows at a time (4
// independent FMA chains; x loads shared), x rows in chunks of MB <= 4 (16 accumulators).  The
// m-chunk loop sits inside the row-block loop so the 4 rows' values stay in L1/L2 while every
// chunk of x reuses them (the weight is streamed from memory once per call).
template <typename T, int MB>
static void sl_block(Isa isa, const float* x, const T* values, const int16_t* meta, float* out, int64_t K,
                     int64_t N, int64_t n, int rows) {
#if SK_X86
  if (isa == Isa::Avx512) {
    if (rows == 4) return sl_block_avx512<T, 4, MB>(x, values, meta, out, K, N, n);
    for (int r = 0; r < rows; ++r) sl_block_avx512<T, 1, MB>(x, values, meta, out, K, N, n + r);
    return;
  }
  if (isa == Isa::Avx2) {
    if (rows == 4) return sl_block_avx2<T, 4, MB>(x, values, meta, out, K, N, n);
    for (int r = 0; r < rows; ++r) sl_block_avx2<T, 1, MB>(x, values, meta, out, K, N, n + r);
    return;
  }
#endif
  sl_rows_scalar<T>(x, values, meta, out, MB, K, N, n, n + rows);
}

template <typename T>
static void sl_rows(Isa isa, const float* x, const T* values, const int16_t* meta, float* out, int64_t M,
                    int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, n1 - n));
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = x + m0 * K;
      float* om = out + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: sl_block<T, 1>(isa, xm, values, meta, om, K, N, n, rows); break;
        case 2: sl_block<T, 2>(isa, xm, values, meta, om, K, N, n, rows); break;
        case 3: sl_block<T, 3>(isa, xm, values, meta, om, K, N, n, rows); break;
        default: sl_block<T, 4>(isa, xm, values, meta, om, K, N, n, rows); break;
      }
    }
  }
}

// Raw-pointer entry: y32 [M, N] fp32 = x32 [M, K] (fp32) @ W^T, W given by values/meta.
template <typename T>
void sparse_linear_kernel(const float* x, const T* values, const int16_t* meta, float* y, int64_t M, int64_t K,
                          int64_t N) {
  const Isa isa = best_isa();
  // Grain 64 rows: 4096 rows split into 2 x 2048 on this 2-core box; blocks of 64 keep R=4 aligned.
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    sl_rows<T>(isa, x, values, meta, y, M, K, N, b0 * 64, std::min<int64_t>(N, b1 * 64));
  });
}

// ------------------------------------------------------------------ masked_linear (raw)
static inline bool mask_bit(const uint8_t* mrow, bool packed, int64_t c) {
  return packed ? ((mrow[c >> 3] >> (c & 7)) & 1) != 0 : mrow[c] != 0;
}

#if SK_X86
// MB rows of x at a time: MB independent FMA chains share each masked weight load (one chain is
// FMA-latency bound once the weight row sits in L1: 11.8 ms vs dense 9.0 ms at 4096x4096 fp32
// batch 16).  The first pass prefetches the row from memory kPrefetchBytes ahead (batch 1 fp32:
// 1.97 ms with it, 4.6 ms without, dense 2.63 ms).
template <typename T, int MB>
SK_AVX512 static void ml_row_avx512(const float* x, const T* w, const uint8_t* mrow, bool packed, float* out,
                                    int64_t K, int64_t N, int64_t n, bool first) {
  __m512 acc[MB];
  for (int b = 0; b < MB; ++b) acc[b] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= K; c += 16) {
    if (first) _mm_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 wv = _mm512_maskz_mov_ps(mask16(mrow, packed, c), load16(w + c));
    for (int b = 0; b < MB; ++b) acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * K + c), acc[b]);
  }
  for (int b = 0; b < MB; ++b) {
    float tail = 0.f;
    for (int64_t t = c; t < K; ++t)
      if (mask_bit(mrow, packed, t)) tail += to_f32(w[t]) * x[b * K + t];
    out[b * N + n] = _mm512_reduce_add_ps(acc[b]) + tail;
  }
}
#endif

template <typename T>
static void ml_row_scalar(const float* x, const T* w, const uint8_t* mrow, bool packed, float* out, int64_t M,
                          int64_t K, int64_t N, int64_t n) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float acc = 0.f;
    for (int64_t c = 0; c < K; ++c)
      if (mask_bit(mrow, packed, c)) acc += to_f32(w[c]) * xr[c];
    out[m * N + n] = acc;
  }
}

template <typename T>
void masked_linear_kernel(const float* x, const T* w, const uint8_t* mask, bool packed, float* y, int64_t M,
                          int64_t K, int64_t N) {
  const Isa isa = best_isa();
  const int64_t mstride = packed ? (K + 7) / 8 : K;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
#if SK_X86
      if (isa == Isa::Avx512) {
        by_four_rows(M, [&](auto mb, int64_t m0) {
          ml_row_avx512<T, decltype(mb)::value>(x + m0 * K, w + n * K, mask + n * mstride, packed, y + m0 * N, K, N,
                                                n, m0 == 0);
        });
        continue;
      }
#endif
      ml_row_scalar<T>(x, w + n * K, mask + n * mstride, packed, y, M, K, N, n);
    }
  });
}

}  // namespace sk_linear
