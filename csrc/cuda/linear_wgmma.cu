// 2:4 sparse Linear on Hopper's warpgroup sparse tensor cores (sm_90a): y [M, N] = x [M, K] @ W^T
// (+ bias), W [N, K] 2:4 as canonical values [N, K/2] and the mma metadata layout meta_dev
// (docs/CUDA.md).  The large-batch kernel: cuBLAS's dense Hopper GEMMs use wgmma, which the
// mma.sync kernels of linear.cu cannot match (0.33-0.40x of cuBLAS at batch >= 2048 on the
// H200, 2026-11-28).  Compiled, not yet run on a GPU.
//
// wgmma.mma_async.sp.sync.aligned.m64n128k32: A = 64 output features x 32 inputs of W, 2:4,
// given as its compressed 64 x 16 values in shared memory (descriptor); B = 32 inputs x 128
// batch rows of x^T in shared memory (descriptor, K-major: x's rows as they are in memory);
// D = 64 x 128 fp32 in registers.  ISA facts used (PTX ISA 9.7.15):
//  * descriptor (64 bit): start address >> 4 in bits 0-13, leading-dimension byte offset >> 4
//    in 16-29, stride-dimension byte offset >> 4 in 32-45, base offset 0, swizzle 0 (none);
//  * no-swizzle K-major layout: "core matrices" of 8 rows x 16 bytes stored as 128 contiguous
//    bytes; the leading byte offset (LBO) is the distance between core matrices adjacent in K,
//    the stride byte offset (SBO) between core matrices adjacent in M (or N);
//  * metadata: per warp w of the warpgroup, the sparse mma.m16n8k32 layout for rows 16w..16w+15
//    of the 64 (lanes t = 2*sel + h supply groups 4h..4h+3 of rows g and g+8), which is the
//    natural word the mma.sp GEMM of linear.cu builds with quad_transpose_nibbles;
//  * D: warp w holds rows 16w + g and 16w + g + 8; d[4j + 2h + c] = row 16w + g + 8h, column
//    8j + 2t + c (j = 0..15);
//  * wgmma reads shared memory through the async proxy: data written by cp.async needs
//    fence.proxy.async before the wgmma that reads it.
// The descriptor conventions and the metadata lane mapping were cross-checked against a public
// raw wgmma.sp demo (K-major A with LBO = K-direction core stride), not against hardware: if
// the first GPU run of test_sparse_linear_cuda_kernels[wgmma] fails with finite wrong values
// while [gemm] passes, the B descriptor's LBO/SBO roles are the first suspect, the metadata
// the second.
//
// CTA: 256 output features x 128 batch rows, 2 warpgroups (256 threads); warpgroup q owns
// features 128q..128q+127 as two m64 blocks, so each 64-column span costs 2 x 2 wgmma per
// warpgroup.  All threads load with cp.async into a kStages-deep ring of spans (A 16 KB, x
// 16 KB, metadata 2 KB per stage); span i + kStages - 2 is loaded while span i's wgmmas run
// and span i - 1's may still be in flight (wgmma.wait_group 1), so a stage is refilled only
// after every warpgroup has waited for the wgmmas that read it (the barrier at the top of the
// next iteration).  No TMA, no warp specialisation, no cluster multicast: a first version.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "linear.h"
#include "ptx.cuh"

