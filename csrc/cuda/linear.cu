// 2:4 sparse Linear on sparse tensor cores: y [M, N] = x [M, K] @ W^T + bias, W [N, K] 2:4.
//
// The sparse operand A of mma.sp.sync.aligned.m16n8k32 is W (16 output features x 32 inputs),
// B is x^T (32 inputs x 8 batch rows), so each MMA computes a 16 x 8 tile of y^T.
//
// ISA facts used (PTX ISA, "Matrix fragments for sparse mma.m16n8k32 with .f16/.bf16";
// lane = 4*g + t, g = lane / 4, t = lane % 4):
//   A (compressed 16 x 16): a0a1 = row g, compressed cols 2t, 2t+1; a2a3 = row g+8, same cols;
//     a4a5 = row g, cols 8+2t, 9+2t; a6a7 = row g+8, cols 8+2t, 9+2t (the dense m16n8k16 A
//     layout); compressed cols 2L, 2L+1 are the two kept values of logical group L (K 4L..4L+3).
//   B (32 x 8): b_{2i}, b_{2i+1} = rows (K) 2t + 8i, 2t + 8i + 1, column g.
//   C/D (16 x 8 fp32): c0c1 = row g, cols 2t, 2t+1; c2c3 = row g+8.
//   metadata e: with sparsity selector s (0 or 1) the lanes with t = 2s + h (h = 0, 1) supply
//     it; bits 4j..4j+3 hold the nibble i0 | i1 << 2 of logical group 4h + j of row g, bits
//     16 + 4j.. the same for row g+8.
//
// DEVICE LAYOUT of the metadata (made once by reorder_meta_mma, docs/CUDA.md):
//   meta_dev [ceil(N/16), ceil(K/64), 32] int32.  For 16-row block b, 64-column span s and lane
//   4g + t, bits 4j..4j+3 = nibble t of canonical meta[16b + g, 4s + j] (= canonical group
//   4j + t of the span), bits 16 + 4j.. = the same for row 16b + g + 8.  Padding rows and
//   columns hold nibble 0x4.  One coalesced 128-byte load per warp per (block, span).
//
// Two kernels read it:
//  * gemv_kernel (M <= 16, memory-bound decode).  It runs the MMAs on a permutation of K inside
//    each span (allowed: a GEMM may reduce over K in any order as long as A and B agree), chosen
//    so that every load is wide: MMA m (0, 1) of a span uses logical group L <- span group
//    4*(L % 4) + 2m + L / 4.  Then lane t's A values are the 16 contiguous bytes of compressed
//    columns 8t..8t+7 (rows g and g+8: two 16-byte loads), its metadata word for selector m is
//    exactly meta_dev's word (t = 2m + h supplies groups 4j + t), and its B values come from two
//    16-byte loads of x plus one exchange of half-groups with lane ^ 1 (4 shuffles).  Weights
//    (9/16 of the dense bytes) are streamed once with cache-streaming loads; 8 warps split K
//    inside a block of 16 output rows and reduce in shared memory in a fixed order.
//  * gemm_kernel (M > 16).  Canonical K order, cp.async 3-stage pipeline, ldmatrix.x4 for A
//    (compressed values) and B (x), metadata transposed back to the natural per-lane form with
//    4 shuffles per (16-row block, span), amortized over the warp's n-tiles.
//    CTA tile 128 (or 64, when 128-row tiles would leave SMs idle) features x 128 batch rows
//    x 64 K; warps of 64 x 32 (8 or 4 per CTA).
//
// Tuning constants are first guesses: compiled, not yet run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "linear.h"
#include "ptx.cuh"

namespace sk {
namespace {

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::Mma;
using ptx::quad_transpose_nibbles;

template <typename T>
struct Dtype;
template <>
struct Dtype<__half> {
  static constexpr int code = kF16;
};
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr int code = kBF16;
};

// ------------------------------------------------------------------ metadata layout kernels

__global__ void reorder_meta_kernel(const int16_t* __restrict__ meta, int64_t rows, int64_t cols16,
                                    int32_t* __restrict__ out, int64_t blocks, int64_t spans) {
  const int64_t total = blocks * spans * 32;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(i % 32);
    const int64_t s = (i / 32) % spans, b = i / (32 * spans);
    const int g = lane >> 2, t = lane & 3;
    uint32_t word = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = 16 * b + 8 * h + g;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = 4 * s + j;
        const uint32_t w = (r < rows && c < cols16) ? static_cast<uint16_t>(meta[r * cols16 + c]) : 0x4444u;
        word |= ((w >> (4 * t)) & 0xFu) << (16 * h + 4 * j);
      }
    }
    out[i] = static_cast<int32_t>(word);
  }
}

