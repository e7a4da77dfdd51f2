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

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace sparse_kernels {
namespace {

// ---------------------------------------------------------------- bit traits
// A group of 4 elements is handled as one wide word (Wide): 64 bits for 16-bit dtypes,
// 128 bits for float32; lane i holds element i.
template <typename U>
struct Bits;
template <>
struct Bits<uint16_t> {
  static constexpr uint16_t sign = 0x8000;
  using Wide = uint64_t;
};
template <>
struct Bits<uint32_t> {
  static constexpr uint32_t sign = 0x80000000u;
  using Wide = unsigned __int128;
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

// Monotone integer key of a non-NaN signed float: a < b  <=>  key(a) < key(b); -0.0 == +0.0.
template <typename U>
inline U signed_key(U b) {
  constexpr U s = Bits<U>::sign;
  const U a = b & static_cast<U>(~s);
  const U k = (b & s) ? static_cast<U>(~b) : static_cast<U>(b | s);
  return a == 0 ? s : k;  // both zeros -> the key of +0.0
}

// 4-bit keep mask (bit i = position i kept) for keys k0..k3, ties to the lower index.
template <typename K>
inline unsigned keep_top2(K k0, K k1, K k2, K k3) {
  // gab (a < b): a beats b.
  const unsigned g01 = k0 >= k1, g02 = k0 >= k2, g03 = k0 >= k3;
  const unsigned g12 = k1 >= k2, g13 = k1 >= k3, g23 = k2 >= k3;
  const unsigned c0 = 3 - g01 - g02 - g03;
  const unsigned c1 = g01 + 2 - g12 - g13;
  const unsigned c2 = g02 + g12 + 1 - g23;
  const unsigned c3 = g03 + g13 + g23;
  return (c0 < 2) | ((c1 < 2) << 1) | ((c2 < 2) << 2) | ((c3 < 2) << 3);
}

// Tables, built once.
struct Tables {
  // compress[nonzero_mask | negzero_mask << 4] = nibble | (more than 2 nonzeros) << 4
  uint8_t compress[256];
  // mask bytes (one bool per lane) for a 4-bit keep mask
  uint32_t mask_bytes[16];
  // valid[nibble]: i0 < i1
  bool valid[16];
  Tables() {
    for (unsigned nz = 0; nz < 16; ++nz) {
      for (unsigned neg = 0; neg < 16; ++neg) {
        unsigned p[4];
        for (int i = 0; i < 4; ++i) p[i] = 2 * ((nz >> i) & 1) + ((neg >> i) & 1);
        const unsigned m = keep_top2(p[0], p[1], p[2], p[3]);
        unsigned i0 = 0, i1 = 0, seen = 0;
        for (unsigned i = 0; i < 4; ++i)
          if ((m >> i) & 1) (seen++ == 0 ? i0 : i1) = i;
        const unsigned many = __builtin_popcount(nz) > 2;
        compress[nz | neg << 4] = static_cast<uint8_t>(i0 | i1 << 2 | many << 4);
      }
    }
    for (unsigned m = 0; m < 16; ++m) {
      mask_bytes[m] = 0;
      for (int i = 0; i < 4; ++i) mask_bytes[m] |= ((m >> i) & 1u) << (8 * i);
      valid[m] = (m & 3) < (m >> 2);
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

// lane_masks<U>()[m]: all-ones in the lanes of the 4-bit mask m, zeros elsewhere.
template <typename U>
const typename Bits<U>::Wide* lane_masks() {
  using W = typename Bits<U>::Wide;
  static const auto t = [] {
    std::array<W, 16> a{};
    for (unsigned m = 0; m < 16; ++m)
      for (unsigned i = 0; i < 4; ++i)
        if ((m >> i) & 1) a[m] |= static_cast<W>(static_cast<U>(~U(0))) << (8 * sizeof(U) * i);
    return a;
  }();
  return t.data();
}

int64_t grain_for(int64_t cols) {
  // ~16K elements per task: small enough to spread 4096-row weights over all cores.
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1));
}

void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v < cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

template <typename U, typename W>
inline U lane(W w, unsigned i) {
  return static_cast<U>(w >> (8 * sizeof(U) * i));
}

// ---------------------------------------------------------------- mask
// Keys from |w| (ABS) or from signed scores.  Returns false if a NaN was seen.
template <typename U, bool ABS>
bool mask_kernel(const U* s, bool* out, int64_t rows, int64_t cols, U inf) {
  constexpr U nosign = static_cast<U>(~Bits<U>::sign);
  const Tables& T = tables();
  std::atomic<bool> nan{false};
  const int64_t n = rows * cols / 4;
  at::parallel_for(0, n, grain_for(cols) * cols / 4, [&](int64_t g0, int64_t g1) {
    bool local_nan = false;
    for (int64_t g = g0; g < g1; ++g) {
      const U* x = s + 4 * g;
      const U a0 = x[0] & nosign, a1 = x[1] & nosign, a2 = x[2] & nosign, a3 = x[3] & nosign;
      local_nan |= (a0 > inf) | (a1 > inf) | (a2 > inf) | (a3 > inf);
      const unsigned m = ABS ? keep_top2(a0, a1, a2, a3)
                             : keep_top2(signed_key(x[0]), signed_key(x[1]), signed_key(x[2]), signed_key(x[3]));
      std::memcpy(out + 4 * g, &T.mask_bytes[m], 4);
    }
    if (local_nan) nan.store(true, std::memory_order_relaxed);
  });
  return !nan.load();
}

// ---------------------------------------------------------------- compress
// Returns the flat index r * groups + g of the first group with > 2 nonzeros, or kNone.
template <typename U, bool PRUNE>
int64_t compress_kernel(const U* w, U* values, int16_t* meta, int64_t rows, int64_t cols, U inf,
                        bool* nan_seen) {
  using W = typename Bits<U>::Wide;
  constexpr U sign = Bits<U>::sign;
  constexpr U nosign = static_cast<U>(~sign);
  const Tables& T = tables();
  const W* lanes = lane_masks<U>();
  const int64_t groups = cols / 4;
  std::atomic<int64_t> first_bad{kNone};
  std::atomic<bool> nan{false};
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    bool local_nan = false;
    for (int64_t r = r0; r < r1; ++r) {
      const U* src = w + r * cols;
      U* vdst = values + r * (cols / 2);
      int16_t* mdst = meta + r * (cols / 16);
      unsigned many = 0;
      for (int64_t q = 0; q < groups / 4; ++q) {
        uint32_t word = 0;
        for (unsigned j = 0; j < 4; ++j) {
          const int64_t g = 4 * q + j;
          W x;
          std::memcpy(&x, src + 4 * g, sizeof(W));
          const U x0 = lane<U>(x, 0), x1 = lane<U>(x, 1), x2 = lane<U>(x, 2), x3 = lane<U>(x, 3);
          const U a0 = x0 & nosign, a1 = x1 & nosign, a2 = x2 & nosign, a3 = x3 & nosign;
          unsigned nz = (a0 != 0) | (a1 != 0) << 1 | (a2 != 0) << 2 | (a3 != 0) << 3;
          unsigned neg = (x0 == sign) | (x1 == sign) << 1 | (x2 == sign) << 2 | (x3 == sign) << 3;
          if (PRUNE) {  // mask_2to4(w) first: the dropped positions become +0.0
            local_nan |= (a0 > inf) | (a1 > inf) | (a2 > inf) | (a3 > inf);
            const unsigned kept = keep_top2(a0, a1, a2, a3);
            nz &= kept;
            neg &= kept;
            x &= lanes[kept];
          }
          const unsigned e = T.compress[nz | neg << 4];
          many |= e & 16;
          const unsigned nib = e & 15, i0 = nib & 3, i1 = nib >> 2;
          vdst[2 * g] = lane<U>(x, i0);
          vdst[2 * g + 1] = lane<U>(x, i1);
          word |= nib << (4 * j);
        }
        mdst[q] = static_cast<int16_t>(static_cast<uint16_t>(word));
      }
      if (!PRUNE && many) {
        for (int64_t g = 0; g < groups; ++g) {
          unsigned nnz = 0;
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
// Returns the flat index r * groups + g of the first group with an invalid nibble, or kNone.
template <typename U>
int64_t decompress_kernel(const U* values, const int16_t* meta, U* out, int64_t rows, int64_t cols) {
  using W = typename Bits<U>::Wide;
  constexpr unsigned B = 8 * sizeof(U);
  const Tables& T = tables();
  const int64_t groups = cols / 4;
  std::atomic<int64_t> first_bad{kNone};
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const U* vsrc = values + r * (cols / 2);
      const int16_t* msrc = meta + r * (cols / 16);
      U* dst = out + r * cols;
      bool ok = true;
      for (int64_t q = 0; q < groups / 4; ++q) {
        const unsigned word = static_cast<uint16_t>(msrc[q]);
        for (unsigned j = 0; j < 4; ++j) {
          const int64_t g = 4 * q + j;
          const unsigned nib = (word >> (4 * j)) & 0xF;
          ok &= T.valid[nib];
          const W x = static_cast<W>(vsrc[2 * g]) << (B * (nib & 3)) | static_cast<W>(vsrc[2 * g + 1]) << (B * (nib >> 2));
          std::memcpy(dst + 4 * g, &x, sizeof(W));
        }
      }
      if (!ok) {
        for (int64_t g = 0; g < groups; ++g) {
          if (!T.valid[(static_cast<uint16_t>(msrc[g / 4]) >> (4 * (g % 4))) & 0xF]) {
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
  TORCH_CHECK_VALUE(ok, "mask_2to4: ", what, " contains NaN; a 2:4 mask needs comparable values");
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
  TORCH_CHECK_VALUE(!nan, "mask_2to4: w contains NaN; a 2:4 mask needs comparable values");
  if (bad != kNone) {
    const int64_t r = bad / (cols / 4), c = 4 * (bad % (cols / 4));
    const at::Tensor grp = w.index({r}).narrow(0, c, 4);
    const int64_t n = grp.ne(0).sum().item<int64_t>();
    TORCH_CHECK_VALUE(false, "compress_2to4: w is not 2:4 sparse: the group at row ", r, ", columns ", c, "..",
                      c + 3, " has ", n,
                      " nonzeros (at most 2 allowed); pass prune=True to keep the 2 largest of each group");
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
    TORCH_CHECK_VALUE(false, "decompress_2to4: meta is corrupt: row ", r, ", group ", g, " (columns ", 4 * g, "..",
                      4 * g + 3, ") has nibble ", nib, " with i0=", nib & 3, " >= i1=", nib >> 2,
                      "; valid nibbles are (4, 8, 9, 12, 13, 14)");
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
