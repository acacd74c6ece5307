// Fused CPU decode ops: the same math as the torch references of kernels/, one call instead of ten to
// twenty small tensor ops. At decode batch sizes those ops each cost ~10 us of dispatch and thread
// wake-up for microseconds of work; summed over the layers they are a third of a step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "mla_context.h"
#include "ops.h"
#include "rows_dot.h"

namespace {

using expertmesh::bf16_ptr;
using expertmesh::check_bf16;
using expertmesh::check_f32;

float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma omp simd
    for (int64_t j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.f;
  for (int64_t j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Indices of the `k` largest values, ties to the lower index (selection is a set; order is by value).
std::vector<int64_t> top_indices(const float* v, int64_t n, int64_t k) {
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx.resize(k);
  return idx;
}

#if defined(__AVX512F__)
// One register block of small_gemm: MB rows of A against 64 columns of B, all 16 accumulators in registers.
template <int64_t MB, typename W>
void gemm_block(const float* a, int64_t a_stride, const W* b, int64_t b_stride, float* c, int64_t c_stride,
                int64_t k_count) {
  __m512 acc[MB][4];
  for (int64_t i = 0; i < MB; ++i)
    for (int64_t j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_count; ++k) {
    const W* brow = b + k * b_stride;
    __m512 bv[4];
    for (int64_t j = 0; j < 4; ++j) bv[j] = expertmesh::load16(brow + 16 * j);
    for (int64_t i = 0; i < MB; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_stride + k]);
      for (int64_t j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  for (int64_t i = 0; i < MB; ++i)
    for (int64_t j = 0; j < 4; ++j) _mm512_storeu_ps(c + i * c_stride + 16 * j, acc[i][j]);
}
#endif

#if defined(__AVX512F__)
// One row of A against NV * 16 columns of B: B's rows read whole, one after the other. (The 64-column blocks
// below walk B in strips of 64 columns; for a single row of A nothing reuses a strip, and B's rows, 512 bytes
// apart, were fetched two lines at a time: MLA's absorption of W_UK read at half the memory's rate at batch 1.)
template <int64_t NV, typename W>
void gemv_block(const float* a, const W* b, int64_t b_stride, float* c, int64_t k_count) {
  __m512 acc[NV];
  for (int64_t j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_count; ++k) {
    const __m512 av = _mm512_set1_ps(a[k]);
    const W* brow = b + k * b_stride;
    for (int64_t j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(av, expertmesh::load16(brow + 16 * j), acc[j]);
  }
  for (int64_t j = 0; j < NV; ++j) _mm512_storeu_ps(c + 16 * j, acc[j]);
}
#endif

// C[m, n] = sum_k A[m, k] B[k, n] for m < M, n < N (row strides given): 4 rows of A by 64 columns of B
// per register block, so each loaded 16-lane piece of B feeds four FMAs; a single row of A takes 256 columns a
// block (gemv_block).
template <typename W>
void small_gemm(const float* a, int64_t a_stride, const W* b, int64_t b_stride, float* c, int64_t c_stride,
                int64_t m_count, int64_t n_count, int64_t k_count) {
  using expertmesh::widen;
  constexpr int64_t kM = 4, kN = 64;
#if defined(__AVX512F__)
  if (m_count == 1) {
    constexpr int64_t kRowN = 256;
    int64_t n0 = 0;
    for (; n0 + kRowN <= n_count; n0 += kRowN) gemv_block<kRowN / 16>(a, b + n0, b_stride, c + n0, k_count);
    for (; n0 + kN <= n_count; n0 += kN) gemv_block<kN / 16>(a, b + n0, b_stride, c + n0, k_count);
    for (; n0 < n_count; ++n0) {
      float sum = 0.f;
      for (int64_t k = 0; k < k_count; ++k) sum += a[k] * widen(b[k * b_stride + n0]);
      c[n0] = sum;
    }
    return;
  }
#endif
  for (int64_t m0 = 0; m0 < m_count; m0 += kM) {
    const int64_t mb = std::min(kM, m_count - m0);
    int64_t n0 = 0;
    for (; n0 + kN <= n_count; n0 += kN) {
#if defined(__AVX512F__)
      const float* ab = a + m0 * a_stride;
      float* cb = c + m0 * c_stride + n0;
      switch (mb) {
        case 4: gemm_block<4>(ab, a_stride, b + n0, b_stride, cb, c_stride, k_count); break;
        case 3: gemm_block<3>(ab, a_stride, b + n0, b_stride, cb, c_stride, k_count); break;
        case 2: gemm_block<2>(ab, a_stride, b + n0, b_stride, cb, c_stride, k_count); break;
        default: gemm_block<1>(ab, a_stride, b + n0, b_stride, cb, c_stride, k_count); break;
      }
#else
      float acc[kM][kN] = {};
      for (int64_t k = 0; k < k_count; ++k) {
        const W* brow = b + k * b_stride + n0;
        float bv[kN];
#pragma omp simd
        for (int64_t j = 0; j < kN; ++j) bv[j] = widen(brow[j]);
        for (int64_t i = 0; i < mb; ++i) {
          const float av = a[(m0 + i) * a_stride + k];
#pragma omp simd
          for (int64_t j = 0; j < kN; ++j) acc[i][j] += av * bv[j];
        }
      }
      for (int64_t i = 0; i < mb; ++i) std::copy(acc[i], acc[i] + kN, c + (m0 + i) * c_stride + n0);
#endif
    }
    for (; n0 < n_count; ++n0) {  // columns past the last full block
      for (int64_t i = 0; i < mb; ++i) {
        float sum = 0.f;
        for (int64_t k = 0; k < k_count; ++k) sum += a[(m0 + i) * a_stride + k] * widen(b[k * b_stride + n0]);
        c[(m0 + i) * c_stride + n0] = sum;
      }
    }
  }
}

}  // namespace

// weight * x * rsqrt(mean(x^2) + eps) over the last dimension.
torch::Tensor rms_norm_f32(torch::Tensor x, torch::Tensor weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  const int64_t h = x.size(-1), rows = x.numel() / std::max<int64_t>(h, 1);
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * h;
      const float inv = 1.f / std::sqrt(dot(xr, xr, h) / h + static_cast<float>(eps));
      for (int64_t j = 0; j < h; ++j) op[r * h + j] = wp[j] * (xr[j] * inv);
    }
  });
  return out;
}

// rms_norm_ref's bf16 semantics (transformers'): normalised in float32, rounded to bf16, then the bf16 weight's
// product, rounded again. x and weight bf16, contiguous.
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps) {
  check_bf16(x, "x");
  check_bf16(weight, "weight");
  TORCH_CHECK(weight.numel() == x.size(-1), "rms_norm_bf16: weight must be [H] for x [..., H]");
  const int64_t h = x.size(-1), rows = x.numel() / std::max<int64_t>(h, 1);
  auto out = torch::empty_like(x);
  const expertmesh::Bf16 *xp = bf16_ptr(x), *wp = bf16_ptr(weight);
  auto* op = reinterpret_cast<expertmesh::Bf16*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(h);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < h; ++j) row[j] = expertmesh::widen(xp[r * h + j]);
      const float inv = 1.f / std::sqrt(dot(row.data(), row.data(), h) / h + static_cast<float>(eps));
      for (int64_t j = 0; j < h; ++j) {
        const float y = expertmesh::widen(expertmesh::to_bf16(row[j] * inv));
        op[r * h + j] = expertmesh::to_bf16(expertmesh::widen(wp[j]) * y);
      }
    }
  });
  return out;
}