__global__ void unreorder_meta_kernel(const int32_t* __restrict__ meta_dev, int64_t rows, int64_t cols16,
                                      int16_t* __restrict__ meta, int64_t spans) {
  const int64_t total = rows * cols16;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols16, c = i % cols16;
    const int64_t b = r / 16, s = c / 4;
    const int h = static_cast<int>((r % 16) / 8), g = static_cast<int>(r % 8), j = static_cast<int>(c % 4);
    uint32_t w = 0;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t word = static_cast<uint32_t>(meta_dev[(b * spans + s) * 32 + 4 * g + t]);
      w |= ((word >> (16 * h + 4 * j)) & 0xFu) << (4 * t);
    }
    meta[i] = static_cast<int16_t>(static_cast<uint16_t>(w));
  }
}

// ------------------------------------------------------------------ decode kernel (M <= 16)
constexpr int kGemvWarps = 8;   // split-K warps per 16-row block (first guess, not tuned on a GPU)
constexpr int kGemvUnroll = 4;  // spans in flight per warp (first guess, not tuned on a GPU)

template <typename T, int kNT>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint32_t* __restrict__ meta_dev,
                const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
  __shared__ float red[kGemvWarps][32][4 * kNT];
  const int blk = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3, q = t >> 1, p = t & 1;
  const int spans = (K + 63) / 64;
  const int64_t pitch = K / 2;  // values row pitch (elements)
  const int r0 = 16 * blk + g, r1 = r0 + 8;
  const T* a0p = values + static_cast<int64_t>(r0 < N ? r0 : 0) * pitch + 8 * t;
  const T* a1p = values + static_cast<int64_t>(r1 < N ? r1 : 0) * pitch + 8 * t;
  const uint32_t* mp = meta_dev + static_cast<int64_t>(blk) * spans * 32 + lane;

  float acc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  // kGemvUnroll spans per warp per step: every weight / metadata / x load of the step is issued
  // before the first MMA, so each thread keeps kGemvUnroll * 2 weight loads (16 B) in flight.
  for (int s0 = warp; s0 < spans; s0 += kGemvWarps * kGemvUnroll) {
    uint4 alo[kGemvUnroll], ahi[kGemvUnroll], bx[kGemvUnroll][kNT][2];
    uint32_t e[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int s = s0 + u * kGemvWarps;
      const int kbase = 64 * s;
      alo[u] = make_uint4(0, 0, 0, 0);
      ahi[u] = make_uint4(0, 0, 0, 0);
      e[u] = 0x44444444u;
      const bool ks = s < spans;
      const bool ka = ks && kbase + 16 * t + 16 <= K;
      if (ka && r0 < N) alo[u] = __ldcs(reinterpret_cast<const uint4*>(a0p + 32 * s));
      if (ka && r1 < N) ahi[u] = __ldcs(reinterpret_cast<const uint4*>(a1p + 32 * s));
      if (ks) e[u] = __ldcs(mp + 32 * s);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int n = 8 * nt + g;
        const int kb = kbase + 16 * q + 32 * p;
        bx[u][nt][0] = make_uint4(0, 0, 0, 0);
        bx[u][nt][1] = make_uint4(0, 0, 0, 0);
        if (ks && n < M && kb + 16 <= K) {
          const uint4* xp = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(n) * K + kb);
          bx[u][nt][0] = __ldg(xp);
          bx[u][nt][1] = __ldg(xp + 1);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const uint32_t aw0[4] = {alo[u].x, alo[u].y, alo[u].z, alo[u].w};
      const uint32_t aw1[4] = {ahi[u].x, ahi[u].y, ahi[u].z, ahi[u].w};
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const uint4 b0 = bx[u][nt][0], b1 = bx[u][nt][1];
        const uint32_t w[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
        uint32_t s0w[4], s1w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // exchange half-groups with lane ^ 1 (see the header comment)
          const uint32_t own = p ? w[2 * k + 1] : w[2 * k];
          const uint32_t send = p ? w[2 * k] : w[2 * k + 1];
          const uint32_t recv = __shfl_xor_sync(0xffffffffu, send, 1);
          s0w[k] = p ? recv : own;
          s1w[k] = p ? own : recv;
        }
        {
          const uint32_t a[4] = {aw0[0], aw1[0], aw0[1], aw1[1]};
          const uint32_t b[4] = {s0w[0], s1w[0], s0w[1], s1w[1]};
          Mma<T>::template sp<0>(acc[nt], a, b, e[u]);
        }
        {
          const uint32_t a[4] = {aw0[2], aw1[2], aw0[3], aw1[3]};
          const uint32_t b[4] = {s0w[2], s1w[2], s0w[3], s1w[3]};
          Mma<T>::template sp<1>(acc[nt], a, b, e[u]);
        }
      }
    }
  }

