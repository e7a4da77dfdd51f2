// The 2:4 format on CUDA: mask_2to4, compress_2to4, decompress_2to4.
//
// Bit-exact twin of sparse_kernels/reference/sparse24.py (read its docstring):
//   * groups of 4 run along the last (contiguous) dim;
//   * values [rows, cols/2] keep w[4g+i0], w[4g+i1] (i0 < i1) at 2g, 2g+1;
//   * meta [rows, cols/16] int16, group g's nibble i0 | i1 << 2 at bits 4*(g%4);
//   * mask: keep the 2 largest scores, ties to the lower index (position j beats i when
//     s_j > s_i, or s_j == s_i and j < i; i is kept when fewer than two positions beat it);
//   * compress: priority 2 for a nonzero (NaN, inf included), 1 for -0.0, 0 for +0.0,
//     same top-2 rule on the priorities.
// Zero tests work on the bit patterns (x != 0 <=> bits without the sign bit != 0), so no
// value is ever converted on the compress/decompress paths.
//
// Data-dependent errors never abort a kernel: the offending flat group index is
// atomicMin'ed into an int64 device flag (pre-set to INT64_MAX) and the ATen wrapper
// (sparse24_ops.cpp) raises the reference's ValueError text after the launch.
//
// Work mapping: mask, one thread per group of 4; compress/decompress, one thread per
// 16-column chunk (4 groups = one meta int16), grid-stride loops, 16-byte vector
// loads/stores when every pointer is 16-byte aligned (the launcher checks), scalar
// otherwise.  These kernels are memory-bound streaming passes; 256 threads per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "sparse24.h"

namespace sk {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Bits;
template <>
struct Bits<__half> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  __device__ static float abs_f(U b) { return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0x7fffu))); }
};
template <>
struct Bits<__nv_bfloat16> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  __device__ static float abs_f(U b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b & 0x7fffu)));
  }
};
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U kSign = 0x80000000u;
  __device__ static float abs_f(U b) { return __uint_as_float(b & 0x7fffffffu); }
};

// Scores of any supported dtype, compared in float (exact for f16/bf16/f32) or double.
template <typename S>
struct Score;
template <>
struct Score<__half> {
  using C = float;
  __device__ static C load(const __half* p) { return __half2float(p[0]); }
};
template <>
struct Score<__nv_bfloat16> {
  using C = float;
  __device__ static C load(const __nv_bfloat16* p) { return __bfloat162float(p[0]); }
};
template <>
struct Score<float> {
  using C = float;
  __device__ static C load(const float* p) { return p[0]; }
};
template <>
struct Score<double> {
  using C = double;
  __device__ static C load(const double* p) { return p[0]; }
};

// keep[i] for the top-2 rule; s may be float/double/int priorities.
template <typename C>
__device__ __forceinline__ unsigned keep_top2(const C s[4]) {
  unsigned keep = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int beaten = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) beaten += (s[j] > s[i]) || (s[j] == s[i] && j < i);
    keep |= (beaten < 2 ? 1u : 0u) << i;
  }
  return keep;  // exactly two bits set for comparable (non-NaN) scores
}

// Ascending indices (i0 < i1) of the two set bits of a 4-bit mask with two bits set.
__device__ __forceinline__ void two_indices(unsigned keep, int& i0, int& i1) {
  i0 = __ffs(keep) - 1;
  i1 = __ffs(keep & ~(1u << i0)) - 1;
}

// q[i] for a runtime i in 0..3 with static register indices only (no local-memory array).
template <typename U>
__device__ __forceinline__ U pick4(const U* q, int i) {
  return i == 0 ? q[0] : (i == 1 ? q[1] : (i == 2 ? q[2] : q[3]));
}

__device__ __forceinline__ void flag_min(int64_t* flag, int64_t v) {
  atomicMin(reinterpret_cast<unsigned long long*>(flag), static_cast<unsigned long long>(v));
}

// ------------------------------------------------------------------ mask_2to4
template <typename T, typename S, bool kHasScores>
__global__ void __launch_bounds__(kThreads) mask_kernel(const T* __restrict__ w, const S* __restrict__ scores,
                                                        bool* __restrict__ mask, int64_t groups, int64_t* flag) {
  using B = Bits<T>;
  using C = typename std::conditional<kHasScores, typename Score<S>::C, float>::type;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    C s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kHasScores) {
        s[i] = Score<S>::load(scores + 4 * g + i);
      } else {
        const typename B::U* wb = reinterpret_cast<const typename B::U*>(w);
        s[i] = B::abs_f(wb[4 * g + i]);
      }
    }
    bool nan = false;