// Same contract as kernels.topk_gating (see gating.py): scores, optional bias and group limit for the
// choice, weights from the unbiased scores, optional renormalisation, scaling.
std::tuple<torch::Tensor, torch::Tensor> topk_gating_f32(torch::Tensor logits, int64_t top_k, bool sigmoid,
                                                         c10::optional<torch::Tensor> bias, int64_t n_group,
                                                         int64_t topk_group, bool top2_sum, bool renormalize,
                                                         double scaling) {
  check_f32(logits, "router_logits");
  const int64_t t_count = logits.size(0), e_count = logits.size(1);
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_f32(bias.value(), "correction_bias");
    bp = bias.value().data_ptr<float>();
  }
  auto weights = torch::empty({t_count, top_k}, logits.options());
  auto ids = torch::empty({t_count, top_k}, logits.options().dtype(torch::kInt64));
  const float* lp = logits.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const bool grouped = n_group > 1 && topk_group < n_group;
  const int64_t per_group = e_count / n_group;
  at::parallel_for(0, t_count, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(e_count), choice(e_count), group_scores(n_group);
    for (int64_t t = begin; t < end; ++t) {
      const float* l = lp + t * e_count;
      if (sigmoid) {
        for (int64_t e = 0; e < e_count; ++e) scores[e] = 1.f / (1.f + std::exp(-l[e]));
      } else {
        const float m = *std::max_element(l, l + e_count);
        float sum = 0.f;
        for (int64_t e = 0; e < e_count; ++e) sum += (scores[e] = std::exp(l[e] - m));
        for (int64_t e = 0; e < e_count; ++e) scores[e] /= sum;
      }
      for (int64_t e = 0; e < e_count; ++e) choice[e] = bp ? scores[e] + bp[e] : scores[e];
      if (grouped) {
        for (int64_t g = 0; g < n_group; ++g) {
          const float* c = choice.data() + g * per_group;
          if (top2_sum) {
            auto best = top_indices(c, per_group, 2);
            group_scores[g] = c[best[0]] + c[best[1]];
          } else {
            group_scores[g] = *std::max_element(c, c + per_group);
          }
        }
        std::vector<char> keep(n_group, 0);
        for (int64_t g : top_indices(group_scores.data(), n_group, topk_group)) keep[g] = 1;
        for (int64_t e = 0; e < e_count; ++e)
          if (!keep[e / per_group]) choice[e] = -std::numeric_limits<float>::infinity();
      }
      auto chosen = top_indices(choice.data(), e_count, top_k);
      float sum = 0.f;
      for (int64_t k = 0; k < top_k; ++k) sum += scores[chosen[k]];
      const float denom = renormalize ? sum + 1e-20f : 1.f;
      for (int64_t k = 0; k < top_k; ++k) {
        ip[t * top_k + k] = chosen[k];
        wp[t * top_k + k] = scores[chosen[k]] / denom * static_cast<float>(scaling);
      }
    }
  });
  return {weights, ids};
}

