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
#include <cstdint>
#include <cstring>
#include <vector>

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

// Raw kernel over rows [r0, r1).  W1: row stride ldw, unit column stride.  H: [B, B] with
// row stride ldh, unit column stride.  mask: [rows, B] contiguous (nullptr when m > 0).
// Q, E: [rows, B] contiguous; loss: [rows].  On x86-64 GCC also compiles an AVX2 clone
// (picked at load time); no FMA, so rounding matches the reference's multiply then subtract.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void sparsegpt_block_rows(const float* W1, int64_t ldw, const float* H, int64_t ldh, int64_t B,
                                 const bool* mask, int64_t n, int64_t m, float* Q, float* E, float* loss,
                                 int64_t r0, int64_t r1) {
  std::vector<float> buf(kTileRows * B);
  std::vector<uint8_t> keep(kTileRows * B);
  std::vector<float> dd(B), score(std::max<int64_t>(m, 1));
  for (int64_t j = 0; j < B; ++j) dd[j] = H[j * ldh + j] * H[j * ldh + j];

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
        const float q = keep_or_zero(wi, kp[i]);
        const float diff = wi - q;
        const float err = diff / d;
        Q[(t0 + r) * B + i] = q;
        E[(t0 + r) * B + i] = err;
        acc[r] += static_cast<double>((diff * diff) / (d * d));
        for (int64_t j = i + 1; j < B; ++j) w[j] -= err * h[j];
      }
    }
    for (int64_t r = 0; r < tr; ++r) loss[t0 + r] = static_cast<float>(acc[r] / 2.0);
  }
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_block_update_cpp(
    const at::Tensor& W1, const at::Tensor& Hinv1, const c10::optional<at::Tensor>& mask1, int64_t n,
    int64_t m) {
  TORCH_CHECK_VALUE(W1.dim() == 2, "W1: expected a 2-D tensor [rows, B], got shape ", W1.sizes());
  TORCH_CHECK_TYPE(W1.scalar_type() == at::kFloat, "W1: dtype ", W1.scalar_type(), " is not supported; expected float32");
  TORCH_CHECK_TYPE(Hinv1.scalar_type() == at::kFloat, "Hinv1: dtype ", Hinv1.scalar_type(),
                   " is not supported; expected float32");
  TORCH_CHECK_VALUE(W1.device().is_cpu() && Hinv1.device().is_cpu(), "sparsegpt_block_update_cpp: tensors must be on the CPU");
  const int64_t rows = W1.size(0), B = W1.size(1);
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

  at::Tensor w = W1.stride(1) == 1 ? W1 : W1.contiguous();
  at::Tensor h = Hinv1.stride(1) == 1 ? Hinv1 : Hinv1.contiguous();
  auto Q = at::empty({rows, B}, W1.options());
  auto E = at::empty({rows, B}, W1.options());
  auto L = at::empty({rows}, W1.options());
  if (rows == 0 || B == 0) {
    L.zero_();
    return {Q, E, L};
  }
  const float* wp = w.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const bool* mp = m == 0 ? mask.data_ptr<bool>() : nullptr;
  float* qp = Q.data_ptr<float>();
  float* ep = E.data_ptr<float>();
  float* lp = L.data_ptr<float>();
  const int64_t ldw = w.stride(0), ldh = h.stride(0);
  const int64_t ntiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, ntiles, 1, [&](int64_t t_begin, int64_t t_end) {
    sparsegpt_block_rows(wp, ldw, hp, ldh, B, mp, n, m, qp, ep, lp, t_begin * kTileRows,
                         std::min(rows, t_end * kTileRows));
  });
  return {Q, E, L};
}

}  // namespace cpu
}  // namespace sparse_kernels

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("sparsegpt_block_update_cpp", &sparse_kernels::cpu::sparsegpt_block_update_cpp);
}
