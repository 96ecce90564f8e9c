// CPU block-sparse attention. Each query row's scores are materialised (prefix keys, then the
// causal part of its listed key blocks), which is exact and simple; the flash-style online softmax
// is the CUDA kernels' business. Threads split (batch, head, query block) in the forward and
// (batch, head) in the backward, so dK/dV accumulate without atomics.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dtype_dispatch.h"
#include "long_exposure/attention.h"

namespace long_exposure {

namespace {

// Element (b, h, i, 0) of a [B, H, S, D] view whose last stride is 1.
template <typename T>
T* row_ptr(const TensorView& view, int64_t b, int64_t h, int64_t i) {
  return view.ptr<T>() + b * view.strides[0] + h * view.strides[1] + i * view.strides[2];
}

// The keys query i may attend, as (source, position): source 0 = prefix, 1 = sequence.
struct KeyRef {
  int source;
  int64_t position;
};

void gather_keys(std::vector<KeyRef>& keys, int64_t prefix, const int32_t* list, int32_t count,
                 int64_t block, int64_t query) {
  keys.clear();
  for (int64_t p = 0; p < prefix; ++p) keys.push_back({0, p});
  for (int32_t c = 0; c < count; ++c) {
    const int64_t first = static_cast<int64_t>(list[c]) * block;
    const int64_t last = std::min(first + block - 1, query);  // causal
    for (int64_t j = first; j <= last; ++j) keys.push_back({1, j});
  }
}

template <typename T>
void forward(const AttentionForwardArgs& a) {
  using Acc = typename Accumulator<T>::type;
  const int64_t B = a.q.size(0), H = a.q.size(1), S = a.q.size(2), D = a.q.size(3);
  const int64_t P = a.prefix_k.defined() ? a.prefix_k.size(2) : 0;
  const int64_t block = a.layout.block, n_q = a.layout.rows(), cap = a.layout.capacity();
  const bool shared_layout = a.layout.batch() == 1;
  const int32_t* counts = a.layout.counts.ptr<const int32_t>();
  const int32_t* indices = a.layout.indices.ptr<const int32_t>();
  const Acc scale = static_cast<Acc>(a.scale);
  float* lse = a.lse.ptr<float>();

#pragma omp parallel
  {
    std::vector<KeyRef> keys;
    std::vector<Acc> qrow(D), scores, acc(D);
#pragma omp for schedule(dynamic) collapse(3)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t qb = 0; qb < n_q; ++qb) {
          const int64_t row = ((shared_layout ? 0 : b) * H + h) * n_q + qb;
          for (int64_t i = qb * block; i < std::min(S, (qb + 1) * block); ++i) {
            gather_keys(keys, P, indices + row * cap, counts[row], block, i);
            T* out = row_ptr<T>(a.out, b, h, i);
            float* lse_i = lse + (b * H + h) * S + i;
            if (keys.empty()) {
              std::fill(out, out + D, T{});
              *lse_i = -std::numeric_limits<float>::infinity();
              continue;
            }
            const T* q = row_ptr<T>(a.q, b, h, i);
            for (int64_t e = 0; e < D; ++e) qrow[e] = load<Acc>(q + e);
            scores.resize(keys.size());
            Acc max_score = -std::numeric_limits<Acc>::infinity();
            for (size_t n = 0; n < keys.size(); ++n) {
              const TensorView& kv = keys[n].source ? a.k : a.prefix_k;
              scores[n] = scale * dot(qrow.data(), row_ptr<const T>(kv, b, h, keys[n].position), D);
              max_score = std::max(max_score, scores[n]);
            }
            Acc total = 0;
            std::fill(acc.begin(), acc.end(), Acc(0));
            for (size_t n = 0; n < keys.size(); ++n) {
              const Acc p = std::exp(scores[n] - max_score);
              total += p;
              const TensorView& vv = keys[n].source ? a.v : a.prefix_v;
              axpy(acc.data(), p, row_ptr<const T>(vv, b, h, keys[n].position), D);
            }
            for (int64_t e = 0; e < D; ++e) store<Acc>(out + e, acc[e] / total);
            *lse_i = static_cast<float>(max_score + std::log(total));
          }
        }
  }
}

template <typename T>
void write_rows(const TensorView& view, int64_t b, int64_t h, const std::vector<typename Accumulator<T>::type>& rows,
                int64_t n_rows, int64_t D) {
  for (int64_t i = 0; i < n_rows; ++i) {
    T* dst = row_ptr<T>(view, b, h, i);
    for (int64_t e = 0; e < D; ++e) store(dst + e, rows[i * D + e]);
  }
}

template <typename T>
void backward(const AttentionBackwardArgs& a) {
  using Acc = typename Accumulator<T>::type;
  const int64_t B = a.q.size(0), H = a.q.size(1), S = a.q.size(2), D = a.q.size(3);
  const int64_t P = a.prefix_k.defined() ? a.prefix_k.size(2) : 0;
  const int64_t block = a.layout.block, n_q = a.layout.rows(), cap = a.layout.capacity();
  const bool shared_layout = a.layout.batch() == 1;
  const bool want_prefix = a.dprefix_k.defined();
  const int32_t* counts = a.layout.counts.ptr<const int32_t>();
  const int32_t* indices = a.layout.indices.ptr<const int32_t>();
  const Acc scale = static_cast<Acc>(a.scale);
  const float* lse = a.lse.ptr<const float>();

#pragma omp parallel
  {
    std::vector<KeyRef> keys;
    std::vector<Acc> qrow(D), dorow(D), dqrow(D);
    std::vector<Acc> dk(S * D), dv(S * D), dpk(P * D), dpv(P * D);
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        std::fill(dk.begin(), dk.end(), Acc(0));
        std::fill(dv.begin(), dv.end(), Acc(0));
        std::fill(dpk.begin(), dpk.end(), Acc(0));
        std::fill(dpv.begin(), dpv.end(), Acc(0));
        for (int64_t i = 0; i < S; ++i) {
          const int64_t qb = i / block;
          const int64_t row = ((shared_layout ? 0 : b) * H + h) * n_q + qb;
          const Acc lse_i = static_cast<Acc>(lse[(b * H + h) * S + i]);
          T* dq = row_ptr<T>(a.dq, b, h, i);
          std::fill(dqrow.begin(), dqrow.end(), Acc(0));
          if (std::isinf(lse_i)) {  // nothing attended: no gradient flows
            for (int64_t e = 0; e < D; ++e) store(dq + e, Acc(0));
            continue;
          }
          gather_keys(keys, P, indices + row * cap, counts[row], block, i);
          const T* q = row_ptr<const T>(a.q, b, h, i);
          const T* dout = row_ptr<const T>(a.dout, b, h, i);
          for (int64_t e = 0; e < D; ++e) {
            qrow[e] = load<Acc>(q + e);
            dorow[e] = load<Acc>(dout + e);
          }
          const Acc delta = dot(dorow.data(), row_ptr<const T>(a.out, b, h, i), D);
          for (const KeyRef& key : keys) {
            const TensorView& kview = key.source ? a.k : a.prefix_k;
            const TensorView& vview = key.source ? a.v : a.prefix_v;
            const T* krow = row_ptr<const T>(kview, b, h, key.position);
            const Acc p = std::exp(scale * dot(qrow.data(), krow, D) - lse_i);
            const Acc ds = p * (dot(dorow.data(), row_ptr<const T>(vview, b, h, key.position), D) - delta);
            Acc* dkrow = (key.source ? dk.data() : dpk.data()) + key.position * D;
            Acc* dvrow = (key.source ? dv.data() : dpv.data()) + key.position * D;
            for (int64_t e = 0; e < D; ++e) {
              dvrow[e] += p * dorow[e];
              dkrow[e] += scale * ds * qrow[e];
            }
            axpy(dqrow.data(), scale * ds, krow, D);
          }
          for (int64_t e = 0; e < D; ++e) store(dq + e, dqrow[e]);
        }
        write_rows<T>(a.dk, b, h, dk, S, D);
        write_rows<T>(a.dv, b, h, dv, S, D);
        if (want_prefix) {
          write_rows<T>(a.dprefix_k, b, h, dpk, P, D);
          write_rows<T>(a.dprefix_v, b, h, dpv, P, D);
        }
      }
  }
}

}  // namespace

void attention_forward_cpu(const AttentionForwardArgs& args) {
  dispatch_float(args.q.dtype, "attention_forward", [&](auto tag) { forward<decltype(tag)>(args); });
}

void attention_backward_cpu(const AttentionBackwardArgs& args) {
  dispatch_float(args.q.dtype, "attention_backward", [&](auto tag) { backward<decltype(tag)>(args); });
}

}  // namespace long_exposure
