// 2:4 format on the CPU: mask_2to4_cpp, compress_2to4_cpp, decompress_2to4_cpp.
//
// Same algorithm as sparse_kernels/reference/sparse24.py, bit for bit:
//   * W [rows, cols], groups of 4 along cols; values [rows, cols/2] (W's dtype);
//     meta [rows, cols/16] int16, group g's nibble i0 | i1 << 2 (i0 < i1) at bits
//     4*(g%4) of meta[r, g/4].
//   * keep rule: position j beats i when key_j > key_i, or key_j == key_i and j < i;
//     the two positions beaten by fewer than two others are kept.
//   * mask keys: |w| or scores; compress keys: priority 2 nonzero, 1 -0.0, 0 +0.0.
//
// Every kernel works on the raw bits, so fp16 and bf16 share one 16-bit kernel:
//   * |w| of a non-NaN float orders exactly like the integer (bits & ~sign);
//   * a signed score orders like the integer key below (with -0.0 folded onto +0.0);
//   * NaN is abs-bits > inf-bits.
// Inputs are validated (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE -> ValueError / TypeError)
// before any pointer is touched; non-contiguous inputs are made contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"
#include "sparse24_errors.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace sparse_kernels {
namespace {
using sk_cpu::atomic_min;

// ---------------------------------------------------------------- bit helpers
// The kernels below are written as straight-line, branch-free loops over groups (0/all-ones
// lane masks instead of ?:) so the compiler vectorizes them (GCC -O3, SSE2 and up:
// "loop vectorized using 16 byte vectors"); the 4 elements of a group are an interleaved load.
template <typename U>
struct Bits;
template <>
struct Bits<uint16_t> {
  static constexpr uint16_t sign = 0x8000;
};
template <>
struct Bits<uint32_t> {
  static constexpr uint32_t sign = 0x80000000u;
};
template <>
struct Bits<uint64_t> {
  static constexpr uint64_t sign = 0x8000000000000000ull;
};

// Bit pattern of +inf for a dtype (NaN iff abs bits > this).
uint64_t inf_bits(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 0x7c00;
    case at::kBFloat16: return 0x7f80;
    case at::kFloat: return 0x7f800000u;
    case at::kDouble: return 0x7ff0000000000000ull;
    default: return 0;
  }
}

template <typename U>
inline U msk(bool c) {
  return static_cast<U>(-static_cast<U>(c));
}
template <typename U>
inline U sel(U m, U a, U b) {
  return (a & m) | (b & static_cast<U>(~m));
}

// Monotone integer key of a non-NaN signed float: a < b  <=>  key(a) < key(b); -0.0 == +0.0.
template <typename U>
inline U signed_key(U b) {
  constexpr U s = Bits<U>::sign;
  const U neg = msk<U>((b & s) != 0);
  const U k = sel<U>(neg, static_cast<U>(~b), static_cast<U>(b | s));
  return sel<U>(msk<U>((b & static_cast<U>(~s)) == 0), s, k);  // both zeros -> the key of +0.0
}

// Keep masks (all-ones lanes) of the two largest keys; j beats i if k_j > k_i, or equal and j < i.
template <typename U>
inline void keep_top2(U k0, U k1, U k2, U k3, U& m0, U& m1, U& m2, U& m3) {
  const U g01 = k0 >= k1, g02 = k0 >= k2, g03 = k0 >= k3;  // gab (a < b): a beats b
  const U g12 = k1 >= k2, g13 = k1 >= k3, g23 = k2 >= k3;
  m0 = msk<U>(static_cast<U>(3 - g01 - g02 - g03) < 2);
  m1 = msk<U>(static_cast<U>(g01 + 2 - g12 - g13) < 2);
  m2 = msk<U>(static_cast<U>(g02 + g12 + 1 - g23) < 2);
  m3 = msk<U>(static_cast<U>(g03 + g13 + g23) < 2);
}