// MLA decode in absorbed form, in three passes: W_UK absorbed into the queries, per head across all sequences; the
// context pass, per sequence (its heads share every cache row it reads); W_UV, per head across all sequences.
//   q_lat[h] = W_UK[h]^T q_nope[h];  s[h, t] = scale * (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t])
//   o_lat[h] = softmax_t(s[h]) . c_kv;  out[h] = W_UV[h] o_lat[h]
// kv_b [H * (nope + v), R] is kv_b_proj.weight; caches are [blocks, block_size, R] and [blocks, block_size, Dr].
namespace {

// An index tensor as contiguous int32: as it is where it is one (AttentionMetadata's block tables and lengths,
// every layer of every step), else narrowed once its values are known to fit.
// The context pass in dot products along the latent (mla_context.h's lanes serve 8 heads or more on AVX-512):
// o_lat [B, H, R] from q_lat [B, H, R] and q_pe [B, H, Dr]. Work items are (sequence, group of heads): whole
// sequences when there are enough of them to keep every thread busy, else each sequence's heads split across threads.
template <typename T>
void attend_row_dot(const float* qlp, const float* qp, int64_t b_count, int64_t heads, int64_t rank, int64_t dr,
                    const T* ckv, const T* kpe, const int32_t* tp, int64_t width, const int32_t* lp, int64_t block,
                    float scale, float* olp) {
  using expertmesh::widen;
  const int64_t per_thread = (2 * at::get_num_threads() + b_count - 1) / b_count;
  const int64_t splits = std::min<int64_t>(heads, std::max<int64_t>(1, per_thread));
  const int64_t group = (heads + splits - 1) / splits;
  at::parallel_for(0, b_count * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, rope_scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / splits, h0 = (item % splits) * group, hn = std::min(heads, h0 + group) - h0;
      const int64_t len = lp[b];
      if (hn <= 0) continue;
      const float* q_lat = qlp + (b * heads + h0) * rank;
      float* o_lat = olp + (b * heads + h0) * rank;
      std::fill(o_lat, o_lat + hn * rank, 0.f);
      if (len <= 0) continue;
      // scores [hn, len]: these heads against each cache block's rows, block by block.
      scores.assign(hn * len, 0.f);
      rope_scores.assign(hn * len, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block) {
        const int64_t base = static_cast<int64_t>(tp[b * width + t0 / block]) * block, n = std::min(block, len - t0);
        expertmesh::rows_dot(ckv + base * rank, n, rank, q_lat, rank, hn, scores.data() + t0, len);
        expertmesh::rows_dot(kpe + base * dr, n, dr, qp + (b * heads + h0) * dr, dr, hn, rope_scores.data() + t0, len);
      }
      for (int64_t i = 0; i < hn; ++i) {
        float* s = scores.data() + i * len;
        const float* rs = rope_scores.data() + i * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t] = scale * (s[t] + rs[t]));
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      // o_lat[i] = sum_t p[i, t] c_kv[t]: each cache row is read once for all of these heads.
      std::vector<float> row(rank);
      for (int64_t t = 0; t < len; ++t) {
        const T* c = ckv + (static_cast<int64_t>(tp[b * width + t / block]) * block + t % block) * rank;
#pragma omp simd
        for (int64_t r = 0; r < rank; ++r) row[r] = widen(c[r]);
        for (int64_t i = 0; i < hn; ++i) {
          const float p = scores[i * len + t];
          float* o = o_lat + i * rank;
#pragma omp simd
          for (int64_t r = 0; r < rank; ++r) o[r] += p * row[r];
        }
      }
    }
  });
}

