// The permutation family on the CPU: sparse_kernels::nm_split_scores_cpp (the N:M
// channel-permutation search step) and sparse_kernels::gather_columns_cpp (a permuted layer's
// input gather).
//
// Math: sparse_kernels/reference/permutation.py.  Pairs of groups run in parallel; a pair's
// 2m score columns are contiguous rows of scores_t.  Rows go in chunks that stay in L1 while
// every candidate split reads them, 8 rows at a time in vector lanes: 2:4 with a branch-free
// top-2-of-4, any other N:M with an odd-even transposition sort per lane.  Row sums are formed
// in float lanes per chunk and accumulated in double.  find_permutation, 20 rounds on 576 x 1536
// synthetic Wanda-style scores, 2-core EPYC, 2026-11-29 (one run): 2:4 0.04 s against 4.00 s for
// the reference (gather + topk), 4:8 0.29 s against 8.02 s.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace sparse_kernels {
namespace cpu {

constexpr int64_t kChunk = 256;
constexpr int64_t kMaxM = 16;

// top-2 sum of four values: the largest of all, plus the larger of the two runners-up
static inline float top2of4(float a, float b, float c, float d) {
  const float hi1 = std::max(a, b), lo1 = std::min(a, b);
  const float hi2 = std::max(c, d), lo2 = std::min(c, d);
  return std::max(hi1, hi2) + std::max(std::min(hi1, hi2), std::max(lo1, lo2));
}

// sum of the n largest of v[0..m)
static inline float topn(const float* v, int64_t n, int64_t m) {
  float buf[kMaxM];
  std::copy(v, v + m, buf);
  float s = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    int64_t best = k;
    for (int64_t j = k + 1; j < m; ++j) best = buf[j] > buf[best] ? j : best;
    std::swap(buf[k], buf[best]);
    s += buf[k];
  }
  return s;
}

// One pair of groups, every 2:4 split: out[s] = sum over rows of top2of4(new A) + top2of4(new B).
// Rows go in chunks of kChunk: the pair's 8 column chunks (8 KiB) stay in L1 while all S splits
// read them, and each split's rows are summed in 8 float lanes (vectorizable; no scalar
// reduction chain), then in double per chunk.
static inline __attribute__((always_inline)) void pair_24(const float* const* cols8, const int64_t* splits,
                                                         int64_t S, int64_t R, double* out) {
  for (int64_t s = 0; s < S; ++s) out[s] = 0.0;
  for (int64_t r0 = 0; r0 < R; r0 += kChunk) {
    const int64_t r1 = std::min(R, r0 + kChunk);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t* sp = splits + s * 8;
      const float *a0 = cols8[sp[0]], *a1 = cols8[sp[1]], *a2 = cols8[sp[2]], *a3 = cols8[sp[3]];
      const float *b0 = cols8[sp[4]], *b1 = cols8[sp[5]], *b2 = cols8[sp[6]], *b3 = cols8[sp[7]];
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t r = r0;
      for (; r + 8 <= r1; r += 8)
        for (int j = 0; j < 8; ++j)
          acc[j] += top2of4(a0[r + j], a1[r + j], a2[r + j], a3[r + j]) +
                    top2of4(b0[r + j], b1[r + j], b2[r + j], b3[r + j]);
      double c = 0.0;
      for (; r < r1; ++r) c += top2of4(a0[r], a1[r], a2[r], a3[r]) + top2of4(b0[r], b1[r], b2[r], b3[r]);
      for (int j = 0; j < 8; ++j) c += acc[j];
      out[s] += c;
    }
  }
}

static void pair_24_generic(const float* const* c, const int64_t* sp, int64_t S, int64_t R, double* out) {
  pair_24(c, sp, S, R, out);
}
#if SK_X86
SK_AVX2 static void pair_24_avx2(const float* const* c, const int64_t* sp, int64_t S, int64_t R, double* out) {
  pair_24(c, sp, S, R, out);
}
#endif

// Sum of the n largest of m values in each of 8 lanes (rows): an odd-even transposition sort
// (m stages of compare-exchanges, descending) on v[k][lane], vectorized across the lanes.
static inline __attribute__((always_inline)) void topn_lanes(float (*v)[8], int64_t n, int64_t m, float* out) {
  for (int64_t stage = 0; stage < m; ++stage)
    for (int64_t i = stage & 1; i + 1 < m; i += 2)
      for (int j = 0; j < 8; ++j) {
        const float a = v[i][j], b = v[i + 1][j];
        v[i][j] = std::max(a, b);
        v[i + 1][j] = std::min(a, b);
      }
  for (int j = 0; j < 8; ++j) out[j] = 0.f;
  for (int64_t k = 0; k < n; ++k)
    for (int j = 0; j < 8; ++j) out[j] += v[k][j];
}

