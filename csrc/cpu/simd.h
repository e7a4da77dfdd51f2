// Shared by the CPU kernels: run-time ISA choice and fp32 vector loads of float / bf16 / fp16.
//
// The build stays portable (no -march flags): SIMD code is compiled per function with the
// SK_AVX512 / SK_AVX2 target attributes and chosen at run time by best_isa(), which reads the
// CPU's features and SPARSE_KERNELS_CPU_ISA=avx512bf16|avx2|scalar (forces a lower path; the
// tests use it to cover every path on one machine).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SK_X86 1
#else
#define SK_X86 0
#endif
// vdpbf16ps path: GCC >= 10 / clang >= 9 know the avx512bf16 target.
#if SK_X86 && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || (defined(__clang__) && __clang_major__ >= 9))
#define SK_X86_BF16 1
#else
#define SK_X86_BF16 0
#endif

#if SK_X86
#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")))
#define SK_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace sk_cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The widest of AVX-512 (F, BW, VL, DQ), AVX2 (+FMA, F16C) and scalar that this CPU runs,
// lowered by SPARSE_KERNELS_CPU_ISA=avx2|scalar.  Read per call (tests change the variable).
inline Isa best_isa() {
  Isa best = Isa::Scalar;
#if SK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
#endif
  const char* env = std::getenv("SPARSE_KERNELS_CPU_ISA");
  if (env != nullptr) {
    if (std::strcmp(env, "scalar") == 0) return Isa::Scalar;
    if (std::strcmp(env, "avx2") == 0 && best != Isa::Scalar) return Isa::Avx2;
  }
  return best;
}

// AVX512-BF16 (vdpbf16ps), unless SPARSE_KERNELS_CPU_ISA names anything else.
inline bool has_avx512bf16() {
#if SK_X86_BF16
  const char* env = std::getenv("SPARSE_KERNELS_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "avx512bf16") != 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

// a = min(a, v), from any thread: the kernels record the first bad element found by parallel chunks.
inline void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v < cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// f(tag) with a value of the C++ type of t: float, c10::BFloat16 or c10::Half; TypeError otherwise.
template <typename F>
void dispatch_float(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, "dtype ", t, " is not supported; expected float32, bfloat16 or float16");
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

#if SK_X86
// 16 values as fp32.
SK_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SK_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SK_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// Lower 8 lanes only (a K % 32 == 16 tail); upper lanes are zero.
SK_AVX512 inline __m512 load8(const float* p) { return _mm512_maskz_loadu_ps(0xFF, p); }
SK_AVX512 inline __m512 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_zextsi128_si256(h)), 16));
}
SK_AVX512 inline __m512 load8(const c10::Half* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtph_ps(_mm256_zextsi128_si256(h));
}
// Mask entries c..c+15 of one row: bool bytes, or bit-packed (bit c%8 of byte c/8; c % 8 == 0).
SK_AVX512 inline __mmask16 mask16(const uint8_t* mrow, bool packed, int64_t c) {
  if (packed) {
    uint16_t bits;
    std::memcpy(&bits, mrow + c / 8, 2);
    return bits;
  }
  return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mrow + c)), _mm_set1_epi8(-1));
}
#endif

}  // namespace sk_cpu
