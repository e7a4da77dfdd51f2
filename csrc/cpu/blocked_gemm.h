// Shared by the CPU kernels' large-batch paths: the blocked "expand a tile of the weight, then the
// BLAS" GEMM and the override of their break-even batch sizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace sk_cpu {

// SPARSE_KERNELS_CPU_GEMM_MIN_M, when set, replaces every kernel's break-even batch size
// (`measured`) between its direct path and its GEMM path: the tests use it to cover both paths.
inline int64_t gemm_min_m_or(int64_t measured) {
  const char* env = std::getenv("SPARSE_KERNELS_CPU_GEMM_MIN_M");
  return env != nullptr ? std::atoll(env) : measured;
}

// y [M, N] (x's dtype) = x @ W^T + bias, W expanded kGemmBlockRows rows at a time into an L2-sized
// scratch tile and multiplied by the BLAS (at::mm_out into a column slice of y).  Only a tile of the
// dense weight ever exists.  `expand(tile, n0, n1, off)` writes weight rows [n0, n1) into tile rows
// [off, off + n1 - n0) (K columns each), called in parallel over the tile's rows.
// 256 rows: bf16 4096x4096 on the dev box (load ~12), speedup over dense at M=16 / M=64 was
// 32 rows 0.37/0.54x, 64 rows 0.43/0.84x, 128 rows 0.52/0.70x, 256 rows 0.54/0.84x,
// 512 rows 0.80/0.63x: small tiles lose, 128..512 are within the noise.
constexpr int64_t kGemmBlockRows = 256;

template <typename Expand>
at::Tensor blocked_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                        const Expand& expand) {
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  at::Tensor tile = at::empty({std::min(N, kGemmBlockRows), K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += kGemmBlockRows) {
    const int64_t nb = std::min(kGemmBlockRows, N - n0);
    at::Tensor t = tile.narrow(0, 0, nb);
    at::parallel_for(0, nb, 16, [&](int64_t a, int64_t b) { expand(t, n0 + a, n0 + b, a); });
    at::Tensor ys = y.narrow(1, n0, nb);
    if (bias.has_value())
      at::addmm_out(ys, bias->narrow(0, n0, nb), x, t.t());  // bias inside the GEMM: one rounding
    else
      at::mm_out(ys, x, t.t());
  }
  return y;
}

}  // namespace sk_cpu