#pragma unroll
    for (int i = 0; i < 4; ++i) nan |= (s[i] != s[i]);
    if (nan) flag_min(flag, g);
    const unsigned keep = keep_top2(s);
    const uint32_t packed = (keep & 1u) | ((keep >> 1) & 1u) << 8 | ((keep >> 2) & 1u) << 16 | ((keep >> 3) & 1u) << 24;
    reinterpret_cast<uint32_t*>(mask)[g] = packed;  // bool is one byte: 0 or 1
  }
}

// ------------------------------------------------------------------ compress / decompress
// Load / store 16 consecutive elements (one 16-column chunk).
template <typename U, bool kVec>
__device__ __forceinline__ void load16(const U* __restrict__ p, U (&v)[16]) {
  if constexpr (kVec) {
    constexpr int kN = 16 * sizeof(U) / 16;  // uint4 count
#pragma unroll
    for (int i = 0; i < kN; ++i) reinterpret_cast<uint4*>(v)[i] = reinterpret_cast<const uint4*>(p)[i];
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = p[i];
  }
}

template <typename U, bool kVec>
__device__ __forceinline__ void store8(U* __restrict__ p, const U (&v)[8]) {
  if constexpr (kVec) {
    constexpr int kN = 8 * sizeof(U) / 16;
#pragma unroll
    for (int i = 0; i < kN; ++i) reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(v)[i];
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    compress_kernel(const T* __restrict__ w, int64_t rows, int64_t cols, bool prune, T* __restrict__ values,
                    int16_t* __restrict__ meta, int64_t* flag) {
  using B = Bits<T>;
  using U = typename B::U;
  const int64_t chunks_per_row = cols / 16;
  const int64_t chunks = rows * chunks_per_row;
  const U* wb = reinterpret_cast<const U*>(w);
  U* vb = reinterpret_cast<U*>(values);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    alignas(16) U x[16];
    load16<U, kVec>(wb + 16 * c, x);
    alignas(16) U out[8];
    uint32_t word = 0;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      U* q = x + 4 * g;
      if (prune) {
        float s[4];
        bool nan = false;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[i] = B::abs_f(q[i]);
          nan |= (s[i] != s[i]);
        }
        if (nan) flag_min(flag, 4 * c + g);
        const unsigned keep = keep_top2(s);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (!((keep >> i) & 1u)) q[i] = 0;  // pruned entries become +0.0
      }
      int prio[4];
      int nnz = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool nonzero = (q[i] & static_cast<U>(~B::kSign)) != 0;
        nnz += nonzero;
        prio[i] = nonzero ? 2 : (q[i] == B::kSign ? 1 : 0);
      }
      if (nnz > 2) flag_min(flag, 4 * c + g);
      int i0, i1;
      two_indices(keep_top2(prio), i0, i1);
      out[2 * g] = pick4(q, i0);
      out[2 * g + 1] = pick4(q, i1);
      word |= static_cast<uint32_t>(i0 | (i1 << 2)) << (4 * g);
    }
    store8<U, kVec>(vb + 8 * c, out);
    meta[c] = static_cast<int16_t>(static_cast<uint16_t>(word));
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    decompress_kernel(const T* __restrict__ values, const int16_t* __restrict__ meta, int64_t rows, int64_t cols,
                      T* __restrict__ w, int64_t* flag) {
  using U = typename Bits<T>::U;
  const int64_t chunks = rows * (cols / 16);
  const U* vb = reinterpret_cast<const U*>(values);
  U* wb = reinterpret_cast<U*>(w);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    alignas(16) U v[8];
    if constexpr (kVec) {
      constexpr int kN = 8 * sizeof(U) / 16;
#pragma unroll
      for (int i = 0; i < kN; ++i) reinterpret_cast<uint4*>(v)[i] = reinterpret_cast<const uint4*>(vb + 8 * c)[i];
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = vb[8 * c + i];
    }
    const uint32_t word = static_cast<uint16_t>(meta[c]);
    alignas(16) U out[16];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int nib = (word >> (4 * g)) & 0xF;
      const int i0 = nib & 3, i1 = nib >> 2;
      if (i0 >= i1) flag_min(flag, 4 * c + g);  // the output is then garbage; the wrapper raises
#pragma unroll
      for (int i = 0; i < 4; ++i) out[4 * g + i] = i == i1 ? v[2 * g + 1] : (i == i0 ? v[2 * g] : U(0));
    }
    if constexpr (kVec) {
      constexpr int kN = 16 * sizeof(U) / 16;
#pragma unroll
      for (int i = 0; i < kN; ++i) reinterpret_cast<uint4*>(wb + 16 * c)[i] = reinterpret_cast<const uint4*>(out)[i];
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) wb[16 * c + i] = out[i];
    }
  }
}

