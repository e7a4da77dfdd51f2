// SparseGPT block update on the CPU: sparse_kernels::sparsegpt_block_update_cpp.
//
// The algorithm is the column loop of sparse_kernels/reference/sparsegpt.py.  Rows are
// independent (column i's update only touches row r's later columns), so each thread takes
// tiles of rows, copies a tile into a small row-major buffer that stays in L1/L2, and runs
// the whole loop over the B columns on it.  Hinv1's row i is shared by every row of the
// tile; the update w[j] -= err * h[j] for j > i is a contiguous, vectorizable loop.  It also
// runs for kept weights (err == 0), like the reference: on random masks a branch skipping
// them mispredicts half the time and cost more than it saved (1 thread, 4096 x 128 block,
// 50% mask, AVX2: 6.4 ms with the branch, 3.4 ms without; CPU time on the 2-core dev box).
// A column-major tile (rows innermost, broadcast h[j]) measured 12 ms against 7 ms for this
// row-major layout, both with the branch.  Branch-free keep/rank selection then took the
// 4096 x 128 block from ~6 to ~4 ms (50% mask) and ~10 to ~5 ms (2:4); padding rows to a
// multiple of 8 to drop the scalar tail of the update loop did not help (measured, dropped).
//
// Numerics match the reference op for op (w*w/(d*d) scores, err = (w - q)/d, w - err*h with
// the product rounded first; no FMA); losses are summed in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace sparse_kernels {
namespace cpu {

// Rows per tile: 16 rows x B=128 floats = 8 KiB, so the tile and Hinv1's current row sit in
// L1 while the tile is swept B times.
constexpr int64_t kTileRows = 16;

// Rank of position j in scores s[0..m): how many positions beat it (larger, or equal and lower).
static inline int64_t rank_in_group(const float* s, int64_t m, int64_t j) {
  int64_t r = 0;
  for (int64_t k = 0; k < m; ++k) {
    r += static_cast<int64_t>(s[k] > s[j]) | (static_cast<int64_t>(s[k] == s[j]) & static_cast<int64_t>(k < j));
  }
  return r;
}

// q = w if keep else +0.0, without a branch (a 50% random mask mispredicts a branch half the time).
static inline float keep_or_zero(float w, uint8_t keep) {
  uint32_t bits;
  std::memcpy(&bits, &w, sizeof bits);
  bits &= 0u - static_cast<uint32_t>(keep);
  float q;
  std::memcpy(&q, &bits, sizeof q);
  return q;
}

// Joint int4 quantization (sparsegpt_block_update_int4): the outputs and settings the int4
// variant of the row kernel adds.  scale_kind: 0 float32, 1 float16, 2 bfloat16 scales.
struct Int4Block {
  int64_t group = 0;
  int scale_kind = 0;
  bool* keep = nullptr;     // [rows, B]
  int8_t* codes = nullptr;  // [rows, B]
  float* scales = nullptr;  // [rows, B / group]
};

// The reference's int4_group_scale: amax / 7 (1 unless amax > 0, so NaN -> 1), rounded to the
// scale dtype (c10's conversions round to nearest even, as Tensor.to does) and back; a scale
// that underflows to 0 becomes the dtype's smallest normal.
static inline float int4_group_scale(float amax, int kind) {
  float s = amax > 0.0f ? amax / 7.0f : 1.0f;
  if (kind == 1) s = static_cast<float>(c10::Half(s));
  if (kind == 2) s = static_cast<float>(c10::BFloat16(s));
  if (!(s > 0.0f)) s = kind == 1 ? 6.103515625e-05f : std::numeric_limits<float>::min();
  return s;
}

// Raw kernel over rows [r0, r1).  W1: row stride ldw, unit column stride.  H: [B, B] with
// row stride ldh, unit column stride.  mask: [rows, B] contiguous (nullptr when m > 0).
// Q, E: [rows, B] contiguous; loss: [rows].  kInt4: each kept weight becomes
// clamp(round(w / s), -8, 7) * s (q4 below), s set per row at each group start from the
// group's max |w| (kept weights only when m == 0), as the reference's
// sparsegpt_block_update_int4.  On x86-64 GCC also compiles an AVX2 clone (picked at load
// time); no FMA, so rounding matches the reference's multiply then subtract.
template <bool kInt4>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void sparsegpt_block_rows(const float* W1, int64_t ldw, const float* H, int64_t ldh, int64_t B,
                                 const bool* mask, int64_t n, int64_t m, float* Q, float* E, float* loss,
                                 int64_t r0, int64_t r1, const Int4Block& q4) {
  std::vector<float> buf(kTileRows * B);
  std::vector<uint8_t> keep(kTileRows * B);
  std::vector<float> dd(B), score(std::max<int64_t>(m, 1));
  for (int64_t j = 0; j < B; ++j) dd[j] = H[j * ldh + j] * H[j * ldh + j];
  float scale[kTileRows];

  for (int64_t t0 = r0; t0 < r1; t0 += kTileRows) {
    const int64_t tr = std::min(kTileRows, r1 - t0);
    double acc[kTileRows];
    for (int64_t r = 0; r < tr; ++r) {
      const float* src = W1 + (t0 + r) * ldw;
      std::copy(src, src + B, buf.data() + r * B);
      acc[r] = 0.0;
      if (m == 0) {
        const bool* ms = mask + (t0 + r) * B;
        for (int64_t j = 0; j < B; ++j) keep[r * B + j] = ms[j] ? 1 : 0;
      }
    }
    for (int64_t i = 0; i < B; ++i) {
      const float* __restrict__ h = H + i * ldh;
      const float d = h[i];
      const bool group_start = m > 0 && i % m == 0;
      for (int64_t r = 0; r < tr; ++r) {
        float* __restrict__ w = buf.data() + r * B;
        uint8_t* kp = keep.data() + r * B;
        if (group_start) {
          for (int64_t k = 0; k < m; ++k) score[k] = (w[i + k] * w[i + k]) / dd[i + k];
          for (int64_t k = 0; k < m; ++k) kp[i + k] = rank_in_group(score.data(), m, k) < n ? 1 : 0;
        }
        const float wi = w[i];
        float q;
        if constexpr (kInt4) {
          if (i % q4.group == 0) {
            float amax = 0.0f;  // NaN-propagating, as torch.amax (|w| * keep: inf * 0 is NaN too)
            for (int64_t k = i; k < i + q4.group; ++k) {
              const float v = m == 0 ? std::fabs(w[k]) * static_cast<float>(kp[k]) : std::fabs(w[k]);
              amax = (v > amax || std::isnan(v)) && !std::isnan(amax) ? v : amax;
            }
            scale[r] = int4_group_scale(amax, q4.scale_kind);
            q4.scales[(t0 + r) * (B / q4.group) + i / q4.group] = scale[r];
          }
          const float s = scale[r];
          float c = std::nearbyint(wi / s);
          c = c < -8.0f ? -8.0f : (c > 7.0f ? 7.0f : c);
          c = kp[i] ? c + 0.0f : 0.0f;
          q4.codes[(t0 + r) * B + i] = std::isnan(c) ? int8_t{0} : static_cast<int8_t>(c);
          q = c * s;
        } else {
          q = keep_or_zero(wi, kp[i]);
        }
        const float diff = wi - q;
        const float err = diff / d;
        Q[(t0 + r) * B + i] = q;
        E[(t0 + r) * B + i] = err;
        acc[r] += static_cast<double>((diff * diff) / (d * d));
        for (int64_t j = i + 1; j < B; ++j) w[j] -= err * h[j];
      }
    }
    for (int64_t r = 0; r < tr; ++r) {
      loss[t0 + r] = static_cast<float>(acc[r] / 2.0);
      if constexpr (kInt4) {
        for (int64_t j = 0; j < B; ++j) q4.keep[(t0 + r) * B + j] = keep[r * B + j] != 0;
      }
    }
  }
}

// The checks both block ops share; returns the contiguous mask (undefined when m > 0).
static at::Tensor check_block(const char* op, const at::Tensor& W1, const at::Tensor& Hinv1,
                              const c10::optional<at::Tensor>& mask1, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(W1.dim() == 2, "W1: expected a 2-D tensor [rows, B], got shape ", W1.sizes());
  TORCH_CHECK_TYPE(W1.scalar_type() == at::kFloat, "W1: dtype ", W1.scalar_type(), " is not supported; expected float32");
  TORCH_CHECK_TYPE(Hinv1.scalar_type() == at::kFloat, "Hinv1: dtype ", Hinv1.scalar_type(),
                   " is not supported; expected float32");
  TORCH_CHECK_VALUE(W1.device().is_cpu() && Hinv1.device().is_cpu(), op, ": tensors must be on the CPU");
  const int64_t B = W1.size(1);
  TORCH_CHECK_VALUE(Hinv1.dim() == 2 && Hinv1.size(0) == B && Hinv1.size(1) == B, "Hinv1: shape ", Hinv1.sizes(),
                    " must be (B, B) = (", B, ", ", B, ")");
  TORCH_CHECK_VALUE(m >= 0, "m: got ", m, ", expected 0 (use mask1) or a group size M > 0");
  at::Tensor mask;
  if (m == 0) {
    TORCH_CHECK_VALUE(mask1.has_value() && mask1->defined(), "mask1: is required when m == 0");
    mask = *mask1;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask1: dtype ", mask.scalar_type(), " is not supported; expected bool");
    TORCH_CHECK_VALUE(mask.sizes() == W1.sizes(), "mask1: shape ", mask.sizes(), " must equal W1's shape ", W1.sizes());
    TORCH_CHECK_VALUE(mask.device().is_cpu(), "mask1: must be on the CPU");
    mask = mask.contiguous();
  } else {
    TORCH_CHECK_VALUE(0 < n && n < m, "n: got n=", n, ", m=", m, "; N:M pruning needs 0 < n < m");
    TORCH_CHECK_VALUE(B % m == 0, "W1: the block width (W1.shape[1]) must be a multiple of ", m, ", got ", B);
  }
  return mask;
}

// Runs the row kernel over tiles of rows in parallel; Q, E, L are allocated by the caller.
template <bool kInt4>
static void run_block(const at::Tensor& W1, const at::Tensor& Hinv1, const at::Tensor& mask, int64_t n, int64_t m,
                      at::Tensor& Q, at::Tensor& E, at::Tensor& L, const Int4Block& q4) {
  const int64_t rows = W1.size(0), B = W1.size(1);
  at::Tensor w = W1.stride(1) == 1 ? W1 : W1.contiguous();
  at::Tensor h = Hinv1.stride(1) == 1 ? Hinv1 : Hinv1.contiguous();
  const float* wp = w.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const bool* mp = m == 0 ? mask.data_ptr<bool>() : nullptr;
  float* qp = Q.data_ptr<float>();
  float* ep = E.data_ptr<float>();
  float* lp = L.data_ptr<float>();
  const int64_t ldw = w.stride(0), ldh = h.stride(0);
  const int64_t ntiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, ntiles, 1, [&](int64_t t_begin, int64_t t_end) {
    sparsegpt_block_rows<kInt4>(wp, ldw, hp, ldh, B, mp, n, m, qp, ep, lp, t_begin * kTileRows,
                                std::min(rows, t_end * kTileRows), q4);
  });
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_block_update_cpp(
    const at::Tensor& W1, const at::Tensor& Hinv1, const c10::optional<at::Tensor>& mask1, int64_t n,
    int64_t m) {
  const at::Tensor mask = check_block("sparsegpt_block_update_cpp", W1, Hinv1, mask1, n, m);
  const int64_t rows = W1.size(0), B = W1.size(1);
  auto Q = at::empty({rows, B}, W1.options());
  auto E = at::empty({rows, B}, W1.options());
  auto L = at::zeros({rows}, W1.options());
  if (rows > 0 && B > 0) run_block<false>(W1, Hinv1, mask, n, m, Q, E, L, Int4Block{});
  return {Q, E, L};
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sparsegpt_block_update_int4_cpp(const at::Tensor& W1, const at::Tensor& Hinv1, const c10::optional<at::Tensor>& mask1,
                                int64_t n, int64_t m, int64_t group_size, at::ScalarType scale_dtype) {
  const at::Tensor mask = check_block("sparsegpt_block_update_int4_cpp", W1, Hinv1, mask1, n, m);
  const int64_t rows = W1.size(0), B = W1.size(1);
  TORCH_CHECK_VALUE(group_size > 0 && B % group_size == 0, "group_size: got ", group_size,
                    "; it must be a positive int dividing the block width (W1.shape[1]) ", B);
  TORCH_CHECK_TYPE(scale_dtype == at::kFloat || scale_dtype == at::kHalf || scale_dtype == at::kBFloat16,
                   "scale_dtype: got ", scale_dtype, ", expected float32, float16 or bfloat16");
  auto Q = at::empty({rows, B}, W1.options());
  auto E = at::empty({rows, B}, W1.options());
  auto L = at::zeros({rows}, W1.options());
  auto K = at::empty({rows, B}, W1.options().dtype(at::kBool));
  auto C = at::empty({rows, B}, W1.options().dtype(at::kChar));
  auto S = at::empty({rows, B / group_size}, W1.options());
  if (rows > 0 && B > 0) {
    Int4Block q4;
    q4.group = group_size;
    q4.scale_kind = scale_dtype == at::kHalf ? 1 : (scale_dtype == at::kBFloat16 ? 2 : 0);
    q4.keep = K.data_ptr<bool>();
    q4.codes = C.data_ptr<int8_t>();
    q4.scales = S.data_ptr<float>();
    run_block<true>(W1, Hinv1, mask, n, m, Q, E, L, q4);
  }
  return {Q, E, L, K, C, S};
}


// ---------------------------------------------------------------------------------------------
// Lazy update W[:, later] -= Err1 @ U[block, later], skipping Err1's zeros:
// sparse_kernels::sparsegpt_lazy_update_cpp.
//
// err = (w - q) / d is exactly zero at every kept weight, so half of Err1 (50% or 2:4) is zero
// and a dense GEMM spends half its FLOPs on them.  Each row's nonzero (index, value) pairs are
// listed once per tile of rows; U is repacked once per call into column chunks of kChunk
// floats ([chunk][B][kChunk], contiguous, the last chunk zero-padded) so a chunk is one 16 KiB
// run in L1 (U's own rows lie ldu floats apart, which maps them onto a few cache sets); then
// every pair of rows accumulates its own terms into 8 AVX2 registers with FMA.
constexpr int64_t kChunk = 32;
constexpr int64_t kLazyTileRows = 64;

#if SK_X86
// acc[0..4) -= v * u[0..32): four 8-float FMA chains.
SK_AVX2 static inline __attribute__((always_inline)) void fnma32(__m256 (&acc)[4], float v, const float* u) {
  const __m256 vv = _mm256_set1_ps(v);
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_fnmadd_ps(vv, _mm256_loadu_ps(u + 8 * q), acc[q]);
}

// Two rows (w1 may be null) against one chunk of U: each row's own terms, interleaved while
// both have terms left so eight independent chains keep the FMA units busy.
SK_AVX2 static void lazy_pair_avx2(float* w0, float* w1, const float* Uc, const int32_t* i0, const float* v0,
                                   int64_t n0, const int32_t* i1, const float* v1, int64_t n1) {
  __m256 a[4], b[4];
  for (int q = 0; q < 4; ++q) {
    a[q] = _mm256_loadu_ps(w0 + 8 * q);
    b[q] = w1 != nullptr ? _mm256_loadu_ps(w1 + 8 * q) : _mm256_setzero_ps();
  }
  const int64_t both = std::min(n0, n1);
  int64_t k = 0;
  for (; k < both; ++k) {
    fnma32(a, v0[k], Uc + static_cast<int64_t>(i0[k]) * kChunk);
    fnma32(b, v1[k], Uc + static_cast<int64_t>(i1[k]) * kChunk);
  }
  for (int64_t j = k; j < n0; ++j) fnma32(a, v0[j], Uc + static_cast<int64_t>(i0[j]) * kChunk);
  for (int64_t j = k; j < n1; ++j) fnma32(b, v1[j], Uc + static_cast<int64_t>(i1[j]) * kChunk);
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(w0 + 8 * q, a[q]);
    if (w1 != nullptr) _mm256_storeu_ps(w1 + 8 * q, b[q]);
  }
}
#endif

// Portable path: the same terms, one row and one chunk at a time.
static void lazy_row_scalar(float* w, const float* Uc, const int32_t* idx, const float* val, int64_t nnz) {
  float acc[kChunk];
  for (int64_t c = 0; c < kChunk; ++c) acc[c] = w[c];
  for (int64_t k = 0; k < nnz; ++k) {
    const float v = val[k];
    const float* u = Uc + static_cast<int64_t>(idx[k]) * kChunk;
    for (int64_t c = 0; c < kChunk; ++c) acc[c] -= v * u[c];
  }
  for (int64_t c = 0; c < kChunk; ++c) w[c] = acc[c];
}

// Rows [r0, r1) of W (row stride ldw) against the packed U (nchunks x B x kChunk), L columns.
static void lazy_update_rows(float* W, int64_t ldw, const float* E, int64_t lde, const float* Up, int64_t B,
                             int64_t L, int64_t r0, int64_t r1) {
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
  std::vector<int32_t> idx(kLazyTileRows * B);
  std::vector<float> val(kLazyTileRows * B);
  std::vector<int64_t> cnt(kLazyTileRows);
  float pad[2][kChunk];
#if SK_X86
  const bool avx2 = sk_cpu::best_isa() != sk_cpu::Isa::Scalar;
#endif
  for (int64_t t0 = r0; t0 < r1; t0 += kLazyTileRows) {
    const int64_t tr = std::min(kLazyTileRows, r1 - t0);
    for (int64_t r = 0; r < tr; ++r) {
      const float* e = E + (t0 + r) * lde;
      int64_t c = 0;
      for (int64_t k = 0; k < B; ++k) {
        idx[r * B + c] = static_cast<int32_t>(k);
        val[r * B + c] = e[k];
        c += e[k] != 0.0f;
      }
      cnt[r] = c;
    }
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t c0 = ch * kChunk, nc = std::min(kChunk, L - c0);
      const float* Uc = Up + ch * B * kChunk;
      for (int64_t r = 0; r < tr; r += 2) {
        const bool two = r + 1 < tr;
        float* w0 = W + (t0 + r) * ldw + c0;
        float* w1 = two ? w0 + ldw : nullptr;
        float* d0 = w0;
        float* d1 = w1;
        if (nc < kChunk) {  // partial last chunk: work on zero-padded copies
          std::fill(pad[0], pad[0] + 2 * kChunk, 0.0f);
          std::copy(w0, w0 + nc, pad[0]);
          if (two) std::copy(w1, w1 + nc, pad[1]);
          d0 = pad[0];
          d1 = two ? pad[1] : nullptr;
        }
        const int32_t* i0 = idx.data() + r * B;
        const float* v0 = val.data() + r * B;
#if SK_X86
        if (avx2) {
          lazy_pair_avx2(d0, d1, Uc, i0, v0, cnt[r], two ? i0 + B : i0, two ? v0 + B : v0, two ? cnt[r + 1] : 0);
        } else
#endif
        {
          lazy_row_scalar(d0, Uc, i0, v0, cnt[r]);
          if (two) lazy_row_scalar(d1, Uc, i0 + B, v0 + B, cnt[r + 1]);
        }
        if (nc < kChunk) {
          std::copy(pad[0], pad[0] + nc, w0);
          if (two) std::copy(pad[1], pad[1] + nc, w1);
        }
      }
    }
  }
}