int64_t grain_for(int64_t cols) {
  // ~16K elements per task so 4096-row weights spread over all cores (a guess, not tuned:
  // the 2-core development box is too contended to measure it).
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1));
}

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// ---------------------------------------------------------------- mask
// A run of groups; keys from |w| (ABS) or from signed scores.  Returns all-ones if a NaN was seen.
template <typename U, bool ABS>
U mask_row(const U* __restrict s, U* __restrict keep, int64_t groups, U inf) {
  constexpr U nosign = static_cast<U>(~Bits<U>::sign);
  U nan = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const U x0 = s[4 * g], x1 = s[4 * g + 1], x2 = s[4 * g + 2], x3 = s[4 * g + 3];
    const U a0 = x0 & nosign, a1 = x1 & nosign, a2 = x2 & nosign, a3 = x3 & nosign;
    nan |= msk<U>(a0 > inf) | msk<U>(a1 > inf) | msk<U>(a2 > inf) | msk<U>(a3 > inf);
    U m0, m1, m2, m3;
    if (ABS)
      keep_top2<U>(a0, a1, a2, a3, m0, m1, m2, m3);
    else
      keep_top2<U>(signed_key(x0), signed_key(x1), signed_key(x2), signed_key(x3), m0, m1, m2, m3);
    keep[4 * g] = m0, keep[4 * g + 1] = m1, keep[4 * g + 2] = m2, keep[4 * g + 3] = m3;
  }
  return nan;
}

template <typename U, bool ABS>
bool mask_kernel(const U* s, bool* out, int64_t rows, int64_t cols, U inf) {
  std::atomic<bool> nan{false};
  constexpr int64_t kChunk = 4096;  // groups per pass through the keep buffer (fits L1/L2; not tuned)
  const int64_t n = rows * cols / 4;
  at::parallel_for(0, n, std::max<int64_t>(kChunk, grain_for(cols) * cols / 4), [&](int64_t g0, int64_t g1) {
    std::vector<U> keep(4 * kChunk);
    U any = 0;
    for (int64_t c0 = g0; c0 < g1; c0 += kChunk) {
      const int64_t len = std::min(kChunk, g1 - c0);
      any |= mask_row<U, ABS>(s + 4 * c0, keep.data(), len, inf);
      uint8_t* o = reinterpret_cast<uint8_t*>(out) + 4 * c0;
      for (int64_t i = 0; i < 4 * len; ++i) o[i] = static_cast<uint8_t>(keep[i] & 1);
    }
    if (any) nan.store(true, std::memory_order_relaxed);
  });
  return !nan.load();
}

// ---------------------------------------------------------------- compress
// One row: values and one nibble per group (in nib, packed into meta afterwards).
// Returns all-ones if a group has more than two nonzeros (never with PRUNE).
template <typename U, bool PRUNE>
U compress_row(const U* __restrict src, U* __restrict vdst, U* __restrict nib, int64_t groups, U inf,
               U& nan) {
  constexpr U sign = Bits<U>::sign;
  constexpr U nosign = static_cast<U>(~sign);
  U many = 0, nanacc = 0;
  for (int64_t g = 0; g < groups; ++g) {
    U x0 = src[4 * g], x1 = src[4 * g + 1], x2 = src[4 * g + 2], x3 = src[4 * g + 3];
    U a0 = x0 & nosign, a1 = x1 & nosign, a2 = x2 & nosign, a3 = x3 & nosign;
    if (PRUNE) {  // mask_2to4(w) first: the dropped positions become +0.0
      nanacc |= msk<U>(a0 > inf) | msk<U>(a1 > inf) | msk<U>(a2 > inf) | msk<U>(a3 > inf);
      U m0, m1, m2, m3;
      keep_top2<U>(a0, a1, a2, a3, m0, m1, m2, m3);
      x0 &= m0, x1 &= m1, x2 &= m2, x3 &= m3;
      a0 &= m0, a1 &= m1, a2 &= m2, a3 &= m3;
    }
    // priority: 2 nonzero, 1 -0.0, 0 +0.0
    const U n0 = a0 != 0, n1 = a1 != 0, n2 = a2 != 0, n3 = a3 != 0;
    U k0, k1, k2, k3;
    keep_top2<U>(2 * n0 + (x0 == sign), 2 * n1 + (x1 == sign), 2 * n2 + (x2 == sign), 2 * n3 + (x3 == sign),
                 k0, k1, k2, k3);
    many |= msk<U>(static_cast<U>(n0 + n1 + n2 + n3) > 2);
    const U i0 = sel<U>(k0, 0, sel<U>(k1, 1, 2));
    const U i1 = sel<U>(k3, 3, sel<U>(k2, 2, 1));
    vdst[2 * g] = sel<U>(k0, x0, sel<U>(k1, x1, x2));
    vdst[2 * g + 1] = sel<U>(k3, x3, sel<U>(k2, x2, x1));
    nib[g] = i0 | static_cast<U>(i1 << 2);
  }
  nan |= nanacc;
  return many;
}

