// The wgmma forms the Hopper attention kernels need beyond wgmma_gemm.cuh (sm_90a only):
//   S = Q K^T: both operands in shared memory, K-major, N = 64 or 128 keys (32 or 64 queries in
//     the backward's transposed products), with the first k-step overwriting the accumulator
//     (scale-d 0), so S needs no zeroing between key tiles;
//   O += P V: P from registers, V in shared memory MN-major (transposed on read), N = head dim
//     (64, 80 or 128).
// The register form takes A in the per-warp layout of mma.sync m16n8k16 (PTX ISA, "Register
// fragments" of wgmma m64nNk16: warp w of the warpgroup holds rows 16 w .. 16 w + 15), which is
// also how the fp32 accumulator of the first product is spread: thread lane holds rows lane / 4
// and lane / 4 + 8, columns 8 i + 2 (lane % 4) + {0, 1}. Rounding S's accumulator pairwise
// therefore gives P's A fragments with no data movement (see to_fragments).
//
// Shared tiles are 64-column panels of 128-byte rows, 16-byte pieces XOR-swizzled by row % 8
// (the 128-byte swizzle the descriptors of wgmma_gemm.cuh name); a panel of R rows holds 64 R
// elements and starts on 1024 bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"
#include "wgmma_gemm.cuh"

