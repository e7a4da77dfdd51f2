// The fused SparseGPT block update: the inner column loop of one block of columns in one launch.
//
// For every row r (rows are independent) and column i = 0 .. B-1, with w the row's CURRENT
// values (already updated by the earlier columns):
//   if m > 0 and i % m == 0: keep the n largest of score_j = w_j^2 / Hinv1[j,j]^2 over
//     j in [i, min(i+m, B)), ties to the lower index (j beats k when s_j > s_k, or s_j == s_k and
//     j < k; k is kept when fewer than n columns of the group beat it); if m == 0 the keep
//     decision is mask1[r, i] (True = keep);
//   q = kept ? w_i : 0;  err = (w_i - q) / Hinv1[i,i];
//   w_j -= err * Hinv1[i,j] for j > i;  Q1[r,i] = q;  Err1[r,i] = err;
//   losses[r] += (w_i - q)^2 / Hinv1[i,i]^2 / 2.
// Same algorithm as sparse_kernels/reference/sparsegpt.py; every product and quotient is rounded
// separately (no FMA contraction) like the reference's fp32 tensor ops, so only the loss
// summation order differs.
//
// Joint int4 (kInt4, sparsegpt_block_update_int4): at each group start (i % G == 0) the row's
// scale is max |w| over the group's current weights (times the keep bit when m == 0; NaN
// propagates, as torch.amax) / 7, 1 unless that is > 0, rounded to the scale dtype (_rn
// conversions) and back, the dtype's smallest normal if it underflows; a kept weight becomes
// q = clamp(rint(w / s), -8, 7) * s (rint: half to even).  Codes, the keep mask and the scales
// are written too.
//
// Mapping: one warp per row; lane l owns columns l, l+32, ... in registers (kSlots = ceil(B/32)
// <= 8); the outer column loop is unrolled over slots so every register index is static.
// Hinv1 is staged in shared memory when B <= kSmemMaxB (160), otherwise
// read through the read-only cache.  kWarps rows per block.  Compiled, not yet run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "sparsegpt.h"

namespace sk {
namespace {

constexpr int kWarps = 8;  // rows per block (first guess, not tuned on a GPU)
constexpr int kSmemMaxB = 160;  // 100 KB of Hinv1: fits sm_80 (164 KB) and sm_90 (227 KB)

// max that propagates NaN (torch.amax's rule): a NaN operand wins
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) && a == a ? b : a; }

// The int4 group scale (the reference's int4_group_scale).
__device__ __forceinline__ float int4_scale(float amax, int kind) {
  float s = amax > 0.f ? __fdiv_rn(amax, 7.f) : 1.f;
  if (kind == 1) s = __half2float(__float2half_rn(s));
  if (kind == 2) s = __bfloat162float(__float2bfloat16_rn(s));
  if (!(s > 0.f)) s = kind == 1 ? 6.103515625e-05f : 1.17549435e-38f;
  return s;
}

template <int kSlots, bool kSmem, bool kInt4>
__global__ void __launch_bounds__(kWarps * 32)
    block_update_kernel(const float* __restrict__ W1, const float* __restrict__ Hinv1, const bool* __restrict__ mask1,
                        int64_t rows, int B, int n, int m, float* __restrict__ Q1, float* __restrict__ Err1,
                        float* __restrict__ losses, Int4Out q4) {
  extern __shared__ float hs[];
  if constexpr (kSmem) {
    for (int i = threadIdx.x; i < B * B; i += blockDim.x) hs[i] = Hinv1[i];
    __syncthreads();
  }
  const float* H = kSmem ? hs : Hinv1;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= rows) return;  // after the only __syncthreads

  float w[kSlots], qv[kSlots], ev[kSlots];
  int cv[kSlots];  // int4 codes (kInt4)
  float scale = 1.f;  // the current group's scale (kInt4; the same in every lane)
  uint32_t keep = 0;  // bit s: keep column 32*s + lane (a bit mask: dynamic slots stay in registers)
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int c = 32 * s + lane;
    w[s] = c < B ? W1[r * B + c] : 0.f;
    if (m == 0 && c < B && mask1[r * B + c]) keep |= 1u << s;
    qv[s] = 0.f;
    ev[s] = 0.f;
    cv[s] = 0;
  }
  float loss = 0.f;

