// Hopper's warpgroup matrix instructions (wgmma, sm_90a only) behind the same chunked-K interface
// as mma_gemm.cuh, for the products whose speed decides the MLP step: each warpgroup (128 threads)
// computes a 64 x 128 fp32 accumulator with wgmma.m64n128k16 reading both operands from shared
// memory, fed by the same cp.async ring. A thread block holds a grid of warpgroups, stacked
// along M (sharing B tiles) and side by side along N (sharing the A tile, each with a B operand
// of its own), because the bytes each K chunk brings from L2 per FLOP, not the tensor cores,
// limit these products. mma.sync on this chip reaches about a third of the rate cuBLAS gets from
// wgmma (bench/RESULTS.md), which no tuning of the older instruction closes.
//
// Shared layouts are the canonical 128-byte-swizzled ones the descriptors name:
//   K-major (A always; B when it is K-major): rows of 64 K elements (128 bytes), 16-byte pieces
//     XOR-swizzled by row % 8, 8-row atoms 1024 bytes apart (mma::SwizzledTile<R, 64>);
//   MN-major B (the weights read transposed in the backward pass): 64-wide N panels of K rows of
//     128 bytes, swizzled the same way, panels 64 x 64 elements apart; wgmma transposes on read.
// Every tile starts on a 1024-byte boundary, as the swizzle pattern is taken from address bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mma_gemm.cuh"

namespace long_exposure {
namespace wgmma {

constexpr int kM = 64, kN = 128, kThreads = 128;

// N-panelled MN-major tile: K rows x 128 N, as two 64-wide panels.
template <int K>
struct PanelTile {
  static constexpr int kElements = K * kN;
  __device__ static __forceinline__ int offset(int k, int n) {
    return (n >> 6) * (K * 64) + k * 64 + ((((n & 63) >> 3) ^ (k & 7)) << 3) + (n & 7);
  }
};

// Shared-memory matrix descriptor: start address, leading and stride byte offsets (16-byte
// units), and the 128-byte swizzle mode in bits 62-63.
__device__ __forceinline__ uint64_t descriptor(const void* p, uint32_t leading_bytes, uint32_t stride_bytes) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint64_t desc = (address & 0x3FFFF) >> 4;
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32;
  desc |= 1ull << 62;
  return desc;
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d += A (64 x 16, K-major) @ B (16 x 128)^T; B is K-major or, with TRANS_B, MN-major. The 64
// accumulator registers are spelled out once, in the two macros below.
#define LONG_EXPOSURE_WGMMA_ACC_REGS \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define LONG_EXPOSURE_WGMMA_ACC_OPERANDS(d) \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define LONG_EXPOSURE_WGMMA_64x128(TYPE, PTX_TYPE, TRANS_B)                                            \
  template <>                                                                                        \
  struct Wgmma64x128<TYPE, (TRANS_B != 0)> {                                                         \
    __device__ static __forceinline__ void run(float (&d)[64], uint64_t a, uint64_t b) {              \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                     \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "          \
                   LONG_EXPOSURE_WGMMA_ACC_REGS ", %64, %65, p, 1, 1, 0, " #TRANS_B ";\n}\n"       \
                   : LONG_EXPOSURE_WGMMA_ACC_OPERANDS(d)                                             \
                   : "l"(a), "l"(b), "r"(1));                                                        \
    }                                                                                                \
  };

template <typename T, bool TRANS_B>
struct Wgmma64x128;
LONG_EXPOSURE_WGMMA_64x128(__nv_bfloat16, "bf16", 0)
LONG_EXPOSURE_WGMMA_64x128(__nv_bfloat16, "bf16", 1)
LONG_EXPOSURE_WGMMA_64x128(__half, "f16", 0)
LONG_EXPOSURE_WGMMA_64x128(__half, "f16", 1)
#undef LONG_EXPOSURE_WGMMA_64x128
#undef LONG_EXPOSURE_WGMMA_ACC_OPERANDS
#undef LONG_EXPOSURE_WGMMA_ACC_REGS

// The chunk loop of mma::accumulate on wgmma, for WG_M x WG_N warpgroups: a 64 WG_M x 128 WG_N
// block tile whose B side is WG_N pieces of 128 columns (mma::SplitChunk). Warpgroup g owns rows
// 64 (g / WG_N).. and piece g % WG_N: it multiplies its 64 rows of the A tile by that piece's B
// tile, so each A tile is read by WG_N warpgroups and each B tile by WG_M, which is what raises
// the FLOPs per byte brought from L2. Chunk i sits in stage i % STAGES. Loads run STAGES - 2
// chunks ahead and each chunk's wgmma is left in flight while the next is issued (wait_group 1),
// so the tensor cores do not idle through the barrier and the copies; the stage a load refills
// belonged to chunk i - 2, whose wgmma every warpgroup finished (by its wait_group 1 after chunk
// i - 1, or its drain where it skipped that chunk) before the block-wide barrier of chunk i.
template <typename T, bool B_KMAJOR, int STAGES, int WG_M = 1, int WG_N = 1>
struct Engine {
  static constexpr int BM = kM * WG_M, BN = kN * WG_N;
  static constexpr int kPieces = WG_N, kPieceN = kN;
  using Chunk = mma::SplitChunk<T, kPieces>;
  static constexpr bool kLoadsByTma = false;
  static constexpr int kThreads = wgmma::kThreads * WG_M * WG_N;
  static constexpr int kMinBlocks = 1;  // thread blocks per SM the kernels are compiled for
  static constexpr bool kPersistent = false;  // one tile per thread block
  using ATile = mma::SwizzledTile<BM, mma::kBK>;
  using BTile = std::conditional_t<B_KMAJOR, mma::SwizzledTile<kN, mma::kBK>, PanelTile<mma::kBK>>;
  // Both tile sizes are multiples of 1024 bytes, so every tile of the ring keeps the alignment.
  static constexpr int kStageElements = ATile::kElements + kPieces * BTile::kElements;
  // 1 KiB of slack lets the ring start on a 1024-byte boundary wherever the dynamic area begins.
  static constexpr int shared_bytes() { return STAGES * kStageElements * static_cast<int>(sizeof(T)) + 1024; }
  static constexpr int kSlots = kN / 8;  // column pairs each thread holds
  struct Acc {
    float d[64];
  };

