// int8 weights against int8-quantised activations (`quantization="w8a8"`): the activations are quantised as
// llama.cpp's Q8_0 quantises them, in blocks of 32 with one float32 scale each (d = amax / 127, q = round(x / d),
// ties to even), and each dot product sums the integer products of a block exactly before scaling it.
//
// Why: widening int8 weights to float32 costs three instructions per 16 weights (sign-extend, convert, FMA),
// which caps a core below the memory bandwidth it could stream at. `vpdpbusd` multiplies 64 weight bytes by 64
// activation bytes and sums them in fours in one instruction. It takes unsigned activations, so the
// activations are held as |q| and a bit mask of their signs, and the signs move onto the weights (a masked
// 0 - w; weights lie in [-127, 127], so the negation cannot overflow).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "rows_dot.h"

namespace expertmesh {

constexpr int64_t kQ8Block = 32;  // activations per scale
constexpr int64_t kQ8Step = 64;   // activations per vpdpbusd: two blocks

// m rows of k quantised activations (k a multiple of 32), laid out for the 64-wide steps.
struct Q8Rows {
  std::vector<uint8_t> mag;     // [m, steps * 64]: |q|, zero past k
  std::vector<uint64_t> neg;    // [m, steps]: bit i set where q[64 s + i] < 0
  std::vector<float> scales;    // [m, steps, 16]: lanes 0-7 carry block 2s's d, lanes 8-15 block 2s+1's
  int64_t k = 0, steps = 0;

  Q8Rows(const float* x, int64_t m, int64_t k_, int64_t x_stride) : k(k_), steps((k_ + kQ8Step - 1) / kQ8Step) {
    mag.assign(m * steps * kQ8Step, 0);
    neg.assign(m * steps, 0);
    scales.assign(m * steps * 16, 0.f);
    for (int64_t t = 0; t < m; ++t) {
      for (int64_t b = 0; b < k / kQ8Block; ++b) {
        quantize_block(x + t * x_stride + b * kQ8Block, t * steps + b / 2, b % 2);
      }
    }
  }

 private:
  // Block `half` (0 or 1) of 64-wide step `at`: d spread over its 8 lanes, |q| and the signs.
  void quantize_block(const float* xb, int64_t at, int64_t half) {
    uint8_t* mag_out = mag.data() + at * kQ8Step + half * kQ8Block;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float d = amax / 127.f;
    for (int64_t l = 0; l < 8; ++l) scales[at * 16 + half * 8 + l] = d;
    if (d == 0.f) return;
    const __m512 dv = _mm512_set1_ps(d);
    // x / d rounded to nearest even (the default rounding mode), as torch.round and std::nearbyint round
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_div_ps(x0, dv)), q1 = _mm512_cvtps_epi32(_mm512_div_ps(x1, dv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(mag_out), _mm512_cvtepi32_epi8(_mm512_abs_epi32(q0)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(mag_out + 16), _mm512_cvtepi32_epi8(_mm512_abs_epi32(q1)));
    const uint64_t signs = static_cast<uint64_t>(_mm512_movepi32_mask(q0)) |
                           static_cast<uint64_t>(_mm512_movepi32_mask(q1)) << 16;
    neg[at] |= signs << (half * kQ8Block);
#else
    float amax = 0.f;
    for (int64_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    for (int64_t l = 0; l < 8; ++l) scales[at * 16 + half * 8 + l] = d;
    if (d == 0.f) return;
    for (int64_t i = 0; i < kQ8Block; ++i) {
      const float q = std::nearbyint(xb[i] / d);
      mag_out[i] = static_cast<uint8_t>(std::fabs(q));
      if (q < 0) neg[at] |= uint64_t{1} << (half * kQ8Block + i);
    }
#endif
  }
};

// out[t * out_stride + r] = scale[r] * sum over blocks of d[t, block] * sum(w[r, i] * q[t, i]), for RB rows and
// TB tokens starting at token `t0` of `x`.
template <int64_t RB, int64_t TB>
inline void q8_dot_block(const int8_t* w, const float* scale, const Q8Rows& x, int64_t t0, float* out,
                         int64_t out_stride) {
  const int64_t k = x.k;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[RB][TB];
  for (int64_t b = 0; b < RB; ++b)
    for (int64_t t = 0; t < TB; ++t) acc[b][t] = _mm512_setzero_ps();
  const int64_t ahead = std::max<int64_t>(RB, kPrefetchBytes / k);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t s = 0; s < x.steps; ++s) {
    const int64_t i = s * kQ8Step;
    // the last step of a k that is an odd number of blocks holds 32 activations: load 32 weight bytes
    const __mmask64 live = i + kQ8Step <= k ? ~__mmask64{0} : (__mmask64{1} << (k - i)) - 1;
    __m512i wv[RB];
    for (int64_t b = 0; b < RB; ++b) {
      __builtin_prefetch(w + (ahead + b) * k + i, 0, 1);
      wv[b] = _mm512_maskz_loadu_epi8(live, w + b * k + i);
    }
    for (int64_t t = 0; t < TB; ++t) {
      const int64_t at = (t0 + t) * x.steps + s;
      const __m512i mag = _mm512_loadu_si512(x.mag.data() + at * kQ8Step);
      const __mmask64 neg = x.neg[at];
      const __m512 d = _mm512_loadu_ps(x.scales.data() + at * 16);
      for (int64_t b = 0; b < RB; ++b) {
        const __m512i signed_w = _mm512_mask_sub_epi8(wv[b], neg, zero, wv[b]);
        const __m512i sums = _mm512_dpbusd_epi32(zero, mag, signed_w);
        acc[b][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, acc[b][t]);
      }
    }
  }
  for (int64_t b = 0; b < RB; ++b)
    for (int64_t t = 0; t < TB; ++t) out[t * out_stride + b] = _mm512_reduce_add_ps(acc[b][t]) * scale[b];
#else  // the same sums, one block at a time
  for (int64_t b = 0; b < RB; ++b) {
    for (int64_t t = 0; t < TB; ++t) {
      float acc = 0.f;
      for (int64_t blk = 0; blk < k / kQ8Block; ++blk) {
        const int64_t s = blk / 2, at = (t0 + t) * x.steps + s;
        int32_t sum = 0;
        for (int64_t i = 0; i < kQ8Block; ++i) {
          const int64_t pos = (blk % 2) * kQ8Block + i;
          const int32_t q = x.mag[at * kQ8Step + pos], sign = (x.neg[at] >> pos) & 1 ? -1 : 1;
          sum += sign * q * w[b * k + blk * kQ8Block + i];
        }
        acc += static_cast<float>(sum) * x.scales[at * 16 + (blk % 2) * 8];
      }
      out[t * out_stride + b] = acc * scale[b];
    }
  }
#endif
}

// rows_dot's contract for int8 weight rows [rows, x.k] against tokens t0 .. t0 + m - 1 of `x`.
inline void rows_dot(const int8_t* w, int64_t rows, const Q8Rows& x, int64_t t0, int64_t m, float* out,
                     int64_t out_stride, const float* scale) {
  for_blocks(rows, m, [&](auto rb, auto tb, int64_t r, int64_t t) {
    q8_dot_block<decltype(rb)::value, decltype(tb)::value>(w + r * x.k, scale + r, x, t0 + t,
                                                           out + t * out_stride + r, out_stride);
  });
}

}  // namespace expertmesh
