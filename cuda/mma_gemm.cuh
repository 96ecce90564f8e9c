// The tensor-core tile product every neuron-block MLP kernel and the MLP predictor are built from:
// one thread block computes acc[BM x BN] = sum over a sequence of K chunks of A_chunk @ B_chunk^T,
// where each chunk names its own operands and K offset (B possibly as several operands, each
// giving its own range of the BN columns). That one abstraction covers the three kinds of sparse
// product the MLP needs:
//   - a whole output tile skipped or computed (fc1, dH): the caller simply does not launch work;
//   - a gathered K loop over a tile's active neuron blocks (fc2, dX): chunks jump between blocks;
//   - LoRA factors entering the same accumulator: extra chunks with other operands.
//
// Operands are bf16 or fp16 with fp32 accumulation (mma.sync m16n8k16, which sm_80 and sm_90 both
// run). Each operand is K-major (element (i, k) at ptr[i * ld + k], as nn.Linear keeps its weight
// and as activations are stored) or MN-major (element (i, k) at ptr[k * ld + i], the same weights
// read transposed in the backward pass); MN-major tiles go through ldmatrix.trans, so no weight is
// ever copied transposed. Tiles travel global -> shared with 16-byte cp.async in a STAGES-deep ring;
// a 16-byte piece that lies outside the operand is zero-filled, so ragged edges need no second
// code path, provided that K extents and the MN extent of MN-major operands are multiples of 8
// (the launchers require it). Shared tiles are rows of 64 or 128 elements whose 16-byte pieces are
// XOR-swizzled by row, so ldmatrix's 8 rows land in 8 distinct bank groups.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"

namespace long_exposure {
namespace mma {

constexpr int kBK = 64;  // K elements per chunk

template <typename T>
struct Operand {
  const T* ptr = nullptr;  // element (0, 0) of the operand
  int64_t ld = 0;          // stride of the slow index (rows if K-major, k if MN-major)
  int64_t rows = 0;        // valid extent of the M (or N) index from ptr
  int64_t k_size = 0;      // valid extent of the K index
  // For engines that load by TMA (wgmma_tma_gemm.cuh): the map of the whole tensor ptr lies in,
  // and the M (or N) index of ptr's row (K-major) or column (MN-major) in it.
  const CUtensorMap* map = nullptr;
  int32_t origin = 0;
};

// One chunk of the K loop: its operands and the K offset of its first element in both.
template <typename T>
struct Chunk {
  Operand<T> a, b;
  int64_t k0 = 0;
};

// A chunk whose B side is PIECES operands side by side along N, piece j giving output columns
// j * BN / PIECES onwards: the pieces may lie anywhere, so one thread block can multiply its A tile
// by two neuron blocks far apart in a weight as well as by adjacent column ranges. A piece with
// no rows (rows <= 0) adds nothing to its columns, and engines need not copy or multiply it.
template <typename T, int PIECES>
struct SplitChunk {
  Operand<T> a;
  Operand<T> b[PIECES];
  int64_t k0 = 0;
};

// A shared-memory tile of R rows x L elements, its 16-byte pieces swizzled by row.
template <int R, int L>
struct SwizzledTile {
  static_assert(L == 64 || L == 128, "tile rows must hold 8 or 16 pieces of 16 bytes");
  static constexpr int kElements = R * L;
  __device__ static __forceinline__ int offset(int row, int col) {
    return row * L + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
  }
};

using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ptx::Mma<T>::run(c, a, b0, b1);
}

// Shapes of one configuration. Warps tile the block WARPS_M x WARPS_N; each warp owns
// (BM / WARPS_M) x (BN / WARPS_N) of the accumulator as MI x NI fragments of 16 x 8.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, bool A_KMAJOR_, bool B_KMAJOR_>
struct Config {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr bool A_KMAJOR = A_KMAJOR_, B_KMAJOR = B_KMAJOR_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "each warp covers whole 16 x 16 pieces");
  // K-major tiles are rows of K; MN-major tiles are rows of M (or N).
  using ATile = SwizzledTile<A_KMAJOR ? BM : kBK, A_KMAJOR ? kBK : BM>;
  using BTile = SwizzledTile<B_KMAJOR ? BN : kBK, B_KMAJOR ? kBK : BN>;
  static constexpr int kStageElements = ATile::kElements + BTile::kElements;
  template <typename T>
  static constexpr int shared_bytes() {
    return STAGES * kStageElements * static_cast<int>(sizeof(T));
  }
};

