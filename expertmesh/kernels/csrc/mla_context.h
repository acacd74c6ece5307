// The context part of MLA's absorbed decode on AVX-512, for every head of every sequence in a batch:
//   s[t, h] = scale * (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t]),  p = softmax_t(s),  o_lat[h] = sum_t p[t, h] c_kv[t]
//
// The row-dot form (decode_ops.cpp) summed each (row, head) dot product across a register's lanes, and its
// weighted sum loaded and stored every head's accumulators for every context row: at batch 32 it ran at ~0.5 FMA
// a cycle of the two a core issues. Here no pass sums across lanes or keeps accumulators in memory:
// - scores put up to 16 heads in the lanes: each cache element is broadcast into one FMA that serves them all;
// - the softmax runs over those heads at once, with a vector exp;
// - the weighted sum puts the latent's columns in the lanes and broadcasts each weight, so a loaded row piece
//   serves four heads.
// A context is read once, block by block, with an online softmax (a block's rows are still in L1 for the second
// use), and a batch of few sequences cuts each context into pieces that are merged after, as flash-decoding does,
// so both cores work at batch 1. On the Intel reference machine, batch 32 at 290 context rows: 2.2 -> 0.9 ms a
// layer (bench/RESULTS.md).
//
// decode_ops.cpp calls it through `attend_in_lanes` (at the end), which takes 8 heads or more: fewer leave most
// lanes idle, and the row-dot form serves those.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "flash_merge.h"
#include "rows_dot.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace expertmesh {

constexpr int64_t kHeadLanes = 16;  // heads a register holds
constexpr int64_t kLaneMinHeads = 8;  // fewer heads than this take the row-dot form

// Buffers one thread reuses from item to item.
struct HeadLaneScratch {
  std::vector<float> q, q_rope;  // [rank, 16], [dr, 16]: the group's queries, scaled, heads in lanes
  std::vector<float> scores;     // [block, 16]: one block's scores, then their exps
  std::vector<float> ckv, kpe;   // one cache block's rows widened to float32 (bf16 caches)
};

// `n` cache rows of `width` starting at row `base`, as float32: in place for a float32 cache, widened into `buf`
// for a bf16 one.
inline const float* float_rows(const float* cache, int64_t base, int64_t n, int64_t width, std::vector<float>&) {
  return cache + base * width;
}
inline const float* float_rows(const Bf16* cache, int64_t base, int64_t n, int64_t width, std::vector<float>& buf) {
  const int64_t count = n * width, vec = count / 16 * 16;
  buf.resize(count);
  const Bf16* src = cache + base * width;
  for (int64_t i = 0; i < vec; i += 16) _mm512_storeu_ps(buf.data() + i, load16(src + i));
  for (int64_t i = vec; i < count; ++i) buf[i] = widen(src[i]);
  return buf.data();
}

// scores[j] (16 lanes) = q . c[j] + q_rope . k[j] for R rows; `top` keeps the lanes' running maximum.
template <int64_t R>
inline void score_rows(const float* c, int64_t rank, const float* k, int64_t dr, const float* q, const float* q_rope,
                       float* scores, __m512& top) {
  __m512 acc[R];
  for (int64_t j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rank; ++r) {
    const __m512 qv = _mm512_loadu_ps(q + r * kHeadLanes);
    for (int64_t j = 0; j < R; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(c[j * rank + r]), qv, acc[j]);
  }
  for (int64_t d = 0; d < dr; ++d) {
    const __m512 qv = _mm512_loadu_ps(q_rope + d * kHeadLanes);
    for (int64_t j = 0; j < R; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(k[j * dr + d]), qv, acc[j]);
  }
  for (int64_t j = 0; j < R; ++j) {
    _mm512_storeu_ps(scores + j * kHeadLanes, acc[j]);
    top = _mm512_max_ps(top, acc[j]);
  }
}

