// out[t * out_stride + r] = dot(w[r], x[t]) (* scale[r]) for r < rows, t < m: the inner loop of every CPU decode
// kernel here. Weight rows are walked four at a time and tokens four at a time, so each 16-lane step
// issues 16 independent FMAs from 8 loads: enough independent work to hide FMA latency, few enough
// accumulators to stay in registers.
//
// Weights are float32, bfloat16 (`Bf16`: the raw bits), or int8 with one float32 scale per row (weight-only
// quantisation). Each weight widens to float32 in registers and the products accumulate in float32; an int8
// row's sum is scaled once at the end. Activations are float32 in every case.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace expertmesh {

struct Bf16 {
  uint16_t bits;
};

inline float widen(float w) { return w; }
inline float widen(int8_t w) { return static_cast<float>(w); }
inline float widen(Bf16 w) {  // bf16 is float32's upper half
  const uint32_t u = static_cast<uint32_t>(w.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int64_t kLanes = 16;
constexpr int64_t kRowBlock = 4;
constexpr int64_t kPrefetchBytes = 8192;
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;  // bf16 x bf16 products pair up in vdpbf16ps (see the bf16 dot_block below)
#else
constexpr bool kBf16Dot = false;
#endif

// float32 -> bf16, rounding to nearest even (torch's `.to(torch.bfloat16)`); NaN stays NaN.
inline Bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

inline void store(float* dst, float v) { *dst = v; }
inline void store(Bf16* dst, float v) { *dst = to_bf16(v); }

#if defined(__AVX512F__)
// 16 weights widened to float32 lanes: one load, plus a sign extension and convert (int8) or a shift (bf16).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const Bf16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// exp(x) for every lane, to ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' polynomial, then 2^n. Lanes
// below -87.3 give ~1e-38 instead of 0 (a context weight that small is lost in the softmax's sum anyway); NaN
// stays NaN (max() returns its second operand when either is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.3365f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: n * hi is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// The same contract as the portable version below, written in AVX-512: the compiler's vectorisation of the
// portable loop re-widened int8 weights per token and spilled accumulators (int8 rows streamed at ~13 GB/s
// from cache, float32 ones at ~60).
template <int64_t RB, int64_t TB, typename W>
inline void dot_block(const W* w, const float* scale, int64_t k, const float* x, int64_t x_stride, float* out,
                      int64_t out_stride) {
  __m512 acc[RB][TB];
  for (int64_t b = 0; b < RB; ++b)
    for (int64_t t = 0; t < TB; ++t) acc[b][t] = _mm512_setzero_ps();
  const int64_t k_vec = k / kLanes * kLanes;
  // Rows this far ahead are pulled toward L2 while this block is consumed (at least the next block): short
  // int8 or bf16 rows would otherwise be prefetched too close to hide DRAM's latency.
  const int64_t ahead = std::max<int64_t>(RB, kPrefetchBytes / static_cast<int64_t>(k * sizeof(W)));
  constexpr int64_t kLine = 64 / sizeof(W) < kLanes ? kLanes : 64 / sizeof(W);  // elements per cache line (>= 16)
  for (int64_t i = 0; i < k_vec; i += kLanes) {
    if (i % kLine == 0)
      for (int64_t b = 0; b < RB; ++b) __builtin_prefetch(w + (ahead + b) * k + i, 0, 1);
    __m512 wv[RB];
    for (int64_t b = 0; b < RB; ++b) wv[b] = load16(w + b * k + i);
    for (int64_t t = 0; t < TB; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * x_stride + i);
      for (int64_t b = 0; b < RB; ++b) acc[b][t] = _mm512_fmadd_ps(wv[b], xv, acc[b][t]);
    }
  }
  for (int64_t b = 0; b < RB; ++b) {
    for (int64_t t = 0; t < TB; ++t) {
      float s = _mm512_reduce_add_ps(acc[b][t]);
      for (int64_t i = k_vec; i < k; ++i) s += widen(w[b * k + i]) * x[t * x_stride + i];
      out[t * out_stride + b] = scale == nullptr ? s : s * scale[b];
    }
  }
}
#else
template <int64_t RB, int64_t TB, typename W>
inline void dot_block(const W* w, const float* scale, int64_t k, const float* x, int64_t x_stride, float* out,
                      int64_t out_stride) {
  float acc[RB][TB][kLanes] = {};
  const int64_t k_vec = k / kLanes * kLanes;
  for (int64_t i = 0; i < k_vec; i += kLanes) {
    // Pull the next row block toward L2 while this one is consumed: the streams of one work item are
    // short enough that the hardware prefetchers otherwise lose time ramping up at each block.
    for (int64_t b = 0; b < RB; ++b) __builtin_prefetch(w + (RB + b) * k + i, 0, 1);
    float wv[RB][kLanes];  // the block's weights widened once, then used for every token
    for (int64_t b = 0; b < RB; ++b) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) wv[b][j] = widen(w[b * k + i + j]);
    }
    for (int64_t b = 0; b < RB; ++b) {
      for (int64_t t = 0; t < TB; ++t) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) acc[b][t][j] += wv[b][j] * x[t * x_stride + i + j];
      }
    }
  }
  for (int64_t b = 0; b < RB; ++b) {
    for (int64_t t = 0; t < TB; ++t) {
      float s = 0.f;
      for (int64_t j = 0; j < kLanes; ++j) s += acc[b][t][j];
      for (int64_t i = k_vec; i < k; ++i) s += widen(w[b * k + i]) * x[t * x_stride + i];
      out[t * out_stride + b] = scale == nullptr ? s : s * scale[b];
    }
  }
}

