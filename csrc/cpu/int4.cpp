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
//   same things first, with friendlier messages), and corrupt meta (i0 >= i1) is refused.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "linear_checks.h"
#include "linear_kernels.h"
#include "simd.h"

namespace sk_int4 {

using namespace sk_cpu;

constexpr int64_t kRows = 16;  // rows dequantized at a time (the buffer: kRows * K/2 floats)
constexpr int64_t kFusedMaxM = 4;  // the fused bf16 kernel up to this batch (see sl4_block_avx512bf16)

// One group's codes (nbytes = G/4 bytes, a multiple of 4) -> 2 * nbytes values (code - 8) * s,
// two codes per byte, low nibble first.  SIMD: each byte duplicated (pshufb), widened to 32-bit
// lanes, shifted by 0 / 4 per lane, masked, offset, converted and scaled.
static void dq_scalar(const uint8_t* q, float s, float* out, int64_t nbytes) {
  for (int64_t b = 0; b < nbytes; ++b) {
    out[2 * b] = static_cast<float>(static_cast<int>(q[b] & 0xF) - 8) * s;
    out[2 * b + 1] = static_cast<float>(static_cast<int>(q[b] >> 4) - 8) * s;
  }
}

#if SK_X86
SK_AVX512 static inline __m512 dq16_avx512(const uint8_t* q, __m512 sv) {  // 8 bytes -> 16 values
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  int64_t word;
  std::memcpy(&word, q, 8);
  __m512i w = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi64_si128(word), dup));
  w = _mm512_sub_epi32(_mm512_and_si512(_mm512_srlv_epi32(w, shifts), _mm512_set1_epi32(0xF)), _mm512_set1_epi32(8));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(w), sv);
}

SK_AVX512 static void dq_avx512(const uint8_t* q, float s, float* out, int64_t nbytes) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t b = 0;
  for (; b + 8 <= nbytes; b += 8) _mm512_storeu_ps(out + 2 * b, dq16_avx512(q + b, sv));
  dq_scalar(q + b, s, out + 2 * b, nbytes - b);  // G = 16 (mod 32): a 4-byte tail
}

SK_AVX2 static void dq_avx2(const uint8_t* q, float s, float* out, int64_t nbytes) {  // 4 bytes -> 8 values
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t b = 0; b < nbytes; b += 4) {
    int32_t word;
    std::memcpy(&word, q + b, 4);
    __m256i w = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(word), dup));
    w = _mm256_sub_epi32(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(0xF)),
                         _mm256_set1_epi32(8));
    _mm256_storeu_ps(out + 2 * b, _mm256_mul_ps(_mm256_cvtepi32_ps(w), sv));
  }
}
#endif

#if SK_X86_BF16
// The bf16 path: values rounded to bfloat16 (round to nearest even), for the vdpbf16ps row kernel.
SK_AVX512BF16 static void dq_avx512bf16(const uint8_t* q, float s, c10::BFloat16* out, int64_t nbytes) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t b = 0;
  for (; b + 8 <= nbytes; b += 8) {
    const __m256bh h = _mm512_cvtneps_pbh(dq16_avx512(q + b, sv));
    std::memcpy(out + 2 * b, &h, 32);
  }
  for (; b < nbytes; ++b) {  // G = 16 (mod 32): a 4-byte tail, rounded to nearest even as vcvtneps2bf16
    out[2 * b] = c10::BFloat16(static_cast<float>(static_cast<int>(q[b] & 0xF) - 8) * s);
    out[2 * b + 1] = c10::BFloat16(static_cast<float>(static_cast<int>(q[b] >> 4) - 8) * s);
  }
}
#endif

