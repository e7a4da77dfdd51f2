// CPU backward kernels of the sparse matmul family (sparse_kernels/ops/linear.py defines the schemas,
// sparse_kernels/reference/linear.py the math).  All take grad_y [M, N] (M = flattened batch, N = out
// features) and accumulate in fp32; outputs are rounded once to their dtype.
//
// masked_linear_grad_x_cpp(grad_y [M,N], weight [N,K], mask) -> [M,K] (grad_y's dtype)
//   grad_x = grad_y @ (W * M).  mask: bool [N,K] or bit-packed uint8 [N,ceil(K/8)] (bit c%8 of byte c/8).
// masked_linear_grad_w_cpp(grad_y [M,N], x [M,K], weight [N,K], mask) -> [N,K] (weight's dtype)
//   grad_W = (grad_y^T x) * M; masked-out entries are exact zeros (+0.0).
// sparse_linear_grad_x_cpp(grad_y [M,N], values [N,K/2], meta [N,K/16] int16) -> [M,K]
//   grad_x = grad_y @ decompress(values, meta), read from the compressed weight.
// sparse_linear_grad_values_cpp(grad_y [M,N], x [M,K], meta [N,K/16]) -> [N,K/2] (x's dtype)
//   grad_values[n, 2g+j] = sum_m grad_y[m,n] * x[m, 4g + i_j]: grad_y^T x sampled at the kept columns.
//
// Two paths each, chosen by batch size and dtype (gemm_min_m below, with its measurements):
// * direct: column tiles; a tile-local fp32 copy of one row chunk of W*M (or of the expanded 2:4
//   row) feeds up to 16 axpys into an fp32 accumulator tile that stays in L2 (grad_x); grad_W and
//   grad_values accumulate 4 rows x 256 columns of grad_y^T x over M, then mask or gather.  The axpy loops are
//   plain C++ compiled twice, once with AVX-512 enabled (chosen at run time, the build stays
//   portable) and once for the baseline ISA; the compiler vectorizes both.
// * gemm: the BLAS on blocks: grad_x by column blocks (KB_GEMM columns of W*M expanded at a time,
//   so every output element comes from one GEMM and is rounded once), grad_W / grad_values by row
//   blocks of the product, masked or gathered while the block is in cache.
// Neither path ever writes the full W*M (or the full dense 2:4 weight) to memory.
// SPARSE_KERNELS_CPU_ISA=avx2|scalar disables the AVX-512 build of the direct loops;
// SPARSE_KERNELS_CPU_GEMM_MIN_M forces the path (tests cover both on one machine).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "blocked_gemm.h"
#include "linear_checks.h"
#include "simd.h"

#define SKG_INLINE inline __attribute__((always_inline))