  __device__ static __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 64; ++i) acc.d[i] = 0.0f;
  }

  // Broadcast from lane 0 so that the compiler sees it uniform across the warp (and branches on
  // it as on a uniform value): otherwise a wgmma under a branch on it is serialized.
  __device__ static __forceinline__ int this_warpgroup() {
    return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / wgmma::kThreads, 0);
  }
  // The warpgroup's 64 rows of the A tile: 64 rows of 128 bytes, 8 swizzle atoms.
  __device__ static __forceinline__ int a_offset(int warpgroup) { return (warpgroup / WG_N) * kM * mma::kBK; }
  // Selected rather than indexed: a run-time index would put the chunk in local memory.
  __device__ static __forceinline__ bool piece_is_live(const Chunk& c, int piece) {
    bool live = c.b[0].rows > 0;
#pragma unroll
    for (int j = 1; j < kPieces; ++j)
      if (piece == j) live = c.b[j].rows > 0;
    return live;
  }
  // acc += one chunk's A tile (this warpgroup's rows from a) times its B piece at b, issued as one
  // committed wgmma group and left in flight.
  __device__ static __forceinline__ void multiply(Acc& acc, const T* a, const T* b) {
    fence();
#pragma unroll
    for (int kk = 0; kk < mma::kBK; kk += 16) {
      // K-major: 16 K elements are 32 bytes along the swizzled row; 8-row atoms 1024 bytes apart.
      const uint64_t da = descriptor(a + kk, 16, 1024);
      const uint64_t db = B_KMAJOR ? descriptor(b + kk, 16, 1024)
                                   // MN-major: 16 K rows of 128 bytes; N panels 64 x 64 elements apart.
                                   : descriptor(b + kk * 64, mma::kBK * 64 * sizeof(T), 1024);
      Wgmma64x128<T, !B_KMAJOR>::run(acc.d, da, db);
    }
    commit();
  }

