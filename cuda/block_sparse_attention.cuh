// Flash-attention-2 style kernels of block-sparse causal attention (contract: attention.h).
//
// Every kernel walks a list of tiles that it compacts in shared memory first, so a CUDA step never
// asks the host what a layout holds. Warps own 16 rows each and keep their accumulators in the
// mma.sync m16n8k16 register layout; shared tiles are row-major with rows padded by 16 bytes, which
// keeps ldmatrix free of bank conflicts for every supported head dimension (80 included, which an
// XOR swizzle of 8 chunks cannot cover). Tiles arrive by cp.async into two stages, the next tile
// loading while the current one is computed.
//
// The kernels are instantiated per (dtype, head dim) in block_sparse_attention_{fwd,bwd}_*.cu; the
// launchers in block_sparse_attention.cu choose among them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "block_sparse_attention_launch.cuh"
#include "cuda_check.cuh"
#include "ptx.cuh"

namespace long_exposure {
namespace attention_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- the few PTX instructions the kernels are built from: cuda/ptx.cuh ------------------------

using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::Mma;
using ptx::cp_async_16;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;

// ---- tiles and warp-level products ----------------------------------------------------------

// One [batch, heads, rows, D] operand, strides in elements (the last is 1).
struct Operand {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
  template <typename T>
  __device__ const T* plane(int b, int h) const {
    return static_cast<const T*>(data) + b * sb + h * sh;
  }
};

struct Output {
  void* data = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
  template <typename T>
  __device__ T* plane(int b, int h) const {
    return static_cast<T*>(data) + b * sb + h * sh;
  }
};

// Issues the copies of rows [row0, row0 + ROWS) of one plane into a padded shared tile; rows at
// or past `limit` are zero-filled (and their source clamped to the plane's start, a valid address).
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_rows(T* tile, const T* plane, int64_t stride, int row0,
                                          int limit) {
  constexpr int kChunks = D / 8, kLds = D + 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, k = c % kChunks;
    const bool valid = row0 + r < limit;
    const T* src = plane + (valid ? static_cast<int64_t>(row0 + r) * stride + k * 8 : 0);
    cp_async_16(tile + r * kLds + k * 8, src, valid);
  }
}

// The A fragments (16 rows x K) of rows [0, 16) of a padded shared tile.
template <typename T, int K, int LDS>
__device__ __forceinline__ void load_a(uint32_t (&a)[K / 16][4], const T* tile) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) ldmatrix_x4(a[ks], tile + (lane & 15) * LDS + ks * 16 + (lane >> 4) * 8);
}

