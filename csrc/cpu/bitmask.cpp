// CPU kernel of the bitmask format for unstructured sparse weights (sparse_kernels/reference/bitmask.py):
//
// bitmask_linear_cpp(x [M,K], values [nnz], bitmask uint8 [N,ceil(K/8)], row_ptr int64 [N+1], bias?) -> [M,N]
//   y[m,n] = bias[n] + sum over the set bits c of row n of W[n,c] * x[m,c], W[n,c] the next value of
//   values[row_ptr[n]:row_ptr[n+1]] in column order.  The dense weight is never formed: per row we
//   stream its bitmask and its values once (memory-bound at small M: (1-s) of the dense value bytes
//   plus 1 bit per weight) for blocks of 4 rows of x converted to fp32 once per call; fp32 accumulation.
//   x86-64 with AVX-512: 16 columns per step, the row's next popcount(bits) values placed in the
//   lanes of the set bits by a permutation from a per-byte table (see expand16); otherwise a scalar
//   loop.  SPARSE_KERNELS_CPU_ISA=avx2|scalar forces
//   the scalar loop (tests cover both paths on one machine).  bf16 with 9 or more rows of x takes a
//   GEMM path instead (bitmask_gemm_bf16: rows expanded to a dense tile, then oneDNN).
//   Validation before any pointer arithmetic: shapes and dtypes, row_ptr[0] == 0, row_ptr[N] == nnz,
//   row_ptr non-decreasing, and per row popcount(bitmask row) == row span (checked in the same pass as
//   the row is read; the first bad row is reported); bits past K must be zero (a set padding bit
//   would consume a value that belongs to no column).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "blocked_gemm.h"
#include "simd.h"

namespace sk_bitmask {
using namespace sk_cpu;

constexpr int kRows = 4;  // rows of x per pass over a weight row
// Batch size from which bf16 takes the GEMM path (bitmask_gemm_bf16).  4096x4096 at 50%, bf16,
// 2-core Zen 5, quiet box, one weight reused (warm), ms direct | GEMM path | dense F.linear:
//   M=1 1.06|2.38|1.13  M=4 1.38|2.26|0.96  M=8 2.33|2.28|1.51  M=10 3.19|2.27  M=12 3.43|2.34
//   M=16 4.51|2.46|1.47  M=32 9.10|3.33|2.17  M=64 20.7|4.56|3.51  M=256 106|11.2|10.1
// -> GEMM from M=9 (the direct kernel re-expands each weight row once per 4 rows of x).
constexpr int64_t kBitmaskGemmMinM = 9;

// Bits set in one bitmask row (the validation pass before a row's values are read).  The build has
// no -march flags, so __builtin_popcountll is a bit-twiddling sequence unless the function is
// compiled for the popcnt instruction (every x86-64 CPU since 2008; checked at run time).
template <bool kHw>
static inline int64_t popcount_bytes(const uint8_t* bm, int64_t nb) {
  int64_t c = 0, i = 0;
  for (; i + 8 <= nb; i += 8) {
    uint64_t w;
    std::memcpy(&w, bm + i, 8);
    c += __builtin_popcountll(w);
  }
  for (; i < nb; ++i) c += __builtin_popcount(bm[i]);
  return c;
}
#if SK_X86
__attribute__((target("popcnt"))) static int64_t popcount_hw(const uint8_t* bm, int64_t nb) {
  return popcount_bytes<true>(bm, nb);
}
static bool has_popcnt() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("popcnt");
}
#endif
static int64_t popcount_row(const uint8_t* bm, int64_t nb) {
#if SK_X86
  static const bool hw = has_popcnt();
  if (hw) return popcount_hw(bm, nb);
#endif
  return popcount_bytes<false>(bm, nb);
}

// One weight row n against rows m0..m0+mb-1 of x32 (fp32, row stride Kp >= K rounded up to 16).
template <typename T>
static void row_scalar(const float* x32, int64_t Kp, int64_t K, const T* v, const uint8_t* bm, int mb, float* acc) {
  for (int64_t c = 0; c < K; ++c) {
    if (!((bm[c >> 3] >> (c & 7)) & 1)) continue;
    const float w = to_f32(*v++);
    for (int b = 0; b < mb; ++b) acc[b] += w * x32[b * Kp + c];
  }
}