// Any N:M (m <= kMaxM): like pair_24, with the per-row top-n from topn_lanes (8 rows at a time)
// and the scalar topn for a chunk's last rows.
static inline __attribute__((always_inline)) void pair_nm(const float* const* cols, const int64_t* splits,
                                                         int64_t S, int64_t R, int64_t n, int64_t m, double* out) {
  const int64_t two_m = 2 * m;
  for (int64_t s = 0; s < S; ++s) out[s] = 0.0;
  for (int64_t r0 = 0; r0 < R; r0 += kChunk) {
    const int64_t r1 = std::min(R, r0 + kChunk);
    for (int64_t s = 0; s < S; ++s) {
      const float* g[2 * kMaxM];
      for (int64_t k = 0; k < two_m; ++k) g[k] = cols[splits[s * two_m + k]];
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t r = r0;
      for (; r + 8 <= r1; r += 8) {
        float va[kMaxM][8], vb[kMaxM][8], ta[8], tb[8];
        for (int64_t k = 0; k < m; ++k)
          for (int j = 0; j < 8; ++j) {
            va[k][j] = g[k][r + j];
            vb[k][j] = g[m + k][r + j];
          }
        topn_lanes(va, n, m, ta);
        topn_lanes(vb, n, m, tb);
        for (int j = 0; j < 8; ++j) acc[j] += ta[j] + tb[j];
      }
      double c = 0.0;
      float v[2 * kMaxM];
      for (; r < r1; ++r) {
        for (int64_t k = 0; k < two_m; ++k) v[k] = g[k][r];
        c += topn(v, n, m) + topn(v + m, n, m);
      }
      for (int j = 0; j < 8; ++j) c += acc[j];
      out[s] += c;
    }
  }
}

static void pair_nm_generic(const float* const* c, const int64_t* sp, int64_t S, int64_t R, int64_t n, int64_t m,
                            double* out) {
  pair_nm(c, sp, S, R, n, m, out);
}
#if SK_X86
SK_AVX2 static void pair_nm_avx2(const float* const* c, const int64_t* sp, int64_t S, int64_t R, int64_t n, int64_t m,
                                 double* out) {
  pair_nm(c, sp, S, R, n, m, out);
}
#endif

at::Tensor nm_split_scores_cpp(const at::Tensor& scores_t, const at::Tensor& cols, const at::Tensor& splits,
                               int64_t n) {
  TORCH_CHECK_TYPE(scores_t.scalar_type() == at::kFloat, "scores_t: expected float32, got ", scores_t.scalar_type());
  TORCH_CHECK_TYPE(cols.scalar_type() == at::kLong, "cols: expected int64, got ", cols.scalar_type());
  TORCH_CHECK_TYPE(splits.scalar_type() == at::kLong, "splits: expected int64, got ", splits.scalar_type());
  TORCH_CHECK_VALUE(scores_t.dim() == 2 && cols.dim() == 2 && splits.dim() == 2,
                    "scores_t, cols, splits: expected 2-D tensors, got ", scores_t.dim(), "-D, ", cols.dim(),
                    "-D, ", splits.dim(), "-D");
  TORCH_CHECK_VALUE(scores_t.device().is_cpu() && cols.device().is_cpu() && splits.device().is_cpu(),
                    "scores_t, cols, splits: the cpp backend needs CPU tensors");
  const int64_t C = scores_t.size(0), R = scores_t.size(1), P = cols.size(0), two_m = cols.size(1);
  const int64_t S = splits.size(0), m = two_m / 2;
  TORCH_CHECK_VALUE(two_m % 2 == 0 && m >= 2 && m <= kMaxM, "cols: expected [pairs, 2m] with 2 <= m <= ", kMaxM,
                    ", got width ", two_m);
  TORCH_CHECK_VALUE(splits.size(1) == two_m && S >= 1, "splits: expected [S >= 1, ", two_m, "], got [", S, ", ",
                    splits.size(1), "]");
  TORCH_CHECK_VALUE(n > 0 && n < m, "n: expected 0 < n < m = ", m, ", got ", n);
  auto st = scores_t.contiguous();
  auto cl = cols.contiguous();
  auto sp = splits.contiguous();
  const int64_t* cp = cl.data_ptr<int64_t>();
  const int64_t* spp = sp.data_ptr<int64_t>();
  for (int64_t i = 0; i < P * two_m; ++i)
    TORCH_CHECK_VALUE(cp[i] >= 0 && cp[i] < C, "cols: column id ", cp[i], " outside [0, ", C, ")");
  for (int64_t s = 0; s < S; ++s) {
    uint32_t seen = 0;
    for (int64_t k = 0; k < two_m; ++k) {
      const int64_t v = spp[s * two_m + k];
      TORCH_CHECK_VALUE(v >= 0 && v < two_m && !(seen >> v & 1u), "splits: row ", s, " is not a permutation of 0..",
                        two_m - 1);
      seen |= 1u << v;
    }
  }
  auto out = at::zeros({P, S}, scores_t.options().dtype(at::kDouble));
  if (P == 0 || R == 0) return out;
  const float* base = st.data_ptr<float>();
  double* op = out.data_ptr<double>();
  const bool fast24 = (m == 4 && n == 2);
#if SK_X86
  const bool avx2 = sk_cpu::best_isa() != sk_cpu::Isa::Scalar;
#else
  const bool avx2 = false;
#endif
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    const float* cols[2 * kMaxM];
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k = 0; k < two_m; ++k) cols[k] = base + cp[p * two_m + k] * R;
      double* o = op + p * S;