// acc[16 x N] += A[16 x K] * B^T, with B's N rows of K contiguous elements in shared memory.
template <typename T, int K, int N, int LDS>
__device__ __forceinline__ void gemm_abt(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                         const T* b_tile) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + ks * 16 +
                     ((lane >> 3) & 1) * 8);
      Mma<T>::run(acc[2 * np], a[ks], b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// acc[16 x N] += A[16 x K] * B^T with A read from shared memory one k-step at a time, for the
// backward pass, where holding all of A in registers would push the accumulators into spills.
template <typename T, int K, int N, int LDS>
__device__ __forceinline__ void gemm_abt_shared(float (&acc)[N / 8][4], const T* a_tile,
                                                const T* b_tile) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile + (lane & 15) * LDS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + ks * 16 +
                     ((lane >> 3) & 1) * 8);
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x N] += A[16 x K] * B, with B's K rows of N contiguous elements in shared memory.
template <typename T, int K, int N, int LDS>
__device__ __forceinline__ void gemm_ab(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                        const T* b_tile) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + np * 16 +
                           (lane >> 4) * 8);
      Mma<T>::run(acc[2 * np], a[ks], b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// An accumulator [16 x N] rounded to the input type, as the A fragments of the next product.
template <typename T, int N>
__device__ __forceinline__ void to_a(uint32_t (&a)[N / 16][4], const float (&acc)[N / 8][4]) {
#pragma unroll
  for (int t = 0; t < N / 16; ++t) {
    a[t][0] = Mma<T>::pack(acc[2 * t][0], acc[2 * t][1]);
    a[t][1] = Mma<T>::pack(acc[2 * t][2], acc[2 * t][3]);
    a[t][2] = Mma<T>::pack(acc[2 * t + 1][0], acc[2 * t + 1][1]);
    a[t][3] = Mma<T>::pack(acc[2 * t + 1][2], acc[2 * t + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Writes a warp's [16 x D] accumulator (times `factor`, per accumulator row half) to rows
// [row0, row0 + 16) of a plane, rows at or past `limit` left alone. The rows pass through the
// warp's own 16 rows of a shared tile so that global stores are 16-byte and coalesced.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float factor_lo,
                                           float factor_hi, T* staging, T* plane, int64_t stride,
                                           int row0, int limit) {
  constexpr int kLds = D + 8, kChunks = D / 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, c = (lane & 3) * 2;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    *reinterpret_cast<uint32_t*>(staging + g * kLds + nt * 8 + c) =
        Mma<T>::pack(acc[nt][0] * factor_lo, acc[nt][1] * factor_lo);
    *reinterpret_cast<uint32_t*>(staging + (g + 8) * kLds + nt * 8 + c) =
        Mma<T>::pack(acc[nt][2] * factor_hi, acc[nt][3] * factor_hi);
  }
  __syncwarp();
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = i / kChunks, k = i % kChunks;
    if (row0 + r < limit)
      *reinterpret_cast<uint4*>(plane + static_cast<int64_t>(row0 + r) * stride + k * 8) =
          *reinterpret_cast<const uint4*>(staging + r * kLds + k * 8);
  }
}

// A thread block's (query or key) block rank, head and batch row. Thread blocks start in launch
// order, and a block's work depends on its rank far more than on its head: causally the last
// query blocks and the first key blocks (and a sink's) see the most. With the rank fastest, the
// last heads' heaviest blocks started in the last wave and ran on alone; with the rank slowest,
// the thread blocks in flight at once spread over every head's operands, more than L2 holds
// (bench/RESULTS.md, session 19). So the ranks go in groups of `group`, heaviest first: a group's
// ranks of every head and batch row launch before the next group's, and each head's ranks of a
// group side by side, sharing the query or key tiles they read.
struct GridItem {
  int rank, h, b;
};
// The grid is (group, heads x batch rows, groups), launched x fastest; a thread block past the
// last rank (in a short last group) has nothing to do. Every value here comes from special
// registers and parameters, so the compiler may recompute it where needed instead of holding it.
__device__ __forceinline__ GridItem grid_item(int group, int heads) {
  const int pair = static_cast<int>(blockIdx.y);
  return {static_cast<int>(blockIdx.z) * group + static_cast<int>(blockIdx.x), pair % heads, pair / heads};
}
// The grid for `ranks` ranks, its group stored in the params the kernel takes: the variable's group
// or the default, but all the ranks in one group where more groups than the grid's z holds would
// be needed (attention.cpp has checked that heads times batch rows fits y's 65535).
template <typename Params>
dim3 rank_grid(Params& p, int ranks, int batch) {
  constexpr int kDefaultGroup = 8, kMaxZ = 65535;
  const char* value = std::getenv("LONG_EXPOSURE_ATTENTION_RANK_GROUP");  // to compare orders
  int group = std::min(value && std::atoi(value) > 0 ? std::atoi(value) : kDefaultGroup, ranks);
  if ((ranks + group - 1) / group > kMaxZ) group = ranks;
  p.rank_group = group;
  return dim3(static_cast<unsigned>(group), static_cast<unsigned>(p.heads * batch),
              static_cast<unsigned>((ranks + group - 1) / group));
}

// Copies the entries of a block list that lie in [lo, hi] into shared memory (warp 0, in list
// order) and returns how many there are to every thread. Entries outside the range hold no
// visible key (causality) or are not valid block numbers; a count beyond the capacity is clamped.
// The count and the list's first 32 entries are read at once, not one after the other: at low
// densities a thread block's whole work is a few tiles, and this read heads its critical path.
__device__ __forceinline__ int compact_list(int* out, int* out_count, const int32_t* list, const int32_t* count_at,
                                            int capacity, int lo, int hi) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int v = lane < capacity ? list[lane] : -1;  // entries past the count are never kept
    const int count = min(max(*count_at, 0), capacity);
    int n = 0;
    for (int s = 0; s < count; s += 32) {
      if (s > 0) v = s + lane < count ? list[s + lane] : -1;
      const bool keep = s + lane < count && v >= lo && v <= hi;
      const unsigned mask = __ballot_sync(0xffffffffu, keep);
      if (keep) out[n + __popc(mask & ((1u << lane) - 1u))] = v;
      n += __popc(mask);
    }
    if (lane == 0) *out_count = n;
  }
  __syncthreads();
  return *out_count;
}

// The key tiles a query block visits, in order: the prefix's tiles, then BLK / BK tiles of each
// listed key block. The forward and the dQ pass walk the same keys, so they share this.
template <typename T, int D, int BLK, int BK, int THREADS>
struct KeyTiles {
  static constexpr int kPerBlock = BLK / BK;
  const int* list;  // the query block's compacted key-block list, in shared memory
  int qb, prefix, seq, n_prefix_tiles, n_tiles;
  const T *k, *v, *pk, *pv;
  int64_t k_ss, v_ss, pk_ss, pv_ss;

  // Copies what it needs out of the kernel parameters, which stay in the constant bank.
  template <typename Params>
  __device__ KeyTiles(const Params& p, const int* s_list, int n_list, int b, int h, int query_block)
      : list(s_list), qb(query_block), prefix(p.prefix), seq(p.seq), n_prefix_tiles((p.prefix + BK - 1) / BK),
        n_tiles(n_prefix_tiles + n_list * kPerBlock), k(p.k.template plane<T>(b, h)),
        v(p.v.template plane<T>(b, h)), pk(p.pk.data ? p.pk.template plane<T>(b, h) : nullptr),
        pv(p.pv.data ? p.pv.template plane<T>(b, h) : nullptr), k_ss(p.k.ss), v_ss(p.v.ss), pk_ss(p.pk.ss),
        pv_ss(p.pv.ss) {}

