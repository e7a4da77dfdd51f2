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

// Joint int4 (sparsegpt_block_update_int4): groups of G columns (G divides B), scale_kind 0/1/2
// for float32/float16/bfloat16 scales; outputs keep [rows, B] bool, codes [rows, B] int8,
// scales [rows, B / G] fp32.
struct Int4Out {
  int G = 0;
  int scale_kind = 0;
  bool* keep = nullptr;
  int8_t* codes = nullptr;
  float* scales = nullptr;
};

// As sparsegpt_block_update_launch, with each kept weight rounded to its int4 value.
cudaError_t sparsegpt_block_update_int4_launch(const float* W1, const float* Hinv1, const bool* mask1, int64_t rows,
                                               int B, int n, int m, float* Q1, float* Err1, float* losses,
                                               const Int4Out& q4, cudaStream_t stream);

}  // namespace sk
