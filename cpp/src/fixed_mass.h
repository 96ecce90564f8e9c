// Block score mass as fixed-point integers, for the greedy projection onto the pattern pool.
//
// The greedy compares sums of scores between atoms and against its stop rule, and near-ties are
// common, so the CPU and CUDA versions must form every sum identically to choose the same atoms.
// Floating-point sums are identical only when added in one order, which forces one thread per
// atom on the device (the greedy then cost about 0.7 ms per layer at 32 blocks). Integer sums are
// exact in any order: each map's scores are scaled by a power of two chosen from its largest
// value, so that any sum of its cells stays below 2^62, and truncated. Scaling by a power of two
// is exact, and a value below 2^-52 of the map's largest (far under fp32's resolution of it)
// counts as zero.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define LONG_EXPOSURE_HOST_DEVICE __host__ __device__
#else
#define LONG_EXPOSURE_HOST_DEVICE
#endif

namespace long_exposure {
namespace fixed_mass {

// A score as the greedy counts it: max(0, s), with NaN as 0 and +inf as the largest float.
LONG_EXPOSURE_HOST_DEVICE inline float clamped(float s) { return 0.f < s ? (s < FLT_MAX ? s : FLT_MAX) : 0.f; }

// The power of two that scales a map whose clamped values are at most `largest` and that has
// `cells` cells: every value then lies below 2^(62 - bits(cells)), so any sum of cells does
// below 2^62.
LONG_EXPOSURE_HOST_DEVICE inline int scale_exponent(float largest, int64_t cells) {
  int largest_exponent = 0;  // largest < 2^largest_exponent (0 for 0)
  frexp(static_cast<double>(largest), &largest_exponent);
  int cell_bits = 0;
  for (int64_t c = cells; c > 0; c >>= 1) ++cell_bits;
  return 62 - largest_exponent - cell_bits;
}

LONG_EXPOSURE_HOST_DEVICE inline int64_t fixed(float score, int exponent) {
  return static_cast<int64_t>(ldexp(static_cast<double>(clamped(score)), exponent));
}

// Mass per newly covered block, the greedy's first criterion. int64 to double rounds the same
// way on both sides.
LONG_EXPOSURE_HOST_DEVICE inline double ratio(int64_t gain, int64_t added) {
  return static_cast<double>(gain) / static_cast<double>(added);
}

// The stop rule: the covered mass has reached `recall` of the total.
LONG_EXPOSURE_HOST_DEVICE inline bool reached(int64_t mass, int64_t total, double recall) {
  return !(static_cast<double>(mass) < recall * static_cast<double>(total));
}

LONG_EXPOSURE_HOST_DEVICE inline float covered_share(int64_t mass, int64_t total) {
  return static_cast<float>(total > 0 ? static_cast<double>(mass) / static_cast<double>(total) : 1.0);
}

}  // namespace fixed_mass
}  // namespace long_exposure