  // Starts the copy of tile t's keys and values into the shared stages.
  template <int LDS>
  __device__ void issue(int t, T* s_k, T* s_v) const {
    T* dk = s_k + (t & 1) * BK * LDS;
    T* dv = s_v + (t & 1) * BK * LDS;
    if (t < n_prefix_tiles) {
      load_rows<T, BK, D, THREADS>(dk, pk, pk_ss, t * BK, prefix);
      load_rows<T, BK, D, THREADS>(dv, pv, pv_ss, t * BK, prefix);
    } else {
      const int u = t - n_prefix_tiles;
      const int key0 = list[u / kPerBlock] * BLK + (u % kPerBlock) * BK;
      load_rows<T, BK, D, THREADS>(dk, k, k_ss, key0, seq);
      load_rows<T, BK, D, THREADS>(dv, v, v_ss, key0, seq);
    }
  }

  // Tile t's first key and the last key each of a thread's two query rows may see: prefix keys
  // past the prefix length are invisible, and causality applies inside the diagonal block.
  __device__ void bounds(int t, int i_lo, int i_hi, int& key0, int& limit_lo, int& limit_hi) const {
    if (t < n_prefix_tiles) {
      key0 = t * BK;
      limit_lo = limit_hi = prefix - 1;
    } else {
      const int u = t - n_prefix_tiles, kb = list[u / kPerBlock];
      key0 = kb * BLK + (u % kPerBlock) * BK;
      limit_lo = kb == qb ? i_lo : 0x7fffffff;
      limit_hi = kb == qb ? i_hi : 0x7fffffff;
    }
  }
};

// ---- forward ------------------------------------------------------------------------------

struct ForwardParams {
  Operand q, k, v, pk, pv;
  Output out;
  float* lse;  // [B, H, S]
  const int32_t* counts;
  const int32_t* indices;
  int heads, seq, prefix, n_q, capacity;
  bool shared_layout;
  float scale_log2;  // softmax scale times log2(e): the kernels exponentiate with exp2
  int rank_group;  // grid_item's, set by rank_grid
};

template <int D, int BLK>
struct ForwardShape {
  static constexpr int kWarps = BLK / 16, kThreads = kWarps * 32, kBk = 64, kLds = D + 8;
  template <typename T>
  static size_t smem_bytes(int n_q) {
    return (BLK + 4 * kBk) * kLds * sizeof(T) + (n_q + 4) * sizeof(int);
  }
};

template <typename T, int D, int BLK>
__global__ void __launch_bounds__(BLK * 2) forward_kernel(ForwardParams p) {
  using Shape = ForwardShape<D, BLK>;
  constexpr int kBk = Shape::kBk, kLds = Shape::kLds, kThreads = Shape::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + BLK * kLds;
  T* s_v = s_k + 2 * kBk * kLds;
  int* s_list = reinterpret_cast<int*>(s_v + 2 * kBk * kLds);
  int* s_count = s_list + p.n_q;

  // The last query blocks see the most keys; starting them first evens out the tail.
  const GridItem item = grid_item(p.rank_group, p.heads);
  if (item.rank >= p.n_q) return;
  const int qb = p.n_q - 1 - item.rank, h = item.h, b = item.b;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = ((p.shared_layout ? 0 : b) * static_cast<int64_t>(p.heads) + h) * p.n_q + qb;
  const int n_list = compact_list(s_list, s_count, p.indices + row * p.capacity, p.counts + row,
                                  p.capacity, 0, qb);
  const KeyTiles<T, D, BLK, kBk, kThreads> tiles(p, s_list, n_list, b, h, qb);
  const int n_tiles = tiles.n_tiles;
  auto issue = [&](int t) { tiles.template issue<kLds>(t, s_k, s_v); };
  const T* q = p.q.plane<T>(b, h);

  load_rows<T, BLK, D, kThreads>(s_q, q, p.q.ss, qb * BLK, p.seq);
  if (n_tiles > 0) issue(0);
  cp_async_commit();

  const int g = lane >> 2, c = (lane & 3) * 2;
  const int i_lo = qb * BLK + warp * 16 + g, i_hi = i_lo + 8;  // this thread's two query rows
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  float o[D / 8][4];
  zero(o);
  uint32_t qf[D / 16][4];

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) issue(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (t == 0) load_a<T, D, kLds>(qf, s_q + warp * 16 * kLds);

    float s[kBk / 8][4];
    zero(s);
    gemm_abt<T, D, kBk, kLds>(s, qf, s_k + (t & 1) * kBk * kLds);

    int key0, limit_lo, limit_hi;
    tiles.bounds(t, i_lo, i_hi, key0, limit_lo, limit_hi);
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
      const int j = key0 + nt * 8 + c;
      s[nt][0] = j <= limit_lo ? s[nt][0] * p.scale_log2 : -INFINITY;
      s[nt][1] = j + 1 <= limit_lo ? s[nt][1] * p.scale_log2 : -INFINITY;
      s[nt][2] = j <= limit_hi ? s[nt][2] * p.scale_log2 : -INFINITY;
      s[nt][3] = j + 1 <= limit_hi ? s[nt][3] * p.scale_log2 : -INFINITY;
      mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o_));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o_));
    }
    const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
    // A row with no visible key so far keeps m = -inf; subtracting 0 then keeps exp2 at 0, not NaN.
    const float base_lo = new_lo == -INFINITY ? 0.f : new_lo;
    const float base_hi = new_hi == -INFINITY ? 0.f : new_hi;
    const float alpha_lo = exp2f(m_lo - base_lo), alpha_hi = exp2f(m_hi - base_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - base_lo);
      s[nt][1] = exp2f(s[nt][1] - base_lo);
      s[nt][2] = exp2f(s[nt][2] - base_hi);
      s[nt][3] = exp2f(s[nt][3] - base_hi);
      sum_lo += s[nt][0] + s[nt][1];
      sum_hi += s[nt][2] + s[nt][3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;
    l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      o[nt][0] *= alpha_lo;
      o[nt][1] *= alpha_lo;
      o[nt][2] *= alpha_hi;
      o[nt][3] *= alpha_hi;
    }
    uint32_t pf[kBk / 16][4];
    to_a<T, kBk>(pf, s);
    gemm_ab<T, kBk, D, kLds>(o, pf, s_v + (t & 1) * kBk * kLds);
    __syncthreads();  // the stage just read is the one the next iteration refills
  }
  cp_async_wait<0>();
  __syncthreads();  // Q must have landed before the staging below overwrites it (empty lists)