#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][lane][4 * nt + i] = acc[nt][i];
  __syncthreads();
  for (int o = threadIdx.x; o < 16 * 8 * kNT; o += blockDim.x) {
    const int r = o % 16, n = o / 16;
    const int nt = n / 8, c = n % 8;
    const int src_lane = 4 * (r % 8) + c / 2, reg = 4 * nt + (c % 2) + 2 * (r / 8);
    float sum = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kGemvWarps; ++w2) sum += red[w2][src_lane][reg];
    const int row = 16 * blk + r;
    if (row < N && n < M) {
      if (bias != nullptr) sum += Mma<T>::to_float(bias[row]);
      y[static_cast<int64_t>(n) * N + row] = Mma<T>::from_float(sum);
    }
  }
}

// ------------------------------------------------------------------ GEMM kernel (M > 16)
// CTA tile: 64 * kWM output features x 32 * kWN batch rows; warps of 64 x 32, kWM x kWN of them.
// K per stage: one 64-column span (the metadata layout's unit); kS stages of cp.async.
// Split-K (gridDim.z > 1): CTA z covers spans [z * spans_per, (z + 1) * spans_per) and writes
// fp32 partials to ws [gridDim.z, M, N]; splitk_reduce_kernel sums them in z order
// (deterministic) and adds the bias.
constexpr int kApitch = 40;  // compressed values per smem row: 32 + 8 pad (80 B: ldmatrix conflict-free)
constexpr int kXpitch = 72;  // x elements per smem row: 64 + 8 pad (144 B)

template <typename T, int kWM, int kWN, int kS>
struct GemmSmem {
  T a[kS][64 * kWM][kApitch];
  T x[kS][32 * kWN][kXpitch];
  uint32_t e[kS][4 * kWM][32];
};

