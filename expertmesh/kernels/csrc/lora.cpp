// LoRA shrink and expand for linear layers whose rows each pick an adapter: the contract of kernels/lora.py's
// `lora_shrink_ref` / `lora_expand_ref` in float32. A decode step's rows (32 at most) cost microseconds here,
// where a torch formulation pays per adapter slot (a loop) or copies every row's A (a gather).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "lora_rows.h"

using expertmesh::check_rows;
using expertmesh::lora_a;
using expertmesh::lora_b;

namespace {

const int64_t* rows_of(const torch::Tensor& rows, int64_t count, int64_t n) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kInt64 && rows.is_contiguous() &&
                  rows.dim() == 1 && rows.size(0) == count,
              "rows must be a contiguous CPU int64 [T] tensor");
  const int64_t* p = rows.data_ptr<int64_t>();
  check_rows(p, count, n);
  return p;
}

}  // namespace

// h [T, r] = A[rows[t]] x[t], zeros where rows[t] = -1. x [T, in] contiguous.
torch::Tensor lora_shrink_f32(torch::Tensor x, torch::Tensor a, torch::Tensor rows) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous float32 [T, in]");
  const auto stack = lora_a(a);
  TORCH_CHECK(stack.in == x.size(1), "x and A disagree on in_features");
  const int64_t count = x.size(0);
  const int64_t* r = rows_of(rows, count, a.size(0));
  auto h = torch::zeros({count, stack.rank}, x.options());
  const float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, stack.rank * stack.in));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      if (r[t] >= 0) expertmesh::shrink_row(stack, r[t], xp + t * stack.in, hp + t * stack.rank);
  });
  return h;
}

// y[t] += B[rows[t]] h[t] in place where rows[t] >= 0; returns y. y [T, out] with unit last stride, h [T, r]
// contiguous, B [N, out, r] any strides.
torch::Tensor lora_expand_f32(torch::Tensor y, torch::Tensor h, torch::Tensor b, torch::Tensor rows) {
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.dim() == 2 && y.stride(1) == 1,
              "y must be float32 [T, out] with unit last stride");
  const auto stack = lora_b(b);
  TORCH_CHECK(stack.out == y.size(1), "y and B disagree on out_features");
  TORCH_CHECK(h.scalar_type() == torch::kFloat32 && h.is_contiguous() && h.dim() == 2 && h.size(0) == y.size(0) &&
                  h.size(1) == stack.rank,
              "h must be contiguous float32 [T, r]");
  const int64_t count = y.size(0), y_stride = y.stride(0);
  const int64_t* r = rows_of(rows, count, b.size(0));
  const float* hp = h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, stack.rank * stack.out));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      if (r[t] >= 0) expertmesh::expand_row(stack, r[t], hp + t * stack.rank, yp + t * y_stride);
  });
  return y;
}
