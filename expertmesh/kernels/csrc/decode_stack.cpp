// A whole decode step of an MLA + MoE decoder in one call: every layer's norms, projections, MLA step, routing,
// routed and shared experts and residuals, then the final norm.
//
// Each op is the one the Python modules run at decode sizes (model/mla.py, model/moe.py, model/layers.py and
// the dispatch of kernels/registry.py, cpu_linear.py, int8_linear.py, cpu_fused_moe.py, int8_moe.py), on the
// same kernels, with the same dtypes, in the same order: the result is theirs bit for bit. What goes is the
// Python between the kernels: about 30 us of module calls, dispatch and argument checks per kernel, ~2 ms of a
// 4.6 ms step on the `small` preset. model/fused_decode.py decides when this applies and builds the stack.
#include <torch/extension.h>

#include <utility>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

torch::Tensor tensor(const py::dict& d, const char* key) { return d[key].cast<torch::Tensor>(); }

c10::optional<torch::Tensor> optional_tensor(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return c10::nullopt;
  return d[key].cast<torch::Tensor>();
}

// A Linear (float32 or bfloat16 weights) or an Int8Linear (int8 weights, a float32 scale per row).
struct Linear {
  torch::Tensor weight, scale;  // scale undefined for float weights
  c10::optional<torch::Tensor> bias;
  bool stream = false;  // cpu_linear.linear would stream these float weights at decode sizes
  bool quantize_activations = false;  // int8 weights against int8-quantised activations (w8a8)

  Linear() = default;
  explicit Linear(const py::dict& d)
      : weight(tensor(d, "weight")),
        bias(optional_tensor(d, "bias")),
        stream(d["stream"].cast<bool>()),
        quantize_activations(d.contains("quantize_activations") && d["quantize_activations"].cast<bool>()) {
    if (auto s = optional_tensor(d, "scale")) scale = *s;
  }
};

struct Norm {
  torch::Tensor weight;
  double eps = 0;

  Norm() = default;
  Norm(const py::dict& d, const char* key)
      : weight(tensor(d, key)), eps(d[(std::string(key) + "_eps").c_str()].cast<double>()) {}
};

struct Mlp {
  Linear gate, up, down;

  explicit Mlp(const py::dict& d)
      : gate(d["gate"].cast<py::dict>()), up(d["up"].cast<py::dict>()), down(d["down"].cast<py::dict>()) {}
};

struct Attention {
  c10::optional<Linear> q;  // q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj
  Linear q_a, q_b, kv_a, o;
  Norm q_a_norm, kv_a_norm;
  torch::Tensor kv_b;
  c10::optional<torch::Tensor> kv_b_scale;  // an int8 kv_b's row scales
  int64_t heads;
  double scale;
  bool interleave;

  explicit Attention(const py::dict& d)
      : kv_a(d["kv_a"].cast<py::dict>()),
        o(d["o"].cast<py::dict>()),
        kv_a_norm(d, "kv_a_norm"),
        kv_b(tensor(d, "kv_b")),
        kv_b_scale(optional_tensor(d, "kv_b_scale")),
        heads(d["heads"].cast<int64_t>()),
        scale(d["scale"].cast<double>()),
        interleave(d["interleave"].cast<bool>()) {
    if (d.contains("q")) {
      q = Linear(d["q"].cast<py::dict>());
    } else {
      q_a = Linear(d["q_a"].cast<py::dict>());
      q_b = Linear(d["q_b"].cast<py::dict>());
      q_a_norm = Norm(d, "q_a_norm");
    }
  }
};

