// CPU kernels of the sparse matmul family (sparse_kernels/ops/linear.py defines the schemas).
//
// sparse_linear_cpp(x [M,K], values [N,K/2], meta [N,K/16] int16, bias [N]?, meta_dev?) -> y [M,N]
//   Two paths chosen by batch size and dtype (gemm_min_m, with the measurements): the direct
//   kernel below, or for large M a blocked expand (256 rows of W at a time) + BLAS GEMM.
//   y[m,n] = bias[n] + sum_g values[n,2g]*x[m,4g+i0] + values[n,2g+1]*x[m,4g+i1], where the nibble
//   i0 | i1<<2 of group g sits at bits 4*(g%4) of meta[n, g/4] (the canonical 2:4 format).
//   The dense weight is never formed: per output row we stream values+meta once and pick x's
//   entries with the nibbles.  x is converted to fp32 once per call; accumulation is fp32.
//   x86-64: bf16 on AVX512-BF16 CPUs with K % 64 == 0: vpermt2w + vdpbf16ps on bf16 x (32 values per
//   step); otherwise AVX-512 (16 values, 8 groups, one permutex2var per step) or AVX2 (8 values,
//   two permutevar8x32 + blend), chosen at run time with __builtin_cpu_supports (the build stays
//   portable: no -march flags); elsewhere a scalar loop.  SPARSE_KERNELS_CPU_ISA=avx512|avx2|scalar
//   forces a lower path (tests use it to cover every path on one machine).
//   Corrupt meta (i0 >= i1) cannot read out of bounds: a nibble always indexes inside its group.
//
// masked_linear_cpp(x [M,K], weight [N,K], mask bool [N,K] | uint8 [N,ceil(K/8)], bias?) -> [M,N]
// pack_mask_cpp / unpack_mask_cpp: bit c%8 of byte c/8 holds mask[..., c] (little bit order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "blocked_gemm.h"
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
template <int R, int MB>
SK_AVX512BF16 static void sl_block_avx512bf16(const c10::BFloat16* x, const c10::BFloat16* values, const int16_t* meta,
                                            float* out, int64_t K, int64_t N, int64_t n) {
  const int64_t half = K / 2, mcols = K / 16, steps = K / 64;
  alignas(64) int16_t word_i[32], shift_i[32], base_i[32];
  for (int l = 0; l < 32; ++l) {
    const int j = l / 2;
    word_i[l] = static_cast<int16_t>(j / 4);                     // which 16-bit meta word
    shift_i[l] = static_cast<int16_t>(4 * (j % 4) + 2 * (l & 1));  // i0 or i1 of group j
    base_i[l] = static_cast<int16_t>(4 * j);
  }
  const __m512i widx = _mm512_load_si512(word_i), shift = _mm512_load_si512(shift_i);
  const __m512i base = _mm512_load_si512(base_i), three = _mm512_set1_epi16(3);
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i idx[R], v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(values + (n + r) * half + 32 * s) + kPrefetchBytes, _MM_HINT_T0);
      int64_t word;
      std::memcpy(&word, meta + (n + r) * mcols + 4 * s, 8);
      const __m512i w = _mm512_permutexvar_epi16(widx, _mm512_set1_epi64(word));
      idx[r] = _mm512_add_epi16(_mm512_and_si512(_mm512_srlv_epi16(w, shift), three), base);
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

static void sl_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* values, const int16_t* meta, float* out,
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

static void ml_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* w, const uint8_t* mask, bool packed, float* out,
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

// The GEMM path: blocked_gemm (blocked_gemm.h) with the 2:4 or masked row expansion above.

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
static void check_x_and_bias(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                             const at::Tensor& w, const char* wname) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K] at the op level, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu(), "x and ", wname, " must be CPU tensors");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x: dtype ", x.scalar_type(), " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), wname, ": dtype ", w.scalar_type(), " does not match x's dtype ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == K, "x: last dim is ", x.size(1), " but the weight has ", K, " input features");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "bias: expected shape (", N, "), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "bias: dtype ", b.scalar_type(), " does not match x's dtype ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(b.device().is_cpu(), "bias: must be a CPU tensor");
  }
}

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
  const int64_t N = values.size(0), K = 2 * values.size(1);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "meta: dtype ", meta.scalar_type(), " is not supported; expected int16");
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == K / 16, "meta: expected shape (", N, ", ",
                    K / 16, "), got ", meta.sizes());
  TORCH_CHECK_VALUE(meta.device().is_cpu(), "meta: must be a CPU tensor");
  check_x_and_bias(x, bias, N, K, values, "values");
  const int64_t M = x.size(0);
  at::Tensor v = values.contiguous(), mt = meta.contiguous();
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
