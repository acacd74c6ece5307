// Weight-streaming kernels for CPU decode: few activation rows (M <= 64) against cold weights.
//
// At decode sizes a matmul is a pass over the weights: each weight row is read from DRAM once and dotted
// with every activation row while it sits in L1. BLAS libraries pay a fixed cost per call and ramp their
// prefetchers per matrix, so many small expert matrices stream at a third of the machine's bandwidth.
// Here one parallel region covers every selected expert of a layer, its rows split evenly into one contiguous
// run per core, so both cores stream for the whole call and finish together.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "lora_rows.h"
#include "ops.h"
#include "q8_rows.h"
#include "rows_dot.h"
#include "tokens_in_lanes.h"

namespace {

using expertmesh::kRowBlock;
using expertmesh::rows_dot;
using expertmesh::bf16_ptr;
using expertmesh::check_bf16;
using expertmesh::check_f32;

// Weights below this many bytes a thread are read by fewer threads: waking one and joining it costs more than
// the reading it would share.
constexpr int64_t kMinBytesPerThread = 32 * 1024;

// `dot(g, r0, r1)` over rows [0, rows) of `groups` matrices (the selected experts' weights) whose rows are
// `row_bytes` long, as one range of row blocks split evenly into one contiguous run per thread: every core
// streams one run and all finish together, a run may end inside one matrix and go on into the next. (Chunks of
// a fixed size left one core idle for a chunk's time whenever their count was odd: q_a_proj's 5 chunks of int8
// rows took the time of 3.)
template <typename F>
void for_group_rows(int64_t groups, int64_t rows, int64_t row_bytes, F&& dot) {
  const int64_t per = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (kRowBlock * row_bytes));
  at::parallel_for(0, groups * per, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      const int64_t g = u / per, end = std::min(u1, (g + 1) * per);
      dot(g, (u - g * per) * kRowBlock, std::min(rows, (end - g * per) * kRowBlock));
      u = end;
    }
  });
}

// `dot(r0, r1)` over the rows of one [n, k] weight matrix, split as for_group_rows splits many.
template <typename F>
void for_row_chunks(int64_t n, int64_t row_bytes, F&& dot) {
  for_group_rows(1, n, row_bytes, [&](int64_t, int64_t r0, int64_t r1) { dot(r0, r1); });
}

// `scale`: one per weight row (int8 weights), or nullptr.
template <typename W, typename X>
void linear_rows(const X* xp, const W* wp, float* op, int64_t m, int64_t k, int64_t n,
                 const float* scale = nullptr) {
  if constexpr (std::is_same_v<W, float> && std::is_same_v<X, float>) {
    if (expertmesh::lanes_for(m)) {  // 16-64 rows: the arithmetic bounds them, tokens in the lanes
      const std::vector<float> xt = expertmesh::transpose_tokens(xp, k, m, k);
      for_row_chunks(n, k * static_cast<int64_t>(sizeof(W)), [&](int64_t r0, int64_t r1) {
        expertmesh::tokens_in_lanes(wp + r0 * k, r1 - r0, k, xp, k, xt.data(), m, op + r0, n);
      });
      return;
    }
  }
  for_row_chunks(n, k * static_cast<int64_t>(sizeof(W)), [&](int64_t r0, int64_t r1) {
    rows_dot(wp + r0 * k, r1 - r0, k, xp, k, m, op + r0, n, scale == nullptr ? nullptr : scale + r0);
  });
}

// Rows t0 .. t0 + m - 1 of [*, k] activations against int8 or float weight rows: through their quantised copy
// `q` where there is one (int8 weights, w8a8), else as float32.
template <typename W>
void rows_dot_acts(const W* w, int64_t rows, int64_t k, const float* x, const std::optional<expertmesh::Q8Rows>& q,
                   int64_t t0, int64_t m, float* out, int64_t out_stride, const float* scale) {
  if constexpr (std::is_same_v<W, int8_t>) {
    if (q) return expertmesh::rows_dot(w, rows, *q, t0, m, out, out_stride, scale);
  }
  rows_dot(w, rows, k, x + t0 * k, k, m, out, out_stride, scale);
}

}  // namespace

