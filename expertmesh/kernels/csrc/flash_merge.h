// Merging a softmax attention split over pieces of a context, as flash-decoding merges its splits: each piece
// kept its unnormalised sum o = sum_t exp(s[t] - top) v[t], its maximum score `top` and its denominator
// `sum` = sum_t exp(s[t] - top), per head. The MLA and GQA decode kernels both cut short batches' contexts so
// that every thread has work, and both merge here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace expertmesh {

// out [heads, width] = for each head, the pieces' sums rescaled from their own maxima to the overall one, over
// the total denominator. Piece k's head h: o[k * o_stride + h * width ...], top and sum[k * top_stride + h]. A
// piece with no rows (sum 0) weighs nothing; a head no piece saw gets zeros. With one piece, `out` may be `o`
// itself: each element is read before it is written.
inline void merge_pieces(const float* o, int64_t o_stride, const float* top, const float* sum, int64_t top_stride,
                         int64_t pieces, int64_t heads, int64_t width, float* out) {
  std::vector<float> w(pieces);
  for (int64_t h = 0; h < heads; ++h) {
    float m = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (int64_t k = 0; k < pieces; ++k) m = std::max(m, top[k * top_stride + h]);
    for (int64_t k = 0; k < pieces; ++k) {
      const float s = sum[k * top_stride + h];
      w[k] = s == 0.f ? 0.f : std::exp(top[k * top_stride + h] - m);
      total += w[k] * s;
    }
    float* dst = out + h * width;
    for (int64_t i = 0; i < width; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < pieces; ++k) acc += w[k] * o[k * o_stride + h * width + i];
      dst[i] = total > 0.f ? acc / total : 0.f;
    }
  }
}

}  // namespace expertmesh