#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o_);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o_);
  }
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  if ((lane & 3) == 0) {
    if (i_lo < p.seq) lse[i_lo] = l_lo > 0.f ? (m_lo + log2f(l_lo)) * kLn2 : -INFINITY;
    if (i_hi < p.seq) lse[i_hi] = l_hi > 0.f ? (m_hi + log2f(l_hi)) * kLn2 : -INFINITY;
  }
  store_rows<T, D>(o, l_lo > 0.f ? 1.f / l_lo : 0.f, l_hi > 0.f ? 1.f / l_hi : 0.f,
                   s_q + warp * 16 * kLds, p.out.plane<T>(b, h), p.out.ss, qb * BLK + warp * 16,
                   p.seq);
}

// The kernels' view of a forward call (both forward kernels take it).
inline ForwardParams forward_params(const AttentionForwardArgs& a) {
  ForwardParams p;
  auto operand = [](const TensorView& t) {
    Operand o;
    if (t.defined()) o = Operand{t.data, t.stride(0), t.stride(1), t.stride(2)};
    return o;
  };
  p.q = operand(a.q);
  p.k = operand(a.k);
  p.v = operand(a.v);
  p.pk = operand(a.prefix_k);
  p.pv = operand(a.prefix_v);
  p.out = Output{a.out.data, a.out.stride(0), a.out.stride(1), a.out.stride(2)};
  p.lse = a.lse.ptr<float>();
  p.counts = a.layout.counts.ptr<const int32_t>();
  p.indices = a.layout.indices.ptr<const int32_t>();
  p.heads = static_cast<int>(a.q.size(1));
  p.seq = static_cast<int>(a.q.size(2));
  p.prefix = a.prefix_k.defined() ? static_cast<int>(a.prefix_k.size(2)) : 0;
  if (p.prefix == 0) p.pk = p.pv = Operand{};
  p.n_q = static_cast<int>(a.layout.rows());
  p.capacity = static_cast<int>(a.layout.capacity());
  p.shared_layout = a.layout.batch() == 1;
  p.scale_log2 = static_cast<float>(a.scale) * kLog2e;
  return p;
}

template <typename T, int D, int BLK>
void launch_forward(const AttentionForwardArgs& a) {
  using Shape = ForwardShape<D, BLK>;
  ForwardParams p = forward_params(a);

  const size_t smem = Shape::template smem_bytes<T>(p.n_q);
  auto kernel = forward_kernel<T, D, BLK>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             "attention forward shared memory");
  const dim3 grid = rank_grid(p, p.n_q, static_cast<int>(a.q.size(0)));
  kernel<<<grid, Shape::kThreads, smem, stream_of(a.q.stream)>>>(p);
  check_cuda(cudaGetLastError(), "attention forward kernel launch");
}

// ---- backward -----------------------------------------------------------------------------

struct BackwardParams {
  Operand q, k, v, pk, pv, dout, out;
  Output dq, dk, dv, dpk, dpv;
  const float* lse;  // [B, H, S]
  // [B, H, S], rowsum(dout * out): written by the delta pass (or on Hopper by the dQ pass, which
  // then runs first), read by the dK/dV pass and, from the delta pass, by the mma.sync dQ pass.
  float* delta;
  const int32_t* counts;     // the layout (kv blocks per query block), for dQ
  const int32_t* indices;
  const int32_t* t_counts;   // the layout transposed (query blocks per key block), for dK/dV
  const int32_t* t_indices;
  int heads, seq, prefix, n_q, capacity, t_capacity;
  bool shared_layout, want_prefix;
  float scale, scale_log2;
  int rank_group;  // grid_item's, set by rank_grid
};

// The ranks of a dK/dV grid: the prefix's key blocks (when its gradient is asked for), then the
// sequence's.
template <int BLK>
__host__ __device__ __forceinline__ int key_block_ranks(const BackwardParams& p) {
  return p.n_q + (p.want_prefix ? (p.prefix + BLK - 1) / BLK : 0);
}