template <typename U>
void pack_meta(const U* __restrict nib, int16_t* __restrict meta, int64_t words) {
  for (int64_t q = 0; q < words; ++q)
    meta[q] = static_cast<int16_t>(static_cast<uint16_t>(nib[4 * q] | nib[4 * q + 1] << 4 | nib[4 * q + 2] << 8 |
                                                         nib[4 * q + 3] << 12));
}

// Returns the flat index r * groups + g of the first group with > 2 nonzeros, or kNone.
template <typename U, bool PRUNE>
int64_t compress_kernel(const U* w, U* values, int16_t* meta, int64_t rows, int64_t cols, U inf,
                        bool* nan_seen) {
  constexpr U nosign = static_cast<U>(~Bits<U>::sign);
  const int64_t groups = cols / 4;
  std::atomic<int64_t> first_bad{kNone};
  std::atomic<bool> nan{false};
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    std::vector<U> nib(groups);
    U local_nan = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const U* src = w + r * cols;
      const U many = compress_row<U, PRUNE>(src, values + r * (cols / 2), nib.data(), groups, inf, local_nan);
      pack_meta<U>(nib.data(), meta + r * (cols / 16), cols / 16);
      if (!PRUNE && many) {
        for (int64_t g = 0; g < groups; ++g) {
          int nnz = 0;
          for (int i = 0; i < 4; ++i) nnz += (src[4 * g + i] & nosign) != 0;
          if (nnz > 2) {
            atomic_min(first_bad, r * groups + g);
            break;
          }
        }
        break;  // rows after this one cannot hold an earlier bad group
      }
    }
    if (local_nan) nan.store(true, std::memory_order_relaxed);
  });
  *nan_seen = nan.load();
  return first_bad.load();
}

// ---------------------------------------------------------------- decompress
// One row; returns all-ones if some nibble is invalid (i0 >= i1).
template <typename U>
U decompress_row(const U* __restrict vsrc, const int16_t* __restrict msrc, U* __restrict nib, U* __restrict dst,
                 int64_t groups) {
  for (int64_t q = 0; q < groups / 4; ++q) {
    const U word = static_cast<uint16_t>(msrc[q]);
    nib[4 * q] = word & 15;
    nib[4 * q + 1] = (word >> 4) & 15;
    nib[4 * q + 2] = (word >> 8) & 15;
    nib[4 * q + 3] = (word >> 12) & 15;
  }
  U bad = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const U i0 = nib[g] & 3, i1 = nib[g] >> 2;
    bad |= msk<U>(i0 >= i1);
    const U v0 = vsrc[2 * g], v1 = vsrc[2 * g + 1];
    dst[4 * g] = v0 & msk<U>(i0 == 0);
    dst[4 * g + 1] = (v0 & msk<U>(i0 == 1)) | (v1 & msk<U>(i1 == 1));
    dst[4 * g + 2] = (v0 & msk<U>(i0 == 2)) | (v1 & msk<U>(i1 == 2));
    dst[4 * g + 3] = v1 & msk<U>(i1 == 3);
  }
  return bad;
}