template <typename T, int kWM, int kWN, int kS>
__global__ void __launch_bounds__(32 * kWM * kWN)
    gemm_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint32_t* __restrict__ meta_dev,
                const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws, int M, int N, int K,
                int spans_per) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kBM = 64 * kWM, kBN = 32 * kWN, kThreads = 32 * kWM * kWN;
  static_assert((4 * kBM) % kThreads == 0 && (8 * kBN) % kThreads == 0, "load loops must divide evenly");
  using Smem = GemmSmem<T, kWM, kWN, kS>;
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / kWN, wn = warp % kWN;  // warp tile: features wm*64.., batch wn*32..
  const int n0 = blockIdx.x * kBM, m0 = blockIdx.y * kBN;
  const int spans = (K + 63) / 64;
  const int s_begin = blockIdx.z * spans_per;
  const int s_end = min(spans, s_begin + spans_per);
  const int nspans = s_end > s_begin ? s_end - s_begin : 0;
  const int nblocks = (N + 15) / 16;
  const int64_t pitch = K / 2;

  auto load_stage = [&](int stage, int s) {
    const int kbase = 64 * s;
#pragma unroll
    for (int i = 0; i < (4 * kBM) / kThreads; ++i) {  // A: kBM rows x 4 chunks of 16 B
      const int c = tid + i * kThreads, row = c / 4, ck = c % 4;
      const bool ok = (n0 + row < N) && (kbase + 16 * ck + 16 <= K);
      const T* src = ok ? values + static_cast<int64_t>(n0 + row) * pitch + 32 * s + 8 * ck : values;
      cp_async16(&sm.a[stage][row][8 * ck], src, ok);
    }
#pragma unroll
    for (int i = 0; i < (8 * kBN) / kThreads; ++i) {  // x: kBN rows x 8 chunks of 16 B
      const int c = tid + i * kThreads, row = c / 8, ck = c % 8;
      const bool ok = (m0 + row < M) && (kbase + 8 * ck + 8 <= K);
      const T* src = ok ? x + static_cast<int64_t>(m0 + row) * K + kbase + 8 * ck : x;
      cp_async16(&sm.x[stage][row][8 * ck], src, ok);
    }
    for (int c = tid; c < 8 * (kBM / 16); c += kThreads) {  // metadata: kBM/16 blocks x 8 chunks of 16 B
      const int b = c / 8, ck = c % 8, gb = n0 / 16 + b;
      if (gb < nblocks) {
        cp_async16(&sm.e[stage][b][4 * ck], meta_dev + (static_cast<int64_t>(gb) * spans + s) * 32 + 4 * ck, true);
      } else {  // a 16-row block past N: valid ordered nibbles (0x4), its outputs are discarded
        *reinterpret_cast<uint4*>(&sm.e[stage][b][4 * ck]) = make_uint4(0x44444444u, 0x44444444u, 0x44444444u, 0x44444444u);
      }
    }
  };

  // With one warp along the batch (32-row tiles, M <= 32) n-tiles wholly past M are skipped
  // (warp-uniform).  Not in the wider tiles: there the branches cost ~90 registers (ptxas -v:
  // 218 instead of 125 at 128 x 128), i.e. half the CTAs per SM.
  constexpr bool kSkipDead = kWN == 1;
  bool live[4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) live[nt] = m0 + wn * 32 + nt * 8 < M;

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

#pragma unroll
  for (int st = 0; st < kS - 1; ++st) {
    if (st < nspans) load_stage(st, s_begin + st);
    cp_async_commit();
  }

  for (int i = 0; i < nspans; ++i) {
    cp_async_wait<kS - 2>();
    __syncthreads();
    {
      const int nxt = i + kS - 1;
      if (nxt < nspans) load_stage(nxt % kS, s_begin + nxt);
      cp_async_commit();
    }
    const int st = i % kS;
    uint32_t e[4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) e[mt] = quad_transpose_nibbles(sm.e[st][wm * 4 + mt][lane], lane);
#pragma unroll
    for (int kstep = 0; kstep < 2; ++kstep) {
      uint32_t af[4][4], bf[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int row = wm * 64 + mt * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        ldmatrix_x4(af[mt], &sm.a[st][row][16 * kstep + (lane >> 4) * 8]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (kSkipDead && !live[nt]) continue;
        const int row = wn * 32 + nt * 8 + (lane & 7);
        ldmatrix_x4(bf[nt], &sm.x[st][row][32 * kstep + (lane >> 3) * 8]);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          if (kSkipDead && !live[nt]) continue;
          if (kstep == 0)
            Mma<T>::template sp<0>(acc[mt][nt], af[mt], bf[nt], e[mt]);
          else
            Mma<T>::template sp<1>(acc[mt][nt], af[mt], bf[nt], e[mt]);
        }
    }
  }
  cp_async_wait<0>();

  float* part = ws != nullptr ? ws + static_cast<int64_t>(blockIdx.z) * M * N : nullptr;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = n0 + wm * 64 + mt * 16 + g + 8 * h;
      if (row >= N) continue;
      const float bv = (part == nullptr && bias != nullptr) ? Mma<T>::to_float(bias[row]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int n = m0 + wn * 32 + nt * 8 + 2 * t + c;
          if (n >= M) continue;
          const int64_t o = static_cast<int64_t>(n) * N + row;
          if (part != nullptr)
            part[o] = acc[mt][nt][2 * h + c];
          else
            y[o] = Mma<T>::from_float(acc[mt][nt][2 * h + c] + bv);
        }
      }
    }
  }
}

// y = sum over z of ws[z] (+ bias), z in order: the split-K GEMM's second pass.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, int split, const T* __restrict__ bias,
                                     T* __restrict__ y, int64_t total, int N) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < split; ++z) s += ws[z * total + i];
    if (bias != nullptr) s += Mma<T>::to_float(bias[i % N]);
    y[i] = Mma<T>::from_float(s);
  }
}