int grid_for(int64_t work) {
  // Enough blocks to fill any current GPU several times over; grid-stride beyond that.
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t mask_dispatch_scores(const void* w, const void* scores, int scores_dtype, bool* mask, int64_t groups,
                                 int64_t* flag, cudaStream_t stream) {
  const int grid = grid_for(groups);
  const T* wp = static_cast<const T*>(w);
  if (scores == nullptr) {
    mask_kernel<T, float, false><<<grid, kThreads, 0, stream>>>(wp, nullptr, mask, groups, flag);
  } else {
    switch (scores_dtype) {
      case kF16:
        mask_kernel<T, __half, true>
            <<<grid, kThreads, 0, stream>>>(wp, static_cast<const __half*>(scores), mask, groups, flag);
        break;
      case kBF16:
        mask_kernel<T, __nv_bfloat16, true>
            <<<grid, kThreads, 0, stream>>>(wp, static_cast<const __nv_bfloat16*>(scores), mask, groups, flag);
        break;
      case kF32:
        mask_kernel<T, float, true>
            <<<grid, kThreads, 0, stream>>>(wp, static_cast<const float*>(scores), mask, groups, flag);
        break;
      case kF64:
        mask_kernel<T, double, true>
            <<<grid, kThreads, 0, stream>>>(wp, static_cast<const double*>(scores), mask, groups, flag);
        break;
      default:
        return cudaErrorInvalidValue;
    }
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t compress_typed(const void* w, int64_t rows, int64_t cols, bool prune, void* values, int16_t* meta,
                           int64_t* flag, cudaStream_t stream) {
  const int grid = grid_for(rows * (cols / 16));
  if (aligned16(w) && aligned16(values)) {
    compress_kernel<T, true><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(w), rows, cols, prune,
                                                             static_cast<T*>(values), meta, flag);
  } else {
    compress_kernel<T, false><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(w), rows, cols, prune,
                                                              static_cast<T*>(values), meta, flag);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t decompress_typed(const void* values, const int16_t* meta, int64_t rows, int64_t cols, void* w,
                             int64_t* flag, cudaStream_t stream) {
  const int grid = grid_for(rows * (cols / 16));
  if (aligned16(w) && aligned16(values)) {
    decompress_kernel<T, true><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(values), meta, rows, cols,
                                                               static_cast<T*>(w), flag);
  } else {
    decompress_kernel<T, false><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(values), meta, rows, cols,
                                                                static_cast<T*>(w), flag);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t mask_2to4_launch(const void* w, int w_dtype, const void* scores, int scores_dtype, bool* mask,
                             int64_t groups, int64_t* flag, cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  switch (w_dtype) {
    case kF16:
      return mask_dispatch_scores<__half>(w, scores, scores_dtype, mask, groups, flag, stream);
    case kBF16:
      return mask_dispatch_scores<__nv_bfloat16>(w, scores, scores_dtype, mask, groups, flag, stream);
    case kF32:
      return mask_dispatch_scores<float>(w, scores, scores_dtype, mask, groups, flag, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t compress_2to4_launch(const void* w, int dtype, int64_t rows, int64_t cols, bool prune, void* values,
                                 int16_t* meta, int64_t* flag, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case kF16:
      return compress_typed<__half>(w, rows, cols, prune, values, meta, flag, stream);
    case kBF16:
      return compress_typed<__nv_bfloat16>(w, rows, cols, prune, values, meta, flag, stream);
    case kF32:
      return compress_typed<float>(w, rows, cols, prune, values, meta, flag, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t decompress_2to4_launch(const void* values, const int16_t* meta, int dtype, int64_t rows, int64_t cols,
                                   void* w, int64_t* flag, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case kF16:
      return decompress_typed<__half>(values, meta, rows, cols, w, flag, stream);
    case kBF16:
      return decompress_typed<__nv_bfloat16>(values, meta, rows, cols, w, flag, stream);
    case kF32:
      return decompress_typed<float>(values, meta, rows, cols, w, flag, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sk