namespace sk_linear_grad {

using namespace sk_cpu;

static bool use_avx512() { return best_isa() == Isa::Avx512; }

// Column tile of the direct grad_W / grad_values kernel (kWRows x kCols fp32 = 4 KiB, in L1).
// Multiple of 16 (2:4 meta words).  grad_x tiles: kMRows rows of grad_y, kAccFloats wide.
constexpr int64_t kCols = 256;
constexpr int64_t kMRows = 16;
// grad_x direct: fp32 accumulator floats per tile (x2 for the partial sums): 2 x 128 KiB in L2.
constexpr int64_t kAccFloats = 32768;
// Two-level summation: kChunk terms into a partial tile, partial tiles into the total.  A single
// running fp32 sum over M = 3000 terms had 6x the error of torch's blocked GEMM (2.7e-4 vs 4.2e-5,
// tests/test_linear_grad.py long-batch test); chunked it stays within torch's own error.
constexpr int64_t kChunk = 64;


static SKG_INLINE bool mask_bit(const uint8_t* mrow, bool packed, int64_t c) {
  return packed ? ((mrow[c >> 3] >> (c & 7)) & 1) != 0 : mrow[c] != 0;
}

// ------------------------------------------------------------------ row-chunk loaders (fp32, tile-local)
// dst[0:len] = (W*M)[n, c0:c0+len] in fp32; c0 % 16 == 0.
template <typename T>
static void load_masked_scalar(const T* wr, const uint8_t* mr, bool packed, int64_t c0, int64_t len, float* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = mask_bit(mr, packed, c0 + i) ? to_f32(wr[c0 + i]) : 0.f;
}

// dst[0:len] = decompress(values, meta)[n, c0:c0+len] in fp32; c0 and len multiples of 16.
template <typename T>
static void load_2to4_scalar(const T* vr, const uint16_t* mtr, int64_t c0, int64_t len, float* dst) {
  std::memset(dst, 0, sizeof(float) * len);
  for (int64_t g = 0; g < len / 4; ++g) {
    const int64_t gg = c0 / 4 + g;
    const uint32_t nib = (mtr[gg >> 2] >> (4 * (gg & 3))) & 0xF;
    dst[4 * g + (nib & 3)] = to_f32(vr[2 * gg]);
    dst[4 * g + (nib >> 2)] = to_f32(vr[2 * gg + 1]);
  }
}

#if SK_X86
template <typename T>
SK_AVX512 static void load_masked_avx512(const T* wr, const uint8_t* mr, bool packed, int64_t c0, int64_t len,
                                          float* dst) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const int64_t c = c0 + i;
    const __mmask16 mk = mask16(mr, packed, c);
    _mm512_storeu_ps(dst + i, _mm512_maskz_mov_ps(mk, load16(wr + c)));
  }
  for (; i < len; ++i) dst[i] = mask_bit(mr, packed, c0 + i) ? to_f32(wr[c0 + i]) : 0.f;
}

// One int16 of meta -> a 16-bit lane mask (bit 4j+i set for kept position i of group j); vexpandps
// puts the 8 values in their lanes and zeroes the other 8.  An invalid nibble (i0 >= i1, never
// written by compress_2to4; the checkpoint loader rejects it) maps to no lanes, so the expand
// then shifts later groups' values, where the scalar loader stays inside the group: garbage in,
// garbage out either way, never an out-of-bounds access.
static const uint8_t kNibbleLanes[16] = {0, 0, 0, 0, 0x3, 0, 0, 0, 0x5, 0x6, 0, 0, 0x9, 0xA, 0xC, 0};

template <typename T>
SK_AVX512 static void load_2to4_avx512(const T* vr, const uint16_t* mtr, int64_t c0, int64_t len, float* dst) {
  for (int64_t i = 0; i < len; i += 16) {
    const int64_t q = (c0 + i) / 16;
    const uint32_t w = mtr[q];
    const __mmask16 lanes = static_cast<__mmask16>(kNibbleLanes[w & 0xF] | kNibbleLanes[(w >> 4) & 0xF] << 4 |
                                                   kNibbleLanes[(w >> 8) & 0xF] << 8 | kNibbleLanes[w >> 12] << 12);
    _mm512_storeu_ps(dst + i, _mm512_maskz_expand_ps(lanes, load8(vr + 8 * q)));
  }
}

// row[c0:c0+len] = 0 where the mask is off (c0 % 16 == 0); 16 lanes per masked store.
template <typename T>
SK_AVX512 static void zero_masked_avx512(T* row, const uint8_t* mr, bool packed, int64_t c0, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __mmask16 off = static_cast<__mmask16>(~mask16(mr, packed, c0 + i));
    if (sizeof(T) == 4)
      _mm512_mask_storeu_epi32(reinterpret_cast<void*>(row + c0 + i), off, _mm512_setzero_si512());
    else
      _mm256_mask_storeu_epi16(reinterpret_cast<void*>(row + c0 + i), off, _mm256_setzero_si256());
  }
  for (; i < len; ++i)
    if (!mask_bit(mr, packed, c0 + i)) row[c0 + i] = T(0);
}

// dst[0:len] = (W*M)[n, c0:c0+len] in W's dtype (c0 % 16 == 0).
template <typename T>
SK_AVX512 static void copy_masked_avx512(const T* wr, const uint8_t* mr, bool packed, int64_t c0, int64_t len, T* dst) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __mmask16 mk = mask16(mr, packed, c0 + i);
    if (sizeof(T) == 4)
      _mm512_storeu_si512(reinterpret_cast<void*>(dst + i),
                          _mm512_maskz_loadu_epi32(mk, reinterpret_cast<const void*>(wr + c0 + i)));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_maskz_loadu_epi16(mk, reinterpret_cast<const void*>(wr + c0 + i)));
  }
  for (; i < len; ++i) dst[i] = mask_bit(mr, packed, c0 + i) ? wr[c0 + i] : T(0);
}
#endif