// The key block a dK/dV thread block takes and its list of query blocks, in shared memory. Prefix
// blocks come first in the grid: they read every query block, and low key blocks most query
// blocks, so the heaviest run first. A key block of the sequence reads the layout's transposed
// list from its own block on. The list's length reaches every thread.
struct KeyBlockQueries {
  bool is_prefix;
  int kb, n_list;
};

template <int BLK, int THREADS>
__device__ __forceinline__ KeyBlockQueries key_block_queries(const BackwardParams& p, int rank, int b, int h, int* s_list,
                                                            int* s_count) {
  const int n_prefix_blocks = p.want_prefix ? (p.prefix + BLK - 1) / BLK : 0;
  KeyBlockQueries w;
  w.is_prefix = rank < n_prefix_blocks;
  w.kb = w.is_prefix ? rank : rank - n_prefix_blocks;
  if (w.is_prefix) {
    for (int i = threadIdx.x; i < p.n_q; i += THREADS) s_list[i] = i;
    w.n_list = p.n_q;
    __syncthreads();
  } else {
    const int64_t row = ((p.shared_layout ? 0 : b) * static_cast<int64_t>(p.heads) + h) * p.n_q + w.kb;
    w.n_list = compact_list(s_list, s_count, p.t_indices + row * p.t_capacity, p.t_counts + row, p.t_capacity, w.kb,
                            p.n_q - 1);
  }
  return w;
}

// rowsum(dout * out) in fp32. kLanes threads share a row, each reading 16 bytes of dout and of out,
// and each thread block takes kRowsPerThread rows per lane group with all their loads in flight
// before any sum: one warp per row with 4-byte loads ran at a third of the H200's bandwidth
// (58 us at OPT-1.3B, batch 4, 2048 tokens). Rows go in the tensors' memory order, heads inner
// when dout's heads are (the [B, S, H, D] projections' layout), so that neighbouring groups read
// neighbouring bytes.
template <int D>
struct DeltaShape {
  static constexpr int kChunks = D / 8;  // 16-byte chunks of a row
  static constexpr int kLanes = kChunks <= 8 ? 8 : (kChunks <= 16 ? 16 : 32);
  static constexpr int kThreads = 256, kRowsPerThread = 4;
  static constexpr int kRowsPerBlock = kThreads / kLanes * kRowsPerThread;
  static_assert(D % 8 == 0 && kChunks <= 32, "head dims up to 256, in multiples of 8");
};

template <typename T, int D>
__global__ void __launch_bounds__(DeltaShape<D>::kThreads)
    delta_kernel(Operand dout, Operand out, float* delta, int heads, int seq, int64_t rows) {
  using Shape = DeltaShape<D>;
  const int lane = threadIdx.x % Shape::kLanes, group = threadIdx.x / Shape::kLanes;
  constexpr int kGroups = Shape::kThreads / Shape::kLanes;
  const bool heads_inner = dout.sh < dout.ss;
  uint4 x[Shape::kRowsPerThread], y[Shape::kRowsPerThread];
  int64_t row[Shape::kRowsPerThread];
#pragma unroll
  for (int j = 0; j < Shape::kRowsPerThread; ++j) {
    const int64_t r = blockIdx.x * static_cast<int64_t>(Shape::kRowsPerBlock) + j * kGroups + group;
    int b, h, i;
    if (heads_inner) {
      h = static_cast<int>(r % heads), i = static_cast<int>((r / heads) % seq);
      b = static_cast<int>(r / (static_cast<int64_t>(seq) * heads));
    } else {
      i = static_cast<int>(r % seq), h = static_cast<int>((r / seq) % heads);
      b = static_cast<int>(r / (static_cast<int64_t>(seq) * heads));
    }
    const bool live = r < rows && lane < Shape::kChunks;
    row[j] = r < rows ? (static_cast<int64_t>(b) * heads + h) * seq + i : -1;
    x[j] = live ? reinterpret_cast<const uint4*>(dout.plane<T>(b, h) + i * dout.ss)[lane] : uint4{0, 0, 0, 0};
    y[j] = live ? reinterpret_cast<const uint4*>(out.plane<T>(b, h) + i * out.ss)[lane] : uint4{0, 0, 0, 0};
  }
#pragma unroll
  for (int j = 0; j < Shape::kRowsPerThread; ++j) {
    const T* xs = reinterpret_cast<const T*>(&x[j]);
    const T* ys = reinterpret_cast<const T*>(&y[j]);
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += static_cast<float>(xs[e]) * static_cast<float>(ys[e]);
#pragma unroll
    for (int o = Shape::kLanes / 2; o >= 1; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0 && row[j] >= 0) delta[row[j]] = sum;
  }
}

// The logsumexp as the backward kernels use it: log2 units, and +inf for rows that attend
// nothing or lie past the sequence, which turns every probability of the row into exactly 0.
__device__ __forceinline__ float backward_lse(const float* lse, int i, int seq) {
  if (i >= seq) return INFINITY;
  const float x = lse[i];
  return x == -INFINITY ? INFINITY : x * kLog2e;
}

template <int D, int BLK>
struct DqShape {
  static constexpr int kWarps = BLK / 16, kThreads = kWarps * 32, kLds = D + 8;
  static constexpr int kBk = D > 64 ? 32 : 64;
  template <typename T>
  static size_t smem_bytes(int n_q) {
    return (2 * BLK + 4 * kBk) * kLds * sizeof(T) + (n_q + 4) * sizeof(int);
  }
};

