// The only pybind11 code. Python hands over TensorViews it has already checked against torch's
// view of the tensors; the core checks the contract again, since C++ callers skip Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "long_exposure/attention.h"
#include "long_exposure/build_info.h"
#include "long_exposure/cross_entropy.h"
#include "long_exposure/masks.h"
#include "long_exposure/mlp.h"
#include "long_exposure/pattern_pool.h"
#include "long_exposure/predictors.h"

namespace py = pybind11;
using namespace long_exposure;

namespace {

using Opt = std::optional<TensorView>;

TensorView view_from_python(uintptr_t data, int dtype, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides, int device, int device_index,
                     uintptr_t stream) {
  require(shape.size() == strides.size(), "shape and strides differ in length");
  require(shape.size() <= static_cast<size_t>(kMaxDims),
          "tensors of more than " + std::to_string(kMaxDims) + " dimensions are not supported");
  require(dtype >= 0 && dtype <= static_cast<int>(DType::kInt64), "unknown dtype code");
  require(device == 0 || device == 1, "unknown device code");
  TensorView view;
  view.data = reinterpret_cast<void*>(data);
  view.dtype = static_cast<DType>(dtype);
  view.ndim = static_cast<int>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    view.shape[i] = shape[i];
    view.strides[i] = strides[i];
  }
  view.device = static_cast<DeviceKind>(device);
  view.device_index = device_index;
  view.stream = reinterpret_cast<void*>(stream);
  return view;
}