#if SK_X86_BF16
// The fused bf16 kernel (bf16 x, AVX512-BF16, K % 64 == 0, G % 64 == 0 or 64 % G == 0): no values
// buffer.  Per step of 64 columns and row: 16 bytes of codes -> 32 bf16 lanes holding (code - 8)
// exactly (each byte duplicated with vpermw, shifted by 0 / 4, masked, then a 16-entry vpermw
// table of bf16 integers), the meta nibbles gather x as in sl_block_avx512bf16, vdpbf16ps sums the
// group-of-4 pair products into 16 fp32 lanes (x * q: exact products), and one FMA per lane
// applies the lane's scale (one per step when G % 64 == 0; 64/G of them, permuted to their lanes,
// when G is 16 or 32).  So the weight is never rounded to bf16: only x is bf16.  (Summing a
// group's steps before scaling once was slower at M = 4..16: 32 accumulators spill.)  It decodes
// the codes once per 4 rows of x, so from M = 5 the dequantizing path below (decode once into a
// bf16 buffer, then the 2:4 vdpbf16ps kernel) wins: 4096x4096, batch 16, 2.8 ms against 3.5 ms.
template <int R, int MB>
SK_AVX512BF16 static void sl4_block_avx512bf16(const c10::BFloat16* x, const uint8_t* q, const int16_t* meta,
                                               const float* sc, float* out, int64_t K, int64_t N, int64_t n,
                                               int64_t G) {
  const int64_t qcols = K / 4, mcols = K / 16, steps = K / 64, ng = K / G;
  alignas(64) int16_t dup_i[32], nib_i[32], table_i[32];
  for (int l = 0; l < 32; ++l) {
    dup_i[l] = static_cast<int16_t>(l / 2);      // value l is in byte l/2 ...
    nib_i[l] = static_cast<int16_t>(4 * (l & 1));  // ... low nibble for even l
    table_i[l] = static_cast<int16_t>(c10::BFloat16(static_cast<float>(l < 16 ? l - 8 : 0)).x);
  }
  alignas(64) int32_t gsel_i[16];
  for (int j = 0; j < 16; ++j) gsel_i[j] = G < 64 ? static_cast<int32_t>(4 * j / G) : 0;  // lane j: columns 4j..4j+3
  const sk_linear::Bf16Gather g = sk_linear::bf16_gather_tables();
  const __m512i dup = _mm512_load_si512(dup_i), nib = _mm512_load_si512(nib_i), table = _mm512_load_si512(table_i);
  const __m512i fifteen = _mm512_set1_epi16(0xF), gsel = _mm512_load_si512(gsel_i);
  const __mmask16 gmask = G < 64 ? static_cast<__mmask16>((1u << (64 / G)) - 1) : 1;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i idx[R], v[R];
    __m512 sv[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* qp = q + (n + r) * qcols + 16 * s;
      _mm_prefetch(reinterpret_cast<const char*>(qp) + sk_linear::kPrefetchBytes / 4, _MM_HINT_T0);
      idx[r] = sk_linear::bf16_gather_index(g, meta + (n + r) * mcols + 4 * s);
      const __m512i bytes = _mm512_castsi256_si512(
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qp))));
      const __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(dup, bytes), nib), fifteen);
      v[r] = _mm512_permutexvar_epi16(codes, table);
      const float* srow = sc + (n + r) * ng + 64 * s / G;
      sv[r] = G >= 64 ? _mm512_set1_ps(*srow) : _mm512_permutexvar_ps(gsel, _mm512_maskz_loadu_ps(gmask, srow));
    }
    for (int b = 0; b < MB; ++b) {
      const c10::BFloat16* xp = x + b * K + 64 * s;
      const __m512i xa = _mm512_loadu_si512(reinterpret_cast<const void*>(xp));
      const __m512i xb = _mm512_loadu_si512(reinterpret_cast<const void*>(xp + 32));
      for (int r = 0; r < R; ++r) {
        const __m512i sel = _mm512_permutex2var_epi16(xa, idx[r], xb);
        const __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v[r], (__m512bh)sel);
        acc[r][b] = _mm512_fmadd_ps(t, sv[r], acc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) out[b * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
}

static void sl4_rows_bf16(const c10::BFloat16* x, const uint8_t* q, const int16_t* meta, const float* sc, float* out,
                          int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t G) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, n1 - n));
    sk_linear::by_four_rows(M, [&](auto mb, int64_t m0) {
      constexpr int MB = decltype(mb)::value;
      if (rows == 4) {
        sl4_block_avx512bf16<4, MB>(x + m0 * K, q, meta, sc, out + m0 * N, K, N, n, G);
      } else {
        for (int r = 0; r < rows; ++r) sl4_block_avx512bf16<1, MB>(x + m0 * K, q, meta, sc, out + m0 * N, K, N, n + r, G);
      }
    });
  }
}
#endif