// dQ of one query block: the forward's walk over its keys, recomputing P from the saved lse.
template <typename T, int D, int BLK>
__global__ void __launch_bounds__(BLK * 2) dq_kernel(BackwardParams p) {
  using Shape = DqShape<D, BLK>;
  constexpr int kBk = Shape::kBk, kLds = Shape::kLds, kThreads = Shape::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + BLK * kLds;
  T* s_k = s_do + BLK * kLds;
  T* s_v = s_k + 2 * kBk * kLds;
  int* s_list = reinterpret_cast<int*>(s_v + 2 * kBk * kLds);
  int* s_count = s_list + p.n_q;

  const GridItem item = grid_item(p.rank_group, p.heads);
  if (item.rank >= p.n_q) return;
  const int qb = p.n_q - 1 - item.rank, h = item.h, b = item.b;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = ((p.shared_layout ? 0 : b) * static_cast<int64_t>(p.heads) + h) * p.n_q + qb;
  const int n_list = compact_list(s_list, s_count, p.indices + row * p.capacity, p.counts + row,
                                  p.capacity, 0, qb);
  const KeyTiles<T, D, BLK, kBk, kThreads> tiles(p, s_list, n_list, b, h, qb);
  const int n_tiles = tiles.n_tiles;
  auto issue = [&](int t) { tiles.template issue<kLds>(t, s_k, s_v); };

  load_rows<T, BLK, D, kThreads>(s_q, p.q.plane<T>(b, h), p.q.ss, qb * BLK, p.seq);
  load_rows<T, BLK, D, kThreads>(s_do, p.dout.plane<T>(b, h), p.dout.ss, qb * BLK, p.seq);
  if (n_tiles > 0) issue(0);
  cp_async_commit();

  const int g = lane >> 2, c = (lane & 3) * 2;
  const int i_lo = qb * BLK + warp * 16 + g, i_hi = i_lo + 8;
  const int64_t bh = (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  const float lse_lo = backward_lse(p.lse + bh, i_lo, p.seq);
  const float lse_hi = backward_lse(p.lse + bh, i_hi, p.seq);
  const float delta_lo = i_lo < p.seq ? p.delta[bh + i_lo] : 0.f;
  const float delta_hi = i_hi < p.seq ? p.delta[bh + i_hi] : 0.f;

  float dq[D / 8][4];
  zero(dq);
  uint32_t qf[D / 16][4], dof[D / 16][4];

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) issue(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (t == 0) {
      load_a<T, D, kLds>(qf, s_q + warp * 16 * kLds);
      load_a<T, D, kLds>(dof, s_do + warp * 16 * kLds);
    }
    const T* tk = s_k + (t & 1) * kBk * kLds;
    const T* tv = s_v + (t & 1) * kBk * kLds;

    float s[kBk / 8][4];
    zero(s);
    gemm_abt<T, D, kBk, kLds>(s, qf, tk);
    int key0, limit_lo, limit_hi;
    tiles.bounds(t, i_lo, i_hi, key0, limit_lo, limit_hi);
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
      const int j = key0 + nt * 8 + c;
      s[nt][0] = j <= limit_lo ? exp2f(s[nt][0] * p.scale_log2 - lse_lo) : 0.f;
      s[nt][1] = j + 1 <= limit_lo ? exp2f(s[nt][1] * p.scale_log2 - lse_lo) : 0.f;
      s[nt][2] = j <= limit_hi ? exp2f(s[nt][2] * p.scale_log2 - lse_hi) : 0.f;
      s[nt][3] = j + 1 <= limit_hi ? exp2f(s[nt][3] * p.scale_log2 - lse_hi) : 0.f;
    }
    float dp[kBk / 8][4];
    zero(dp);
    gemm_abt<T, D, kBk, kLds>(dp, dof, tv);
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
      dp[nt][0] = s[nt][0] * (dp[nt][0] - delta_lo);
      dp[nt][1] = s[nt][1] * (dp[nt][1] - delta_lo);
      dp[nt][2] = s[nt][2] * (dp[nt][2] - delta_hi);
      dp[nt][3] = s[nt][3] * (dp[nt][3] - delta_hi);
    }
    uint32_t dsf[kBk / 16][4];
    to_a<T, kBk>(dsf, dp);
    gemm_ab<T, kBk, D, kLds>(dq, dsf, tk);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  store_rows<T, D>(dq, p.scale, p.scale, s_q + warp * 16 * kLds, p.dq.plane<T>(b, h), p.dq.ss,
                   qb * BLK + warp * 16, p.seq);
}

template <int D, int BLK>
struct DkvShape {
  static constexpr int kWarps = BLK / 16, kThreads = kWarps * 32, kLds = D + 8;
  static constexpr int kBq = D > 64 ? 32 : 64;
  template <typename T>
  static size_t smem_bytes(int n_q) {
    return (2 * BLK + 4 * kBq) * kLds * sizeof(T) + 4 * kBq * sizeof(float) +
           (n_q + 4) * sizeof(int);
  }
};