template <typename T>
static void zero_masked(bool avx, T* row, const uint8_t* mr, bool packed, int64_t c0, int64_t len) {
#if SK_X86
  if (avx) return zero_masked_avx512<T>(row, mr, packed, c0, len);
#endif
  for (int64_t i = 0; i < len; ++i)
    if (!mask_bit(mr, packed, c0 + i)) row[c0 + i] = T(0);
}

// acc += part; part = 0.
static SKG_INLINE void fold(float* __restrict acc, float* __restrict part, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    acc[i] += part[i];
    part[i] = 0.f;
  }
}

// ------------------------------------------------------------------ direct grad_x (masked and 2:4)
// Output columns [k0, k0+kb) for grad_y rows [m0, m0+mc): acc[m][:] += gy[m, n] * row_n[k0:k0+kb]
// over all n, the row chunk loaded (masked or expanded) once per n into a tile-local buffer.
struct GradXArgs {
  const float* gy;  // fp32 [M, N]
  const void* w;    // weight [N, K] (masked) or values [N, K/2] (2:4)
  const uint8_t* mask;
  bool packed;
  const uint16_t* meta;  // 2:4 only
  int64_t M, N, K;
};

// buf: 2 * mc * kw + kw floats (kw = the tile width, >= kb): total, partial sums, the row chunk.
template <typename T, typename O, bool SPARSE, bool AVX>
static SKG_INLINE void grad_x_tile_body(const GradXArgs& a, O* out, int64_t m0, int64_t mc, int64_t k0, int64_t kb,
                                        int64_t kw, float* buf) {
  float* acc = buf;
  float* part = buf + mc * kw;
  float* row = buf + 2 * mc * kw;
  std::memset(buf, 0, sizeof(float) * 2 * mc * kw);
  const int64_t mstride = a.packed ? (a.K + 7) / 8 : a.K;
  for (int64_t n = 0; n < a.N; ++n) {
    if (SPARSE) {
      const T* vr = static_cast<const T*>(a.w) + n * (a.K / 2);
      const uint16_t* mtr = a.meta + n * (a.K / 16);
#if SK_X86
      if constexpr (AVX) load_2to4_avx512<T>(vr, mtr, k0, kb, row); else
#endif
      load_2to4_scalar<T>(vr, mtr, k0, kb, row);
    } else {
      const T* wr = static_cast<const T*>(a.w) + n * a.K;
      const uint8_t* mr = a.mask + n * mstride;
#if SK_X86
      if constexpr (AVX) load_masked_avx512<T>(wr, mr, a.packed, k0, kb, row); else
#endif
      load_masked_scalar<T>(wr, mr, a.packed, k0, kb, row);
    }
    for (int64_t m = 0; m < mc; ++m) {
      const float g = a.gy[(m0 + m) * a.N + n];
      float* __restrict ac = part + m * kw;
      const float* __restrict rw = row;
      for (int64_t i = 0; i < kb; ++i) ac[i] += g * rw[i];
    }
    if ((n + 1) % kChunk == 0 || n + 1 == a.N) fold(acc, part, mc * kw);
  }
  for (int64_t m = 0; m < mc; ++m)
    for (int64_t i = 0; i < kb; ++i) out[(m0 + m) * a.K + k0 + i] = static_cast<O>(acc[m * kw + i]);
}

#if SK_X86
template <typename T, typename O, bool SPARSE>
SK_AVX512 static void grad_x_tile_avx512(const GradXArgs& a, O* out, int64_t m0, int64_t mc, int64_t k0, int64_t kb,
                                          int64_t kw, float* buf) {
  grad_x_tile_body<T, O, SPARSE, true>(a, out, m0, mc, k0, kb, kw, buf);
}
#endif
template <typename T, typename O, bool SPARSE>
static void grad_x_tile_plain(const GradXArgs& a, O* out, int64_t m0, int64_t mc, int64_t k0, int64_t kb, int64_t kw,
                              float* buf) {
  grad_x_tile_body<T, O, SPARSE, false>(a, out, m0, mc, k0, kb, kw, buf);
}