struct Moe {
  torch::Tensor router;  // [E, H] float32 (load_model keeps gates in it)
  c10::optional<torch::Tensor> bias;
  int64_t top_k, n_group, topk_group;
  bool sigmoid, top2_sum, renormalize;
  double scaling;
  torch::Tensor w13, w2, w13_scale, w2_scale;  // scales defined for int8 experts
  bool quantize_activations = false;
  c10::optional<Mlp> shared;
  explicit Moe(const py::dict& d)
      : router(tensor(d, "router")),
        bias(optional_tensor(d, "bias")),
        top_k(d["top_k"].cast<int64_t>()),
        n_group(d["n_group"].cast<int64_t>()),
        topk_group(d["topk_group"].cast<int64_t>()),
        sigmoid(d["sigmoid"].cast<bool>()),
        top2_sum(d["top2_sum"].cast<bool>()),
        renormalize(d["renormalize"].cast<bool>()),
        scaling(d["scaling"].cast<double>()),
        w13(tensor(d, "w13")),
        w2(tensor(d, "w2")) {
    if (auto s = optional_tensor(d, "w13_scale")) w13_scale = *s;
    if (auto s = optional_tensor(d, "w2_scale")) w2_scale = *s;
    quantize_activations = d.contains("quantize_activations") && d["quantize_activations"].cast<bool>();
    TORCH_CHECK(router.scalar_type() == torch::kFloat32, "decode stack: the router gate must be float32");
    if (!d["shared"].is_none()) shared = Mlp(d["shared"].cast<py::dict>());
  }
};

struct Layer {
  Norm input_norm, post_norm;
  Attention attn;
  c10::optional<Mlp> mlp;  // a dense layer
  c10::optional<Moe> moe;  // or an MoE block

  explicit Layer(const py::dict& d)
      : input_norm(d, "input_norm"), post_norm(d, "post_norm"), attn(d["attn"].cast<py::dict>()) {
    if (d["moe"].is_none()) {
      mlp = Mlp(d["mlp"].cast<py::dict>());
    } else {
      moe = Moe(d["moe"].cast<py::dict>());
    }
  }
};

class DecodeStack {
 public:
  DecodeStack(bool bf16, const py::dict& final_norm) : bf16_(bf16), final_norm_(final_norm, "norm") {}

  void add_layer(const py::dict& d) { layers_.emplace_back(d); }

  // x [T, hidden] (the embedded tokens); cos/sin [T, Dr/2]; caches[i] layer i's (latent, rope key) caches.
  // Returns the final-normed hidden states and each MoE layer's routing decisions (expert ids [T, K]).
  std::pair<torch::Tensor, std::vector<torch::Tensor>> forward(
      torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
      const std::vector<std::pair<torch::Tensor, torch::Tensor>>& caches, const torch::Tensor& slot_mapping,
      const torch::Tensor& block_tables, const torch::Tensor& context_lens) {
    TORCH_CHECK(caches.size() == layers_.size(), "decode stack: one cache pair per layer, got ", caches.size(),
                " for ", layers_.size(), " layers");
    std::vector<torch::Tensor> routed;
    // The MLA kernel takes its few activations in float32 (registry.mla_decode_step's bf16 branch).
    const torch::Tensor cos_f = cos.to(torch::kFloat32).contiguous(), sin_f = sin.to(torch::kFloat32).contiguous();
    for (size_t i = 0; i < layers_.size(); ++i) {
      Layer& layer = layers_[i];
      x = x + attention(layer.attn, norm(layer.input_norm, x), cos_f, sin_f, caches[i], slot_mapping, block_tables,
                        context_lens);
      const torch::Tensor h = norm(layer.post_norm, x);
      if (layer.mlp) {
        x = x + mlp(*layer.mlp, h);
      } else {
        x = x + moe(*layer.moe, h, routed);
      }
    }
    return {norm(final_norm_, x), std::move(routed)};
  }

 private:
  torch::Tensor as_model_dtype(torch::Tensor t) const { return bf16_ ? t.to(torch::kBFloat16) : t; }

  torch::Tensor norm(const Norm& n, const torch::Tensor& x) const {
    return bf16_ ? rms_norm_bf16(x.contiguous(), n.weight, n.eps) : rms_norm_f32(x.contiguous(), n.weight, n.eps);
  }