namespace {

// x [M, K] @ w[N, K]^T -> out [M, N] float32. w float32 or bfloat16 (read as bf16, summed in float32); x float32
// or bfloat16 (each product of two bf16 values is exact in float32). For one or two rows of bf16 against bf16
// weights the products pair up in `vdpbf16ps` where the CPU has it (10-30% faster on the Intel reference
// machine); for more rows, reading each activation twice costs more than widening the weights once, and x goes
// to float32.
void check_linear_shapes(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_small_m: x [M, K] and weight [N, K] ",
              "expected, got ", x.sizes(), " and ", w.sizes());
}

// (check_linear_shapes first)
void linear_small_m_into(torch::Tensor x, const torch::Tensor& w, float* out) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  if (x.scalar_type() == torch::kBFloat16 && (!expertmesh::kBf16Dot || m > 2 || w.scalar_type() != torch::kBFloat16)) {
    x = x.to(torch::kFloat32);
  }
  if (x.scalar_type() == torch::kBFloat16) {
    check_bf16(x, "x");
    check_bf16(w, "weight");
    return linear_rows(bf16_ptr(x), bf16_ptr(w), out, m, k, n);
  }
  check_f32(x, "x");
  if (w.scalar_type() == torch::kBFloat16) {
    check_bf16(w, "weight");
    linear_rows(x.data_ptr<float>(), bf16_ptr(w), out, m, k, n);
  } else {
    check_f32(w, "weight");
    linear_rows(x.data_ptr<float>(), w.data_ptr<float>(), out, m, k, n);
  }
}

}  // namespace

// x [M, K] @ w[N, K]^T (+ bias) -> [M, N] float32 (see linear_small_m_into).
torch::Tensor linear_small_m(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_linear_shapes(x, w);
  auto out = torch::empty({x.size(0), w.size(0)}, x.options().dtype(torch::kFloat32));
  linear_small_m_into(std::move(x), w, out.data_ptr<float>());
  if (bias.has_value()) out.add_(bias.value().to(torch::kFloat32));
  return out;
}

// linear_small_m's float32 result (bias included) rounded once to bf16, as `.to(torch.bfloat16)` of it would be:
// the sums go to a per-thread scratch buffer, so a call allocates one tensor, not two, and makes no extra op.
torch::Tensor linear_small_m_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_linear_shapes(x, w);
  const int64_t m = x.size(0), n = w.size(0);
  thread_local std::vector<float> sums;
  sums.resize(static_cast<size_t>(m * n));
  linear_small_m_into(std::move(x), w, sums.data());
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias.value().to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == n, "linear_small_m: bias must have ", n, " entries, got ", b.numel());
  }
  auto out = torch::empty({m, n}, w.options().dtype(torch::kBFloat16));
  auto* op = reinterpret_cast<expertmesh::Bf16*>(out.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t j = 0; j < n; ++j) {
      const float v = sums[t * n + j];
      op[t * n + j] = expertmesh::to_bf16(bp == nullptr ? v : v + bp[j]);
    }
  }
  return out;
}

// x [M, K] @ (w [N, K] int8 * scale [N, 1])^T (+ bias) -> [M, N] float32: int8 weight-only linear, each row
// widened in registers and its sum scaled once. With `quantize_activations` (K a multiple of 32), x is
// quantised in blocks of 32 first and the products summed as integers (q8_rows.h).
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                          bool quantize_activations) {
  check_f32(x, "x");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2,
              "weight must be a contiguous CPU int8 tensor [N, K]");
  check_f32(scale, "scale");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "linear_int8: x [M, K] does not fit weight [N, K]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0), "scale must be [N]: one per weight row");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto out = torch::empty({m, n}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (quantize_activations) {
    TORCH_CHECK(k % expertmesh::kQ8Block == 0, "quantised activations need K a multiple of 32, got ", k);
    const expertmesh::Q8Rows qx(x.data_ptr<float>(), m, k, k);
    for_row_chunks(n, k, [&](int64_t r0, int64_t r1) {  // int8 rows: k bytes
      expertmesh::rows_dot(wp + r0 * k, r1 - r0, qx, 0, m, op + r0, n, sp + r0);
    });
  } else {
    linear_rows(x.data_ptr<float>(), wp, op, m, k, n, sp);
  }
  if (bias.has_value()) out.add_(bias.value().to(torch::kFloat32));
  return out;
}

