// A whole decode step of an MoE decoder in one call: every layer's norms, projections, attention step (MLA, or
// grouped-query attention over a paged K/V cache), routing, routed and shared experts and residuals, then the
// final norm.
//
// Each op is the one the Python modules run at decode sizes (model/mla.py, model/gqa.py, model/moe.py,
// model/layers.py, kernels/rope.py and the dispatch of kernels/registry.py, cpu_linear.py, int8_linear.py,
// cpu_fused_moe.py, int8_moe.py), on the same kernels, with the same dtypes, in the same order: the result is
// theirs bit for bit. What goes is the
// Python between the kernels: about 30 us of module calls, dispatch and argument checks per kernel, ~2 ms of a
// 4.6 ms step on the `small` preset. model/fused_decode.py decides when this applies and builds the stack.
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

// Rounds a contiguous float32 tensor's values to bf16 in place, as `.to(bf16).to(float32)` would.
void round_to_bf16_(torch::Tensor& t) {
  float* p = t.data_ptr<float>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = expertmesh::widen(expertmesh::to_bf16(p[i]));
}

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

// Grouped-query attention (model/gqa.py): q, k, v projections, optional q/k norms and clipping, RoPE, the cache
// writes and the paged decode kernel, then o_proj.
struct GqaAttention {
  Linear q, k, v, o;
  c10::optional<Norm> q_norm, k_norm;
  bool head_norm = false;  // the q/k norms per head (Qwen3), or over the whole projection (OLMoE)
  c10::optional<double> clip;
  int64_t heads, kv_heads, head_dim, window;
  double scale;
  bool interleave;

  explicit GqaAttention(const py::dict& d)
      : q(d["q"].cast<py::dict>()),
        k(d["k"].cast<py::dict>()),
        v(d["v"].cast<py::dict>()),
        o(d["o"].cast<py::dict>()),
        heads(d["heads"].cast<int64_t>()),
        kv_heads(d["kv_heads"].cast<int64_t>()),
        head_dim(d["head_dim"].cast<int64_t>()),
        window(d["window"].cast<int64_t>()),
        scale(d["scale"].cast<double>()),
        interleave(d["interleave"].cast<bool>()) {
    if (d.contains("q_norm")) {
      q_norm = Norm(d, "q_norm");
      k_norm = Norm(d, "k_norm");
      head_norm = d["head_norm"].cast<bool>();
    }
    if (!d["clip"].is_none()) clip = d["clip"].cast<double>();
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
  c10::optional<Linear> shared_gate;  // sigmoid(shared_gate(x)) scales the shared expert's output (Qwen2-MoE)
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
    if (d.contains("shared_gate")) shared_gate = Linear(d["shared_gate"].cast<py::dict>());
  }
};

struct Layer {
  Norm input_norm, post_norm;
  c10::optional<Attention> mla;  // MLA attention
  c10::optional<GqaAttention> gqa;  // or grouped-query attention
  c10::optional<Mlp> mlp;  // a dense layer
  c10::optional<Moe> moe;  // or an MoE block

  explicit Layer(const py::dict& d) : input_norm(d, "input_norm"), post_norm(d, "post_norm") {
    const py::dict attn = d["attn"].cast<py::dict>();
    if (attn["kind"].cast<std::string>() == "gqa") {
      gqa = GqaAttention(attn);
    } else {
      mla = Attention(attn);
    }
    if (d["moe"].is_none()) {
      mlp = Mlp(d["mlp"].cast<py::dict>());
    } else {
      moe = Moe(d["moe"].cast<py::dict>());
    }
  }
};

class DecodeStack {
 public:
  // bf16_stream_rows: up to how many rows a bf16 model's linears stream their weights (cpu_linear.linear); past
  // them at::linear, as there.
  DecodeStack(bool bf16, const py::dict& final_norm, int64_t bf16_stream_rows)
      : bf16_(bf16), bf16_stream_rows_(bf16_stream_rows), final_norm_(final_norm, "norm") {}

  void add_layer(const py::dict& d) {
    layers_.emplace_back(d);
    any_mla_ = any_mla_ || layers_.back().mla.has_value();
  }

