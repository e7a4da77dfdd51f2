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

// y [M, N] = x [M, K] @ W^T (+ bias [N]), W [N, K] 2:4 given as canonical values [N, K/2] and
// meta_dev.  dtype kF16 or kBF16 for x, values, bias and y; fp32 accumulation.
// Requirements (the wrapper checks): K % 16 == 0, x/values 16-byte aligned, contiguous rows.
cudaError_t sparse_linear_launch(const void* x, const void* values, const int32_t* meta_dev, const void* bias,
                                 void* y, int64_t M, int64_t N, int64_t K, int dtype, cudaStream_t stream);

}  // namespace sk