int grid1d(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// Streaming multiprocessors of the current device (queried once per process and device).
int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int v = 0;
    cached[dev] = cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0 ? v : 132;
  }
  return cached[dev];
}

// Batch rows per CTA of a tile (the grid's y extent is ceil(M / this)).
int64_t tile_rows(int tile) {
  switch (tile) {
    case kTile128x32:
      return 32;
    case kTile128x64:
      return 64;
    case kTile128x128:
    case kTile64x128:
    case kTileWgmma:
      return 128;
    default:
      return 1 << 30;  // the GEMV: one CTA per 16 output features, any M <= 16
  }
}

template <typename T, int kWM, int kWN, int kS>
cudaError_t launch_gemm(const T* x, const T* values, const uint32_t* meta_dev, const T* bias, T* y, float* ws,
                        int split, int M, int N, int K, cudaStream_t stream) {
  const int smem = static_cast<int>(sizeof(GemmSmem<T, kWM, kWN, kS>));
  cudaError_t err =
      cudaFuncSetAttribute(gemm_kernel<T, kWM, kWN, kS>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int spans = (K + 63) / 64;
  const int spans_per = (spans + split - 1) / split;
  const dim3 grid(static_cast<unsigned>((N + 64 * kWM - 1) / (64 * kWM)),
                  static_cast<unsigned>((M + 32 * kWN - 1) / (32 * kWN)), static_cast<unsigned>(split));
  gemm_kernel<T, kWM, kWN, kS><<<grid, 32 * kWM * kWN, smem, stream>>>(x, values, meta_dev, bias, y,
                                                                         split > 1 ? ws : nullptr, M, N, K, spans_per);
  err = cudaGetLastError();
  if (err != cudaSuccess || split == 1) return err;
  const int64_t total = static_cast<int64_t>(M) * N;
  splitk_reduce_kernel<T><<<grid1d(total, 256), 256, 0, stream>>>(ws, split, bias, y, total, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t linear_typed(const void* x, const void* values, const int32_t* meta_dev, const void* bias, void* y,
                         int64_t M, int64_t N, int64_t K, const LinearPlan& plan, float* ws, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const T* vp = static_cast<const T*>(values);
  const uint32_t* ep = reinterpret_cast<const uint32_t*>(meta_dev);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const unsigned gemv_grid = static_cast<unsigned>((N + 15) / 16);
  switch (plan.tile) {
    case kTileGemv8:
      gemv_kernel<T, 1><<<gemv_grid, kGemvWarps * 32, 0, stream>>>(xp, vp, ep, bp, yp, m, n, k);
      return cudaGetLastError();
    case kTileGemv16:
      gemv_kernel<T, 2><<<gemv_grid, kGemvWarps * 32, 0, stream>>>(xp, vp, ep, bp, yp, m, n, k);
      return cudaGetLastError();
    case kTile128x128:
      return launch_gemm<T, 2, 4, 3>(xp, vp, ep, bp, yp, ws, plan.split, m, n, k, stream);
    case kTile64x128:
      return launch_gemm<T, 1, 4, 3>(xp, vp, ep, bp, yp, ws, plan.split, m, n, k, stream);
    case kTile128x64:
      return launch_gemm<T, 2, 2, 4>(xp, vp, ep, bp, yp, ws, plan.split, m, n, k, stream);
    case kTile128x32:
      return launch_gemm<T, 2, 1, 4>(xp, vp, ep, bp, yp, ws, plan.split, m, n, k, stream);
    case kTileWgmma:
      return sparse_linear_wgmma_launch(x, values, meta_dev, bias, y, M, N, K, Dtype<T>::code, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t sparse_linear_plan(int64_t M, int64_t N, int64_t K, int kernel, LinearPlan* plan) {
  // M, N stay 256 below INT32_MAX so tile offsets (n0 + row, m0 + row) never overflow an int
  if (plan == nullptr || M < 0 || N < 0 || K < 0 || K % 16 != 0 || M > INT32_MAX - 256 || N > INT32_MAX - 256 ||
      K > INT32_MAX)
    return cudaErrorInvalidValue;
  LinearPlan p;
  p.kernel = kernel;
  p.split = 1;
  p.ws_elems = 0;
  if (kernel == kLinAuto) kernel = M <= 16 ? kLinGemv : kLinGemm;
  switch (kernel) {
    case kLinGemv:
      if (M > 16) return cudaErrorInvalidValue;
      p.tile = M <= 8 ? kTileGemv8 : kTileGemv16;
      break;
    case kLinGemm: {  // 128 x 128 tiles, or 64 x 128 when 128-row tiles would leave SMs idle
      const int64_t grid128 = ((N + 127) / 128) * ((M + 127) / 128);
      p.tile = grid128 >= sm_count() ? kTile128x128 : kTile64x128;
      break;
    }
    case kLinSplitK: {
      // 128 features x (32, 64 or 128) batch rows, K split across CTAs until there are about
      // kSplitKWaves CTAs per SM, each with at least kSplitKMinSpans spans of 64 columns.
      int bn = 128;
      if (M <= 32) {
        p.tile = kTile128x32;
        bn = 32;
      } else if (M <= 64) {
        p.tile = kTile128x64;
        bn = 64;
      } else {
        p.tile = kTile128x128;
      }
      const int64_t base = ((N + 127) / 128) * ((M + bn - 1) / bn);
      const int64_t spans = (K + 63) / 64;
      const int64_t want = static_cast<int64_t>(kSplitKWaves) * sm_count();
      int64_t split = base > 0 ? (want + base - 1) / base : 1;
      const int64_t cap = spans / kSplitKMinSpans > 1 ? spans / kSplitKMinSpans : 1;
      if (split > cap) split = cap;
      if (split > kSplitKMax) split = kSplitKMax;
      if (split < 1) split = 1;
      const int64_t per = (spans + split - 1) / split;  // no empty split: every z gets >= 1 span
      split = per > 0 ? (spans + per - 1) / per : 1;
      p.split = static_cast<int>(split);
      if (p.split > 1) p.ws_elems = static_cast<int64_t>(p.split) * M * N;
      break;
    }
    case kLinWgmma:
      p.tile = kTileWgmma;
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if ((M + tile_rows(p.tile) - 1) / tile_rows(p.tile) > 65535) return cudaErrorInvalidValue;  // grid.y
  *plan = p;
  return cudaSuccess;
}

cudaError_t reorder_meta_mma_launch(const int16_t* meta, int64_t rows, int64_t cols16, int32_t* meta_dev,
                                    cudaStream_t stream) {
  const int64_t blocks = (rows + 15) / 16, spans = (cols16 + 3) / 4;
  const int64_t total = blocks * spans * 32;
  if (total == 0) return cudaSuccess;
  reorder_meta_kernel<<<grid1d(total, 256), 256, 0, stream>>>(meta, rows, cols16, meta_dev, blocks, spans);
  return cudaGetLastError();
}

cudaError_t unreorder_meta_mma_launch(const int32_t* meta_dev, int64_t rows, int64_t cols16, int16_t* meta,
                                      cudaStream_t stream) {
  const int64_t spans = (cols16 + 3) / 4;
  if (rows * cols16 == 0) return cudaSuccess;
  unreorder_meta_kernel<<<grid1d(rows * cols16, 256), 256, 0, stream>>>(meta_dev, rows, cols16, meta, spans);
  return cudaGetLastError();
}

cudaError_t sparse_linear_launch(const void* x, const void* values, const int32_t* meta_dev, const void* bias,
                                 void* y, int64_t M, int64_t N, int64_t K, int dtype, const LinearPlan& plan,
                                 float* ws, int64_t ws_elems, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 16 != 0 || M > INT32_MAX - 256 || N > INT32_MAX - 256 || K > INT32_MAX ||
      (M + tile_rows(plan.tile) - 1) / tile_rows(plan.tile) > 65535 || plan.split < 1 ||
      (plan.ws_elems > 0 && (ws == nullptr || ws_elems < plan.ws_elems)) ||
      (plan.split > 1 && plan.ws_elems < static_cast<int64_t>(plan.split) * M * N))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case kF16:
      return linear_typed<__half>(x, values, meta_dev, bias, y, M, N, K, plan, ws, stream);
    case kBF16:
      return linear_typed<__nv_bfloat16>(x, values, meta_dev, bias, y, M, N, K, plan, ws, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sk
