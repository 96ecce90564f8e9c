// CPU neuron-block MLP: the reference the CUDA kernels are held to, so it favours plain loops
// over cleverness. Threads split token tiles (forward, input gradients) and neuron ranges
// (parameter gradients), so no two threads ever write the same element.
#include <algorithm>
#include <vector>

#include "dtype_dispatch.h"
#include "long_exposure/mlp.h"

namespace long_exposure {

namespace {

struct TileRange {
  int64_t first, rows;
};

TileRange tile_range(int64_t tile, int64_t tile_m, int64_t tokens) {
  int64_t first = tile * tile_m;
  return {first, std::min(tile_m, tokens - first)};
}

template <typename T>
void load_rows(std::vector<typename Accumulator<T>::type>& out, const TensorView& view,
               int64_t first, int64_t rows) {
  using Acc = typename Accumulator<T>::type;
  const int64_t width = view.size(1);
  const T* src = view.ptr<const T>() + first * width;
  for (int64_t i = 0; i < rows * width; ++i) out[i] = load<Acc>(src + i);
}

template <typename T>
void forward(const MlpForwardArgs& a) {
  using Acc = typename Accumulator<T>::type;
  const int64_t tokens = a.x.size(0), d = a.x.size(1), F = a.w1.size(0);
  const int64_t tm = a.mask.tile_m, bn = a.mask.block_n, cap = a.mask.capacity();
  const int64_t r1 = a.lora1_u.defined() ? a.lora1_u.size(1) : 0;
  const int64_t r2 = a.lora2_a.defined() ? a.lora2_a.size(0) : 0;
  const T* w1 = a.w1.ptr<const T>();
  const T* w2 = a.w2.ptr<const T>();
  const T* b1 = a.b1.defined() ? a.b1.ptr<const T>() : nullptr;
  const T* b2 = a.b2.defined() ? a.b2.ptr<const T>() : nullptr;
  const T* lb1 = r1 ? a.lora1_b.ptr<const T>() : nullptr;
  const T* la2 = r2 ? a.lora2_a.ptr<const T>() : nullptr;
  T* y = a.y.ptr<T>();
  T* h = a.h.ptr<T>();
  T* v2 = r2 ? a.lora2_v.ptr<T>() : nullptr;
  const int32_t* counts = a.mask.counts.ptr<const int32_t>();
  const int32_t* indices = a.mask.indices.ptr<const int32_t>();
  const int64_t n_tiles = a.mask.n_tiles();

#pragma omp parallel
  {
    std::vector<Acc> xt(tm * d), ut(tm * r1), yt(tm * d), vt(tm * r2), hb(tm * bn);
#pragma omp for schedule(dynamic)
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const TileRange tr = tile_range(tile, tm, tokens);
      load_rows<T>(xt, a.x, tr.first, tr.rows);
      if (r1) load_rows<T>(ut, a.lora1_u, tr.first, tr.rows);
      std::fill(yt.begin(), yt.end(), Acc(0));
      std::fill(vt.begin(), vt.end(), Acc(0));
      std::fill(h + tr.first * F, h + (tr.first + tr.rows) * F, T{});
      for (int32_t i = 0; i < counts[tile]; ++i) {
        const int64_t n0 = static_cast<int64_t>(indices[tile * cap + i]) * bn;
        const int64_t nb = std::min(bn, F - n0);
        for (int64_t r = 0; r < tr.rows; ++r) {
          for (int64_t n = 0; n < nb; ++n) {
            Acc pre = b1 ? load<Acc>(b1 + n0 + n) : Acc(0);
            pre += dot(&xt[r * d], w1 + (n0 + n) * d, d);
            if (r1) pre += dot(&ut[r * r1], lb1 + (n0 + n) * r1, r1);
            // h is stored in T, and fc2 must consume exactly what the backward will read back.
            const Acc act = round_through<T>(std::max(pre, Acc(0)));
            store<Acc>(h + (tr.first + r) * F + n0 + n, act);
            hb[r * bn + n] = act;
          }
        }
        for (int64_t r = 0; r < tr.rows; ++r) {
          for (int64_t o = 0; o < d; ++o) yt[r * d + o] += dot(&hb[r * bn], w2 + o * F + n0, nb);
          for (int64_t j = 0; j < r2; ++j) vt[r * r2 + j] += dot(&hb[r * bn], la2 + j * F + n0, nb);
        }
      }
      for (int64_t r = 0; r < tr.rows; ++r) {
        for (int64_t o = 0; o < d; ++o)
          store<Acc>(y + (tr.first + r) * d + o, yt[r * d + o] + (b2 ? load<Acc>(b2 + o) : Acc(0)));
        for (int64_t j = 0; j < r2; ++j) store<Acc>(v2 + (tr.first + r) * r2 + j, vt[r * r2 + j]);
      }
    }
  }
}

template <typename T>
void backward(const MlpBackwardArgs& a) {
  using Acc = typename Accumulator<T>::type;
  const int64_t tokens = a.dy.size(0), d = a.dy.size(1), F = a.w1.size(0);
  const int64_t tm = a.mask.tile_m, bn = a.mask.block_n, cap = a.mask.capacity();
  const int64_t r1 = a.lora1_u.defined() ? a.lora1_u.size(1) : 0;
  const int64_t r2 = a.lora2_a.defined() ? a.lora2_a.size(0) : 0;
  const bool has_dv2 = a.dlora2_v.defined();
  const T* w1 = a.w1.ptr<const T>();
  const T* w2 = a.w2.ptr<const T>();
  const T* h = a.h.ptr<const T>();
  const T* lb1 = r1 ? a.lora1_b.ptr<const T>() : nullptr;
  const T* la2 = r2 ? a.lora2_a.ptr<const T>() : nullptr;
  const int32_t* counts = a.mask.counts.ptr<const int32_t>();
  const int32_t* indices = a.mask.indices.ptr<const int32_t>();
  const int64_t n_tiles = a.mask.n_tiles();
  const bool want_du = a.dlora1_u.defined();
  // The pre-activation gradient is kept whole only when a parameter gradient sums it over tokens.
  const bool keep_dpre = a.db1.defined() || a.dlora1_b.defined();
  std::vector<Acc> dpre_all(keep_dpre ? tokens * F : 0, Acc(0));

  // Phase 1, by token tile: dpre on active blocks, then dx and dlora1_u.
#pragma omp parallel
  {
    std::vector<Acc> dyt(tm * d), dvt(tm * r2), dxt(tm * d), dut(tm * r1), dh(tm * bn);
#pragma omp for schedule(dynamic)
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const TileRange tr = tile_range(tile, tm, tokens);
      load_rows<T>(dyt, a.dy, tr.first, tr.rows);
      if (has_dv2) load_rows<T>(dvt, a.dlora2_v, tr.first, tr.rows);
      std::fill(dxt.begin(), dxt.end(), Acc(0));
      std::fill(dut.begin(), dut.end(), Acc(0));
      for (int32_t i = 0; i < counts[tile]; ++i) {
        const int64_t n0 = static_cast<int64_t>(indices[tile * cap + i]) * bn;
        const int64_t nb = std::min(bn, F - n0);
        std::fill(dh.begin(), dh.end(), Acc(0));
        for (int64_t r = 0; r < tr.rows; ++r) {
          for (int64_t o = 0; o < d; ++o) axpy(&dh[r * bn], dyt[r * d + o], w2 + o * F + n0, nb);
          if (has_dv2)
            for (int64_t j = 0; j < r2; ++j) axpy(&dh[r * bn], dvt[r * r2 + j], la2 + j * F + n0, nb);
        }
        for (int64_t r = 0; r < tr.rows; ++r) {
          const int64_t t = tr.first + r;
          for (int64_t n = 0; n < nb; ++n) {
            const Acc g = load<Acc>(h + t * F + n0 + n) > Acc(0) ? dh[r * bn + n] : Acc(0);
            if (g == Acc(0)) continue;
            axpy(&dxt[r * d], g, w1 + (n0 + n) * d, d);
            if (want_du) axpy(&dut[r * r1], g, lb1 + (n0 + n) * r1, r1);
            if (keep_dpre) dpre_all[t * F + n0 + n] = g;
          }
        }
      }
      for (int64_t r = 0; r < tr.rows; ++r) {
        const int64_t t = tr.first + r;
        for (int64_t o = 0; o < d; ++o) store<Acc>(a.dx.ptr<T>() + t * d + o, dxt[r * d + o]);
        if (want_du)
          for (int64_t j = 0; j < r1; ++j) store<Acc>(a.dlora1_u.ptr<T>() + t * r1 + j, dut[r * r1 + j]);
      }
    }
  }