// o[i, r0 + c] += sum over n rows t of p[t, h0 + i] * row_t[r0 + c], for H heads and V * 16 columns (the last
// vector's columns limited by `tail`): the rows' columns in the lanes, each weight broadcast, so every loaded
// row piece serves H heads (8 loads for 16 FMAs at H = V = 4).
template <int64_t H, int64_t V>
inline void weigh_rows(const float* c, int64_t rank, int64_t r0, const float* p, int64_t h0, int64_t n, float* o,
                       __mmask16 tail) {
  __m512 acc[H][V];
  auto mask = [&](int64_t v) { return v == V - 1 ? tail : static_cast<__mmask16>(0xffff); };
  for (int64_t i = 0; i < H; ++i)
    for (int64_t v = 0; v < V; ++v) acc[i][v] = _mm512_maskz_loadu_ps(mask(v), o + i * rank + r0 + 16 * v);
  for (int64_t t = 0; t < n; ++t) {
    __m512 row[V];
    for (int64_t v = 0; v < V; ++v) row[v] = _mm512_maskz_loadu_ps(mask(v), c + t * rank + r0 + 16 * v);
    for (int64_t i = 0; i < H; ++i) {
      const __m512 pv = _mm512_set1_ps(p[t * kHeadLanes + h0 + i]);
      for (int64_t v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(pv, row[v], acc[i][v]);
    }
  }
  for (int64_t i = 0; i < H; ++i)
    for (int64_t v = 0; v < V; ++v) _mm512_mask_storeu_ps(o + i * rank + r0 + 16 * v, mask(v), acc[i][v]);
}

// weigh_rows over every column of H heads.
template <int64_t H>
inline void weigh_heads(const float* c, int64_t rank, const float* p, int64_t h0, int64_t n, float* o) {
  int64_t r0 = 0;
  for (; r0 + 64 <= rank; r0 += 64) weigh_rows<H, 4>(c, rank, r0, p, h0, n, o, 0xffff);
  for (; r0 + 16 <= rank; r0 += 16) weigh_rows<H, 1>(c, rank, r0, p, h0, n, o, 0xffff);
  if (r0 < rank) weigh_rows<H, 1>(c, rank, r0, p, h0, n, o, static_cast<__mmask16>((1u << (rank - r0)) - 1));
}

// One piece of the attention of heads q_lat [hn, rank] and q_pe [hn, dr] (hn <= 16) of one sequence: its context
// rows t_begin .. t_end - 1 (t_begin a multiple of `block`), which lie in the paged caches `ckv` [*, rank] and
// `kpe` [*, dr] at the blocks of `table`. Adds sum_t exp(s[t] - top) c_kv[t] into `o` [hn, rank] (zero on entry)
// and returns each head's `top` (max score) and `sum` (sum_t exp(s[t] - top)), for merge_pieces to combine and
// normalise. One pass over the rows, block by block (the online softmax of flash attention): a block's scores
// and its weighted sum read its rows while they are in L1, and a context is read from memory once.
template <typename T>
void attend_piece(const float* q_lat, const float* q_pe, int64_t hn, int64_t rank, int64_t dr, const T* ckv,
                  const T* kpe, const int32_t* table, int64_t block, int64_t t_begin, int64_t t_end, float scale,
                  float* o, float* top_out, float* sum_out, HeadLaneScratch& s) {
  constexpr int64_t L = kHeadLanes;
  s.q.assign(rank * L, 0.f);
  s.q_rope.assign(dr * L, 0.f);
  for (int64_t i = 0; i < hn; ++i) {
    for (int64_t r = 0; r < rank; ++r) s.q[r * L + i] = scale * q_lat[i * rank + r];
    for (int64_t d = 0; d < dr; ++d) s.q_rope[d * L + i] = scale * q_pe[i * dr + d];
  }
  s.scores.resize(block * L);
  float* p = s.scores.data();
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sum = _mm512_setzero_ps();
  for (int64_t t0 = t_begin; t0 < t_end; t0 += block) {
    const int64_t base = static_cast<int64_t>(table[t0 / block]) * block, n = std::min(block, t_end - t0);
    const float* c = float_rows(ckv, base, n, rank, s.ckv);
    const float* k = float_rows(kpe, base, n, dr, s.kpe);
    // Scores; 8 rows at a time keep 8 independent FMA chains in flight.
    __m512 block_top = top;
    auto score = [&](auto rows, int64_t j) {
      score_rows<decltype(rows)::value>(c + j * rank, rank, k + j * dr, dr, s.q.data(), s.q_rope.data(), p + j * L,
                                        block_top);
    };
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) score(Block<8>{}, j);
    for (; j < n; ++j) score(Block<1>{}, j);
    // A head whose maximum rose rescales what it summed so far.
    const __mmask16 rose = _mm512_cmp_ps_mask(block_top, top, _CMP_GT_OQ);
    if (rose != 0 && t0 != t_begin) {
      alignas(64) float factor[L];
      _mm512_store_ps(factor, exp16(_mm512_sub_ps(top, block_top)));
      sum = _mm512_mul_ps(sum, _mm512_load_ps(factor));
      for (int64_t i = 0; i < hn; ++i) {
        if (!((rose >> i) & 1)) continue;
        const __m512 f = _mm512_set1_ps(factor[i]);
        int64_t r = 0;
        float* row = o + i * rank;
        for (; r + 16 <= rank; r += 16) _mm512_storeu_ps(row + r, _mm512_mul_ps(f, _mm512_loadu_ps(row + r)));
        for (; r < rank; ++r) row[r] *= factor[i];
      }
    }
    top = block_top;
    for (int64_t t = 0; t < n; ++t) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + t * L), top));
      _mm512_storeu_ps(p + t * L, e);
      sum = _mm512_add_ps(sum, e);
    }
    // The weighted sum of the block's rows, four heads at a time.
    int64_t h = 0;
    for (; h + 4 <= hn; h += 4) weigh_heads<4>(c, rank, p, h, n, o + h * rank);
    switch (hn - h) {
      case 3: weigh_heads<3>(c, rank, p, h, n, o + h * rank); break;
      case 2: weigh_heads<2>(c, rank, p, h, n, o + h * rank); break;
      case 1: weigh_heads<1>(c, rank, p, h, n, o + h * rank); break;
      default: break;
    }
  }
  _mm512_storeu_ps(top_out, top);
  _mm512_storeu_ps(sum_out, sum);
}