static void sparsegpt_lazy_update_cpp(const at::Tensor& W, const at::Tensor& Err1, const at::Tensor& U) {
  TORCH_CHECK_VALUE(W.dim() == 2 && Err1.dim() == 2 && U.dim() == 2, "sparsegpt_lazy_update: W, Err1 and U must be 2-D, got ",
                    W.sizes(), ", ", Err1.sizes(), ", ", U.sizes());
  const char* names[] = {"W", "Err1", "U"};
  int i = 0;
  for (const at::Tensor* t : {&W, &Err1, &U}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "sparsegpt_lazy_update: ", names[i], ": expected float32, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), "sparsegpt_lazy_update_cpp: ", names[i], ": expected a CPU tensor, got ",
                      t->device());
    ++i;
  }
  const int64_t rows = W.size(0), L = W.size(1), B = Err1.size(1);
  TORCH_CHECK_VALUE(Err1.size(0) == rows, "Err1: shape ", Err1.sizes(), " must have W's ", rows, " rows");
  TORCH_CHECK_VALUE(U.size(0) == B && U.size(1) == L, "U: shape ", U.sizes(), " must be (B, L) = (", B, ", ", L,
                    ") for Err1 ", Err1.sizes(), " and W ", W.sizes());
  TORCH_CHECK_VALUE(W.stride(1) == 1 || L <= 1, "W: the columns must be contiguous (stride(1) == 1), got strides ",
                    W.strides());
  TORCH_CHECK_VALUE(rows <= 1 || L == 0 || W.stride(0) >= L, "W: rows overlap in memory (stride(0) = ", W.stride(0),
                    " < ", L, " columns)");
  TORCH_CHECK_VALUE(B < (int64_t{1} << 31), "Err1: too many columns (", B, ")");
  if (rows == 0 || L == 0 || B == 0) return;
  at::Tensor e = Err1.stride(1) == 1 ? Err1 : Err1.contiguous();
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
  // Pack U (any strides) as [chunk][B][kChunk], zero-padded.
  at::Tensor Upad = at::zeros({B, nchunks * kChunk}, U.options());
  Upad.narrow(1, 0, L).copy_(U);
  const at::Tensor Up = Upad.view({B, nchunks, kChunk}).permute({1, 0, 2}).contiguous();
  float* wp = W.data_ptr<float>();
  const float* ep = e.data_ptr<float>();
  const float* up = Up.data_ptr<float>();
  const int64_t ldw = W.stride(0), lde = e.stride(0);
  const int64_t ntiles = (rows + kLazyTileRows - 1) / kLazyTileRows;
  at::parallel_for(0, ntiles, 1, [&](int64_t t_begin, int64_t t_end) {
    lazy_update_rows(wp, ldw, ep, lde, up, B, L, t_begin * kLazyTileRows, std::min(rows, t_end * kLazyTileRows));
  });
}

}  // namespace cpu
}  // namespace sparse_kernels

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("sparsegpt_block_update_cpp", &sparse_kernels::cpu::sparsegpt_block_update_cpp);
  m.impl("sparsegpt_block_update_int4_cpp", &sparse_kernels::cpu::sparsegpt_block_update_int4_cpp);
  m.impl("sparsegpt_lazy_update_cpp", &sparse_kernels::cpu::sparsegpt_lazy_update_cpp);
}