// dK and dV of one key tile: BLK keys of the sequence (a key block) or of the prefix. Warps own
// 16 keys each and compute the transposed products (keys as rows), so each warp's dK/dV rows are
// its own and need no reduction. Query tiles come from the transposed layout (every query block
// for prefix keys).
template <typename T, int D, int BLK>
__global__ void __launch_bounds__(BLK * 2) dkv_kernel(BackwardParams p) {
  using Shape = DkvShape<D, BLK>;
  constexpr int kBq = Shape::kBq, kLds = Shape::kLds, kThreads = Shape::kThreads;
  constexpr int kPerBlock = BLK / kBq;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + BLK * kLds;
  T* s_q = s_v + BLK * kLds;
  T* s_do = s_q + 2 * kBq * kLds;
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kBq * kLds);
  float* s_delta = s_lse + 2 * kBq;
  int* s_list = reinterpret_cast<int*>(s_delta + 2 * kBq);
  int* s_count = s_list + p.n_q;

  const GridItem item = grid_item(p.rank_group, p.heads);
  if (item.rank >= key_block_ranks<BLK>(p)) return;
  const int h = item.h, b = item.b;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const KeyBlockQueries work = key_block_queries<BLK, kThreads>(p, item.rank, b, h, s_list, s_count);
  const bool is_prefix = work.is_prefix;
  const int kb = work.kb, n_list = work.n_list;
  const int n_tiles = n_list * kPerBlock;

  const T* q = p.q.plane<T>(b, h);
  const T* dout = p.dout.plane<T>(b, h);
  const int64_t bh = (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  auto issue = [&](int t) {
    const int q0 = s_list[t / kPerBlock] * BLK + (t % kPerBlock) * kBq;
    load_rows<T, kBq, D, kThreads>(s_q + (t & 1) * kBq * kLds, q, p.q.ss, q0, p.seq);
    load_rows<T, kBq, D, kThreads>(s_do + (t & 1) * kBq * kLds, dout, p.dout.ss, q0, p.seq);
    for (int r = threadIdx.x; r < kBq; r += kThreads) {
      s_lse[(t & 1) * kBq + r] = backward_lse(p.lse + bh, q0 + r, p.seq);
      s_delta[(t & 1) * kBq + r] = q0 + r < p.seq ? p.delta[bh + q0 + r] : 0.f;
    }
  };

  const int key_limit = is_prefix ? p.prefix : p.seq;
  if (is_prefix) {
    load_rows<T, BLK, D, kThreads>(s_k, p.pk.plane<T>(b, h), p.pk.ss, kb * BLK, key_limit);
    load_rows<T, BLK, D, kThreads>(s_v, p.pv.plane<T>(b, h), p.pv.ss, kb * BLK, key_limit);
  } else {
    load_rows<T, BLK, D, kThreads>(s_k, p.k.plane<T>(b, h), p.k.ss, kb * BLK, key_limit);
    load_rows<T, BLK, D, kThreads>(s_v, p.v.plane<T>(b, h), p.v.ss, kb * BLK, key_limit);
  }
  if (n_tiles > 0) issue(0);
  cp_async_commit();

  const int g = lane >> 2, c = (lane & 3) * 2;
  const int j_lo = kb * BLK + warp * 16 + g, j_hi = j_lo + 8;  // this thread's two key rows
  const T* my_k = s_k + warp * 16 * kLds;
  const T* my_v = s_v + warp * 16 * kLds;
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) issue(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tq = s_q + (t & 1) * kBq * kLds;
    const T* tdo = s_do + (t & 1) * kBq * kLds;
    const float* tl = s_lse + (t & 1) * kBq;
    const float* td = s_delta + (t & 1) * kBq;
    const int qb = s_list[t / kPerBlock];
    const int q0 = qb * BLK + (t % kPerBlock) * kBq;
    const bool diagonal = !is_prefix && qb == kb;

    float s[kBq / 8][4];  // P^T: rows are keys, columns queries
    zero(s);
    gemm_abt_shared<T, D, kBq, kLds>(s, my_k, tq);
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt) {
      const int col = nt * 8 + c, i = q0 + col;
      const float l0 = tl[col], l1 = tl[col + 1];
      s[nt][0] = !diagonal || j_lo <= i ? exp2f(s[nt][0] * p.scale_log2 - l0) : 0.f;
      s[nt][1] = !diagonal || j_lo <= i + 1 ? exp2f(s[nt][1] * p.scale_log2 - l1) : 0.f;
      s[nt][2] = !diagonal || j_hi <= i ? exp2f(s[nt][2] * p.scale_log2 - l0) : 0.f;
      s[nt][3] = !diagonal || j_hi <= i + 1 ? exp2f(s[nt][3] * p.scale_log2 - l1) : 0.f;
    }
    {
      uint32_t pf[kBq / 16][4];
      to_a<T, kBq>(pf, s);
      gemm_ab<T, kBq, D, kLds>(dv, pf, tdo);
    }
    float dp[kBq / 8][4];  // dP^T
    zero(dp);
    gemm_abt_shared<T, D, kBq, kLds>(dp, my_v, tdo);
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt) {
      const int col = nt * 8 + c;
      const float d0 = td[col], d1 = td[col + 1];
      dp[nt][0] = s[nt][0] * (dp[nt][0] - d0);
      dp[nt][1] = s[nt][1] * (dp[nt][1] - d1);
      dp[nt][2] = s[nt][2] * (dp[nt][2] - d0);
      dp[nt][3] = s[nt][3] * (dp[nt][3] - d1);
    }
    {
      uint32_t dsf[kBq / 16][4];
      to_a<T, kBq>(dsf, dp);
      gemm_ab<T, kBq, D, kLds>(dk, dsf, tq);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  const Output out_k = is_prefix ? p.dpk : p.dk;
  const Output out_v = is_prefix ? p.dpv : p.dv;
  // Each warp stages through its own 16 rows of the K and V tiles, which only it has read.
  store_rows<T, D>(dk, p.scale, p.scale, s_k + warp * 16 * kLds, out_k.plane<T>(b, h), out_k.ss,
                   kb * BLK + warp * 16, key_limit);
  store_rows<T, D>(dv, 1.f, 1.f, s_v + warp * 16 * kLds, out_v.plane<T>(b, h), out_v.ss,
                   kb * BLK + warp * 16, key_limit);
}