#pragma unroll
  for (int si = 0; si < kSlots; ++si) {
    for (int l = 0; l < 32; ++l) {
      const int i = 32 * si + l;
      if (i >= B) break;  // uniform across the warp
      if (m > 0 && i % m == 0) {
        const int end = min(i + m, B);
        // this lane's column in [i, end), if any: the unique c = lane (mod 32) in the range
        const int c = i + ((lane - (i & 31)) & 31);
        const bool in_group = c < end;
        // c lies in slot si or si + 1 (m <= 32): static register indices only
        const float wc = (c >> 5) == si ? w[si] : (si + 1 < kSlots ? w[si + 1 < kSlots ? si + 1 : si] : 0.f);
        float score = 0.f;
        if (in_group) {
          const float d = H[c * B + c];
          score = __fdiv_rn(__fmul_rn(wc, wc), __fmul_rn(d, d));
        }
        int beaten = 0;
        for (int k = i; k < end; ++k) {
          const float sk = __shfl_sync(0xffffffffu, score, k & 31);
          beaten += (sk > score) || (sk == score && k < c);
        }
        if (in_group) {
          const uint32_t bit = 1u << (c >> 5);
          keep = beaten < n ? (keep | bit) : (keep & ~bit);
        }
      }
      if constexpr (kInt4) {
        if (i % q4.G == 0) {
          float amax = 0.f;
#pragma unroll
          for (int s = 0; s < kSlots; ++s) {
            const int c = 32 * s + lane;
            if (c >= i && c < i + q4.G && c < B) {
              const float a = fabsf(w[s]);
              amax = nan_max(amax, m == 0 ? __fmul_rn(a, static_cast<float>((keep >> s) & 1u)) : a);
            }
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
          scale = int4_scale(amax, q4.scale_kind);
          if (lane == 0) q4.scales[r * (B / q4.G) + i / q4.G] = scale;
        }
      }
      const float wi = __shfl_sync(0xffffffffu, w[si], l);
      const bool ki = (__shfl_sync(0xffffffffu, keep, l) >> si) & 1u;
      const float d = H[i * B + i];
      float q = ki ? wi : 0.f;
      int code = 0;
      if constexpr (kInt4) {
        float c = rintf(__fdiv_rn(wi, scale));
        c = c < -8.f ? -8.f : (c > 7.f ? 7.f : c);  // NaN stays NaN, as torch.clamp
        c = ki ? __fadd_rn(c, 0.f) : 0.f;           // + 0: a code of -0.0 is stored as +0.0
        code = c == c ? static_cast<int>(c) : 0;
        q = __fmul_rn(c, scale);
      }
      const float diff = __fsub_rn(wi, q);
      const float err = __fdiv_rn(diff, d);
      loss = __fadd_rn(loss, __fdiv_rn(__fmul_rn(diff, diff), __fmul_rn(d, d)));
      if (lane == l) {
        qv[si] = q;
        ev[si] = err;
        cv[si] = code;
      }
#pragma unroll
      for (int s = si; s < kSlots; ++s) {
        const int c = 32 * s + lane;
        if (c > i && c < B) w[s] = __fsub_rn(w[s], __fmul_rn(err, H[i * B + c]));
      }
    }
  }

#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int c = 32 * s + lane;
    if (c < B) {
      Q1[r * B + c] = qv[s];
      Err1[r * B + c] = ev[s];
      if constexpr (kInt4) {
        q4.codes[r * B + c] = static_cast<int8_t>(cv[s]);
        q4.keep[r * B + c] = (keep >> s) & 1u;
      }
    }
  }
  if (lane == 0) losses[r] = loss * 0.5f;
}

template <int kSlots, bool kInt4>
cudaError_t launch_slots(const float* W1, const float* Hinv1, const bool* mask1, int64_t rows, int B, int n, int m,
                         float* Q1, float* Err1, float* losses, const Int4Out& q4, cudaStream_t stream) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 2147483647) return cudaErrorInvalidValue;
  constexpr bool kSmem = 32 * kSlots <= kSmemMaxB;  // B <= 160: Hinv1 (<= 100 KB) in shared memory
  const size_t smem = kSmem ? static_cast<size_t>(B) * B * sizeof(float) : 0;
  if (kSmem) {
    cudaError_t err = cudaFuncSetAttribute(block_update_kernel<kSlots, kSmem, kInt4>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  block_update_kernel<kSlots, kSmem, kInt4><<<static_cast<unsigned>(blocks), kWarps * 32, smem, stream>>>(
      W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4);
  return cudaGetLastError();
}

template <bool kInt4>
cudaError_t launch(const float* W1, const float* Hinv1, const bool* mask1, int64_t rows, int B, int n, int m,
                   float* Q1, float* Err1, float* losses, const Int4Out& q4, cudaStream_t stream) {
  if (rows == 0 || B == 0) return cudaSuccess;
  if (B < 0 || B > 256 || m < 0 || m > 32 || n < 0 || (m > 0 && n > m) || (m == 0 && mask1 == nullptr))
    return cudaErrorInvalidValue;
  if (kInt4 && (q4.G <= 0 || B % q4.G != 0 || q4.scale_kind < 0 || q4.scale_kind > 2 || q4.keep == nullptr ||
                q4.codes == nullptr || q4.scales == nullptr))
    return cudaErrorInvalidValue;
  switch ((B + 31) / 32) {
    case 1:
      return launch_slots<1, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    case 2:
      return launch_slots<2, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    case 3:
      return launch_slots<3, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    case 4:
      return launch_slots<4, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    case 5:
      return launch_slots<5, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    case 6:
      return launch_slots<6, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    case 7:
      return launch_slots<7, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
    default:
      return launch_slots<8, kInt4>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
  }
}

}  // namespace

cudaError_t sparsegpt_block_update_launch(const float* W1, const float* Hinv1, const bool* mask1, int64_t rows,
                                          int B, int n, int m, float* Q1, float* Err1, float* losses,
                                          cudaStream_t stream) {
  return launch<false>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, Int4Out{}, stream);
}

cudaError_t sparsegpt_block_update_int4_launch(const float* W1, const float* Hinv1, const bool* mask1, int64_t rows,
                                               int B, int n, int m, float* Q1, float* Err1, float* losses,
                                               const Int4Out& q4, cudaStream_t stream) {
  return launch<true>(W1, Hinv1, mask1, rows, B, n, m, Q1, Err1, losses, q4, stream);
}

}  // namespace sk