namespace {

// LoRA on the (token, slot) pairs of moe_small_m: rows [T*K] into the stacks (-1: the pair has none).
struct MoeLora {
  const int64_t* rows;
  expertmesh::LoraA a13, a2;
  expertmesh::LoraB b13, b2;
};

// The experts of one layer: float32 weights (scales null), or int8 weights with a float32 scale per output row.
template <typename W>
struct Experts {
  const W* w13;      // [E, 2I, H]: gate rows, then up
  const float* s13;  // [E, 2I] or null
  const W* w2;       // [E, H, I]
  const float* s2;   // [E, H] or null
  int64_t count, inter;
};

// Routed experts for few tokens: out[t] = sum_k w[t,k] * W2[e] (silu(G[e] x_t) * (U[e] x_t)), e = ids[t,k].
// topk_weights [T, K] fp32, topk_ids [T, K] int64.
// With `lora`, pairs with a row gain B13 A13 x_t on gate/up before the activation and B2 A2 act on the down
// output, each right after the parallel region that streams the experts' weights.
template <typename W>
torch::Tensor moe_small_m_impl(torch::Tensor x, const Experts<W>& ex, torch::Tensor topk_weights,
                               torch::Tensor topk_ids, const MoeLora* lora, bool quantize_activations = false) {
  check_f32(x, "hidden_states");
  const int64_t t_count = x.size(0), h = x.size(1), e_count = ex.count, inter = ex.inter;
  const int64_t k_count = topk_ids.size(1);
  auto ids = topk_ids.to(torch::kInt64).contiguous();
  auto weights = topk_weights.to(torch::kFloat32).contiguous();
  const int64_t* idp = ids.data_ptr<int64_t>();

  // Group (token, slot) pairs by expert: pair p of group g is pairs[offsets[g] + i].
  std::vector<int64_t> counts(e_count, 0);
  for (int64_t p = 0; p < t_count * k_count; ++p) {
    TORCH_CHECK(idp[p] >= 0 && idp[p] < e_count, "topk_ids holds expert id ", idp[p], " outside [0, ", e_count, ")");
    counts[idp[p]]++;
  }
  std::vector<int64_t> experts, offsets{0};
  for (int64_t e = 0; e < e_count; ++e) {
    if (counts[e]) {
      experts.push_back(e);
      offsets.push_back(offsets.back() + counts[e]);
    }
  }
  const int64_t groups = experts.size(), pairs = t_count * k_count;
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1), slot_of_expert(e_count, -1);
  for (int64_t g = 0; g < groups; ++g) slot_of_expert[experts[g]] = g;
  std::vector<int64_t> pair_order(pairs);  // sorted position -> pair index t*K + k
  for (int64_t p = 0; p < pairs; ++p) pair_order[fill[slot_of_expert[idp[p]]]++] = p;

  // Tokens of each group gathered contiguously, so each weight row meets them back to back.
  auto xs = torch::empty({pairs, h}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  for (int64_t i = 0; i < pairs; ++i) std::memcpy(xsp + i * h, xp + (pair_order[i] / k_count) * h, h * sizeof(float));

  // int8 experts with quantised activations (q8_rows.h): each gathered row quantised once
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  if constexpr (kInt8) {
    TORCH_CHECK(!quantize_activations || (h % expertmesh::kQ8Block == 0 && inter % expertmesh::kQ8Block == 0),
                "quantised activations need the hidden and expert sizes to be multiples of 32");
  }
  const std::optional<expertmesh::Q8Rows> qxs =
      kInt8 && quantize_activations ? std::optional<expertmesh::Q8Rows>(std::in_place, xsp, pairs, h, h) : std::nullopt;

  auto gate_up = torch::empty({pairs, 2 * inter}, x.options());
  float* gup = gate_up.data_ptr<float>();
  for_group_rows(groups, 2 * inter, h * static_cast<int64_t>(sizeof(W)), [&](int64_t g, int64_t r0, int64_t r1) {
    const int64_t o = offsets[g], row = experts[g] * 2 * inter + r0;
    rows_dot_acts(ex.w13 + row * h, r1 - r0, h, xsp, qxs, o, offsets[g + 1] - o, gup + o * 2 * inter + r0, 2 * inter,
                  ex.s13 == nullptr ? nullptr : ex.s13 + row);
  });

  std::vector<int64_t> sorted_rows;  // lora->rows in sorted order
  if (lora != nullptr) {
    sorted_rows.resize(pairs);
    for (int64_t i = 0; i < pairs; ++i) sorted_rows[i] = lora->rows[pair_order[i]];
    expertmesh::lora_rows(lora->a13, lora->b13, sorted_rows.data(), pairs, xsp, h, gup, 2 * inter);
  }

  auto act = torch::empty({pairs, inter}, x.options());
  float* ap = act.data_ptr<float>();
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < inter; ++j) {
        const float g = gup[i * 2 * inter + j], u = gup[i * 2 * inter + inter + j];
        ap[i * inter + j] = g / (1.f + std::exp(-g)) * u;
      }
    }
  });

  const std::optional<expertmesh::Q8Rows> qact =
      qxs ? std::optional<expertmesh::Q8Rows>(std::in_place, ap, pairs, inter, inter) : std::nullopt;
  auto ys = torch::empty({pairs, h}, x.options());
  float* ysp = ys.data_ptr<float>();
  for_group_rows(groups, h, inter * static_cast<int64_t>(sizeof(W)), [&](int64_t g, int64_t r0, int64_t r1) {
    const int64_t o = offsets[g], row = experts[g] * h + r0;
    rows_dot_acts(ex.w2 + row * inter, r1 - r0, inter, ap, qact, o, offsets[g + 1] - o, ysp + o * h + r0, h,
                  ex.s2 == nullptr ? nullptr : ex.s2 + row);
  });

  if (lora != nullptr) expertmesh::lora_rows(lora->a2, lora->b2, sorted_rows.data(), pairs, ap, inter, ysp, h);

  // Weighted sum over each token's K slots, in slot order.
  std::vector<int64_t> sorted_pos(pairs);
  for (int64_t i = 0; i < pairs; ++i) sorted_pos[pair_order[i]] = i;
  auto out = torch::zeros({t_count, h}, x.options());
  float* op = out.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  at::parallel_for(0, t_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = 0; k < k_count; ++k) {
        const float wk = wp[t * k_count + k];
        const float* y = ysp + sorted_pos[t * k_count + k] * h;
        for (int64_t j = 0; j < h; ++j) op[t * h + j] += wk * y[j];
      }
    }
  });
  return out;
}

}  // namespace