#if SK_X86
// GCC 12 reports the _mm512_undefined_*() placeholders inside its own shift / extract / reduce
// intrinsics as "(may be) used uninitialized" once they are inlined here: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// 16 columns a step: the next popcount(bits) values go to the lanes of the set bits.  vexpandps /
// vpexpandw would do it in one instruction, but they ran at about 4 ns a step here (AMD EPYC Zen 5,
// both the memory and the register forms, and so did a masked load): a permutation from a 256-entry
// table per byte of bits (lane l of byte m takes the popcount of m's bits below l) ran at 1.4 ns,
// against 1.0 for a plain load.  The plain 16-value load may run past the row (harmless: those
// lanes are masked off), but never past the values array: the last steps use a masked load.
struct ExpandTable {
  alignas(64) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int l = 0; l < 8; ++l) idx[m][l] = ((m >> l) & 1) ? j++ : 0;
    }
  }
};
static const ExpandTable& expand_table() {
  static const ExpandTable t;
  return t;
}
static inline __mmask16 low_bits(int count) { return static_cast<__mmask16>((1u << count) - 1u); }

SK_AVX512 static inline __m512 load_raw(const float* v, bool tail, int cnt) {
  return tail ? _mm512_maskz_loadu_ps(low_bits(cnt), v) : _mm512_loadu_ps(v);
}
SK_AVX512 static inline __m512 load_raw(const c10::BFloat16* v, bool tail, int cnt) {
  __m256i h = tail ? _mm256_maskz_loadu_epi16(low_bits(cnt), v) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SK_AVX512 static inline __m512 load_raw(const c10::Half* v, bool tail, int cnt) {
  __m256i h = tail ? _mm256_maskz_loadu_epi16(low_bits(cnt), v) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_cvtph_ps(h);
}
template <typename T>
SK_AVX512 static inline __m512 expand16(const T* v, const T* vend, uint16_t bits, int cnt, const ExpandTable& tb) {
  const int lo = bits & 0xFF, hi = bits >> 8;
  const __m256i il = _mm256_load_si256(reinterpret_cast<const __m256i*>(tb.idx[lo]));
  const __m256i ih = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(tb.idx[hi])),
                                      _mm256_set1_epi32(__builtin_popcount(static_cast<unsigned>(lo))));
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(il), ih, 1);
  return _mm512_maskz_permutexvar_ps(bits, idx, load_raw(v, vend - v < 16, cnt));
}

// MB (rows of x) is a template parameter so that the accumulators stay in registers (with a run-time
// count GCC kept them on the stack: a store and a load per FMA).
template <int MB, typename T>
SK_AVX512 static void row_avx512(const float* x32, int64_t Kp, const T* v, const T* vend, const uint8_t* bm,
                                 float* acc) {
  const ExpandTable& tb = expand_table();
  __m512 a[MB];
  for (int b = 0; b < MB; ++b) a[b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < Kp; c += 16) {
    uint16_t bits;
    std::memcpy(&bits, bm + c / 8, 2);  // Kp/8 bytes exist: the bitmask row is padded
    // no `bits == 0` skip: at 90% sparsity a fifth of the steps are empty at random, and the
    // mispredicted branch cost more than the (all-zero) permute and FMA it saves
    const int cnt = __builtin_popcount(static_cast<unsigned>(bits));
    _mm_prefetch(reinterpret_cast<const char*>(v) + 1024, _MM_HINT_T0);  // a hint: never faults
    const __m512 w = expand16(v, vend, bits, cnt, tb);
    v += cnt;
    for (int b = 0; b < MB; ++b) a[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x32 + b * Kp + c), a[b]);
  }
  for (int b = 0; b < MB; ++b) acc[b] += _mm512_reduce_add_ps(a[b]);
}

template <typename T>
static void row_vec(const float* x32, int64_t Kp, const T* v, const T* vend, const uint8_t* bm, int mb, float* acc) {
  switch (mb) {
    case 1: row_avx512<1>(x32, Kp, v, vend, bm, acc); break;
    case 2: row_avx512<2>(x32, Kp, v, vend, bm, acc); break;
    case 3: row_avx512<3>(x32, Kp, v, vend, bm, acc); break;
    default: row_avx512<4>(x32, Kp, v, vend, bm, acc); break;
  }
}

