// Grouped-query decode attention over the paged K/V cache (Mixtral, Qwen-MoE, OLMoE), read in place:
//   s[h, t] = scale * q[h] . k[t, g(h)],  p = softmax_t(s),  o[h] = sum_t p[h, t] v[t, g(h)],  g(h) = h / rep
// for the keys a decode query sees: its whole context, or the last `window` positions of it (sliding window).
//
// The torch path gathered every sequence's whole context into a padded copy, every layer of every step, and ran
// batched matmuls on strided views of it: ~0.7-4 GB/s of cache read on the reference machine. Here each work item,
// (sequence, piece of the context), walks its rows once through the block table with an online softmax, every head
// at once:
// - a row's keys for all KV heads are one contiguous read (one KV head's slice of each row, item by item, left the
//   hardware prefetchers a new page at every row: ~4 GB/s from DRAM);
// - each key and value serves the `rep` query heads that share it;
// - a batch of few sequences cuts each context into pieces so that every thread has work, and the pieces are
//   merged after, as flash-decoding merges its splits.
// Caches float32 or bf16 (widened in registers); queries, sums and output float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "flash_merge.h"
#include "ops.h"

// The loops below are written for the compiler to vectorise; on AVX-512 machines it otherwise picks 256-bit
// vectors for them (GCC's tuning for Intel cores).
#pragma GCC target("prefer-vector-width=512")

namespace {

using expertmesh::widen;

constexpr int64_t kRowsPerPass = 32;  // context rows scored together before their values are summed
constexpr int64_t kMinPieceRows = 64;  // a context is not cut into pieces shorter than this

// a . b over n floats. The compiler's own reduction of this loop summed the lanes one scalar add at a time, through
// memory: a quarter of the kernel's time.
inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One (sequence, rows [t_begin, t_end)) item over every head: o [H, dv] the unnormalised sums, top [H] the running
// maxima, sum [H] the softmax denominators, relative to top. `q` [H, d] already scaled; head h reads KV head h / rep.
// A row's keys (and then its values) for all KV heads lie together in the cache, so each row is one contiguous read.
template <typename T>
void attend_rows(const float* q, int64_t heads, int64_t kv_heads, int64_t d, int64_t dv, const T* k_cache,
                 const T* v_cache, const int32_t* table, int64_t block, int64_t t_begin, int64_t t_end, float* o,
                 float* top, float* sum) {
  const int64_t rep = heads / kv_heads, k_row = kv_heads * d, v_row = kv_heads * dv;
  std::fill(o, o + heads * dv, 0.f);
  std::fill(top, top + heads, -std::numeric_limits<float>::infinity());
  std::fill(sum, sum + heads, 0.f);
  std::vector<float> key(d), value(dv), s(heads * kRowsPerPass);
  std::vector<int64_t> slots(kRowsPerPass), next(kRowsPerPass);
  auto slots_from = [&](int64_t t0, std::vector<int64_t>& out) {
    for (int64_t j = 0; j < std::min(kRowsPerPass, t_end - t0); ++j)
      out[j] = static_cast<int64_t>(table[(t0 + j) / block]) * block + (t0 + j) % block;
  };
  // A cache row's lines asked for ahead of use: rows are read a few KB at a time from blocks scattered over the
  // cache, too little of each page for the hardware prefetchers to get going.
  auto prefetch = [](const T* row, int64_t elements) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < elements * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 1);
  };
  if (t_begin < t_end) slots_from(t_begin, next);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kRowsPerPass) {
    const int64_t n = std::min(kRowsPerPass, t_end - t0), n_next = std::min(kRowsPerPass, t_end - t0 - n);
    slots.swap(next);
    if (n_next > 0) slots_from(t0 + n, next);
    for (int64_t j = 0; j < n; ++j) {
      const T* kp = k_cache + slots[j] * k_row;
      if (j + 2 < n) prefetch(k_cache + slots[j + 2] * k_row, k_row);
      prefetch(v_cache + slots[j] * v_row, v_row);  // summed once this pass's scores are in
      for (int64_t g = 0; g < kv_heads; ++g) {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) key[i] = widen(kp[g * d + i]);
        for (int64_t r = 0; r < rep; ++r) {
          s[(g * rep + r) * kRowsPerPass + j] = dot(q + (g * rep + r) * d, key.data(), d);
        }
      }
    }
    // Online softmax: a head whose maximum rises rescales what it has summed.
    for (int64_t h = 0; h < heads; ++h) {
      float* sh = s.data() + h * kRowsPerPass;
      float m = top[h];
      for (int64_t j = 0; j < n; ++j) m = std::max(m, sh[j]);
      if (m > top[h]) {
        const float factor = std::exp(top[h] - m);  // 0 on the first rows (top -inf)
        sum[h] *= factor;
        float* oh = o + h * dv;
#pragma omp simd
        for (int64_t i = 0; i < dv; ++i) oh[i] *= factor;
        top[h] = m;
      }
      sum[h] += expertmesh::exp_shifted_sum(sh, n, m);
    }
    for (int64_t j = 0; j < n; ++j) {  // each value row read once for every query head of its group
      const T* vp = v_cache + slots[j] * v_row;
      if (j < n_next) prefetch(k_cache + next[j] * k_row, k_row);  // the next pass's keys
      for (int64_t g = 0; g < kv_heads; ++g) {
#pragma omp simd
        for (int64_t i = 0; i < dv; ++i) value[i] = widen(vp[g * dv + i]);
        for (int64_t r = 0; r < rep; ++r) {
          const int64_t h = g * rep + r;
          const float p = s[h * kRowsPerPass + j];
          float* oh = o + h * dv;
#pragma omp simd
          for (int64_t i = 0; i < dv; ++i) oh[i] += p * value[i];
        }
      }
    }
  }
}