// Returns the flat index r * groups + g of the first group with an invalid nibble, or kNone.
template <typename U>
int64_t decompress_kernel(const U* values, const int16_t* meta, U* out, int64_t rows, int64_t cols) {
  const int64_t groups = cols / 4;
  std::atomic<int64_t> first_bad{kNone};
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    std::vector<U> nib(groups);
    for (int64_t r = r0; r < r1; ++r) {
      const int16_t* msrc = meta + r * (cols / 16);
      if (decompress_row<U>(values + r * (cols / 2), msrc, nib.data(), out + r * cols, groups)) {
        for (int64_t g = 0; g < groups; ++g) {
          const unsigned n = (static_cast<uint16_t>(msrc[g / 4]) >> (4 * (g % 4))) & 15;
          if ((n & 3) >= (n >> 2)) {
            atomic_min(first_bad, r * groups + g);
            break;
          }
        }
        break;
      }
    }
  });
  return first_bad.load();
}

// ---------------------------------------------------------------- ATen wrappers
bool is_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, ": dtype ", t.scalar_type(),
                   " is not supported; expected one of float16, bfloat16, float32");
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": the cpp backend needs a CPU tensor, got ", t.device());
}

at::Tensor mask_2to4_cpp(const at::Tensor& w, const std::optional<at::Tensor>& scores) {
  check_cpu(w, "w");
  check_float(w, "w");
  TORCH_CHECK_VALUE(w.dim() >= 1, "w: expected at least 1 dims, got shape ", w.sizes());
  const int64_t cols = w.size(-1);
  TORCH_CHECK_VALUE(cols % 4 == 0, "w: the last dim must be a multiple of 4, got ", cols,
                    " (groups of 4 run along the last dim)");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  const int64_t rows = w.numel() / cols;
  bool* o = out.data_ptr<bool>();
  bool ok;
  const char* what = "w";
  if (scores.has_value()) {
    const at::Tensor& s0 = *scores;
    check_cpu(s0, "scores");
    TORCH_CHECK_TYPE(is_float(s0.scalar_type()) || s0.scalar_type() == at::kDouble, "scores: dtype ",
                     s0.scalar_type(), " is not supported; expected one of float16, bfloat16, float32, float64");
    TORCH_CHECK_VALUE(s0.sizes() == w.sizes(), "scores: shape ", s0.sizes(), " must equal w's shape ", w.sizes());
    const at::Tensor s = s0.contiguous();
    const uint64_t inf = inf_bits(s.scalar_type());
    what = "scores";
    switch (s.element_size()) {
      case 2: ok = mask_kernel<uint16_t, false>(static_cast<const uint16_t*>(s.const_data_ptr()), o, rows, cols, inf); break;
      case 4: ok = mask_kernel<uint32_t, false>(static_cast<const uint32_t*>(s.const_data_ptr()), o, rows, cols, inf); break;
      default: ok = mask_kernel<uint64_t, false>(static_cast<const uint64_t*>(s.const_data_ptr()), o, rows, cols, inf); break;
    }
  } else {
    const at::Tensor s = w.contiguous();
    const uint64_t inf = inf_bits(s.scalar_type());
    if (s.element_size() == 2)
      ok = mask_kernel<uint16_t, true>(static_cast<const uint16_t*>(s.const_data_ptr()), o, rows, cols, inf);
    else
      ok = mask_kernel<uint32_t, true>(static_cast<const uint32_t*>(s.const_data_ptr()), o, rows, cols, inf);
  }
  if (!ok) raise_mask_nan(what);
  return out;
}