// Copies one operand's chunk into its shared tile. The loop is unrolled over a compile-time
// count, so each thread's shared-memory offsets and row offsets fold into constants and the K
// loop issues little more than the copies themselves.
template <typename T, typename Tile, bool KMAJOR, int EXTENT, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const Operand<T>& op, int64_t k0) {
  constexpr int kRows = KMAJOR ? EXTENT : kBK;
  constexpr int kPieces = (KMAJOR ? kBK : EXTENT) / 8;
  static_assert((kRows * kPieces) % THREADS == 0, "every thread copies the same number of pieces");
#pragma unroll
  for (int j = 0; j < kRows * kPieces / THREADS; ++j) {
    const int p = static_cast<int>(threadIdx.x) + j * THREADS;
    const int row = p / kPieces, col = (p % kPieces) * 8;
    const int64_t i = KMAJOR ? row : col;         // M/N index within the tile
    const int64_t k = k0 + (KMAJOR ? col : row);  // K index
    const bool valid = i < op.rows && k < op.k_size;
    const T* src = valid ? op.ptr + (KMAJOR ? i * op.ld + k : k * op.ld + i) : op.ptr;
    cp_async_16(tile + Tile::offset(row, col), src, valid);
  }
}

// acc += the chunks' products. get_chunk(i) -> Chunk<T> for i in [0, n_chunks). Every thread of
// the block calls this with the same n_chunks; it leaves no cp.async group pending and ends with a
// barrier, so the shared memory can be reused by the caller.
template <typename Cfg, typename T, typename GetChunk>
__device__ __forceinline__ void accumulate(float (&acc)[Cfg::MI][Cfg::NI][4], int n_chunks, GetChunk get_chunk,
                                           T* shared) {
  using ATile = typename Cfg::ATile;
  using BTile = typename Cfg::BTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / Cfg::WARPS_N) * Cfg::WM, wn = (warp % Cfg::WARPS_N) * Cfg::WN;

  auto stage_a = [&](int s) { return shared + s * Cfg::kStageElements; };
  auto stage_b = [&](int s) { return shared + s * Cfg::kStageElements + ATile::kElements; };
  auto load = [&](int i) {
    if (i < n_chunks) {
      const Chunk<T> c = get_chunk(i);
      load_tile<T, ATile, Cfg::A_KMAJOR, Cfg::BM, Cfg::kThreads>(stage_a(i % Cfg::STAGES), c.a, c.k0);
      load_tile<T, BTile, Cfg::B_KMAJOR, Cfg::BN, Cfg::kThreads>(stage_b(i % Cfg::STAGES), c.b, c.k0);
    }
    cp_async_commit();  // an empty group keeps the wait count uniform at the tail
  };

  for (int s = 0; s < Cfg::STAGES - 1; ++s) load(s);
  for (int i = 0; i < n_chunks; ++i) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();  // chunk i is visible to all, and stage (i - 1) % STAGES is free
    load(i + Cfg::STAGES - 1);
    const T* a_tile = stage_a(i % Cfg::STAGES);
    const T* b_tile = stage_b(i % Cfg::STAGES);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a_frag[Cfg::MI][4];
      uint32_t b_frag[Cfg::NI][2];
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) {
        const int m = wm + mi * 16;
        if constexpr (Cfg::A_KMAJOR) {
          // matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
          ldmatrix_x4(a_frag[mi], a_tile + ATile::offset(m + (lane % 16), kk + (lane / 16) * 8));
        } else {
          // the same four matrices read from k-rows
          ldmatrix_x4_trans(a_frag[mi],
                            a_tile + ATile::offset(kk + (lane % 8) + (lane / 16) * 8, m + ((lane / 8) % 2) * 8));
        }
      }