template <typename S, typename O>
static void dequantize_rows(Isa isa, const uint8_t* q, const S* scales, O* out, int64_t rows, int64_t K, int64_t G) {
  const int64_t qcols = K / 4, half = K / 2, ngroups = K / G, gbytes = G / 4;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const float s = to_f32(scales[r * ngroups + g]);
      const uint8_t* qg = q + r * qcols + g * gbytes;
      O* og = out + r * half + g * (G / 2);
      if constexpr (std::is_same_v<O, float>) {
#if SK_X86
        if (isa == Isa::Avx512) {
          dq_avx512(qg, s, og, gbytes);
          continue;
        }
        if (isa == Isa::Avx2) {
          dq_avx2(qg, s, og, gbytes);
          continue;
        }
#endif
        dq_scalar(qg, s, og, gbytes);
      } else {
#if SK_X86_BF16
        dq_avx512bf16(qg, s, og, gbytes);
#endif
      }
    }
  }
}

at::Tensor sparse_linear_int4_cpp(const at::Tensor& x, const at::Tensor& qvalues, const at::Tensor& meta,
                                  const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(qvalues.dim() == 2, "qvalues: expected a 2-D tensor [N, K/4], got ", qvalues.dim(), "-D");
  TORCH_CHECK_TYPE(qvalues.scalar_type() == at::kByte, "qvalues: dtype ", qvalues.scalar_type(),
                   " is not supported; expected uint8");
  const int64_t N = qvalues.size(0), K = sk_linear::packed_cols(qvalues, 4, "qvalues");
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
  sk_linear::check_x_and_bias(x, bias, N, K, qvalues, "qvalues", /*w_dtype_is_x=*/false);
  TORCH_CHECK_VALUE(meta.device().is_cpu() && scales.device().is_cpu(), "meta and scales must be CPU tensors");
  sk_linear::check_meta_nibbles(meta.contiguous());
  const int64_t M = x.size(0), G = N > 0 ? K / scales.size(1) : K;
  at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));  // every element written below
  if (M > 0 && N > 0 && K > 0) {
#if SK_X86_BF16
    // bf16 x on AVX512-BF16 CPUs (K % 64 == 0): values rounded to bf16, the vdpbf16ps kernel (the
    // rounding torch's own bf16 matmul of the dequantized weight makes too)
    const bool bf16_dot = x.scalar_type() == at::kBFloat16 && K % 64 == 0 && has_avx512bf16();
#else
    const bool bf16_dot = false;
#endif
    // x: fp32 for the fp32 row kernels (converted once), as it is (bf16) for the vdpbf16ps one
    at::Tensor xb = bf16_dot ? x.contiguous() : x.to(at::kFloat).contiguous();
#if SK_X86_BF16
    if (bf16_dot && M <= kFusedMaxM && (G % 64 == 0 || 64 % G == 0)) {  // fused: codes + fp32 scales, no buffer
      at::Tensor sc32 = scales.to(at::kFloat).contiguous(), q = qvalues.contiguous(), mt = meta.contiguous();
      const c10::BFloat16* xq = xb.data_ptr<c10::BFloat16>();
      const uint8_t* qq = q.data_ptr<uint8_t>();
      const int16_t* mq = mt.data_ptr<int16_t>();
      const float* sq = sc32.data_ptr<float>();
      float* yq = y32.data_ptr<float>();
      at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
        sl4_rows_bf16(xq, qq, mq, sq, yq, M, K, N, b0 * 64, std::min<int64_t>(N, b1 * 64), G);
      });
      if (bias.has_value()) y32.add_(bias->to(at::kFloat).unsqueeze(0));
      return y32.to(x.scalar_type());
    }
#endif
    at::Tensor q = qvalues.contiguous(), mt = meta.contiguous(), sc = scales.contiguous();
    const float* xp = bf16_dot ? nullptr : xb.data_ptr<float>();
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
        std::vector<float> buf(bf16_dot ? 0 : static_cast<size_t>(kRows * half));
        std::vector<c10::BFloat16> bbuf(bf16_dot ? static_cast<size_t>(kRows * half) : 0);
        for (int64_t n = b0 * 64; n < std::min<int64_t>(N, b1 * 64); n += kRows) {
          const int64_t rows = std::min<int64_t>(kRows, N - n);
          // the row kernels index values/meta/out by row inside the block: pass the block's base
#if SK_X86_BF16
          if (bf16_dot) {
            dequantize_rows<S, c10::BFloat16>(isa, qp + n * (K / 4), sp + n * ng, bbuf.data(), rows, K, G);
            sk_linear::sl_rows_bf16(xb.data_ptr<c10::BFloat16>(), bbuf.data(), mp + n * mcols, yp + n, M, K, N, 0,
                                    rows);
            continue;
          }
#endif
          dequantize_rows<S, float>(isa, qp + n * (K / 4), sp + n * ng, buf.data(), rows, K, G);
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