Experts<float> f32_experts(const torch::Tensor& w13, const torch::Tensor& w2) {
  check_f32(w13, "w13");
  check_f32(w2, "w2");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) && w13.size(1) == 2 * w2.size(2),
              "w13 [E, 2I, H] and w2 [E, H, I] do not fit each other");
  return {w13.data_ptr<float>(), nullptr, w2.data_ptr<float>(), nullptr, w13.size(0), w2.size(2)};
}

// x float32; w13 [E, 2I, H] and w2 [E, H, I] float32, or bfloat16 (read as bf16, summed in float32).
torch::Tensor moe_small_m(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor topk_weights,
                          torch::Tensor topk_ids) {
  if (w13.scalar_type() == torch::kBFloat16) {
    check_bf16(w13, "w13");
    check_bf16(w2, "w2");
    TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) && w13.size(1) == 2 * w2.size(2),
                "w13 [E, 2I, H] and w2 [E, H, I] do not fit each other");
    const Experts<expertmesh::Bf16> ex{bf16_ptr(w13), nullptr, bf16_ptr(w2), nullptr, w13.size(0), w2.size(2)};
    return moe_small_m_impl(x, ex, topk_weights, topk_ids, nullptr);
  }
  return moe_small_m_impl(x, f32_experts(w13, w2), topk_weights, topk_ids, nullptr);
}