template <typename T>
void gqa_decode(const float* q, int64_t b_count, int64_t heads, int64_t d, const T* k_cache, const T* v_cache,
                int64_t kv_heads, int64_t dv, const int32_t* tables, int64_t width, const int32_t* lens, int64_t block,
                float scale, int64_t window, float* out) {
  std::vector<int64_t> first(b_count), count(b_count);  // each sequence's visible rows
  int64_t longest = 0;
  for (int64_t b = 0; b < b_count; ++b) {
    first[b] = window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0;
    count[b] = std::max<int64_t>(0, lens[b] - first[b]);
    longest = std::max(longest, count[b]);
  }
  const int64_t wanted = 2 * at::get_num_threads();
  const int64_t pieces = std::clamp<int64_t>((wanted + b_count - 1) / b_count, 1,
                                             std::max<int64_t>(1, longest / kMinPieceRows));
  const int64_t items = b_count * pieces;
  std::vector<float> part(items * heads * dv), tops(items * heads), sums(items * heads);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(heads * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / pieces, k = item % pieces;
      const int64_t t_begin = first[b] + count[b] * k / pieces, t_end = first[b] + count[b] * (k + 1) / pieces;
      for (int64_t i = 0; i < heads * d; ++i) qs[i] = q[b * heads * d + i] * scale;
      attend_rows(qs.data(), heads, kv_heads, d, dv, k_cache, v_cache, tables + b * width, block, t_begin, t_end,
                  &part[item * heads * dv], &tops[item * heads], &sums[item * heads]);
    }
  });
  // Each sequence's pieces merged (flash_merge.h); a sequence with no visible rows gets zeros.
  at::parallel_for(0, b_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      expertmesh::merge_pieces(&part[b * pieces * heads * dv], heads * dv, &tops[b * pieces * heads],
                               &sums[b * pieces * heads], heads, pieces, heads, dv, out + b * heads * dv);
  });
}

}  // namespace

// q [B, H, D] float32; k_cache [blocks, block_size, KVH, D] and v_cache [blocks, block_size, KVH, Dv], both float32 or
// both bf16; block_tables [B, width] and context_lens [B] (any integer type); window <= 0: none. -> [B, H, Dv] float32.
torch::Tensor gqa_decode_f32(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                             torch::Tensor context_lens, double scale, int64_t window) {
  using expertmesh::check_bf16;
  using expertmesh::check_f32;
  check_f32(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3),
              "k_cache and v_cache must be [blocks, block_size, KVH, D] alike, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t b_count = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t blocks = k_cache.size(0), block = k_cache.size(1), kv_heads = k_cache.size(2), dv = v_cache.size(3);
  TORCH_CHECK(k_cache.size(3) == d, "k_cache's head size ", k_cache.size(3), " is not q's ", d);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "q's ", heads, " heads are not a multiple of the cache's ",
              kv_heads, " KV heads");
  auto tables = expertmesh::int32_index(block_tables, "block_tables");
  auto lens = expertmesh::int32_index(context_lens, "context_lens");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == b_count, "block_tables must be [B=", b_count, ", width], got ",
              tables.sizes());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == b_count, "context_lens must be [B=", b_count, "], got ", lens.sizes());
  const int32_t *tp = tables.data_ptr<int32_t>(), *lp = lens.data_ptr<int32_t>();
  expertmesh::check_block_tables(tp, lp, b_count, tables.size(1), block, blocks);
  auto out = torch::empty({b_count, heads, dv}, q.options());
  if (k_cache.scalar_type() == torch::kBFloat16) {
    check_bf16(k_cache, "k_cache");
    check_bf16(v_cache, "v_cache");
    gqa_decode(q.data_ptr<float>(), b_count, heads, d, expertmesh::bf16_ptr(k_cache), expertmesh::bf16_ptr(v_cache),
               kv_heads, dv, tp, tables.size(1), lp, block, static_cast<float>(scale), window,
               out.data_ptr<float>());
  } else {
    check_f32(k_cache, "k_cache");
    check_f32(v_cache, "v_cache");
    gqa_decode(q.data_ptr<float>(), b_count, heads, d, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), kv_heads,
               dv, tp, tables.size(1), lp, block, static_cast<float>(scale), window, out.data_ptr<float>());
  }
  return out;
}