template <typename T, bool SPARSE>
static void grad_x_direct(const GradXArgs& a, T* out) {
  const bool avx = use_avx512();
  // Tile width: as wide as kAccFloats allows (long contiguous runs of each weight row: 256-column
  // tiles walked W in 1 KiB pieces 16 KiB apart and ran at 17.9 ms for 4096x4096 fp32 at M=1, load
  // ~5), but at least one column tile per thread.
  const int64_t mrows = std::min(kMRows, a.M);
  const int64_t per_thread = (a.K + at::get_num_threads() - 1) / at::get_num_threads();
  int64_t kw = std::min(kAccFloats / mrows, (per_thread + 15) / 16 * 16);
  kw = std::max<int64_t>(16, kw / 16 * 16);
  const int64_t kt = (a.K + kw - 1) / kw, mt = (a.M + kMRows - 1) / kMRows;
  at::parallel_for(0, kt * mt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(static_cast<size_t>((2 * mrows + 1) * kw + 16));
    float* bp = buf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = (t % kt) * kw, m0 = (t / kt) * kMRows;
      const int64_t kb = std::min(kw, a.K - k0), mc = std::min(kMRows, a.M - m0);
#if SK_X86
      if (avx) { grad_x_tile_avx512<T, T, SPARSE>(a, out, m0, mc, k0, kb, kw, bp); continue; }
#endif
      grad_x_tile_plain<T, T, SPARSE>(a, out, m0, mc, k0, kb, kw, bp);
    }
  });
}

// ------------------------------------------------------------------ direct grad_W / grad_values
// Rows [n0, n0+nr) (nr <= 4) x columns [k0, k0+kb): acc[r][:] = sum_m gyT[n, m] * x[m, k0:k0+kb],
// then stored masked (grad_W) or gathered at the kept columns (grad_values).
struct GradWArgs {
  const float* gyT;  // fp32 [N, M]
  const float* x;    // fp32 [M, K]
  const uint8_t* mask;
  bool packed;
  const uint16_t* meta;  // set: grad_values
  int64_t M, N, K;
};
constexpr int64_t kWRows = 4;

template <typename O, bool AVX>
static SKG_INLINE void grad_w_tile_body(const GradWArgs& a, O* out, int64_t n0, int64_t nr, int64_t k0, int64_t kb) {
  alignas(64) float acc[kWRows * kCols];
  alignas(64) float part[kWRows * kCols];
  std::memset(acc, 0, sizeof(acc));
  std::memset(part, 0, sizeof(part));
  for (int64_t m = 0; m < a.M; ++m) {
    const float* __restrict xr = a.x + m * a.K + k0;
    for (int64_t r = 0; r < nr; ++r) {
      const float g = a.gyT[(n0 + r) * a.M + m];
      float* __restrict ac = part + r * kCols;
      for (int64_t i = 0; i < kb; ++i) ac[i] += g * xr[i];
    }
    if ((m + 1) % kChunk == 0 || m + 1 == a.M) fold(acc, part, kWRows * kCols);
  }
  if (a.meta != nullptr) {
    for (int64_t r = 0; r < nr; ++r) {
      const uint16_t* mtr = a.meta + (n0 + r) * (a.K / 16);
      O* o = out + (n0 + r) * (a.K / 2) + k0 / 2;
      for (int64_t g = 0; g < kb / 4; ++g) {
        const int64_t gg = k0 / 4 + g;
        const uint32_t nib = (mtr[gg >> 2] >> (4 * (gg & 3))) & 0xF;
        o[2 * g] = static_cast<O>(acc[r * kCols + 4 * g + (nib & 3)]);
        o[2 * g + 1] = static_cast<O>(acc[r * kCols + 4 * g + (nib >> 2)]);
      }
    }
    return;
  }
  const int64_t mstride = a.packed ? (a.K + 7) / 8 : a.K;
  for (int64_t r = 0; r < nr; ++r) {
    O* o = out + (n0 + r) * a.K;
    for (int64_t i = 0; i < kb; ++i) o[k0 + i] = static_cast<O>(acc[r * kCols + i]);
    zero_masked<O>(AVX, o, a.mask + (n0 + r) * mstride, a.packed, k0, kb);
  }
}

