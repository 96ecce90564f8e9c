// wgmma::Engine's products with the operands brought in by TMA (sm_90a only): the same block
// tiles, accumulators and visitor, another chunk loop. The cp.async ring costs every thread the
// address arithmetic of its pieces and the whole block a barrier per 64-element K chunk; here one
// thread issues each chunk's boxes, mbarriers say when a stage has landed (full) and when every
// warp is done reading it (empty), and the warpgroups run ahead of one another up to the ring's
// depth. Each operand names its tensor map and the index of its first row (K-major) or column
// (MN-major) in it (mma::Operand::map, origin); ragged edges read as zeros, as with cp.async.
#pragma once

#include "tma.cuh"
#include "wgmma_gemm.cuh"

namespace long_exposure {
namespace wgmma {

// A chunk into a stage, issued by one thread: the A box at `a`, each live piece's box (two 64-column
// panels when B is MN-major) at b + j * piece_elements, all completing on `full`, which is told to
// expect their bytes; an empty piece is neither copied nor counted.
template <typename T, bool B_KMAJOR, int PIECES, typename Chunk>
__device__ __forceinline__ void load_chunk(const Chunk& c, T* a, T* b, int piece_elements, uint32_t a_bytes,
                                           uint32_t piece_bytes, uint64_t* full) {
  const int k0 = static_cast<int>(c.k0);
  uint32_t bytes = a_bytes;
#pragma unroll
  for (int j = 0; j < PIECES; ++j)
    if (c.b[j].rows > 0) bytes += piece_bytes;
  tma::arrive_expecting(full, bytes);
  tma::load_box(a, c.a.map, k0, c.a.origin, full);
#pragma unroll
  for (int j = 0; j < PIECES; ++j) {
    if (c.b[j].rows <= 0) continue;
    T* dst = b + j * piece_elements;
    if constexpr (B_KMAJOR) {
      tma::load_box(dst, c.b[j].map, k0, c.b[j].origin, full);
    } else {
      tma::load_box(dst, c.b[j].map, c.b[j].origin, k0, full);
      tma::load_box(dst + mma::kBK * 64, c.b[j].map, c.b[j].origin + 64, k0, full);
    }
  }
}

// MIN_BLOCKS thread blocks share an SM where the ring is shallow enough for them to fit: while
// one stores its tile's results, another's products keep the tensor cores busy.
template <typename T, bool B_KMAJOR, int STAGES, int WG_M = 1, int WG_N = 1, int MIN_BLOCKS = 1>
struct TmaEngine : Engine<T, B_KMAJOR, STAGES, WG_M, WG_N> {
  static_assert(STAGES >= 2, "one stage computing, one loading");
  using Base = Engine<T, B_KMAJOR, STAGES, WG_M, WG_N>;
  using typename Base::Acc;
  using typename Base::ATile;
  using typename Base::BTile;
  using typename Base::Chunk;
  using Base::BM;
  using Base::kPieces;
  using Base::kStageElements;
  using Base::kThreads;
  static constexpr bool kLoadsByTma = true;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  // The box heights the launcher must encode each operand's map with: BM rows of the A operand,
  // kN rows of a K-major B piece, 64 K rows of each 64-column panel of an MN-major one.
  static constexpr int kABoxRows = BM, kBBoxRows = B_KMAJOR ? kN : mma::kBK;
  static constexpr int kWarps = kThreads / 32;
  static constexpr uint32_t kABytes = ATile::kElements * sizeof(T), kPieceBytes = BTile::kElements * sizeof(T);
  // The ring, its 1 KiB alignment slack, and a full and an empty barrier per stage.
  static constexpr int shared_bytes() { return Base::shared_bytes() + 2 * STAGES * 8; }

  template <typename GetChunk>
  __device__ static __forceinline__ void accumulate(Acc& acc, int n_chunks, GetChunk get_chunk, unsigned char* raw) {
    T* shared = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023});
    uint64_t* full = reinterpret_cast<uint64_t*>(shared + STAGES * kStageElements);
    uint64_t* empty = full + STAGES;
    auto stage_a = [&](int s) { return shared + s * kStageElements; };
    auto stage_b = [&](int s, int piece) {
      return shared + s * kStageElements + ATile::kElements + piece * BTile::kElements;
    };
    const bool producer = threadIdx.x == 0;
    if (producer) {
      for (int s = 0; s < STAGES; ++s) {
        tma::barrier_init(&full[s], 1);
        tma::barrier_init(&empty[s], kWarps);
      }
      tma::fence_barrier_init();
    }
    __syncthreads();

    auto issue = [&](int i) {
      const int s = i % STAGES;
      load_chunk<T, B_KMAJOR, kPieces>(get_chunk(i), stage_a(s), stage_b(s, 0), BTile::kElements, kABytes,
                                       kPieceBytes, &full[s]);
    };
    if (producer)
      for (int i = 0; i < STAGES - 1 && i < n_chunks; ++i) issue(i);

    const int warpgroup = Base::this_warpgroup(), piece = warpgroup % WG_N, a_rows = Base::a_offset(warpgroup);
    for (int i = 0; i < n_chunks; ++i) {
      const int s = i % STAGES;
      tma::wait(&full[s], (i / STAGES) & 1);
      if (Base::piece_is_live(get_chunk(i), piece)) {
        Base::multiply(acc, stage_a(s) + a_rows, stage_b(s, piece));
        // Chunk i - 1's products are done: its stage may be refilled. The last chunk drains, so
        // that no wgmma is in flight where the loop's exit joins the path that skipped it.
        if (i + 1 < n_chunks)
          wait_one();
        else
          wait_all();
      } else {
        wait_all();
      }
      // Chunk i + STAGES - 1 refills the stage of chunk i - 1, once every warp has released it.
      tma::arrive_if(&empty[(i + STAGES - 1) % STAGES], i > 0 && threadIdx.x % 32 == 0);
      const int next = i + STAGES - 1;
      if (producer && next < n_chunks) {
        if (next >= STAGES) tma::wait(&empty[next % STAGES], (next / STAGES - 1) & 1);
        issue(next);
      }
      __syncwarp();  // wgmma is warp-collective: lane 0's warp meets again before the next chunk
    }
    __syncthreads();  // the caller may reuse the shared memory
  }
};

}  // namespace wgmma
}  // namespace long_exposure