namespace long_exposure {
namespace wgmma {

// The descriptor of a tile of 32-byte rows under the 32-byte swizzle (layout type 3), 8-row
// atoms of 256 bytes; `descriptor` (wgmma_gemm.cuh) names the 128-byte one.
__device__ __forceinline__ uint64_t descriptor_32b(const void* p, uint32_t leading_bytes, uint32_t stride_bytes) {
  return (descriptor(p, leading_bytes, stride_bytes) & ~(3ull << 62)) | (3ull << 62);
}

// Element (row, col) of the narrow panel that holds columns 64 .. 79 of head dim 80: 32-byte rows,
// whose two 16-byte halves swap in rows 4 .. 7 of every 8 (the 32-byte swizzle, as TMA writes it
// and layout type 3 reads it).
__device__ __forceinline__ int narrow_offset(int row, int col) {
  return row * 16 + ((((col >> 3) & 1) ^ ((row >> 2) & 1)) << 3) + (col & 7);
}

// R rows x (64 x panels) columns. K-major operands (Q, K) put K along the columns; V, read
// MN-major, puts keys along the rows and the head dim along the columns, so one layout serves all.
template <int R>
struct Panels {
  __device__ static __forceinline__ int offset(int row, int col) {
    return (col >> 6) * (R * 64) + row * 64 + ((((col & 63) >> 3) ^ (row & 7)) << 3) + (col & 7);
  }
};

// An empty asm that claims to rewrite the registers: the compiler may not move their reads or
// writes across it, which keeps them on the right side of the wgmma issue and wait (the asm
// operands alone only order them against the issue; the hardware reads them until the wait).
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    asm volatile("" : "+r"(r[i][0]), "+r"(r[i][1]), "+r"(r[i][2]), "+r"(r[i][3])::"memory");
}

// The accumulator operands of a 64 x 16, 64 x 32, 64 x 64, 64 x 80 and 64 x 128 product, spelled
// out once.
#define LONG_EXPOSURE_ATTN_REGS8 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define LONG_EXPOSURE_ATTN_OPERANDS8(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define LONG_EXPOSURE_ATTN_REGS16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define LONG_EXPOSURE_ATTN_OPERANDS16(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define LONG_EXPOSURE_ATTN_REGS32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define LONG_EXPOSURE_ATTN_REGS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define LONG_EXPOSURE_ATTN_OPERANDS32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define LONG_EXPOSURE_ATTN_REGS40 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"
#define LONG_EXPOSURE_ATTN_OPERANDS40(d) \
  LONG_EXPOSURE_ATTN_OPERANDS32(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define LONG_EXPOSURE_ATTN_OPERANDS64(d) \
  LONG_EXPOSURE_ATTN_OPERANDS32(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// 2^x, flushing results below 2^-126 to zero: exp2f's denormal handling costs a compare and a
// predicated multiply per element, for probabilities that no row sum would notice.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// d (64 x N) = A B^T + (accumulate ? d : 0); A and B K-major in shared memory.
template <typename T, int N>
struct WgmmaSS;
// d (64 x N) += A B; A (64 x 16) in registers, B (16 x N) MN-major in shared memory.
template <typename T, int N>
struct WgmmaRS;

#define LONG_EXPOSURE_ATTN_SS(TYPE, PTX_TYPE, N, REGS, OPERANDS, IA, IB, IACC)                      \
  template <>                                                                                      \
  struct WgmmaSS<TYPE, N> {                                                                        \
    __device__ static __forceinline__ void run(float (&d)[N / 2], uint64_t a, uint64_t b,           \
                                               int accumulate) {                                   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IACC ", 0;\n"                             \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " " REGS \
                   ", %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                      \
                   : OPERANDS(d)                                                                   \
                   : "l"(a), "l"(b), "r"(accumulate));                                             \
    }                                                                                              \
  };
#define LONG_EXPOSURE_ATTN_RS(TYPE, PTX_TYPE, N, REGS, OPERANDS, I0, I1, I2, I3, IB, IONE)          \
  template <>                                                                                      \
  struct WgmmaRS<TYPE, N> {                                                                        \
    __device__ static __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4],           \
                                               uint64_t b) {                                       \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IONE ", 0;\n"                             \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " " REGS \
                   ", {%" #I0 ", %" #I1 ", %" #I2 ", %" #I3 "}, %" #IB ", p, 1, 1, 1;\n}\n"         \
                   : OPERANDS(d)                                                                   \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                  \
    }                                                                                              \
  };

// N = 32: the backward's 32-query tiles at head dim 128, where wider ones would not leave the
// registers for dK and dV.
LONG_EXPOSURE_ATTN_SS(__nv_bfloat16, "bf16", 32, LONG_EXPOSURE_ATTN_REGS16, LONG_EXPOSURE_ATTN_OPERANDS16, 16, 17, 18)
LONG_EXPOSURE_ATTN_SS(__half, "f16", 32, LONG_EXPOSURE_ATTN_REGS16, LONG_EXPOSURE_ATTN_OPERANDS16, 16, 17, 18)
LONG_EXPOSURE_ATTN_SS(__nv_bfloat16, "bf16", 64, LONG_EXPOSURE_ATTN_REGS32, LONG_EXPOSURE_ATTN_OPERANDS32, 32, 33, 34)
LONG_EXPOSURE_ATTN_SS(__nv_bfloat16, "bf16", 128, LONG_EXPOSURE_ATTN_REGS64, LONG_EXPOSURE_ATTN_OPERANDS64, 64, 65, 66)
LONG_EXPOSURE_ATTN_SS(__half, "f16", 64, LONG_EXPOSURE_ATTN_REGS32, LONG_EXPOSURE_ATTN_OPERANDS32, 32, 33, 34)
LONG_EXPOSURE_ATTN_SS(__half, "f16", 128, LONG_EXPOSURE_ATTN_REGS64, LONG_EXPOSURE_ATTN_OPERANDS64, 64, 65, 66)
LONG_EXPOSURE_ATTN_RS(__nv_bfloat16, "bf16", 64, LONG_EXPOSURE_ATTN_REGS32, LONG_EXPOSURE_ATTN_OPERANDS32, 32, 33, 34, 35, 36, 37)
// N = 80: OPT-2.7B's head dim, whose second 64-column panel the product reads 16 columns of.
LONG_EXPOSURE_ATTN_RS(__nv_bfloat16, "bf16", 80, LONG_EXPOSURE_ATTN_REGS40, LONG_EXPOSURE_ATTN_OPERANDS40, 40, 41, 42, 43, 44, 45)
LONG_EXPOSURE_ATTN_RS(__half, "f16", 80, LONG_EXPOSURE_ATTN_REGS40, LONG_EXPOSURE_ATTN_OPERANDS40, 40, 41, 42, 43, 44, 45)
LONG_EXPOSURE_ATTN_RS(__nv_bfloat16, "bf16", 128, LONG_EXPOSURE_ATTN_REGS64, LONG_EXPOSURE_ATTN_OPERANDS64, 64, 65, 66, 67, 68, 69)
LONG_EXPOSURE_ATTN_RS(__half, "f16", 64, LONG_EXPOSURE_ATTN_REGS32, LONG_EXPOSURE_ATTN_OPERANDS32, 32, 33, 34, 35, 36, 37)
LONG_EXPOSURE_ATTN_RS(__half, "f16", 128, LONG_EXPOSURE_ATTN_REGS64, LONG_EXPOSURE_ATTN_OPERANDS64, 64, 65, 66, 67, 68, 69)
// N = 16: the forward's head-dim-80 output, columns 64 .. 79, whose values sit in a narrow panel.
LONG_EXPOSURE_ATTN_RS(__nv_bfloat16, "bf16", 16, LONG_EXPOSURE_ATTN_REGS8, LONG_EXPOSURE_ATTN_OPERANDS8, 8, 9, 10, 11, 12, 13)
LONG_EXPOSURE_ATTN_RS(__half, "f16", 16, LONG_EXPOSURE_ATTN_REGS8, LONG_EXPOSURE_ATTN_OPERANDS8, 8, 9, 10, 11, 12, 13)
#undef LONG_EXPOSURE_ATTN_SS
#undef LONG_EXPOSURE_ATTN_RS
#undef LONG_EXPOSURE_ATTN_OPERANDS64
#undef LONG_EXPOSURE_ATTN_OPERANDS40
#undef LONG_EXPOSURE_ATTN_REGS40
#undef LONG_EXPOSURE_ATTN_OPERANDS32
#undef LONG_EXPOSURE_ATTN_REGS64
#undef LONG_EXPOSURE_ATTN_OPERANDS16
#undef LONG_EXPOSURE_ATTN_REGS32
#undef LONG_EXPOSURE_ATTN_REGS16
#undef LONG_EXPOSURE_ATTN_OPERANDS8
#undef LONG_EXPOSURE_ATTN_REGS8

// The accumulator of a 64 x N product, rounded to T, as the A fragments of the N / 16 k-steps of
// the next product: k-step k takes accumulator column groups 2 k (its registers 0, 1 for the
// lower row, 2, 3 for the upper) and 2 k + 1 (the same for columns 8 .. 15 of the step).
template <typename T, int N>
__device__ __forceinline__ void to_fragments(uint32_t (&a)[N / 16][4], const float (&acc)[N / 2]) {
#pragma unroll
  for (int k = 0; k < N / 16; ++k) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[k][r] = ptx::Mma<T>::pack(acc[8 * k + 2 * r], acc[8 * k + 2 * r + 1]);
  }
}

}  // namespace wgmma
}  // namespace long_exposure