#if SK_X86
template <typename O>
SK_AVX512 static void grad_w_tile_avx512(const GradWArgs& a, O* out, int64_t n0, int64_t nr, int64_t k0, int64_t kb) {
  grad_w_tile_body<O, true>(a, out, n0, nr, k0, kb);
}
#endif
template <typename O>
static void grad_w_tile_plain(const GradWArgs& a, O* out, int64_t n0, int64_t nr, int64_t k0, int64_t kb) {
  grad_w_tile_body<O, false>(a, out, n0, nr, k0, kb);
}

// Tiles ordered column block outer, row block inner: one thread walks down all rows of a column
// block, so x[:, k0:k0+kb] (M x 1 KiB) stays in L2 while gyT streams.
template <typename O>
static void grad_w_direct(const GradWArgs& a, O* out) {
  const bool avx = use_avx512();
  const int64_t kt = (a.K + kCols - 1) / kCols, nt = (a.N + kWRows - 1) / kWRows;
  at::parallel_for(0, kt * nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = (t / nt) * kCols, n0 = (t % nt) * kWRows;
      const int64_t kb = std::min(kCols, a.K - k0), nr = std::min(kWRows, a.N - n0);
#if SK_X86
      if (avx) { grad_w_tile_avx512<O>(a, out, n0, nr, k0, kb); continue; }
#endif
      grad_w_tile_plain<O>(a, out, n0, nr, k0, kb);
    }
  });
}

// ------------------------------------------------------------------ GEMM paths
// KB_GEMM = 256 columns of W*M expanded per BLAS call (N x 256 tile: 4 MiB fp32 at N = 4096); the
// forward's blocked GEMM uses the same tile size (csrc/cpu/blocked_gemm.h, kGemmBlockRows).
constexpr int64_t kGemmCols = 256;
constexpr int64_t kGemmRows = 256;

template <typename T, bool SPARSE>
static void expand_cols(bool avx, const GradXArgs& a, T* tile, int64_t k0, int64_t kb, int64_t n0, int64_t n1) {
  const int64_t mstride = a.packed ? (a.K + 7) / 8 : a.K;
  for (int64_t n = n0; n < n1; ++n) {
    T* d = tile + n * kb;
    if (SPARSE) {
      const T* vr = static_cast<const T*>(a.w) + n * (a.K / 2);
      const uint16_t* mtr = a.meta + n * (a.K / 16);
      std::fill(d, d + kb, T(0));
      for (int64_t g = 0; g < kb / 4; ++g) {
        const int64_t gg = k0 / 4 + g;
        const uint32_t nib = (mtr[gg >> 2] >> (4 * (gg & 3))) & 0xF;
        d[4 * g + (nib & 3)] = vr[2 * gg];
        d[4 * g + (nib >> 2)] = vr[2 * gg + 1];
      }
    } else {
      const T* wr = static_cast<const T*>(a.w) + n * a.K;
      const uint8_t* mr = a.mask + n * mstride;
#if SK_X86
      if (avx) {
        copy_masked_avx512<T>(wr, mr, a.packed, k0, kb, d);
        continue;
      }
#endif
      for (int64_t i = 0; i < kb; ++i) d[i] = mask_bit(mr, a.packed, k0 + i) ? wr[k0 + i] : T(0);
    }
  }
}

// grad_x [M, K] = gy [M, N] @ W_tile [N, kb], one column block at a time.
template <typename T, bool SPARSE>
static at::Tensor grad_x_gemm(const GradXArgs& a, const at::Tensor& gy) {
  const bool avx = use_avx512();
  at::Tensor gx = at::empty({a.M, a.K}, gy.options());
  at::Tensor tile = at::empty({a.N, std::min(a.K, kGemmCols)}, gy.options());
  for (int64_t k0 = 0; k0 < a.K; k0 += kGemmCols) {
    const int64_t kb = std::min(kGemmCols, a.K - k0);
    at::Tensor t = tile.view({-1}).narrow(0, 0, a.N * kb).view({a.N, kb});
    T* tp = t.data_ptr<T>();
    at::parallel_for(0, a.N, 64, [&](int64_t n0, int64_t n1) { expand_cols<T, SPARSE>(avx, a, tp, k0, kb, n0, n1); });
    at::Tensor out = gx.narrow(1, k0, kb);
    at::mm_out(out, gy, t);
  }
  return gx;
}

