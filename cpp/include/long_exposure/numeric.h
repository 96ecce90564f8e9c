// Element types the CPU operators read and write, each with a float accumulator type.
// bf16 is converted by hand because C++17 has no bfloat16 and the core may not use torch's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace long_exposure {

struct bfloat16 {
  uint16_t bits;
};

inline float bf16_to_float(bfloat16 value) {
  uint32_t word = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &word, sizeof(result));
  return result;
}

// Round to nearest even, as torch does, so CPU results match the reference bit for bit on ties.
inline bfloat16 float_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if (std::isnan(value)) return bfloat16{static_cast<uint16_t>((word >> 16) | 0x40u)};
  uint32_t rounding = 0x7fffu + ((word >> 16) & 1u);
  return bfloat16{static_cast<uint16_t>((word + rounding) >> 16)};
}

template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};

template <typename Acc>
inline Acc load(const float* p) { return static_cast<Acc>(*p); }
template <typename Acc>
inline Acc load(const double* p) { return static_cast<Acc>(*p); }
template <typename Acc>
inline Acc load(const bfloat16* p) { return static_cast<Acc>(bf16_to_float(*p)); }

template <typename Acc>
inline void store(float* p, Acc v) { *p = static_cast<float>(v); }
template <typename Acc>
inline void store(double* p, Acc v) { *p = static_cast<double>(v); }
template <typename Acc>
inline void store(bfloat16* p, Acc v) { *p = float_to_bf16(static_cast<float>(v)); }

// Rounds a value through the storage type, so that a stored-then-reloaded intermediate (the MLP's
// hidden activation) is used exactly as the reference uses it.
template <typename T, typename Acc>
inline Acc round_through(Acc v) {
  T stored;
  store<Acc>(&stored, v);
  return load<Acc>(&stored);
}

}  // namespace long_exposure
