// Hopper's tensor-memory accelerator (TMA) and the shared-memory barriers that track its copies:
// the device instructions (sm_90 and later) and, on the host, the tensor maps they read. One TMA
// copy moves a whole 2-D box into a swizzled shared tile, zero-filling what lies outside the
// tensor, and signals an mbarrier when its bytes have landed, so the threads that compute issue no
// address arithmetic and meet at no block-wide barrier.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <string>

#include "cuda_check.cuh"
#include "long_exposure/tensor_view.h"
#include "ptx.cuh"

namespace long_exposure {
namespace tma {

// ---- device side ----

using ptx::smem_address;

__device__ __forceinline__ void barrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(arrivals) : "memory");
}
// Makes initialised barriers visible to the async proxy (the TMA unit) before any copy names them.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` of copies to come before the phase may complete.
__device__ __forceinline__ void arrive_expecting(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(bytes)
               : "memory");
}
// An arrival by the threads where `signal` holds, predicated rather than branched around: a branch
// here, between a wgmma and its wait, makes ptxas serialize the wgmma (its warning C7515).
__device__ __forceinline__ void arrive_if(uint64_t* barrier, bool signal) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
                   smem_address(barrier)),
               "r"(static_cast<uint32_t>(signal))
               : "memory");
}
// Waits until the barrier's phase of this parity has completed (phases alternate 0, 1, 0, ...).
__device__ __forceinline__ void wait(uint64_t* barrier, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(barrier)), "r"(parity)
        : "memory");
  } while (!done);
}

// The box of `map` whose first element is (c0 along the contiguous dimension, c1 along the other)
// into `dst` (aligned to 1024 bytes for the 128-byte swizzle), completing on `barrier`. `map` must
// live in kernel parameter, constant or global memory (a __grid_constant__ parameter here).
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, int32_t c0, int32_t c1,
                                         uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_address(barrier))
      : "memory");
}

// The same for a map of rank 4 (planes_map): the box at (column c0, row c1) of plane (c2, c3).
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, int32_t c0, int32_t c1, int32_t c2,
                                         int32_t c3, uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_address(barrier))
      : "memory");
}

// The box of `map` at (c0, c1) from `src` (swizzled as load_box lands it), in the bulk-async group
// that commit_stores closes. The issuing thread's writes to `src` (and, through a barrier, other
// threads') must be made visible to the async proxy first (wgmma::fence_proxy).
__device__ __forceinline__ void store_box(const CUtensorMap* map, int32_t c0, int32_t c1, const void* src) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(smem_address(src))
               : "memory");
}
__device__ __forceinline__ void commit_stores() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until every committed store has read its shared memory (which may then be written again).
__device__ __forceinline__ void wait_stores_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Until every committed store is done.
__device__ __forceinline__ void wait_stores() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// ---- host side ----

template <typename T>
constexpr CUtensorMapDataType data_type();
template <>
constexpr CUtensorMapDataType data_type<__nv_bfloat16>() {
  return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}
template <>
constexpr CUtensorMapDataType data_type<__half>() {
  return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// The driver's encoder, found through the runtime so that the library need not link libcuda.
inline PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    require(found == cudaDriverEntryPointSuccess && fn != nullptr,
            "the CUDA driver has no cuTensorMapEncodeTiled (the TMA kernels need driver 12.0 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The map of a row-major [rows, cols] matrix at `base`, read in boxes of box_rows x 64 elements
// (128 bytes, the widest row the 128-byte swizzle takes) that land swizzled as wgmma's canonical
// layouts expect. Elements outside the matrix read as zeros. The kernels' callers already require
// 16-byte-aligned bases and rows of whole 16-byte pieces, which is what TMA needs too.
// An empty matrix gets a blank map: no chunk of an empty K range or M range is ever loaded.
template <typename T>
CUtensorMap matrix_map(const T* base, int64_t rows, int64_t cols, int box_rows, const char* name) {
  CUtensorMap map{};
  if (base == nullptr || rows <= 0 || cols <= 0) return map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(T)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult status =
      encoder()(&map, data_type<T>(), 2, const_cast<T*>(base), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require(status == CUDA_SUCCESS, std::string("cuTensorMapEncodeTiled failed for ") + name + " [" +
                                      std::to_string(rows) + ", " + std::to_string(cols) + "] (CUresult " +
                                      std::to_string(static_cast<int>(status)) + ")");
  return map;
}

// The map of a [batch, heads, rows, cols] operand at `base` with element strides sb, sh and ss
// (the last dimension contiguous), read in boxes of box_rows rows x box_cols columns of one (batch,
// head) plane: 64 columns swizzled as matrix_map's, or 16 (32-byte rows) under the 32-byte swizzle.
// The strides may come in any order (heads inside rows, as a transposed [batch, rows, heads, cols]
// tensor has them); they are whole 16-byte pieces, as the attention launchers require. Rows and columns outside the plane read as zeros, so a box at row
// `rows` fills its tile with zeros. An empty operand gets a blank map, which no kernel reads.
template <typename T>
CUtensorMap planes_map(const T* base, int64_t batch, int64_t heads, int64_t rows, int64_t cols, int64_t sb,
                       int64_t sh, int64_t ss, const char* name, int box_rows = 64, int box_cols = 64) {
  CUtensorMap map{};
  require(box_cols * sizeof(T) == 128 || box_cols * sizeof(T) == 32, "planes_map takes boxes of 128- or 32-byte rows");
  if (base == nullptr || batch <= 0 || heads <= 0 || rows <= 0 || cols <= 0) return map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // A dimension of extent 1 may carry any stride; TMA still wants a multiple of 16 bytes.
  auto stride = [](int64_t elements, int64_t extent) {
    return static_cast<cuuint64_t>(extent == 1 ? 16 : elements * static_cast<int64_t>(sizeof(T)));
  };
  const cuuint64_t strides[3] = {stride(ss, rows), stride(sh, heads), stride(sb, batch)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows), 1, 1};
  const CUtensorMapSwizzle swizzle = box_cols * sizeof(T) == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_32B;
  const cuuint32_t steps[4] = {1, 1, 1, 1};
  const CUresult status =
      encoder()(&map, data_type<T>(), 4, const_cast<T*>(base), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require(status == CUDA_SUCCESS, std::string("cuTensorMapEncodeTiled failed for ") + name + " [" +
                                      std::to_string(batch) + ", " + std::to_string(heads) + ", " +
                                      std::to_string(rows) + ", " + std::to_string(cols) + "] (CUresult " +
                                      std::to_string(static_cast<int>(status)) + ")");
  return map;
}

}  // namespace tma
}  // namespace long_exposure