TensorView value(const Opt& view) { return view ? *view : TensorView{}; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Long Exposure core: block-sparse operators over raw tensor views";

  py::class_<TensorView>(m, "TensorView")
      .def(py::init(&view_from_python), py::arg("data"), py::arg("dtype"), py::arg("shape"),
           py::arg("strides"), py::arg("device"), py::arg("device_index"), py::arg("stream"))
      .def_property_readonly("shape", [](const TensorView& v) {
        return std::vector<int64_t>(v.shape, v.shape + v.ndim);
      });

  m.def("build_info", [] {
    BuildInfo info = build_info();
    py::dict out;
    out["version"] = info.version;
    out["cuda"] = info.cuda;
    out["cuda_architectures"] = info.cuda_architectures;
    out["cuda_compiler_version"] = info.cuda_compiler_version;
    out["openmp"] = info.openmp;
    return out;
  });

  m.def(
      "mlp_forward",
      [](const TensorView& x, const TensorView& w1, const Opt& b1, const TensorView& w2,
         const Opt& b2, const TensorView& counts, const TensorView& indices, int64_t tile_m,
         int64_t block_n, const Opt& lora1_u, const Opt& lora1_b, const Opt& lora2_a,
         const TensorView& y, const TensorView& h, const Opt& lora2_v) {
        MlpForwardArgs a;
        a.x = x; a.w1 = w1; a.b1 = value(b1); a.w2 = w2; a.b2 = value(b2);
        a.mask = MlpMask{counts, indices, tile_m, block_n};
        a.lora1_u = value(lora1_u); a.lora1_b = value(lora1_b); a.lora2_a = value(lora2_a);
        a.y = y; a.h = h; a.lora2_v = value(lora2_v);
        mlp_forward(a);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "mlp_backward",
      [](const TensorView& dy, const Opt& dlora2_v, const TensorView& w1,
         const TensorView& w2, const TensorView& h, const TensorView& counts,
         const TensorView& indices, int64_t tile_m, int64_t block_n, const Opt& lora1_u,
         const Opt& lora1_b, const Opt& lora2_a, const TensorView& dx, const Opt& db1,
         const Opt& db2, const Opt& dlora1_u, const Opt& dlora1_b, const Opt& dlora2_a,
         const Opt& dh_workspace, const Opt& sum_workspace) {
        MlpBackwardArgs a;
        a.dy = dy; a.dlora2_v = value(dlora2_v); a.w1 = w1; a.w2 = w2; a.h = h;
        a.mask = MlpMask{counts, indices, tile_m, block_n};
        a.lora1_u = value(lora1_u); a.lora1_b = value(lora1_b); a.lora2_a = value(lora2_a);
        a.dx = dx; a.db1 = value(db1); a.db2 = value(db2);
        a.dlora1_u = value(dlora1_u); a.dlora1_b = value(dlora1_b); a.dlora2_a = value(dlora2_a);
        a.dh_workspace = value(dh_workspace); a.sum_workspace = value(sum_workspace);
        mlp_backward(a);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "attention_forward",
      [](const TensorView& q, const TensorView& k, const TensorView& v, const Opt& prefix_k,
         const Opt& prefix_v, const TensorView& counts, const TensorView& indices, int64_t block,
         double scale, const TensorView& out, const TensorView& lse) {
        AttentionForwardArgs a;
        a.q = q; a.k = k; a.v = v; a.prefix_k = value(prefix_k); a.prefix_v = value(prefix_v);
        a.layout = BlockLayout{counts, indices, block};
        a.scale = scale; a.out = out; a.lse = lse;
        attention_forward(a);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "attention_backward",
      [](const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
         const Opt& prefix_k, const Opt& prefix_v, const TensorView& out, const TensorView& lse,
         const TensorView& counts, const TensorView& indices, int64_t block, double scale,
         const TensorView& dq, const TensorView& dk, const TensorView& dv, const Opt& dprefix_k,
         const Opt& dprefix_v, const Opt& ws_delta, const Opt& ws_q_counts,
         const Opt& ws_q_indices) {
        AttentionBackwardArgs a;
        a.dout = dout; a.q = q; a.k = k; a.v = v;
        a.prefix_k = value(prefix_k); a.prefix_v = value(prefix_v);
        a.out = out; a.lse = lse; a.layout = BlockLayout{counts, indices, block};
        a.scale = scale; a.dq = dq; a.dk = dk; a.dv = dv;
        a.dprefix_k = value(dprefix_k); a.dprefix_v = value(dprefix_v);
        a.ws_delta = value(ws_delta); a.ws_q_counts = value(ws_q_counts);
        a.ws_q_indices = value(ws_q_indices);
        attention_backward(a);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def("attention_cuda_supports", [](int dtype, int64_t head_dim, int64_t block) {
    return attention_cuda_supports(static_cast<DType>(dtype), head_dim, block);
  });

  m.def("atom_name", [](int kind, int64_t param) {
    return atom_name(Atom{static_cast<AtomKind>(kind), param});
  });

  m.def(
      "build_pattern_luts",
      [](const std::vector<int>& kinds, const std::vector<int64_t>& params, int64_t n_blocks,
         const TensorView& row_counts, const TensorView& row_indices, const TensorView& col_counts,
         const TensorView& col_indices) {
        require(kinds.size() == params.size(), "kinds and params differ in length");
        std::vector<Atom> atoms;
        for (size_t i = 0; i < kinds.size(); ++i)
          atoms.push_back(Atom{static_cast<AtomKind>(kinds[i]), params[i]});
        build_pattern_luts(atoms, n_blocks, row_counts, row_indices, col_counts, col_indices);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def("combine_patterns", &combine_patterns, py::arg("lut_counts"), py::arg("lut_indices"),
        py::arg("selection"), py::arg("out_counts"), py::arg("out_indices"),
        py::call_guard<py::gil_scoped_release>());

  m.def("project_patterns", &project_patterns, py::arg("lut_counts"), py::arg("lut_indices"),
        py::arg("diagonal_atom"), py::arg("scores"), py::arg("recall"), py::arg("selection"),
        py::arg("density"), py::arg("covered"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "mlp_predictor_mask",
      [](const TensorView& x, const TensorView& down, const TensorView& up, const TensorView& bias,
         double threshold, int64_t tile_m, const TensorView& counts, const TensorView& indices,
         const TensorView& tile_max) {
        MlpPredictorArgs a;
        a.x = x; a.down = down; a.up = up; a.bias = bias; a.threshold = threshold; a.tile_m = tile_m;
        a.counts = counts; a.indices = indices; a.tile_max = tile_max;
        mlp_predictor_mask(a);
      },
      py::arg("x"), py::arg("down"), py::arg("up"), py::arg("bias"), py::arg("threshold"),
      py::arg("tile_m"), py::arg("counts"), py::arg("indices"), py::arg("tile_max"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "attention_block_scores",
      [](const TensorView& hidden, const TensorView& wq, const TensorView& wk, int64_t block,
         const TensorView& pooled, const TensorView& scores, const Opt& workspace) {
        AttentionBlockScoresArgs a;
        a.hidden = hidden; a.wq = wq; a.wk = wk; a.block = block; a.pooled = pooled; a.scores = scores;
        a.workspace = value(workspace);
        attention_block_scores(a);
      },
      py::arg("hidden"), py::arg("wq"), py::arg("wk"), py::arg("block"), py::arg("pooled"),
      py::arg("scores"), py::arg("workspace") = py::none(), py::call_guard<py::gil_scoped_release>());

  m.def("attention_sketch_splits", &attention_sketch_splits, py::arg("batch"), py::arg("n"),
        py::arg("heads"), py::arg("rank"), py::arg("d_model"));

  m.def("transpose_block_lists", &transpose_block_lists, py::arg("counts"), py::arg("indices"),
        py::arg("out_counts"), py::arg("out_indices"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "cross_entropy_forward",
      [](const TensorView& logits, const TensorView& labels, int64_t ignore_index, const TensorView& lse,
         const TensorView& loss) {
        CrossEntropyForwardArgs a;
        a.logits = logits; a.labels = labels; a.ignore_index = ignore_index; a.lse = lse; a.loss = loss;
        cross_entropy_forward(a);
      },
      py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("lse"), py::arg("loss"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "cross_entropy_backward",
      [](const TensorView& logits, const TensorView& labels, const TensorView& lse, const TensorView& grad_loss,
         int64_t ignore_index, const TensorView& grad_logits) {
        CrossEntropyBackwardArgs a;
        a.logits = logits; a.labels = labels; a.lse = lse; a.grad_loss = grad_loss;
        a.ignore_index = ignore_index; a.grad_logits = grad_logits;
        cross_entropy_backward(a);
      },
      py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("grad_loss"), py::arg("ignore_index"),
      py::arg("grad_logits"), py::call_guard<py::gil_scoped_release>());
}