// One bf16 weight row written out dense (Kp columns, zeros where the bits are clear) for the GEMM
// path: the same expand16 permutation, then the fp32 lanes (bf16 bit patterns shifted up 16, so
// exact) shifted back down to bf16.
SK_AVX512 static void expand_row_bf16(const c10::BFloat16* v, const c10::BFloat16* vend, const uint8_t* bm,
                                      int64_t Kp, c10::BFloat16* dst) {
  const ExpandTable& tb = expand_table();
  for (int64_t c = 0; c < Kp; c += 16) {
    uint16_t bits;
    std::memcpy(&bits, bm + c / 8, 2);
    const int cnt = __builtin_popcount(static_cast<unsigned>(bits));
    const __m512 w = expand16(v, vend, bits, cnt, tb);
    v += cnt;
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), h);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// bf16 from kBitmaskGemmMinM rows of x on (x86-64 with AVX-512): blocked_gemm (blocked_gemm.h)
// with weight rows expanded into the bf16 tile by expand_row_bf16, i.e. oneDNN's bf16 GEMM; below
// it the direct kernel, which re-expands each row once per 4 rows of x and accumulates in fp32
// FMAs.  fp32 and fp16 stay direct (no faster GEMM for them here).
#if SK_X86
static at::Tensor bitmask_gemm_bf16(const at::Tensor& x, const at::Tensor& vc, const uint8_t* bm, int64_t nbp,
                                    const int64_t* r, int64_t N, int64_t Kp, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), nnz = vc.size(0);
  at::Tensor xp = x.contiguous();
  if (Kp != K) {  // zero columns against the tile's zero padding
    xp = at::zeros({M, Kp}, x.options());
    xp.narrow(1, 0, K).copy_(x);
  }
  const c10::BFloat16* v0 = vc.data_ptr<c10::BFloat16>();
  return blocked_gemm(xp, bias, N, Kp, [&](at::Tensor& t, int64_t n0, int64_t n1, int64_t off) {
    c10::BFloat16* tp = t.data_ptr<c10::BFloat16>() + off * Kp;
    for (int64_t n = n0; n < n1; ++n) expand_row_bf16(v0 + r[n], v0 + nnz, bm + n * nbp, Kp, tp + (n - n0) * Kp);
  });
}
#endif

at::Tensor bitmask_linear_cpp(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                              const at::Tensor& row_ptr, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K] at the op level, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x: dtype ", x.scalar_type(), " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "values: dtype ", values.scalar_type(),
                   " does not match x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1, "values: expected a 1-D tensor [nnz], got ", values.dim(), "-D");
  TORCH_CHECK_TYPE(bitmask.scalar_type() == at::kByte, "bitmask: dtype ", bitmask.scalar_type(),
                   " is not supported; expected uint8");
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kLong, "row_ptr: dtype ", row_ptr.scalar_type(),
                   " is not supported; expected int64");
  const int64_t M = x.size(0), K = x.size(1), nb = (K + 7) / 8;
  TORCH_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(1) == nb, "bitmask: expected shape (N, ", nb,
                    ") for x's last dim ", K, ", got ", bitmask.sizes());
  const int64_t N = bitmask.size(0), nnz = values.size(0);
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.size(0) == N + 1, "row_ptr: expected shape (", N + 1,
                    ",), got ", row_ptr.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (", N, ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias: dtype ", bias->scalar_type(),
                     " does not match x's dtype ", x.scalar_type());
  }
  for (const at::Tensor* t : {&x, &values, &bitmask, &row_ptr})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "bitmask_linear_cpp: every tensor must be on the CPU, got one on ",
                      t->device());
  TORCH_CHECK_VALUE(!bias.has_value() || bias->device().is_cpu(), "bias: must be a CPU tensor");
  at::Tensor rp = row_ptr.contiguous();
  const int64_t* r = rp.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(r[0] == 0 && r[N] == nnz, "row_ptr: must run from 0 to values.numel() = ", nnz, ", got ", r[0],
                    " .. ", r[N]);
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK_VALUE(r[n + 1] >= r[n], "row_ptr: must be non-decreasing, but row_ptr[", n + 1, "] = ", r[n + 1],
                      " < row_ptr[", n, "] = ", r[n]);
  // The bitmask, padded to whole 16-column steps (zero bytes), so the vector loop reads 2 bytes at a time.
  const int64_t Kp = (K + 15) / 16 * 16, nbp = Kp / 8;
  at::Tensor bmp = at::zeros({N, nbp}, bitmask.options());
  if (N > 0 && nb > 0) bmp.narrow(1, 0, nb).copy_(bitmask);
  if (K % 8 && N > 0) {
    const int64_t bad = bitmask.select(1, nb - 1).__rshift__(K % 8).nonzero().numel();
    TORCH_CHECK_VALUE(bad == 0, "bitmask: bits are set past column ", K, " (the padding bits must be zero)");
  }
