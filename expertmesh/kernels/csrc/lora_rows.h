// LoRA on rows that each pick an adapter (-1: none): shrink h = A[row] x, expand y += B[row] h. Shared by the
// linear layers' ops (lora.cpp) and the routed experts' hook in moe_small_m (small_m.cpp).
//
// At decode sizes every adapter matrix is a few tens of KB that stays in L1/L2 while a row uses it, so a row
// costs its FMAs, not memory. The expand runs fastest with B held as [N, r, out] (the model's adapters are
// stored so, handed over as a transposed [N, out, r] view): r contiguous axpy passes over the output row,
// where an [N, out, r] layout needs a horizontal sum of r products per output. Measured on one thread of the
// 2-core Xeon, 32 rows, 16 slots, r 8, out 1152: 11 us held [N, r, out], 84 us as [N, out, r].
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rows_dot.h"

namespace expertmesh {

// A stack of A [N, r, in], contiguous.
struct LoraA {
  const float* data;
  int64_t rank, in;
};

// A stack of B [N, out, r], any strides.
struct LoraB {
  const float* data;
  int64_t out, rank, stride_n, stride_out, stride_r;
};

inline LoraA lora_a(const torch::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == torch::kFloat32 && a.dim() == 3 && a.is_contiguous(),
              "LoRA A must be a contiguous CPU float32 [N, r, in] tensor");
  return {a.data_ptr<float>(), a.size(1), a.size(2)};
}

inline LoraB lora_b(const torch::Tensor& b) {
  TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == torch::kFloat32 && b.dim() == 3,
              "LoRA B must be a CPU float32 [N, out, r] tensor");
  return {b.data_ptr<float>(), b.size(1), b.size(2), b.stride(0), b.stride(1), b.stride(2)};
}

// Every row index in [-1, n): checked before a parallel region, whose workers must not throw.
inline void check_rows(const int64_t* rows, int64_t count, int64_t n) {
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(rows[i] >= -1 && rows[i] < n, "LoRA row ", rows[i], " outside [-1, ", n, ")");
}

// h[0:r] = A[row] x
inline void shrink_row(const LoraA& a, int64_t row, const float* x, float* h) {
  rows_dot(a.data + row * a.rank * a.in, a.rank, a.in, x, a.in, 1, h, a.rank);
}

// y[0:out] += B[row] h
inline void expand_row(const LoraB& b, int64_t row, const float* h, float* y) {
  const float* base = b.data + row * b.stride_n;
  if (b.stride_out == 1) {  // blocks of 64 outputs kept in registers across the r passes
    constexpr int64_t kBlock = 64;
    int64_t o0 = 0;
    for (; o0 + kBlock <= b.out; o0 += kBlock) {
      float acc[kBlock];
#pragma omp simd
      for (int64_t o = 0; o < kBlock; ++o) acc[o] = y[o0 + o];
      for (int64_t j = 0; j < b.rank; ++j) {
        const float hj = h[j];
        const float* col = base + j * b.stride_r + o0;
#pragma omp simd
        for (int64_t o = 0; o < kBlock; ++o) acc[o] += hj * col[o];
      }
#pragma omp simd
      for (int64_t o = 0; o < kBlock; ++o) y[o0 + o] = acc[o];
    }
    for (int64_t j = 0; j < b.rank; ++j) {
      const float hj = h[j];
      const float* col = base + j * b.stride_r;
      for (int64_t o = o0; o < b.out; ++o) y[o] += hj * col[o];
    }
    return;
  }
  for (int64_t o = 0; o < b.out; ++o) {
    const float* w = base + o * b.stride_out;
    float s = 0.f;
    for (int64_t j = 0; j < b.rank; ++j) s += w[j * b.stride_r] * h[j];
    y[o] += s;
  }
}

// For each i < count with rows[i] >= 0: y[i] += B[rows[i]] A[rows[i]] x[i], rows of x and y `x_stride` and
// `y_stride` apart. Parallel over rows.
inline void lora_rows(const LoraA& a, const LoraB& b, const int64_t* rows, int64_t count, const float* x,
                      int64_t x_stride, float* y, int64_t y_stride) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.rank * (a.in + b.out)));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(a.rank);
    for (int64_t i = begin; i < end; ++i) {
      if (rows[i] < 0) continue;
      shrink_row(a, rows[i], x + i * x_stride, h.data());
      expand_row(b, rows[i], h.data(), y + i * y_stride);
    }
  });
}

}  // namespace expertmesh