  torch::Tensor linear(const Linear& l, const torch::Tensor& x) const {
    if (l.scale.defined()) {
      return as_model_dtype(
          linear_int8(x.to(torch::kFloat32).contiguous(), l.weight, l.scale, l.bias, l.quantize_activations));
    }
    if (narrow_weights(l.weight)) {  // registry.linear_mixed: the input rounded to bf16, float32 sums and output
      const torch::Tensor xb = x.to(torch::kBFloat16).contiguous();
      if (l.stream) return linear_small_m(xb, l.weight, l.bias);
      const c10::optional<torch::Tensor> bias = l.bias ? c10::optional<torch::Tensor>(l.bias->to(torch::kFloat32))
                                                       : c10::nullopt;
      return at::linear(xb.to(torch::kFloat32), l.weight.to(torch::kFloat32), bias);
    }
    if (!l.stream) return at::linear(x, l.weight, l.bias);
    return as_model_dtype(linear_small_m(x.contiguous(), l.weight, l.bias));
  }

  // bf16 weights under float32 activations (activation_dtype): each matmul reads its input rounded to bf16.
  bool narrow_weights(const torch::Tensor& w) const { return !bf16_ && w.scalar_type() == torch::kBFloat16; }

  torch::Tensor mlp(const Mlp& m, const torch::Tensor& x) const {
    return linear(m.down, at::silu(linear(m.gate, x)) * linear(m.up, x));
  }

  torch::Tensor attention(const Attention& a, const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin, const std::pair<torch::Tensor, torch::Tensor>& cache,
                          const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                          const torch::Tensor& context_lens) const {
    const int64_t t = x.size(0);
    torch::Tensor q = a.q ? linear(*a.q, x) : linear(a.q_b, norm(a.q_a_norm, linear(a.q_a, x)));
    q = q.view({t, a.heads, -1}).to(torch::kFloat32).contiguous();
    const torch::Tensor kv_a = linear(a.kv_a, x).to(torch::kFloat32).contiguous();
    const torch::Tensor out =
        mla_decode_step_f32(q, kv_a, a.kv_a_norm.weight.to(torch::kFloat32).contiguous(), a.kv_a_norm.eps, cos, sin,
                            a.interleave, a.kv_b, cache.first, cache.second, slot_mapping, block_tables,
                            context_lens, a.scale, a.kv_b_scale);
    return linear(a.o, as_model_dtype(out).flatten(1));
  }

  torch::Tensor moe(const Moe& m, const torch::Tensor& x, std::vector<torch::Tensor>& routed) const {
    const torch::Tensor x_f = x.to(torch::kFloat32);
    const torch::Tensor logits = at::linear(x_f, m.router);
    c10::optional<torch::Tensor> bias;
    if (m.bias) bias = m.bias->to(torch::kFloat32).contiguous();
    auto [weights, ids] = topk_gating_f32(logits.contiguous(), m.top_k, m.sigmoid, bias, m.n_group, m.topk_group,
                                          m.top2_sum, m.renormalize, m.scaling);
    routed.push_back(ids);
    torch::Tensor out;
    if (m.w13_scale.defined()) {
      out = moe_small_m_int8(x_f.contiguous(), m.w13, m.w13_scale, m.w2, m.w2_scale, weights, ids,
                             m.quantize_activations);
    } else if (narrow_weights(m.w13)) {  // registry.fused_moe_mixed: the input rounded to bf16
      const torch::Tensor xb = x_f.to(torch::kBFloat16).to(torch::kFloat32).contiguous();
      out = moe_small_m(xb, m.w13, m.w2, weights.to(torch::kFloat32), ids);
    } else {
      out = moe_small_m(x_f.contiguous(), m.w13, m.w2, weights.to(torch::kFloat32), ids);
    }
    out = as_model_dtype(out);
    return m.shared ? out + mlp(*m.shared, x) : out;
  }

  bool bf16_;
  Norm final_norm_;
  std::vector<Layer> layers_;
};

}  // namespace

void bind_decode_stack(py::module& m) {
  py::class_<DecodeStack>(m, "DecodeStack", "One decode step of an MLA + MoE decoder; see model/fused_decode.py")
      .def(py::init<bool, const py::dict&>(), py::arg("bf16"), py::arg("final_norm"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>());
}
