// The 2:4 format's data errors, raised with one text by every C++ backend (CPU and CUDA
// wrappers); the Python reference (sparse_kernels/reference/sparse24.py) raises the same
// text, and the tests match on it.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace sparse_kernels {

[[noreturn]] inline void raise_mask_nan(const char* what) {
  TORCH_CHECK_VALUE(false, "mask_2to4: ", what, " contains NaN; a 2:4 mask needs comparable values");
  __builtin_unreachable();
}

// Row r, first column c of the first group with n > 2 nonzeros.
[[noreturn]] inline void raise_not_2to4(int64_t r, int64_t c, int64_t n) {
  TORCH_CHECK_VALUE(false, "compress_2to4: w is not 2:4 sparse: the group at row ", r, ", columns ", c, "..", c + 3,
                    " has ", n, " nonzeros (at most 2 allowed); pass prune=True to keep the 2 largest of each group");
  __builtin_unreachable();
}

// Row r, group g of the first nibble with i0 >= i1.
[[noreturn]] inline void raise_bad_nibble(int64_t r, int64_t g, int64_t nib) {
  TORCH_CHECK_VALUE(false, "decompress_2to4: meta is corrupt: row ", r, ", group ", g, " (columns ", 4 * g, "..",
                    4 * g + 3, ") has nibble ", nib, " with i0=", nib & 3, " >= i1=", nib >> 2,
                    "; valid nibbles are (4, 8, 9, 12, 13, 14)");
  __builtin_unreachable();
}

}  // namespace sparse_kernels