// moe_small_m over int8 weight-only experts: w13 [E, 2I, H] int8 with w13_scale [E, 2I] float32, w2 [E, H, I]
// int8 with w2_scale [E, H]; weight (e, n, k) stands for w[e, n, k] * scale[e, n].
torch::Tensor moe_small_m_int8(torch::Tensor x, torch::Tensor w13, torch::Tensor w13_scale, torch::Tensor w2,
                               torch::Tensor w2_scale, torch::Tensor topk_weights, torch::Tensor topk_ids,
                               bool quantize_activations) {
  for (const auto& [t, name] : {std::pair{w13, "w13"}, std::pair{w2, "w2"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt8 && t.is_contiguous() && t.dim() == 3, name,
                " must be a contiguous CPU int8 tensor [E, N, K]");
  }
  for (const auto& [t, name] : {std::pair{w13_scale, "w13_scale"}, std::pair{w2_scale, "w2_scale"}}) {
    check_f32(t, name);
  }
  TORCH_CHECK(w13.size(0) == w2.size(0) && w13.size(1) == 2 * w2.size(2) && w13.size(2) == w2.size(1),
              "w13 [E, 2I, H] and w2 [E, H, I] do not fit each other");
  TORCH_CHECK(w13_scale.sizes() == w13.sizes().slice(0, 2) && w2_scale.sizes() == w2.sizes().slice(0, 2),
              "the scales must be [E, 2I] and [E, H]: one per output row of each expert");
  const Experts<int8_t> ex{w13.data_ptr<int8_t>(), w13_scale.data_ptr<float>(), w2.data_ptr<int8_t>(),
                           w2_scale.data_ptr<float>(), w13.size(0), w2.size(2)};
  return moe_small_m_impl(x, ex, topk_weights, topk_ids, nullptr, quantize_activations);
}

// moe_small_m plus LoRA on the pairs whose lora_rows [T, K] entry is >= 0: the contract of
// kernels/lora.py's `fused_moe_lora_ref` in float32.
torch::Tensor moe_lora_small_m(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor topk_weights,
                               torch::Tensor topk_ids, torch::Tensor lora_rows, torch::Tensor a13, torch::Tensor b13,
                               torch::Tensor a2, torch::Tensor b2) {
  auto rows = lora_rows.to(torch::kInt64).contiguous();
  TORCH_CHECK(rows.sizes() == topk_ids.sizes(), "lora_rows must have the shape of topk_ids");
  expertmesh::check_rows(rows.data_ptr<int64_t>(), rows.numel(), a13.size(0));
  const MoeLora lora{rows.data_ptr<int64_t>(), expertmesh::lora_a(a13), expertmesh::lora_a(a2),
                     expertmesh::lora_b(b13), expertmesh::lora_b(b2)};
  TORCH_CHECK(lora.a13.in == x.size(1) && lora.b13.out == w13.size(1) && lora.a2.in == w2.size(2) &&
                  lora.b2.out == x.size(1),
              "LoRA stacks do not fit the experts");
  return moe_small_m_impl(x, f32_experts(w13, w2), topk_weights, topk_ids, &lora);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mla_decode_step_f32", &mla_decode_step_f32, "MLA decode step after the projections: norm, RoPE, cache writes, attention",
        py::arg("q"), py::arg("kv_a"), py::arg("kv_norm_weight"), py::arg("eps"), py::arg("cos"), py::arg("sin"),
        py::arg("interleave"), py::arg("kv_b"), py::arg("ckv_cache"), py::arg("kpe_cache"), py::arg("slot_mapping"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("kv_b_scale") = py::none());
  m.def("rms_norm_f32", &rms_norm_f32, "RMSNorm over the last dimension");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm in bf16 as transformers rounds it (twice)");
  m.def("topk_gating_f32", &topk_gating_f32, "top-k routing, the contract of kernels.topk_gating");
  m.def("mla_decode_absorbed_f32", &mla_decode_absorbed_f32, "MLA decode with absorbed W_UK / W_UV",
        py::arg("q_nope"), py::arg("q_pe"), py::arg("kv_b"), py::arg("ckv_cache"), py::arg("kpe_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("kv_b_scale") = py::none());
  m.def("linear_small_m", &linear_small_m, "x @ w.T (+ bias) for few rows of x, streaming w once");
  m.def("linear_small_m_bf16", &linear_small_m_bf16, "linear_small_m rounded to bf16 in the same call");
  m.def("linear_int8", &linear_int8, "x @ (w * scale)^T (+ bias) over int8 weight rows with a scale per row",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bias"), py::arg("quantize_activations") = false);
  m.def("moe_small_m", &moe_small_m, "routed experts for few tokens, every selected expert in one parallel region");
  m.def("moe_small_m_int8", &moe_small_m_int8, "moe_small_m over int8 weight-only experts (a scale per output row)",
        py::arg("x"), py::arg("w13"), py::arg("w13_scale"), py::arg("w2"), py::arg("w2_scale"),
        py::arg("topk_weights"), py::arg("topk_ids"), py::arg("quantize_activations") = false);
  m.def("moe_lora_small_m", &moe_lora_small_m, "moe_small_m plus LoRA on the (token, expert) pairs that have a row");
  m.def("lora_shrink_f32", &lora_shrink_f32, "h = A[rows[t]] x[t] per row (zeros where rows[t] = -1)");
  m.def("lora_expand_f32", &lora_expand_f32, "y[t] += B[rows[t]] h[t] in place where rows[t] >= 0");
  m.def("gqa_decode_f32", &gqa_decode_f32, "grouped-query decode attention over the paged K/V cache, read in place",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("window"));
  bind_decode_stack(m);
}
