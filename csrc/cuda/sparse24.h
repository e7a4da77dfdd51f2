// Host launchers of csrc/cuda/sparse24.cu (the 2:4 format on CUDA).
// Raw pointers and a cudaStream_t only: the .cu file compiles with plain nvcc.
// Every launcher returns cudaSuccess or the launch error; data-dependent
// errors are reported through `flag` (see sparse24.cu).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace sk {

// Element type codes shared by the CUDA launchers.
enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// mask [groups*4] bool from w (and optional scores, `scores_dtype`), groups of 4 contiguous.
// flag: int64 device scalar pre-set to INT64_MAX; receives the smallest group index with a NaN score.
cudaError_t mask_2to4_launch(const void* w, int w_dtype, const void* scores, int scores_dtype, bool* mask,
                             int64_t groups, int64_t* flag, cudaStream_t stream);

// w [rows, cols] (cols % 16 == 0) -> values [rows, cols/2], meta [rows, cols/16] int16.
// flag: smallest flat group index (row * cols/4 + group) with > 2 nonzeros (prune == false),
// or with a NaN |w| (prune == true).
cudaError_t compress_2to4_launch(const void* w, int dtype, int64_t rows, int64_t cols, bool prune, void* values,
                                 int16_t* meta, int64_t* flag, cudaStream_t stream);

// values [rows, cols/2], meta [rows, cols/16] -> w [rows, cols].
// flag: smallest flat group index whose nibble has i0 >= i1.
cudaError_t decompress_2to4_launch(const void* values, const int16_t* meta, int dtype, int64_t rows, int64_t cols,
                                   void* w, int64_t* flag, cudaStream_t stream);

}  // namespace sk