  // x [T, hidden] (the embedded tokens); cos/sin [T, rotary dim / 2] in x's dtype; caches[i] layer i's (latent,
  // rope key) caches for MLA, (key, value) caches for grouped-query attention.
  // Returns the final-normed hidden states and each MoE layer's routing decisions (expert ids [T, K]).
  std::pair<torch::Tensor, std::vector<torch::Tensor>> forward(
      torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
      const std::vector<std::pair<torch::Tensor, torch::Tensor>>& caches, const torch::Tensor& slot_mapping,
      const torch::Tensor& block_tables, const torch::Tensor& context_lens) {
    TORCH_CHECK(caches.size() == layers_.size(), "decode stack: one cache pair per layer, got ", caches.size(),
                " for ", layers_.size(), " layers");
    std::vector<torch::Tensor> routed;
    // The MLA kernel takes its few activations in float32 (registry.mla_decode_step's bf16 branch).
    torch::Tensor cos_f, sin_f;  // only MLA layers want them (grouped-query ones rotate in x's dtype)
    if (any_mla_) {
      cos_f = cos.to(torch::kFloat32).contiguous();
      sin_f = sin.to(torch::kFloat32).contiguous();
    }
    for (size_t i = 0; i < layers_.size(); ++i) {
      Layer& layer = layers_[i];
      const torch::Tensor h_attn = norm(layer.input_norm, x);
      x = x + (layer.mla ? attention(*layer.mla, h_attn, cos_f, sin_f, caches[i], slot_mapping, block_tables,
                                     context_lens)
                         : gqa_attention(*layer.gqa, h_attn, cos, sin, caches[i], slot_mapping, block_tables,
                                         context_lens));
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
    if (!streams(l, x)) return at::linear(x, l.weight, l.bias);
    const torch::Tensor xc = x.contiguous();
    return bf16_ ? linear_small_m_bf16(xc, l.weight, l.bias) : linear_small_m(xc, l.weight, l.bias);
  }

  // A float (not int8) linear of the model's dtype takes the streaming kernel for these rows (cpu_linear.linear).
  bool streams(const Linear& l, const torch::Tensor& x) const {
    return l.stream && !(bf16_ && x.size(0) > bf16_stream_rows_);
  }

  // linear(l, x) widened to float32, contiguous: for a bf16 model, the float32 sums of a streamed linear rounded
  // to bf16 in place (what `.to(bf16).to(float32)` gives, without the two copies).
  torch::Tensor linear_widened(const Linear& l, const torch::Tensor& x) const {
    if (bf16_ && !l.scale.defined() && streams(l, x)) {
      torch::Tensor out = linear_small_m(x.contiguous(), l.weight, l.bias);
      round_to_bf16_(out);
      return out;
    }
    return linear(l, x).to(torch::kFloat32).contiguous();
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
    const torch::Tensor q = linear_widened(a.q ? *a.q : a.q_b, a.q ? x : norm(a.q_a_norm, linear(a.q_a, x)))
                                .view({t, a.heads, -1});
    const torch::Tensor kv_a = linear_widened(a.kv_a, x);
    const torch::Tensor out =
        mla_decode_step_f32(q, kv_a, a.kv_a_norm.weight.to(torch::kFloat32).contiguous(), a.kv_a_norm.eps, cos, sin,
                            a.interleave, a.kv_b, cache.first, cache.second, slot_mapping, block_tables,
                            context_lens, a.scale, a.kv_b_scale);
    return linear(a.o, as_model_dtype(out).flatten(1));
  }

  // kernels.rope.apply_rope, op for op: x [T, heads, dim], cos/sin [T, dim/2] in x's dtype.
  static torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                            bool interleave) {
    const torch::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
    const int64_t half = x.size(-1) / 2;
    const torch::Tensor x1 = interleave ? x.slice(-1, 0, c10::nullopt, 2) : x.slice(-1, 0, half);
    const torch::Tensor x2 = interleave ? x.slice(-1, 1, c10::nullopt, 2) : x.slice(-1, half);
    return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
  }

  // model/paged.py write_cache: cache [N, block_size, ...] <- values [T, ...] at flat slots [T].
  static void write_cache(const torch::Tensor& cache, const torch::Tensor& slots, const torch::Tensor& values) {
    std::vector<int64_t> rows = {-1};
    for (int64_t d = 2; d < cache.dim(); ++d) rows.push_back(cache.size(d));
    cache.view(rows).index_copy_(0, slots, values.to(cache.scalar_type()));
  }

  torch::Tensor gqa_attention(const GqaAttention& a, const torch::Tensor& x, const torch::Tensor& cos,
                              const torch::Tensor& sin, const std::pair<torch::Tensor, torch::Tensor>& cache,
                              const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                              const torch::Tensor& context_lens) const {
    const int64_t t = x.size(0);
    torch::Tensor q = linear(a.q, x), k = linear(a.k, x), v = linear(a.v, x);
    if (a.q_norm && !a.head_norm) {
      q = norm(*a.q_norm, q);
      k = norm(*a.k_norm, k);
    }
    if (a.clip) {
      q = q.clamp(-*a.clip, *a.clip);
      k = k.clamp(-*a.clip, *a.clip);
      v = v.clamp(-*a.clip, *a.clip);
    }
    q = q.view({t, a.heads, a.head_dim});
    k = k.view({t, a.kv_heads, a.head_dim});
    v = v.view({t, a.kv_heads, a.head_dim});
    if (a.q_norm && a.head_norm) {
      q = norm(*a.q_norm, q);
      k = norm(*a.k_norm, k);
    }
    q = rope(q, cos, sin, a.interleave);
    k = rope(k, cos, sin, a.interleave);
    write_cache(cache.first, slot_mapping, k);
    write_cache(cache.second, slot_mapping, v);
    const torch::Tensor out = gqa_decode_f32(q.to(torch::kFloat32).contiguous(), cache.first, cache.second,
                                             block_tables, context_lens, a.scale, a.window);
    return linear(a.o, out.to(q.scalar_type()).flatten(1));
  }

  torch::Tensor moe(const Moe& m, const torch::Tensor& x, std::vector<torch::Tensor>& routed) const {
    const torch::Tensor x_f = x.to(torch::kFloat32);
    const torch::Tensor logits = at::mm(x_f, m.router.t());  // what at::linear without a bias calls
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
    if (!m.shared) return out;
    torch::Tensor shared = mlp(*m.shared, x);
    if (m.shared_gate) shared = at::sigmoid(linear(*m.shared_gate, x)) * shared;
    return out + shared;
  }

  bool bf16_;
  int64_t bf16_stream_rows_;
  Norm final_norm_;
  std::vector<Layer> layers_;
  bool any_mla_ = false;
};

}  // namespace

void bind_decode_stack(py::module& m) {
  py::class_<DecodeStack>(m, "DecodeStack", "One decode step of an MoE decoder; see model/fused_decode.py")
      .def(py::init<bool, const py::dict&, int64_t>(), py::arg("bf16"), py::arg("final_norm"),
           py::arg("bf16_stream_rows"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>());
}