  // get_chunk(i) -> Chunk. An empty B piece (rows <= 0) is neither copied nor multiplied: its
  // warpgroup issues no wgmma for that chunk, and its stale shared tile is never read.
  template <typename GetChunk>
  __device__ static __forceinline__ void accumulate(Acc& acc, int n_chunks, GetChunk get_chunk, unsigned char* raw) {
    static_assert(STAGES >= 3, "one stage computing, one in flight, at least one loading");
    constexpr int kAhead = STAGES - 2;
    T* shared = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023});
    auto stage_a = [&](int s) { return shared + s * kStageElements; };
    auto stage_b = [&](int s, int piece) {
      return shared + s * kStageElements + ATile::kElements + piece * BTile::kElements;
    };
    auto load = [&](int i) {
      if (i < n_chunks) {
        const Chunk c = get_chunk(i);
        mma::load_tile<T, ATile, true, BM, kThreads>(stage_a(i % STAGES), c.a, c.k0);
#pragma unroll
        for (int j = 0; j < kPieces; ++j)
          if (c.b[j].rows > 0) mma::load_tile<T, BTile, B_KMAJOR, kN, kThreads>(stage_b(i % STAGES, j), c.b[j], c.k0);
      }
      mma::cp_async_commit();  // an empty group keeps the wait count uniform at the tail
    };
    const int warpgroup = this_warpgroup(), piece = warpgroup % WG_N, a_rows = a_offset(warpgroup);
    for (int s = 0; s < kAhead; ++s) load(s);
    for (int i = 0; i < n_chunks; ++i) {
      mma::cp_async_wait<kAhead - 1>();
      fence_proxy();
      __syncthreads();  // chunk i is visible to the async proxy; chunk i - 2's wgmma is done everywhere
      load(i + kAhead);
      const T* a = stage_a(i % STAGES) + a_rows;
      const T* b = stage_b(i % STAGES, piece);
      if (piece_is_live(get_chunk(i), piece)) {
        multiply(acc, a, b);
        wait_one();
      } else {
        // No group here: an empty commit on this path makes the compiler commit after the join,
        // behind the live path's wgmma, which its wait_group 1 would then wait for. Draining
        // instead leaves, as on the live path, nothing older than chunk i in flight at the next
        // barrier.
        wait_all();
      }
    }
    wait_all();
    mma::cp_async_wait<0>();
    __syncthreads();
  }

  // f(row, col, v0, v1, slot): the accumulator's element pairs (columns col, col + 1 of the block
  // tile); slot numbers the thread's column pairs, the same for every row it holds.
  template <typename F>
  __device__ static __forceinline__ void for_each_pair(const Acc& acc, F f) {
    // Warp w of a warpgroup holds rows 16 w.. of the warpgroup's 64, lane / 4 and lane / 4 + 8
    // among them, and in every 8 columns the two at 2 (lane % 4).
    const int warpgroup = threadIdx.x / wgmma::kThreads, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int row = (warpgroup / WG_N) * kM + warp * 16 + lane / 4;
    const int col = (warpgroup % WG_N) * kN + (lane % 4) * 2;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      f(row, col + i * 8, acc.d[i * 4], acc.d[i * 4 + 1], i);
      f(row + 8, col + i * 8, acc.d[i * 4 + 2], acc.d[i * 4 + 3], i);
    }
  }
  __device__ static __forceinline__ int slot_column(int slot) {
    return ((threadIdx.x / wgmma::kThreads) % WG_N) * kN + slot * 8 + (threadIdx.x % 4) * 2;
  }
};

}  // namespace wgmma
}  // namespace long_exposure