namespace sk {
namespace {

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::Mma;
using ptx::quad_transpose_nibbles;
using ptx::smem_addr;

constexpr int kWgBM = 256;            // output features per CTA (2 warpgroups x 2 x m64)
constexpr int kWgBN = 128;            // batch rows per CTA (the wgmma N)
constexpr int kWgStages = 5;          // first guess: 3 spans loading while 1-2 are computed
constexpr int kWgThreads = 256;
[[maybe_unused]] constexpr int kALbo = kWgBM / 8 * 128;  // bytes between the 4 compressed-K core-matrix columns of A
[[maybe_unused]] constexpr int kXLbo = kWgBN / 8 * 128;  // bytes between the 8 K core-matrix columns of x
[[maybe_unused]] constexpr int kSbo = 128;               // bytes between core matrices adjacent in M / N

struct WgSmem {
  alignas(128) unsigned char a[kWgStages][kWgBM * 64];   // 256 rows x 32 compressed values
  alignas(128) unsigned char x[kWgStages][kWgBN * 128];  // 128 rows x 64 inputs
  uint32_t e[kWgStages][kWgBM / 16][32];                 // meta_dev words of the 16 row blocks
};

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SK_HAS_WGMMA 1
#else
#define SK_HAS_WGMMA 0
#endif

// 1 in the sm_90a cubin, 0 in every other one (sm_80, plain sm_90, a PTX JIT): read back from
// the image the device actually loaded, so a build whose kernel body is the empty stub is never
// launched (binaryVersion alone cannot tell: a plain-sm_90 cubin or a JIT of compute_80 PTX on an
// H100 also reports 90).
__device__ int sk_wgmma_body = SK_HAS_WGMMA;

#if SK_HAS_WGMMA
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kN>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kN) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma window.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <typename T>
struct Wgmma;

// d[64] += A (64 x 32 of W, 2:4, compressed in shared memory: desc_a) * B (32 x 128 of x^T:
// desc_b), metadata e with selector kSel; one specialization per dtype (PTYPE: its PTX name).
#define SK_WGMMA_SP(T, PTYPE)                                                                                     \
  template <>                                                                                                     \
  struct Wgmma<T> {                                                                                               \
    template <int kSel>                                                                                           \
    __device__ static void sp(float (&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t e) {                     \
      asm volatile(                                                                                               \
          "{\n"                                                                                                   \
          ".reg .pred p;\n"                                                                                       \
          "setp.ne.b32 p, %67, 0;\n"                                                                              \
          "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." PTYPE "." PTYPE " {"                                  \
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                \
          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                      \
          "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                      \
          "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                     \
          "%64, %65, %66, %68, p, 1, 1, 0, 0;\n"                                                                  \
          "}\n"                                                                                                   \
          :                                                                                                       \
          "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
          : "l"(desc_a), "l"(desc_b), "r"(e), "r"(1), "n"(kSel));                                                 \
    }                                                                                                             \
  };
SK_WGMMA_SP(__half, "f16")
SK_WGMMA_SP(__nv_bfloat16, "bf16")
#undef SK_WGMMA_SP
#endif  // SK_HAS_WGMMA

template <typename T>
__global__ void __launch_bounds__(kWgThreads, 1)
    wgmma_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint32_t* __restrict__ meta_dev,
                 const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
#if SK_HAS_WGMMA
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  WgSmem& sm = *reinterpret_cast<WgSmem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wgi = warp >> 2, wq = warp & 3;  // warpgroup, warp inside it
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kWgBM, m0 = blockIdx.y * kWgBN;
  const int spans = (K + 63) / 64;
  const int nblocks = (N + 15) / 16;
  const int64_t pitch = K / 2;

  auto load_stage = [&](int stage, int s) {
    const int kbase = 64 * s;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // A: 256 rows x 4 chunks of 16 B (8 compressed values)
      // lane pairs take adjacent chunks of one row (full 32-byte sectors from L2); the shared
      // memory slot depends only on row & 7, so the warp's 32 writes still take 4 wavefronts
      const int c = tid + i * kWgThreads, row = (c >> 1) % kWgBM, ck = 2 * (c / (2 * kWgBM)) + (c & 1);
      const bool ok = (n0 + row < N) && (kbase + 16 * ck + 16 <= K);
      const T* src = ok ? values + static_cast<int64_t>(n0 + row) * pitch + 32 * s + 8 * ck : values;
      cp_async16(sm.a[stage] + ck * kALbo + (row >> 3) * kSbo + (row & 7) * 16, src, ok);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // x: 128 rows x 8 chunks of 16 B (8 inputs)
      const int c = tid + i * kWgThreads, row = (c >> 1) % kWgBN, ck = 2 * (c / (2 * kWgBN)) + (c & 1);
      const bool ok = (m0 + row < M) && (kbase + 8 * ck + 8 <= K);
      const T* src = ok ? x + static_cast<int64_t>(m0 + row) * K + kbase + 8 * ck : x;
      cp_async16(sm.x[stage] + ck * kXLbo + (row >> 3) * kSbo + (row & 7) * 16, src, ok);
    }
    if (tid < 8 * (kWgBM / 16)) {  // metadata: 16 row blocks x 8 chunks of 16 B
      const int b = tid / 8, ck = tid % 8, gb = n0 / 16 + b;
      if (gb < nblocks) {
        cp_async16(&sm.e[stage][b][4 * ck], meta_dev + (static_cast<int64_t>(gb) * spans + s) * 32 + 4 * ck, true);
      } else {  // a 16-row block past N: valid ordered nibbles (0x4), its outputs are discarded
        *reinterpret_cast<uint4*>(&sm.e[stage][b][4 * ck]) = make_uint4(0x44444444u, 0x44444444u, 0x44444444u, 0x44444444u);
      }
    }
  };

  float acc[2][64];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[b][i] = 0.f;

#pragma unroll
  for (int st = 0; st < kWgStages - 2; ++st) {
    if (st < spans) load_stage(st, st);
    cp_async_commit();
  }