// The absorbed attention over kv_b stored as W (float32, bf16, or int8 with `w_scale`: one float32 scale per
// row) and caches stored as T (float32 or bf16); queries and output float32.
template <typename W, typename T>
torch::Tensor mla_absorbed(torch::Tensor q_nope, torch::Tensor q_pe, const W* w, const float* w_scale, const T* ckv,
                           const T* kpe, int64_t ckv_cache_blocks, int64_t rank, int64_t block, int64_t v_dim,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  const int64_t b_count = q_nope.size(0), heads = q_nope.size(1), nope = q_nope.size(2), dr = q_pe.size(2);
  const float* qn = q_nope.data_ptr<float>();
  std::vector<float> q_scaled;
  if (w_scale != nullptr) {  // W_UK's row n scaled by s[n]: fold the scales into the queries, q_nope[., h, n] * s[n]
    q_scaled.resize(b_count * heads * nope);
    for (int64_t i = 0; i < b_count * heads; ++i)
      for (int64_t n = 0; n < nope; ++n)
        q_scaled[i * nope + n] = qn[i * nope + n] * w_scale[(i % heads) * (nope + v_dim) + n];
    qn = q_scaled.data();
  }
  auto tables = expertmesh::int32_index(block_tables, "block_tables");
  auto lens = expertmesh::int32_index(context_lens, "context_lens");
  auto out = torch::empty({b_count, heads, v_dim}, q_nope.options());  // W_UV below writes every entry
  const float* qp = q_pe.data_ptr<float>();
  const int32_t *tp = tables.data_ptr<int32_t>(), *lp = lens.data_ptr<int32_t>();
  const int64_t width = tables.size(1), num_blocks = ckv_cache_blocks;
  expertmesh::check_block_tables(tp, lp, b_count, width, block, num_blocks);
  float* op = out.data_ptr<float>();
  // Absorb W_UK into every query first, per head across all sequences: q_lat [B, H, R].
  auto q_latent = torch::empty({b_count, heads, rank}, q_nope.options());
  float* qlp = q_latent.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      small_gemm(qn + h * nope, heads * nope, w + h * (nope + v_dim) * rank, rank, qlp + h * rank, heads * rank,
                 b_count, rank, nope);
  });
  auto o_latent = torch::empty({b_count, heads, rank}, q_nope.options());
  float* olp = o_latent.data_ptr<float>();
  // The context pass: o_lat [B, H, R].
  if (!expertmesh::attend_in_lanes(qlp, qp, b_count, heads, rank, dr, ckv, kpe, tp, width, lp, block,
                                   static_cast<float>(scale), olp)) {
    attend_row_dot(qlp, qp, b_count, heads, rank, dr, ckv, kpe, tp, width, lp, block, static_cast<float>(scale), olp);
  }
  // W_UV per head across all sequences: out[b, h] = W_UV[h] o_lat[b, h].
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      expertmesh::rows_dot(w + (h * (nope + v_dim) + nope) * rank, v_dim, rank, olp + h * rank, heads * rank, b_count,
                           op + h * v_dim, heads * v_dim,
                           w_scale == nullptr ? nullptr : w_scale + h * (nope + v_dim) + nope);
  });
  return out;
}

}  // namespace

