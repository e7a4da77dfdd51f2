// Host launcher of csrc/cuda/sparsegpt.cu (the fused SparseGPT block update).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace sk {

// W1 [rows, B] fp32, Hinv1 [B, B] fp32 (upper triangle read), mask1 [rows, B] bool (True = keep;
// read only when m == 0, may be null otherwise) -> Q1 [rows, B], Err1 [rows, B], losses [rows].
// 1 <= B <= 256; m == 0 or 1 <= m <= 32 with 0 <= n <= m.  All pointers contiguous.
cudaError_t sparsegpt_block_update_launch(const float* W1, const float* Hinv1, const bool* mask1, int64_t rows,
                                          int B, int n, int m, float* Q1, float* Err1, float* losses,
                                          cudaStream_t stream);

}  // namespace sk