// The kernels' view of a backward call (both backward kernel families take it).
inline BackwardParams backward_params(const AttentionBackwardArgs& a) {
  auto operand = [](const TensorView& t) {
    Operand o;
    if (t.defined()) o = Operand{t.data, t.stride(0), t.stride(1), t.stride(2)};
    return o;
  };
  auto output = [](const TensorView& t) {
    Output o;
    if (t.defined()) o = Output{t.data, t.stride(0), t.stride(1), t.stride(2)};
    return o;
  };
  BackwardParams p;
  p.q = operand(a.q);
  p.k = operand(a.k);
  p.v = operand(a.v);
  p.pk = operand(a.prefix_k);
  p.pv = operand(a.prefix_v);
  p.dout = operand(a.dout);
  p.out = operand(a.out);
  p.dq = output(a.dq);
  p.dk = output(a.dk);
  p.dv = output(a.dv);
  p.dpk = output(a.dprefix_k);
  p.dpv = output(a.dprefix_v);
  p.lse = a.lse.ptr<const float>();
  p.delta = a.ws_delta.ptr<float>();
  p.counts = a.layout.counts.ptr<const int32_t>();
  p.indices = a.layout.indices.ptr<const int32_t>();
  p.t_counts = a.ws_q_counts.ptr<const int32_t>();
  p.t_indices = a.ws_q_indices.ptr<const int32_t>();
  p.heads = static_cast<int>(a.q.size(1));
  p.seq = static_cast<int>(a.q.size(2));
  p.prefix = a.prefix_k.defined() ? static_cast<int>(a.prefix_k.size(2)) : 0;
  if (p.prefix == 0) p.pk = p.pv = Operand{};
  p.n_q = static_cast<int>(a.layout.rows());
  p.capacity = static_cast<int>(a.layout.capacity());
  p.t_capacity = static_cast<int>(a.ws_q_indices.size(3));
  p.shared_layout = a.layout.batch() == 1;
  p.want_prefix = a.dprefix_k.defined() && p.prefix > 0;
  p.scale = static_cast<float>(a.scale);
  p.scale_log2 = p.scale * kLog2e;
  return p;
}

// delta = rowsum(dout * out), which both dK/dV and dQ kernels read.
template <typename T, int D>
void launch_delta(const AttentionBackwardArgs& a, const BackwardParams& p, cudaStream_t stream) {
  auto operand = [](const TensorView& t) { return Operand{t.data, t.stride(0), t.stride(1), t.stride(2)}; };
  const int64_t rows = a.q.size(0) * static_cast<int64_t>(p.heads) * p.seq;
  if (rows > 0) {
    using Shape = DeltaShape<D>;
    delta_kernel<T, D><<<static_cast<unsigned>((rows + Shape::kRowsPerBlock - 1) / Shape::kRowsPerBlock),
                         Shape::kThreads, 0, stream>>>(
        p.dout, operand(a.out), a.ws_delta.ptr<float>(), p.heads, p.seq, rows);
    check_cuda(cudaGetLastError(), "attention backward delta kernel launch");
  }
}

template <typename T, int D, int BLK>
void launch_backward(const AttentionBackwardArgs& a) {
  BackwardParams p = backward_params(a);
  cudaStream_t stream = stream_of(a.q.stream);
  launch_delta<T, D>(a, p, stream);

  {
    using Shape = DkvShape<D, BLK>;
    const size_t smem = Shape::template smem_bytes<T>(p.n_q);
    auto kernel = dkv_kernel<T, D, BLK>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "attention dK/dV shared memory");
    const dim3 grid = rank_grid(p, key_block_ranks<BLK>(p), static_cast<int>(a.q.size(0)));
    kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "attention dK/dV kernel launch");
  }
  {
    using Shape = DqShape<D, BLK>;
    const size_t smem = Shape::template smem_bytes<T>(p.n_q);
    auto kernel = dq_kernel<T, D, BLK>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "attention dQ shared memory");
    const dim3 grid = rank_grid(p, p.n_q, static_cast<int>(a.q.size(0)));
    kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "attention dQ kernel launch");
  }
}

}  // namespace attention_cuda
}  // namespace long_exposure