// Row blocks of P = gy^T x (BLAS, gy's dtype: one rounding of an fp32-accumulated dot product), then
// masked in place (grad_W) or gathered at the kept columns (grad_values) while the block is in cache.
template <typename T>
static void masked_rows_inplace(bool avx, T* gw, const uint8_t* mask, bool packed, int64_t K, int64_t n0, int64_t n1) {
  const int64_t mstride = packed ? (K + 7) / 8 : K;
  for (int64_t n = n0; n < n1; ++n) zero_masked<T>(avx, gw + n * K, mask + n * mstride, packed, 0, K);
}

template <typename T>
static void gather_rows(const T* p, const uint16_t* meta, T* gv, int64_t K, int64_t n0, int64_t n1, int64_t pn0) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* pr = p + (n - pn0) * K;
    const uint16_t* mtr = meta + n * (K / 16);
    T* o = gv + n * (K / 2);
    for (int64_t g = 0; g < K / 4; ++g) {
      const uint32_t nib = (mtr[g >> 2] >> (4 * (g & 3))) & 0xF;
      o[2 * g] = pr[4 * g + (nib & 3)];
      o[2 * g + 1] = pr[4 * g + (nib >> 2)];
    }
  }
}

// Batch size from which the GEMM path runs.  SPARSE_KERNELS_CPU_GEMM_MIN_M overrides.
// Measured with benchmarks/bench_linear_grad.py, 4096x4096, 2-core AMD EPYC (Zen 5), load average
// 3.5..5.8 (shared box: +-30%), median ms direct | gemm (results/cpu/bench_linear_grad_cpu_gradx_m1_m16.json and an earlier run):
//   grad_x masked fp32: M=1 14.7|19.6  M=16 29.1|37.8  M=256 463|107
//   grad_x 2:4    fp32: M=1 15.5|15.8  M=16 42.1|28.7  M=256 1081|223
//   grad_x masked bf16: M=1 6.9|17.2   M=16 18.0|14.7  M=256 426|51
//   grad_x 2:4    bf16: M=1 7.0|15.7   M=16 25.2|14.8  M=256 458|50
//   -> direct below M=16, GEMM from 16 (M=2..8 not measured with the current direct kernel).
//   Re-measured alone (1-min load 1.6 at the start, falling after the previous benchmark) once the
//   build had OpenMP (2 threads; bench_linear_grad_cpu.json),
//   M=16 direct|gemm: grad_x masked fp32 14.3|16.0, 2:4 fp32 14.5|14.2, masked bf16 16.9|10.0,
//   2:4 bf16 10.9|11.6: within noise of the threshold, kept.
//   grad_W / grad_values, M=16: masked fp32 99.8|75.7, bf16 48.4|31.8; 2:4 fp32 57.4|28.6,
//   bf16 38.6|13.9 -> GEMM always.  fp16 stays direct (no fast fp16 GEMM on this CPU; the forward
//   measured 34 vs 7 ms at M=8).
static int64_t gemm_min_m(at::ScalarType t, bool grad_x) {
  if (t == at::kHalf) return gemm_min_m_or(INT64_MAX);
  return gemm_min_m_or(grad_x ? 16 : 1);
}

// ------------------------------------------------------------------ ATen wrappers

static void check_grad_y(const at::Tensor& gy, int64_t N) {
  TORCH_CHECK_VALUE(gy.dim() == 2, "grad_y: expected a 2-D tensor [M, N] at the op level, got ", gy.dim(), "-D");
  TORCH_CHECK_VALUE(gy.device().is_cpu(), "grad_y: must be a CPU tensor");
  TORCH_CHECK_TYPE(gy.scalar_type() == at::kFloat || gy.scalar_type() == at::kBFloat16 || gy.scalar_type() == at::kHalf,
                   "grad_y: dtype ", gy.scalar_type(), " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK_VALUE(gy.size(1) == N, "grad_y: last dim is ", gy.size(1), " but the weight has ", N,
                    " output features (rows)");
}