// MLA decode in absorbed form (the three passes above):
//   q_lat[h] = W_UK[h]^T q_nope[h];  s[h, t] = scale * (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t])
//   o_lat[h] = softmax_t(s[h]) . c_kv;  out[h] = W_UV[h] o_lat[h]
// kv_b [H * (nope + v), R] is kv_b_proj.weight; caches are [blocks, block_size, R] and [blocks, block_size, Dr].
// Queries float32; kv_b and both caches all float32 or all bf16 (read as bf16, every sum in float32).
torch::Tensor mla_decode_absorbed_f32(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor kv_b,
                                      torch::Tensor ckv_cache, torch::Tensor kpe_cache, torch::Tensor block_tables,
                                      torch::Tensor context_lens, double scale,
                                      c10::optional<torch::Tensor> kv_b_scale) {
  check_f32(q_nope, "q_nope");
  check_f32(q_pe, "q_pe");
  const int64_t heads = q_nope.size(1), nope = q_nope.size(2);
  const int64_t rank = ckv_cache.size(2), block = ckv_cache.size(1), v_dim = kv_b.size(0) / heads - nope;
  const bool bf16_cache = ckv_cache.scalar_type() == torch::kBFloat16;
  if (bf16_cache) {
    check_bf16(ckv_cache, "ckv_cache");
    check_bf16(kpe_cache, "kpe_cache");
  } else {
    check_f32(ckv_cache, "ckv_cache");
    check_f32(kpe_cache, "kpe_cache");
  }
  auto run = [&](auto* w, const float* w_scale) {
    if (bf16_cache) {
      return mla_absorbed(q_nope, q_pe, w, w_scale, bf16_ptr(ckv_cache), bf16_ptr(kpe_cache), ckv_cache.size(0), rank,
                          block, v_dim, block_tables, context_lens, scale);
    }
    return mla_absorbed(q_nope, q_pe, w, w_scale, static_cast<const float*>(ckv_cache.data_ptr<float>()),
                        static_cast<const float*>(kpe_cache.data_ptr<float>()), ckv_cache.size(0), rank, block, v_dim,
                        block_tables, context_lens, scale);
  };
  if (kv_b.scalar_type() == torch::kInt8) {  // int8 rows, a float32 scale each
    TORCH_CHECK(kv_b.is_contiguous() && kv_b_scale.has_value(),
                "an int8 kv_b must be contiguous and come with its scales");
    check_f32(*kv_b_scale, "kv_b_scale");
    TORCH_CHECK(kv_b_scale->dim() == 1 && kv_b_scale->size(0) == kv_b.size(0), "kv_b_scale must be [H * (nope + v)]");
    return run(static_cast<const int8_t*>(kv_b.data_ptr<int8_t>()), kv_b_scale->data_ptr<float>());
  }
  TORCH_CHECK(!kv_b_scale.has_value(), "kv_b_scale goes with an int8 kv_b only");
  if (kv_b.scalar_type() == torch::kBFloat16) {
    check_bf16(kv_b, "kv_b");
    return run(bf16_ptr(kv_b), nullptr);
  }
  check_f32(kv_b, "kv_b");  // float32 weights, over float32 caches or bf16 ones (kv_cache_dtype="bfloat16")
  return run(static_cast<const float*>(kv_b.data_ptr<float>()), nullptr);
}