#pragma unroll
      for (int nj = 0; nj < Cfg::NI; nj += 2) {
        const int n = wn + nj * 8;
        uint32_t r[4];
        if constexpr (Cfg::B_KMAJOR) {
          // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
          ldmatrix_x4(r, b_tile + BTile::offset(n + (lane % 8) + (lane / 16) * 8, kk + ((lane / 8) % 2) * 8));
        } else {
          ldmatrix_x4_trans(r, b_tile + BTile::offset(kk + (lane % 8) + ((lane / 8) % 2) * 8, n + (lane / 16) * 8));
        }
        b_frag[nj][0] = r[0];
        b_frag[nj][1] = r[1];
        b_frag[nj + 1][0] = r[2];
        b_frag[nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Cfg::NI; ++ni) mma_16816<T>(acc[mi][ni], a_frag[mi], b_frag[ni][0], b_frag[ni][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
}

template <typename Cfg>
__device__ __forceinline__ void zero(float (&acc)[Cfg::MI][Cfg::NI][4]) {
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
}

// Visits the accumulator as f(row, col, v0, v1, slot): columns col and col + 1 of the block tile,
// so the epilogue can store two elements at once; slot numbers the thread's column pairs (the
// same for every row it holds).
template <typename Cfg, typename F>
__device__ __forceinline__ void for_each_pair(const float (&acc)[Cfg::MI][Cfg::NI][4], F f) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / Cfg::WARPS_N) * Cfg::WM, wn = (warp % Cfg::WARPS_N) * Cfg::WN;
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni) {
      const int row = wm + mi * 16 + lane / 4, col = wn + ni * 8 + (lane % 4) * 2;
      f(row, col, acc[mi][ni][0], acc[mi][ni][1], ni);
      f(row + 8, col, acc[mi][ni][2], acc[mi][ni][3], ni);
    }
}

// The interface the MLP kernels are written against (wgmma_gemm.cuh has the Hopper one): a
// BM x BN block tile whose B side comes in kPieces operands of kPieceN columns (SplitChunk), as
// an accumulator type, the chunk loop and a visitor. Here: 64 x BN on 4 warps of mma.sync, with
// B in one piece.
template <typename T, int BN_, bool B_KMAJOR, int STAGES>
struct Engine {
  using Cfg = Config<64, BN_, 2, 2, STAGES, true, B_KMAJOR>;
  static constexpr int BM = 64, BN = BN_;
  static constexpr int kPieces = 1, kPieceN = BN;
  using Chunk = SplitChunk<T, kPieces>;
  static constexpr bool kLoadsByTma = false;
  static constexpr int kThreads = Cfg::kThreads;
  static constexpr int kMinBlocks = 1;
  static constexpr bool kPersistent = false;  // one tile per thread block
  static constexpr int kSlots = Cfg::NI;  // column pairs each thread holds
  static constexpr int shared_bytes() { return Cfg::template shared_bytes<T>(); }
  struct Acc {
    float v[Cfg::MI][Cfg::NI][4];
  };
  __device__ static __forceinline__ void zero(Acc& acc) { mma::zero<Cfg>(acc.v); }
  // get_chunk(i) -> Chunk. An empty piece is zero-filled like any ragged edge (its pointer must
  // still be a valid address), so it adds nothing here either.
  template <typename GetChunk>
  __device__ static __forceinline__ void accumulate(Acc& acc, int n_chunks, GetChunk get_chunk, unsigned char* raw) {
    mma::accumulate<Cfg, T>(acc.v, n_chunks, [&](int i) {
      const Chunk c = get_chunk(i);
      return mma::Chunk<T>{c.a, c.b[0], c.k0};
    }, reinterpret_cast<T*>(raw));
  }
  template <typename F>
  __device__ static __forceinline__ void for_each_pair(const Acc& acc, F f) {
    mma::for_each_pair<Cfg>(acc.v, f);
  }
  __device__ static __forceinline__ int slot_column(int slot) {
    const int warp = threadIdx.x / 32;
    return (warp % Cfg::WARPS_N) * Cfg::WN + slot * 8 + (threadIdx.x % 4) * 2;
  }
};

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  __device__ static __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
  __device__ static __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
};
template <>
struct Pair<__half> {
  using type = __half2;
  __device__ static __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
  __device__ static __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
};

}  // namespace mma
}  // namespace long_exposure