static void check_same(const at::Tensor& t, const char* name, const at::Tensor& gy) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": must be a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == gy.scalar_type(), name, ": dtype ", t.scalar_type(),
                   " does not match grad_y's dtype ", gy.scalar_type());
}

static void check_x(const at::Tensor& x, const at::Tensor& gy, int64_t K, const char* what) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K] at the op level, got ", x.dim(), "-D");
  check_same(x, "x", gy);
  TORCH_CHECK_VALUE(x.size(0) == gy.size(0), "x: has ", x.size(0), " rows but grad_y has ", gy.size(0),
                    "; they must match");
  TORCH_CHECK_VALUE(x.size(1) == K, "x: last dim is ", x.size(1), " but ", what, " has ", K, " input features");
}

static const uint8_t* check_mask(const at::Tensor& mask, int64_t N, int64_t K, at::Tensor& contig, bool& packed) {
  packed = mask.scalar_type() == at::kByte;
  TORCH_CHECK_TYPE(packed || mask.scalar_type() == at::kBool, "mask: dtype ", mask.scalar_type(),
                   " is not supported; expected bool [N, K] or bit-packed uint8 [N, ceil(K/8)]");
  const int64_t mcols = packed ? (K + 7) / 8 : K;
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == N && mask.size(1) == mcols, "mask: expected shape (", N, ", ",
                    mcols, "), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device().is_cpu(), "mask: must be a CPU tensor");
  contig = mask.contiguous();
  return packed ? contig.data_ptr<uint8_t>() : reinterpret_cast<const uint8_t*>(contig.data_ptr<bool>());
}

static void check_meta(const at::Tensor& meta, int64_t N, int64_t K) {
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "meta: dtype ", meta.scalar_type(),
                   " is not supported; expected int16");
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == K / 16, "meta: expected shape (", N, ", ",
                    K / 16, "), got ", meta.sizes());
  TORCH_CHECK_VALUE(meta.device().is_cpu(), "meta: must be a CPU tensor");
}

template <bool SPARSE>
static at::Tensor grad_x_impl(const at::Tensor& gy, const at::Tensor& w, const uint8_t* mask, bool packed,
                              const at::Tensor& meta, int64_t N, int64_t K) {
  const int64_t M = gy.size(0);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, K}, gy.options());
  at::Tensor g = gy.contiguous();
  GradXArgs a{nullptr, w.data_ptr(), mask, packed,
              SPARSE ? reinterpret_cast<const uint16_t*>(meta.data_ptr<int16_t>()) : nullptr, M, N, K};
  at::Tensor out;
  if (M >= gemm_min_m(gy.scalar_type(), true)) {
    dispatch_float(gy.scalar_type(), [&](auto tag) { out = grad_x_gemm<decltype(tag), SPARSE>(a, g); });
    return out;
  }
  at::Tensor g32 = g.to(at::kFloat);
  a.gy = g32.data_ptr<float>();
  out = at::empty({M, K}, gy.options());
  dispatch_float(gy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    grad_x_direct<T, SPARSE>(a, out.data_ptr<T>());
  });
  return out;
}

at::Tensor masked_linear_grad_x_cpp(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor [N, K], got ", weight.dim(), "-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  check_grad_y(grad_y, N);
  check_same(weight, "weight", grad_y);
  at::Tensor mk;
  bool packed;
  const uint8_t* mp = check_mask(mask, N, K, mk, packed);
  at::Tensor w = weight.contiguous();
  return grad_x_impl<false>(grad_y, w, mp, packed, at::Tensor(), N, K);
}

