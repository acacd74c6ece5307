// The CPU kernels each translation unit defines, for the others to call: small_m.cpp binds them all to Python,
// decode_stack.cpp runs them layer after layer.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "rows_dot.h"

namespace expertmesh {

inline void check_contiguous(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), name,
              " must be a contiguous CPU ", c10::toString(dtype), " tensor, got ", t.scalar_type(),
              t.is_contiguous() ? "" : " (not contiguous)", " on ", t.device());
}
inline void check_f32(const torch::Tensor& t, const char* name) { check_contiguous(t, torch::kFloat32, name); }
inline void check_bf16(const torch::Tensor& t, const char* name) { check_contiguous(t, torch::kBFloat16, name); }

inline const Bf16* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const Bf16*>(t.data_ptr<at::BFloat16>());
}

// An index tensor (block tables, context lengths, slots) as contiguous int32, whatever integer type it came in.
inline torch::Tensor int32_index(const torch::Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kInt32) return t.contiguous();
  const auto wide = t.to(torch::kInt64);
  TORCH_CHECK(wide.numel() == 0 || (wide.min().item<int64_t>() >= std::numeric_limits<int32_t>::min() &&
                                    wide.max().item<int64_t>() <= std::numeric_limits<int32_t>::max()),
              name, " holds values outside int32");
  return wide.to(torch::kInt32).contiguous();
}

// Every block a sequence's context reads (tables [B, width], lens [B]) must lie in a cache of `num_blocks` blocks.
inline void check_block_tables(const int32_t* tables, const int32_t* lens, int64_t b_count, int64_t width,
                               int64_t block, int64_t num_blocks) {
  for (int64_t b = 0; b < b_count; ++b) {
    TORCH_CHECK(lens[b] <= width * block, "context_lens[", b, "] = ", lens[b], " exceeds its block table");
    for (int64_t i = 0; i * block < lens[b]; ++i) {
      TORCH_CHECK(tables[b * width + i] >= 0 && tables[b * width + i] < num_blocks, "block_tables[", b, ", ", i,
                  "] = ", tables[b * width + i], " is outside the cache's ", num_blocks, " blocks");
    }
  }
}

}  // namespace expertmesh

// small_m.cpp
torch::Tensor linear_small_m(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor linear_small_m_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                          bool quantize_activations);
torch::Tensor moe_small_m(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor topk_weights,
                          torch::Tensor topk_ids);
torch::Tensor moe_small_m_int8(torch::Tensor x, torch::Tensor w13, torch::Tensor w13_scale, torch::Tensor w2,
                               torch::Tensor w2_scale, torch::Tensor topk_weights, torch::Tensor topk_ids,
                               bool quantize_activations);

// lora.cpp
torch::Tensor lora_shrink_f32(torch::Tensor x, torch::Tensor a, torch::Tensor rows);
torch::Tensor lora_expand_f32(torch::Tensor y, torch::Tensor h, torch::Tensor b, torch::Tensor rows);

// decode_ops.cpp
torch::Tensor rms_norm_f32(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> topk_gating_f32(torch::Tensor logits, int64_t top_k, bool sigmoid,
                                                         c10::optional<torch::Tensor> bias, int64_t n_group,
                                                         int64_t topk_group, bool top2_sum, bool renormalize,
                                                         double scaling);
torch::Tensor mla_decode_absorbed_f32(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor kv_b,
                                      torch::Tensor ckv_cache, torch::Tensor kpe_cache, torch::Tensor block_tables,
                                      torch::Tensor context_lens, double scale,
                                      c10::optional<torch::Tensor> kv_b_scale);
torch::Tensor mla_decode_step_f32(torch::Tensor q, torch::Tensor kv_a, torch::Tensor kv_norm_weight, double eps,
                                  torch::Tensor cos, torch::Tensor sin, bool interleave, torch::Tensor kv_b,
                                  torch::Tensor ckv_cache, torch::Tensor kpe_cache, torch::Tensor slot_mapping,
                                  torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                  c10::optional<torch::Tensor> kv_b_scale);

// gqa_decode.cpp
torch::Tensor gqa_decode_f32(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                             torch::Tensor context_lens, double scale, int64_t window);

// decode_stack.cpp
void bind_decode_stack(pybind11::module& m);