#if SK_X86
  if (x.scalar_type() == at::kBFloat16 && N > 0 && M > 0 && M >= gemm_min_m_or(kBitmaskGemmMinM) &&
      best_isa() == Isa::Avx512) {
    // every row's popcount first: the tile expansion reads each row's values unchecked
    std::atomic<int64_t> bad_row{std::numeric_limits<int64_t>::max()};
    const uint8_t* bmc = bmp.data_ptr<uint8_t>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        if (popcount_row(bmc + n * nbp, nbp) != r[n + 1] - r[n]) atomic_min(bad_row, n);
    });
    const int64_t b = bad_row.load();
    TORCH_CHECK_VALUE(b == std::numeric_limits<int64_t>::max(), "bitmask: row ", b, " has ",
                      b == std::numeric_limits<int64_t>::max() ? 0 : popcount_row(bmc + b * nbp, nbp),
                      " bits set but row_ptr gives it ",
                      b == std::numeric_limits<int64_t>::max() ? 0 : r[b + 1] - r[b],
                      " values; the bitmask and row_ptr do not describe the same weight");
    return bitmask_gemm_bf16(x, values.contiguous(), bmc, nbp, r, N, Kp, bias);
  }
#endif
  at::Tensor y32 = at::zeros({M, N}, x.options().dtype(at::kFloat));
  if (N == 0) return y32.to(x.scalar_type());  // M == 0 still runs the row checks below
  at::Tensor x32 = at::zeros({M, Kp}, x.options().dtype(at::kFloat));
  x32.narrow(1, 0, K).copy_(x);
  at::Tensor vc = values.contiguous();
  const uint8_t* bm = bmp.data_ptr<uint8_t>();
  const float* xp = x32.data_ptr<float>();
  float* yp = y32.data_ptr<float>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
#if SK_X86
  const bool vec = best_isa() == Isa::Avx512;
#else
  const bool vec = false;
#endif
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* v0 = vc.data_ptr<T>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = bm + n * nbp;
        if (popcount_row(row, nbp) != r[n + 1] - r[n]) {  // checked before the row's values are read
          atomic_min(first_bad, n);
          continue;
        }
        const T* v = v0 + r[n];
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          const int mb = static_cast<int>(std::min<int64_t>(kRows, M - m0));
          float acc[kRows] = {0.f, 0.f, 0.f, 0.f};
#if SK_X86
          if (vec)
            row_vec<T>(xp + m0 * Kp, Kp, v, v0 + nnz, row, mb, acc);
          else
#endif
            row_scalar<T>(xp + m0 * Kp, Kp, K, v, row, mb, acc);
          for (int b = 0; b < mb; ++b) yp[(m0 + b) * N + n] = acc[b];
        }
      }
    });
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t got = popcount_row(bm + bad * nbp, nbp);
    TORCH_CHECK_VALUE(false, "bitmask: row ", bad, " has ", got, " bits set but row_ptr gives it ", r[bad + 1] - r[bad],
                      " values; the bitmask and row_ptr do not describe the same weight");
  }
  if (bias.has_value()) y32.add_(bias->to(at::kFloat).unsqueeze(0));
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

}  // namespace sk_bitmask

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) { m.impl("bitmask_linear_cpp", &sk_bitmask::bitmask_linear_cpp); }