  // Phase 2, by neuron range: the gradients that sum over tokens.
  constexpr int64_t kChunk = 64;
  const int64_t n_chunks = ceil_div(F, kChunk);
  if (keep_dpre || a.dlora2_a.defined()) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t f0 = chunk * kChunk, nf = std::min(kChunk, F - f0);
      std::vector<Acc> db1(nf, Acc(0)), dlb1(nf * r1, Acc(0)), dla2(r2 * nf, Acc(0));
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t n = 0; n < nf; ++n) {
          if (keep_dpre) {
            const Acc g = dpre_all[t * F + f0 + n];
            if (g != Acc(0)) {
              db1[n] += g;
              if (r1) axpy(&dlb1[n * r1], g, a.lora1_u.ptr<const T>() + t * r1, r1);
            }
          }
          if (a.dlora2_a.defined() && has_dv2) {
            const Acc hv = load<Acc>(h + t * F + f0 + n);
            if (hv != Acc(0))
              for (int64_t j = 0; j < r2; ++j)
                dla2[j * nf + n] += hv * load<Acc>(a.dlora2_v.ptr<const T>() + t * r2 + j);
          }
        }
      }
      for (int64_t n = 0; n < nf; ++n) {
        if (a.db1.defined()) store<Acc>(a.db1.ptr<T>() + f0 + n, db1[n]);
        if (a.dlora1_b.defined())
          for (int64_t j = 0; j < r1; ++j) store<Acc>(a.dlora1_b.ptr<T>() + (f0 + n) * r1 + j, dlb1[n * r1 + j]);
        if (a.dlora2_a.defined())
          for (int64_t j = 0; j < r2; ++j) store<Acc>(a.dlora2_a.ptr<T>() + j * F + f0 + n, dla2[j * nf + n]);
      }
    }
  }
  if (a.db2.defined()) {
    const int64_t d_chunks = ceil_div(d, kChunk);
#pragma omp parallel for schedule(static)
    for (int64_t chunk = 0; chunk < d_chunks; ++chunk) {
      const int64_t o0 = chunk * kChunk, no = std::min(kChunk, d - o0);
      std::vector<Acc> sum(no, Acc(0));
      for (int64_t t = 0; t < tokens; ++t) axpy(sum.data(), Acc(1), a.dy.ptr<const T>() + t * d + o0, no);
      for (int64_t o = 0; o < no; ++o) store<Acc>(a.db2.ptr<T>() + o0 + o, sum[o]);
    }
  }
}

}  // namespace

void mlp_forward_cpu(const MlpForwardArgs& args) {
  dispatch_float(args.x.dtype, "mlp_forward", [&](auto tag) { forward<decltype(tag)>(args); });
}

void mlp_backward_cpu(const MlpBackwardArgs& args) {
  dispatch_float(args.dy.dtype, "mlp_backward", [&](auto tag) { backward<decltype(tag)>(args); });
}

}  // namespace long_exposure