#if SK_X86
      if (avx2) {
        if (fast24)
          pair_24_avx2(cols, spp, S, R, o);
        else
          pair_nm_avx2(cols, spp, S, R, n, m, o);
        continue;
      }
#endif
      if (fast24)
        pair_24_generic(cols, spp, S, R, o);
      else
        pair_nm_generic(cols, spp, S, R, n, m, o);
    }
  });
  (void)avx2;
  return out;
}


// ---------------------------------------------------------------- gather_columns
// out[r, j] = x[r, index[j]] for x [M, K] (any element size); rows in parallel (columns in
// chunks when there are few rows).  A row of x (<= 64 KiB for K = 16384 at 4 bytes) stays in
// L1/L2 while its gather runs.
template <typename U>
static void gather_rows(const U* x, const int64_t* idx, U* out, int64_t K, int64_t N, int64_t r0, int64_t r1,
                        int64_t c0, int64_t c1) {
  for (int64_t r = r0; r < r1; ++r) {
    const U* xr = x + r * K;
    U* orow = out + r * N;
    for (int64_t j = c0; j < c1; ++j) orow[j] = xr[idx[j]];
  }
}

template <typename U>
static void gather_all(const void* xv, const int64_t* idx, void* ov, int64_t M, int64_t K, int64_t N) {
  const U* x = static_cast<const U*>(xv);
  U* out = static_cast<U*>(ov);
  if (M >= 4) {
    at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) { gather_rows(x, idx, out, K, N, r0, r1, 0, N); });
  } else {
    at::parallel_for(0, N, 2048, [&](int64_t c0, int64_t c1) { gather_rows(x, idx, out, K, N, 0, M, c0, c1); });
  }
}

at::Tensor gather_columns_cpp(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index: expected int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, "index: expected a 1-D tensor, got ", index.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().is_cpu() && index.device().is_cpu(), "x, index: the cpp backend needs CPU tensors");
  const int64_t esize = static_cast<int64_t>(x.element_size());
  TORCH_CHECK_TYPE(esize == 1 || esize == 2 || esize == 4 || esize == 8, "x: unsupported dtype ", x.scalar_type());
  const int64_t K = x.size(-1), N = index.size(0);
  auto idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < N; ++j)
    TORCH_CHECK_VALUE(ip[j] >= 0 && ip[j] < K, "index: entry ", ip[j], " at position ", j, " outside [0, ", K,
                      ") (x's last dim)");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  if (x.numel() == 0) return at::empty(shape, x.options());  // also K == 0 (then N == 0: checked above)
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto out = at::empty({M, N}, x.options());
  if (N == 0) return out.view(shape);
  const void* xp = x2.data_ptr();
  void* op = out.data_ptr();
  switch (esize) {
    case 1: gather_all<uint8_t>(xp, ip, op, M, K, N); break;
    case 2: gather_all<uint16_t>(xp, ip, op, M, K, N); break;
    case 4: gather_all<uint32_t>(xp, ip, op, M, K, N); break;
    default: gather_all<uint64_t>(xp, ip, op, M, K, N); break;
  }
  return out.view(shape);
}

}  // namespace cpu
}  // namespace sparse_kernels

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("nm_split_scores_cpp", &sparse_kernels::cpu::nm_split_scores_cpp);
  m.impl("gather_columns_cpp", &sparse_kernels::cpu::gather_columns_cpp);
}
