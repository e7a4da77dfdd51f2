// Host launchers of csrc/cuda/linear.cu (2:4 sparse tensor-core GEMM and its metadata layout).
// Raw pointers and a cudaStream_t only: the .cu file compiles with plain nvcc.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "sparse24.h"  // sk::DType codes

namespace sk {

// Device metadata layout (docs/CUDA.md, sparse_kernels/reference/mma_layout.py):
// meta_dev [ceil(N/16), ceil(K/64), 32] int32, one word per lane per (16-row block, 64-col span).
// meta [N, K/16] int16 canonical -> meta_dev.  Padding rows/columns get nibble 0x4 (indices 0, 1).
cudaError_t reorder_meta_mma_launch(const int16_t* meta, int64_t rows, int64_t cols16, int32_t* meta_dev,
                                    cudaStream_t stream);
// meta_dev -> meta [rows, cols16] (the padding is dropped).
cudaError_t unreorder_meta_mma_launch(const int32_t* meta_dev, int64_t rows, int64_t cols16, int16_t* meta,
                                      cudaStream_t stream);

// Which kernel runs sparse_linear (the `kernel` argument of sparse_linear_cuda_kernel):
//   kLinAuto   M <= 16: the decode GEMV, else the GEMM (the kernels the first GPU run measured);
//   kLinGemv   the decode GEMV (M <= 16 only);
//   kLinGemm   the GEMM: 128 x 128 CTA tiles, or 64 x 128 when those leave SMs idle;
//   kLinSplitK the GEMM with 128 x 32/64/128 tiles (by M) and K split across CTAs (fp32 partials in
//              a workspace, then a deterministic reduction): for mid-size batches, where the plain
//              GEMM has too few CTAs to stream the weight.  Compiled, not yet run on a GPU.
//   kLinWgmma  Hopper's warpgroup sparse MMA (linear_wgmma.cu, sm_90a builds on sm_90 devices
//              only: sparse_linear_wgmma_supported()), 256 x 128 tiles, for large batches.
//              Compiled, not yet run on a GPU.
enum LinearKernel : int { kLinAuto = 0, kLinGemv = 1, kLinGemm = 2, kLinSplitK = 3, kLinWgmma = 4 };
enum LinearTile : int { kTileGemv8, kTileGemv16, kTile128x128, kTile64x128, kTile128x64, kTile128x32, kTileWgmma };

// Split-K rule (first guesses, compiled, not yet run on a GPU): split until the grid has about
// kSplitKWaves CTAs per SM, each CTA keeping >= kSplitKMinSpans spans of 64 columns, <= kSplitKMax splits.
constexpr int kSplitKWaves = 3;
constexpr int kSplitKMinSpans = 8;
constexpr int kSplitKMax = 16;

struct LinearPlan {
  int kernel = kLinAuto;  // as requested
  int tile = kTileGemv8;  // what runs
  int split = 1;          // CTAs along K
  int64_t ws_elems = 0;   // fp32 workspace elements the call needs (split * M * N when split > 1)
};

// The plan for y [M, N] = x [M, K] @ W^T: cudaErrorInvalidValue for a kernel that cannot run
// this shape (kLinGemv with M > 16) or sizes past int32.  Reads the SM count of the current device.
cudaError_t sparse_linear_plan(int64_t M, int64_t N, int64_t K, int kernel, LinearPlan* plan);

// y [M, N] = x [M, K] @ W^T (+ bias [N]), W [N, K] 2:4 given as canonical values [N, K/2] and
// meta_dev.  dtype kF16 or kBF16 for x, values, bias and y; fp32 accumulation.  `plan` from
// sparse_linear_plan for the same M, N, K; `ws` holds at least plan.ws_elems floats (may be null
// when that is 0).
// Requirements (the wrapper checks): K % 16 == 0, x/values 16-byte aligned, contiguous rows.
cudaError_t sparse_linear_launch(const void* x, const void* values, const int32_t* meta_dev, const void* bias,
                                 void* y, int64_t M, int64_t N, int64_t K, int dtype, const LinearPlan& plan,
                                 float* ws, int64_t ws_elems, cudaStream_t stream);

// linear_wgmma.cu: whether the current device can run kLinWgmma (an sm_90 GPU, and this build
// has sm_90a code), and its launcher (same contract as sparse_linear_launch, no workspace).
bool sparse_linear_wgmma_supported();
cudaError_t sparse_linear_wgmma_launch(const void* x, const void* values, const int32_t* meta_dev, const void* bias,
                                       void* y, int64_t M, int64_t N, int64_t K, int dtype, cudaStream_t stream);

}  // namespace sk