  for (int i = 0; i < spans; ++i) {
    cp_async_wait<kWgStages - 3>();  // this thread's copies of span i have landed
    fence_proxy_async();             // ... and are visible to the wgmma (async proxy)
    __syncthreads();                 // everyone's; every warpgroup has waited for span i - 2's wgmmas
    {
      const int nxt = i + kWgStages - 2;
      if (nxt < spans) load_stage(nxt % kWgStages, nxt);
      cp_async_commit();
    }
    const int st = i % kWgStages;
    uint32_t e[2];
#pragma unroll
    for (int b = 0; b < 2; ++b) e[b] = quad_transpose_nibbles(sm.e[st][wgi * 8 + b * 4 + wq][lane], lane);
    const uint32_t a_base = smem_addr(sm.a[st]) + wgi * 2048;  // this warpgroup's 128 rows
    const uint32_t x_base = smem_addr(sm.x[st]);
    pin(acc[0]);
    pin(acc[1]);
    wgmma_fence();
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const uint32_t ab = a_base + b * 1024;  // m64 block b: 8 core-matrix rows of 128 B
      Wgmma<T>::template sp<0>(acc[b], gmma_desc(ab, kALbo, kSbo), gmma_desc(x_base, kXLbo, kSbo), e[b]);
      Wgmma<T>::template sp<1>(acc[b], gmma_desc(ab + 2 * kALbo, kALbo, kSbo),
                               gmma_desc(x_base + 4 * kXLbo, kXLbo, kSbo), e[b]);
    }
    wgmma_commit();
    wgmma_wait<1>();
    pin(acc[0]);
    pin(acc[1]);
  }
  wgmma_wait<0>();
  pin(acc[0]);
  pin(acc[1]);
  cp_async_wait<0>();

#pragma unroll
  for (int b = 0; b < 2; ++b) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = n0 + wgi * 128 + b * 64 + wq * 16 + g + 8 * h;
      if (row >= N) continue;
      const float bv = bias != nullptr ? Mma<T>::to_float(bias[row]) : 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int n = m0 + 8 * j + 2 * t + c;
          if (n < M) y[static_cast<int64_t>(n) * N + row] = Mma<T>::from_float(acc[b][4 * j + 2 * h + c] + bv);
        }
      }
    }
  }
#else
  __trap();  // never launched (supported_here() reads sk_wgmma_body); fail loudly if it ever is
#endif  // SK_HAS_WGMMA
}

// Whether the current device runs the real kernel: an sm_90 GPU whose loaded image is the sm_90a
// one (sk_wgmma_body == 1).  Queried once per device (the symbol read is a synchronous copy, so
// the first call must not be inside a CUDA-graph capture) and cached; a failed query leaves no
// sticky "last error" behind.
bool supported_here() {
  static int cached[64] = {0};  // 0 unknown, 1 yes, -1 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return false;
  }
  if (cached[dev] == 0) {
    int major = 0, body = 0;
    bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9;
    ok = ok && cudaMemcpyFromSymbol(&body, sk_wgmma_body, sizeof(int)) == cudaSuccess && body == 1;
    if (!ok) cudaGetLastError();
    cached[dev] = ok ? 1 : -1;
  }
  return cached[dev] == 1;
}

template <typename T>
cudaError_t launch(const void* x, const void* values, const int32_t* meta_dev, const void* bias, void* y, int M, int N,
                   int K, cudaStream_t stream) {
  if (!supported_here()) return cudaErrorNotSupported;
  const int smem = static_cast<int>(sizeof(WgSmem));
  cudaError_t err = cudaFuncSetAttribute(wgmma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((N + kWgBM - 1) / kWgBM), static_cast<unsigned>((M + kWgBN - 1) / kWgBN));
  wgmma_kernel<T><<<grid, kWgThreads, smem, stream>>>(static_cast<const T*>(x), static_cast<const T*>(values),
                                                       reinterpret_cast<const uint32_t*>(meta_dev),
                                                       static_cast<const T*>(bias), static_cast<T*>(y), M, N, K);
  return cudaGetLastError();
}

}  // namespace

bool sparse_linear_wgmma_supported() { return supported_here(); }

cudaError_t sparse_linear_wgmma_launch(const void* x, const void* values, const int32_t* meta_dev, const void* bias,
                                       void* y, int64_t M, int64_t N, int64_t K, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 16 != 0 || M > INT32_MAX - 256 || N > INT32_MAX - 256 || K > INT32_MAX ||
      (M + kWgBN - 1) / kWgBN > 65535)
    return cudaErrorInvalidValue;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  switch (dtype) {
    case kF16:
      return launch<__half>(x, values, meta_dev, bias, y, m, n, k, stream);
    case kBF16:
      return launch<__nv_bfloat16>(x, values, meta_dev, bias, y, m, n, k, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sk