// The context part for all B sequences and all heads: o_lat [B, H, rank] from q_lat [B, H, rank] and q_pe [B, H, dr].
// Work items are (sequence, group of at most 16 heads, piece of the context): with few sequences each context
// is cut into pieces so that every thread has work (a batch-1 step would otherwise leave a core idle or split its
// heads into groups too small for the lanes), and the pieces are merged after.
template <typename T>
void attend_head_lanes(const float* q_lat, const float* q_pe, int64_t b_count, int64_t heads, int64_t rank, int64_t dr,
                       const T* ckv, const T* kpe, const int32_t* tables, int64_t width, const int32_t* lens,
                       int64_t block, float scale, float* o_lat) {
  const int64_t groups = (heads + kHeadLanes - 1) / kHeadLanes, group = (heads + groups - 1) / groups;
  const int64_t wanted = 2 * at::get_num_threads();
  const int64_t pieces = std::max<int64_t>(1, (wanted + b_count * groups - 1) / (b_count * groups));
  if (pieces == 1) {  // whole contexts: each item sums into its place in o_lat and normalises it there
    at::parallel_for(0, b_count * groups, 1, [&](int64_t begin, int64_t end) {
      HeadLaneScratch scratch;
      alignas(64) float top[kHeadLanes], sum[kHeadLanes];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / groups, h0 = item % groups * group, hn = std::min(heads, h0 + group) - h0;
        if (hn <= 0) continue;
        float* dst = o_lat + (b * heads + h0) * rank;
        std::fill(dst, dst + hn * rank, 0.f);
        if (lens[b] <= 0) continue;
        attend_piece(q_lat + (b * heads + h0) * rank, q_pe + (b * heads + h0) * dr, hn, rank, dr, ckv, kpe,
                     tables + b * width, block, 0, lens[b], scale, dst, top, sum, scratch);
        merge_pieces(dst, 0, top, sum, 0, 1, hn, rank, dst);
      }
    });
    return;
  }
  // Pieces of few contexts (fewer items than twice the threads, so these buffers are small), merged after.
  const int64_t items = b_count * groups * pieces;
  std::vector<float> part(items * group * rank, 0.f), tops(items * kHeadLanes), sums(items * kHeadLanes);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    HeadLaneScratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (groups * pieces), g = item / pieces % groups, k = item % pieces;
      const int64_t h0 = g * group, hn = std::min(heads, h0 + group) - h0, len = lens[b];
      const int64_t blocks = (len + block - 1) / block;
      const int64_t t_begin = blocks * k / pieces * block, t_end = std::min(len, blocks * (k + 1) / pieces * block);
      std::fill(&tops[item * kHeadLanes], &tops[(item + 1) * kHeadLanes], -std::numeric_limits<float>::infinity());
      std::fill(&sums[item * kHeadLanes], &sums[(item + 1) * kHeadLanes], 0.f);
      if (hn <= 0 || t_begin >= t_end) continue;
      attend_piece(q_lat + (b * heads + h0) * rank, q_pe + (b * heads + h0) * dr, hn, rank, dr, ckv, kpe,
                   tables + b * width, block, t_begin, t_end, scale, &part[item * group * rank],
                   &tops[item * kHeadLanes], &sums[item * kHeadLanes], scratch);
    }
  });
  at::parallel_for(0, b_count * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / groups, h0 = bg % groups * group, hn = std::min(heads, h0 + group) - h0;
      float* dst = o_lat + (b * heads + h0) * rank;
      if (hn <= 0) continue;
      if (lens[b] <= 0) {
        std::fill(dst, dst + hn * rank, 0.f);
        continue;
      }
      const int64_t first = bg * pieces;
      merge_pieces(&part[first * group * rank], group * rank, &tops[first * kHeadLanes], &sums[first * kHeadLanes],
                   kHeadLanes, pieces, hn, rank, dst);
    }
  });
}

}  // namespace expertmesh

#endif  // __AVX512F__

namespace expertmesh {

// The context pass with the heads in lanes, where this build has AVX-512 and there are kLaneMinHeads heads or more:
// true when it ran, false when the caller's row-dot form is to serve this call.
template <typename T>
bool attend_in_lanes(const float* q_lat, const float* q_pe, int64_t b_count, int64_t heads, int64_t rank, int64_t dr,
                     const T* ckv, const T* kpe, const int32_t* tables, int64_t width, const int32_t* lens,
                     int64_t block, float scale, float* o_lat) {
#if defined(__AVX512F__)
  if (heads >= kLaneMinHeads) {
    attend_head_lanes(q_lat, q_pe, b_count, heads, rank, dr, ckv, kpe, tables, width, lens, block, scale, o_lat);
    return true;
  }
#endif
  return false;
}

}  // namespace expertmesh