#endif  // __AVX512F__

// bf16 weights against bf16 activations (a bf16 model's decode): every product of two bf16 values is exact in
// float32, so summing them in float32 gives what widening both would. With AVX512-BF16 one `vdpbf16ps` does 32
// of them, with no widening of the weights.
template <int64_t RB, int64_t TB>
inline void dot_block(const Bf16* w, const float* scale, int64_t k, const Bf16* x, int64_t x_stride, float* out,
                      int64_t out_stride) {
#if defined(__AVX512BF16__)
  constexpr int64_t kPair = 32;  // bf16 lanes of one 512-bit register
  __m512 acc[RB][TB];
  for (int64_t b = 0; b < RB; ++b)
    for (int64_t t = 0; t < TB; ++t) acc[b][t] = _mm512_setzero_ps();
  const int64_t k_vec = k / kPair * kPair;
  const int64_t ahead = std::max<int64_t>(RB, kPrefetchBytes / static_cast<int64_t>(k * sizeof(Bf16)));
  for (int64_t i = 0; i < k_vec; i += kPair) {
    for (int64_t b = 0; b < RB; ++b) __builtin_prefetch(w + (ahead + b) * k + i, 0, 1);  // one line a row
    __m512bh wv[RB];
    for (int64_t b = 0; b < RB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + b * k + i);
    for (int64_t t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * x_stride + i);
      for (int64_t b = 0; b < RB; ++b) acc[b][t] = _mm512_dpbf16_ps(acc[b][t], wv[b], xv);
    }
  }
  for (int64_t b = 0; b < RB; ++b) {
    for (int64_t t = 0; t < TB; ++t) {
      float s = _mm512_reduce_add_ps(acc[b][t]);
      for (int64_t i = k_vec; i < k; ++i) s += widen(w[b * k + i]) * widen(x[t * x_stride + i]);
      out[t * out_stride + b] = scale == nullptr ? s : s * scale[b];
    }
  }
#else  // correct anywhere; linear_small_m sends bf16 activations here only where kBf16Dot holds
  for (int64_t b = 0; b < RB; ++b) {
    for (int64_t t = 0; t < TB; ++t) {
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += widen(w[b * k + i]) * widen(x[t * x_stride + i]);
      out[t * out_stride + b] = scale == nullptr ? s : s * scale[b];
    }
  }
#endif
}

template <int64_t N>
using Block = std::integral_constant<int64_t, N>;

// The register blocks a (rows x tokens) dot product is walked in: `block(Block<RB>{}, Block<TB>{}, r, t)` for
// rows r .. r + RB - 1 and tokens t .. t + TB - 1; rows kRowBlock at a time then one by one, tokens four at a
// time then the 3, 2 or 1 left.
template <typename F>
inline void for_blocks(int64_t rows, int64_t m, F&& block) {
  auto tokens = [&](auto rb, int64_t r) {
    int64_t t = 0;
    for (; t + 4 <= m; t += 4) block(rb, Block<4>{}, r, t);
    switch (m - t) {
      case 3: block(rb, Block<3>{}, r, t); break;
      case 2: block(rb, Block<2>{}, r, t); break;
      case 1: block(rb, Block<1>{}, r, t); break;
      default: break;
    }
  };
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) tokens(Block<kRowBlock>{}, r);
  for (; r < rows; ++r) tokens(Block<1>{}, r);
}

// `scale`: one per weight row (int8 weights), or nullptr (float32 weights). Activations `x` are float32, or bf16
// against bf16 weights.
template <typename W, typename X>
inline void rows_dot(const W* w, int64_t rows, int64_t k, const X* x, int64_t x_stride, int64_t m, float* out,
                     int64_t out_stride, const float* scale = nullptr) {
  for_blocks(rows, m, [&](auto rb, auto tb, int64_t r, int64_t t) {
    dot_block<decltype(rb)::value, decltype(tb)::value>(w + r * k, scale == nullptr ? nullptr : scale + r, k,
                                                        x + t * x_stride, x_stride, out + t * out_stride + r,
                                                        out_stride);
  });
}

// x[j] <- exp(x[j] - m) for j < n, returning their sum: a softmax's numerators against its running maximum `m`
// (vector exp16 on AVX-512).
inline float exp_shifted_sum(float* x, int64_t n, float m) {
  float total = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; j < n; j += kLanes) {
    const __mmask16 lanes = n - j >= kLanes ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + j), mv));
    _mm512_mask_storeu_ps(x + j, lanes, e);
    acc = _mm512_mask_add_ps(acc, lanes, acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    total += x[j];
  }
  return total;
}

}  // namespace expertmesh