std::tuple<at::Tensor, at::Tensor> compress_2to4_cpp(const at::Tensor& w0, bool prune) {
  check_cpu(w0, "w");
  check_float(w0, "w");
  TORCH_CHECK_VALUE(w0.dim() == 2, "w: expected a 2-D tensor, got ", w0.dim(), "-D with shape ", w0.sizes());
  const int64_t rows = w0.size(0), cols = w0.size(1);
  TORCH_CHECK_VALUE(cols % 16 == 0, "w: the number of columns (w.shape[1]) must be a multiple of 16, got ", cols,
                    "; pad the columns with zeros to a multiple of 16 (e.g. torch.nn.functional.pad) first");
  const at::Tensor w = w0.contiguous();
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, cols / 16}, w.options().dtype(at::kShort));
  if (w.numel() == 0) return {values, meta};
  int16_t* m = meta.data_ptr<int16_t>();
  bool nan = false;
  int64_t bad;
  const uint64_t inf = inf_bits(w.scalar_type());
  if (w.element_size() == 2) {
    auto* src = static_cast<const uint16_t*>(w.const_data_ptr());
    auto* v = static_cast<uint16_t*>(values.data_ptr());
    bad = prune ? compress_kernel<uint16_t, true>(src, v, m, rows, cols, inf, &nan)
                : compress_kernel<uint16_t, false>(src, v, m, rows, cols, inf, &nan);
  } else {
    auto* src = static_cast<const uint32_t*>(w.const_data_ptr());
    auto* v = static_cast<uint32_t*>(values.data_ptr());
    bad = prune ? compress_kernel<uint32_t, true>(src, v, m, rows, cols, inf, &nan)
                : compress_kernel<uint32_t, false>(src, v, m, rows, cols, inf, &nan);
  }
  if (nan) raise_mask_nan("w");
  if (bad != kNone) {
    const int64_t r = bad / (cols / 4), c = 4 * (bad % (cols / 4));
    const at::Tensor grp = w.index({r}).narrow(0, c, 4);
    const int64_t n = grp.ne(0).sum().item<int64_t>();
    raise_not_2to4(r, c, n);
  }
  return {values, meta};
}

at::Tensor decompress_2to4_cpp(const at::Tensor& values0, const at::Tensor& meta0) {
  check_cpu(values0, "values");
  check_cpu(meta0, "meta");
  check_float(values0, "values");
  TORCH_CHECK_TYPE(meta0.scalar_type() == at::kShort, "meta: dtype ", meta0.scalar_type(),
                   " is not supported; expected int16");
  TORCH_CHECK_VALUE(values0.dim() == 2, "values: expected a 2-D tensor, got ", values0.dim(), "-D with shape ",
                    values0.sizes());
  TORCH_CHECK_VALUE(meta0.dim() == 2, "meta: expected a 2-D tensor, got ", meta0.dim(), "-D with shape ",
                    meta0.sizes());
  const int64_t rows = values0.size(0), half = values0.size(1);
  TORCH_CHECK_VALUE(half % 8 == 0, "values: the number of columns (values.shape[1]) must be a multiple of 8, got ",
                    half, " (it holds cols/2 values for a weight whose cols is a multiple of 16)");
  TORCH_CHECK_VALUE(meta0.size(0) == rows && meta0.size(1) == half / 8, "meta: shape ", meta0.sizes(),
                    " does not match values ", values0.sizes(), "; expected (", rows, ", ", half / 8,
                    ") = (rows, cols/16)");
  const int64_t cols = 2 * half;
  const at::Tensor values = values0.contiguous(), meta = meta0.contiguous();
  at::Tensor out = at::empty({rows, cols}, values.options());
  if (out.numel() == 0) return out;
  const int16_t* m = meta.const_data_ptr<int16_t>();
  int64_t bad;
  if (values.element_size() == 2)
    bad = decompress_kernel<uint16_t>(static_cast<const uint16_t*>(values.const_data_ptr()), m,
                                      static_cast<uint16_t*>(out.data_ptr()), rows, cols);
  else
    bad = decompress_kernel<uint32_t>(static_cast<const uint32_t*>(values.const_data_ptr()), m,
                                      static_cast<uint32_t*>(out.data_ptr()), rows, cols);
  if (bad != kNone) {
    const int64_t r = bad / (cols / 4), g = bad % (cols / 4);
    const unsigned nib = (static_cast<uint16_t>(m[r * (cols / 16) + g / 4]) >> (4 * (g % 4))) & 0xF;
    raise_bad_nibble(r, g, nib);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("mask_2to4_cpp", &mask_2to4_cpp);
  m.impl("compress_2to4_cpp", &compress_2to4_cpp);
  m.impl("decompress_2to4_cpp", &decompress_2to4_cpp);
}

}  // namespace sparse_kernels