// One MLA decode step after the projections, for B single-token sequences: kv_a_layernorm on the latent,
// RoPE on the query's and the key's rotary parts, both cache writes, then the absorbed attention above.
// q [B, H, nope + Dr] (q_b_proj output), kv_a [B, R + Dr] (kv_a_proj_with_mqa output), cos/sin [B, Dr/2].
torch::Tensor mla_decode_step_f32(torch::Tensor q, torch::Tensor kv_a, torch::Tensor kv_norm_weight, double eps,
                                  torch::Tensor cos, torch::Tensor sin, bool interleave, torch::Tensor kv_b,
                                  torch::Tensor ckv_cache, torch::Tensor kpe_cache, torch::Tensor slot_mapping,
                                  torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                  c10::optional<torch::Tensor> kv_b_scale) {
  check_f32(q, "q");
  check_f32(kv_a, "kv_a");
  check_f32(kv_norm_weight, "kv_norm_weight");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  const bool bf16_cache = ckv_cache.scalar_type() == torch::kBFloat16;
  if (bf16_cache) {
    check_bf16(ckv_cache, "ckv_cache");
    check_bf16(kpe_cache, "kpe_cache");
  } else {
    check_f32(ckv_cache, "ckv_cache");
    check_f32(kpe_cache, "kpe_cache");
  }
  const int64_t b_count = q.size(0), heads = q.size(1), rank = ckv_cache.size(2), dr = kpe_cache.size(2);
  const int64_t nope = q.size(2) - dr, half = dr / 2;
  TORCH_CHECK(kv_a.size(1) == rank + dr, "kv_a must be [B, R + Dr]");
  auto slots = slot_mapping.to(torch::kInt64).contiguous();
  const int64_t cache_rows = ckv_cache.size(0) * ckv_cache.size(1);
  for (int64_t b = 0; b < slots.numel(); ++b) {
    const int64_t at = slots.data_ptr<int64_t>()[b];
    TORCH_CHECK(at >= 0 && at < cache_rows, "slot_mapping[", b, "] = ", at, " is outside the cache's ", cache_rows,
                " rows");
  }
  auto q_nope = torch::empty({b_count, heads, nope}, q.options());
  auto q_pe = torch::empty({b_count, heads, dr}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = kv_a.data_ptr<float>(), *nw = kv_norm_weight.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  float *qn = q_nope.data_ptr<float>(), *qr = q_pe.data_ptr<float>();
  // out[:half] = x1 c - x2 s, out[half:] = x2 c + x1 s, with (x1, x2) the even/odd or first/second halves;
  // `out` is float32, or a bf16 cache row (rounded to nearest even, as torch writes one).
  auto rotate = [&](const float* x, const float* c, const float* s, auto* out) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = interleave ? x[2 * i] : x[i], x2 = interleave ? x[2 * i + 1] : x[half + i];
      expertmesh::store(out + i, x1 * c[i] - x2 * s[i]);
      expertmesh::store(out + half + i, x2 * c[i] + x1 * s[i]);
    }
  };
  auto step = [&](auto* ckv, auto* kpe) {
    for (int64_t b = 0; b < b_count; ++b) {
      const float* latent = kp + b * (rank + dr);
      const float inv = 1.f / std::sqrt(dot(latent, latent, rank) / rank + static_cast<float>(eps));
      auto* dst = ckv + slot[b] * rank;
      for (int64_t r = 0; r < rank; ++r) expertmesh::store(dst + r, nw[r] * (latent[r] * inv));
      rotate(latent + rank, cp + b * half, sp + b * half, kpe + slot[b] * dr);
      for (int64_t h = 0; h < heads; ++h) {
        const float* qh = qp + (b * heads + h) * (nope + dr);
        std::copy(qh, qh + nope, qn + (b * heads + h) * nope);
        rotate(qh + nope, cp + b * half, sp + b * half, qr + (b * heads + h) * dr);
      }
    }
  };
  if (bf16_cache) {
    step(reinterpret_cast<expertmesh::Bf16*>(ckv_cache.data_ptr<at::BFloat16>()),
         reinterpret_cast<expertmesh::Bf16*>(kpe_cache.data_ptr<at::BFloat16>()));
  } else {
    step(ckv_cache.data_ptr<float>(), kpe_cache.data_ptr<float>());
  }
  return mla_decode_absorbed_f32(q_nope, q_pe, kv_b, ckv_cache, kpe_cache, block_tables, context_lens, scale,
                                 kv_b_scale);
}