at::Tensor sparse_linear_grad_x_cpp(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(values.dim() == 2, "values: expected a 2-D tensor [N, K/2], got ", values.dim(), "-D");
  TORCH_CHECK_VALUE(values.size(1) % 8 == 0, "values: the number of columns must be a multiple of 8 (K % 16 == 0), got ",
                    values.size(1));
  const int64_t N = values.size(0), K = sk_linear::packed_cols(values, 2, "values");
  check_meta(meta, N, K);
  check_grad_y(grad_y, N);
  check_same(values, "values", grad_y);
  at::Tensor v = values.contiguous(), mt = meta.contiguous();
  sk_linear::check_meta_nibbles(mt);
  return grad_x_impl<true>(grad_y, v, nullptr, false, mt, N, K);
}

// grad_W (mask given) or grad_values (meta given).
static at::Tensor grad_w_impl(const at::Tensor& gy, const at::Tensor& x, const uint8_t* mask, bool packed,
                              const at::Tensor& meta, int64_t N, int64_t K) {
  const bool sparse = meta.defined();
  const int64_t M = gy.size(0);
  at::Tensor out = at::empty({N, sparse ? K / 2 : K}, x.options());
  if (N == 0 || K == 0) return out;
  if (M == 0) return out.zero_();
  const uint16_t* mtp = sparse ? reinterpret_cast<const uint16_t*>(meta.data_ptr<int16_t>()) : nullptr;
  at::Tensor g = gy.contiguous(), xc = x.contiguous();
  if (M >= gemm_min_m(gy.scalar_type(), false)) {
    const bool avx = use_avx512();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      at::Tensor tile = sparse ? at::empty({std::min(N, kGemmRows), K}, x.options()) : at::Tensor();
      for (int64_t n0 = 0; n0 < N; n0 += kGemmRows) {
        const int64_t nb = std::min(kGemmRows, N - n0);
        at::Tensor p = sparse ? tile.narrow(0, 0, nb) : out.narrow(0, n0, nb);
        at::mm_out(p, g.narrow(1, n0, nb).t(), xc);
        T* pp = p.data_ptr<T>();
        T* op = out.data_ptr<T>();
        at::parallel_for(n0, n0 + nb, 16, [&](int64_t a, int64_t b) {
          if (sparse)
            gather_rows<T>(pp, mtp, op, K, a, b, n0);
          else
            masked_rows_inplace<T>(avx, op, mask, packed, K, a, b);
        });
      }
    });
    return out;
  }
  at::Tensor gyT = g.t().to(at::kFloat).contiguous(), x32 = xc.to(at::kFloat).contiguous();
  GradWArgs a{gyT.data_ptr<float>(), x32.data_ptr<float>(), mask, packed, mtp, M, N, K};
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    grad_w_direct<T>(a, out.data_ptr<T>());
  });
  return out;
}

at::Tensor masked_linear_grad_w_cpp(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor [N, K], got ", weight.dim(), "-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  check_grad_y(grad_y, N);
  check_same(weight, "weight", grad_y);
  check_x(x, grad_y, K, "weight");
  at::Tensor mk;
  bool packed;
  const uint8_t* mp = check_mask(mask, N, K, mk, packed);
  return grad_w_impl(grad_y, x, mp, packed, at::Tensor(), N, K);
}

at::Tensor sparse_linear_grad_values_cpp(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(meta.dim() == 2, "meta: expected a 2-D tensor [N, K/16], got ", meta.dim(), "-D");
  const int64_t N = meta.size(0), K = sk_linear::packed_cols(meta, 16, "meta");
  check_meta(meta, N, K);
  check_grad_y(grad_y, N);
  check_x(x, grad_y, K, "the 2:4 weight (16 * meta.shape[1])");
  at::Tensor mt = meta.contiguous();
  sk_linear::check_meta_nibbles(mt);
  return grad_w_impl(grad_y, x, nullptr, false, mt, N, K);
}

}  // namespace sk_linear_grad

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("masked_linear_grad_x_cpp", &sk_linear_grad::masked_linear_grad_x_cpp);
  m.impl("masked_linear_grad_w_cpp", &sk_linear_grad::masked_linear_grad_w_cpp);
  m.impl("sparse_linear_grad_x_cpp", &sk_linear_grad::sparse_linear_grad_x_cpp);
  m.impl("sparse_linear_grad_values_cpp", &sk_linear_grad::sparse_linear_grad_values_cpp);
}
