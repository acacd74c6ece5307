// out[t * out_stride + r] = dot(w[r], x[t]) for float32 weights and 16 to 64 activation rows, with the tokens in
// a register's lanes.
//
// rows_dot (rows_dot.h) puts k in the lanes: every (row, token) pair ends in a sum across a register's lanes, and
// each 16-lane step loads a piece of every token's activations again. From 16 rows up a decode linear is bound
// by that arithmetic, not by its weights (the machine streams them faster than it computes): on the Intel
// reference machine rows_dot, oneDNN and MKL all ran at ~150 GFLOP/s at 32 rows. Here the activations are
// transposed once per call (xt [k, mp], mp = m rounded up to 16, the lanes past m zero); for each k, each weight
// of a block of rows is broadcast into one FMA with 16 tokens' activations. No sum crosses lanes, and a block's
// accumulators stay in registers for the whole row: on the same machine 280-300 GFLOP/s over weights in the
// cache, 180-230 over weights streamed from memory (oneDNN and MKL: 130-170).
//
// Each output is w[r] . x[t] summed in order of k, whatever the thread split.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rows_dot.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace expertmesh {

constexpr int64_t kLanesMinRows = 16;  // fewer tokens leave lanes idle: rows_dot serves those
constexpr int64_t kLanesMaxRows = 64;  // the accumulators of 4 token vectors per weight row fill the registers

// x [m, k] (row stride x_stride) transposed into xt [k, mp], the lanes past m zero.
inline std::vector<float> transpose_tokens(const float* x, int64_t x_stride, int64_t m, int64_t k) {
  const int64_t mp = (m + kLanes - 1) / kLanes * kLanes;
  std::vector<float> xt(k * mp, 0.f);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t t = 0; t < m; ++t) xt[i * mp + t] = x[t * x_stride + i];
  return xt;
}

#if defined(__AVX512F__)
// Rows r .. r + R - 1 of w [*, k] against V vectors of 16 tokens, written to out for the m tokens there are.
template <int64_t R, int64_t V>
inline void lanes_block(const float* w, int64_t k, const float* xt, int64_t mp, int64_t m, float* out,
                        int64_t out_stride) {
  __m512 acc[R][V];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    if (i % kLanes == 0)  // one cache line of each of the next block's rows, a block ahead
      for (int64_t r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * k + i, 0, 1);
    __m512 xv[V];
    for (int64_t v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xt + i * mp + kLanes * v);
    for (int64_t r = 0; r < R; ++r) {
      const __m512 wv = _mm512_set1_ps(w[r * k + i]);
      for (int64_t v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
    }
  }
  alignas(64) float lanes[kLanes];
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < V; ++v) {
      _mm512_store_ps(lanes, acc[r][v]);
      const int64_t t0 = kLanes * v, tn = std::min(kLanes, m - t0);
      for (int64_t l = 0; l < tn; ++l) out[(t0 + l) * out_stride + r] = lanes[l];
    }
  }
}

// Every row of w [rows, k]: blocks of R rows x V token vectors (24 accumulators; 8 rows for one vector, where 24
// rows of broadcasts ran slower than rows_dot), then single rows.
template <int64_t V>
inline void lanes_rows(const float* w, int64_t rows, int64_t k, const float* xt, int64_t mp, int64_t m, float* out,
                       int64_t out_stride) {
  constexpr int64_t R = V == 1 ? 8 : 24 / V;
  int64_t r = 0;
  for (; r + R <= rows; r += R) lanes_block<R, V>(w + r * k, k, xt, mp, m, out + r, out_stride);
  for (; r < rows; ++r) lanes_block<1, V>(w + r * k, k, xt, mp, m, out + r, out_stride);
}
#endif

// out[t * out_stride + r] = dot(w[r], x[t]) for r < rows, t < m (kLanesMinRows <= m <= kLanesMaxRows under
// AVX-512; anything else goes to rows_dot, with x itself), from xt = transpose_tokens(x, ...).
inline void tokens_in_lanes(const float* w, int64_t rows, int64_t k, const float* x, int64_t x_stride,
                            const float* xt, int64_t m, float* out, int64_t out_stride) {
#if defined(__AVX512F__)
  const int64_t mp = (m + kLanes - 1) / kLanes * kLanes;
  switch (mp / kLanes) {
    case 1: return lanes_rows<1>(w, rows, k, xt, mp, m, out, out_stride);
    case 2: return lanes_rows<2>(w, rows, k, xt, mp, m, out, out_stride);
    case 3: return lanes_rows<3>(w, rows, k, xt, mp, m, out, out_stride);
    case 4: return lanes_rows<4>(w, rows, k, xt, mp, m, out, out_stride);
    default: break;
  }
#endif
  (void)xt;
  rows_dot(w, rows, k, x, x_stride, m, out, out_stride);
}

// Whether tokens_in_lanes takes the lanes for m activation rows in this build.
inline bool lanes_for(int64_t m) {
#if defined(__AVX512F__)
  return m >= kLanesMinRows && m <= kLanesMaxRows;
#else
  (void)m;
  return false;
#endif
}

}  // namespace expertmesh
