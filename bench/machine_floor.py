"""This machine's floors for a decode step: read bandwidth measured the way a decode step reads, and the rates
of the dot products the kernels run.

- Read bandwidth: every core (OpenMP, one thread per core) sums its own contiguous share of a buffer far
  larger than the caches with 512-bit loads, 8 independent accumulators per thread, as the kernels' weight
  streams do; best of several passes. Also a torch `sum` over the same buffer (what `bench/RESULTS.md` once
  called the floor), and each at one thread.
- Compute: float32 FMA, bf16 dot (`vdpbf16ps`, where the CPU has AVX512-BF16) and int8 dot (`vpdpbusd`, where it
  has AVX512-VNNI) rates on registers and an L1-resident block, all cores.

The C++ is compiled here for this machine (`-march=native`), for the benchmark only.

    python bench/machine_floor.py [--json bench/machine_floor_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from engine_vs_hf import best_of  # bench/ is on sys.path when run as a script
from machine_info import machine

SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <chrono>

// Sum of a float32 buffer, each thread its own contiguous share, 8 accumulators of 16 lanes.
double stream_sum(torch::Tensor buf, int64_t threads) {
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel();
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = (n / nt) / 128 * 128, begin = t * per, end = (t == nt - 1) ? n / 128 * 128 : begin + per;
    __m512 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
    for (int64_t i = begin; i < end; i += 128) {
      for (int j = 0; j < 8; ++j) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(p + i + 16 * j));
    }
    __m512 s = a[0];
    for (int i = 1; i < 8; ++i) s = _mm512_add_ps(s, a[i]);
    total += _mm512_reduce_add_ps(s);
  }
  return total;
}

// Operations per second of `kind` (0: fp32 FMA, 2 flops a lane; 1: bf16 dot, 2 products a lane pair; 2: int8
// dot, 4 products a lane), on registers, all threads, for about `iters` x 16 instructions each.
double dot_rate(int64_t kind, int64_t iters, int64_t threads) {
  double ops = 0.0;
  auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : ops)
  {
    __m512 f[16];
    __m512i q[16];
    for (int i = 0; i < 16; ++i) { f[i] = _mm512_set1_ps(1e-3f * i); q[i] = _mm512_set1_epi32(i); }
    const __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
    const __m512i u = _mm512_set1_epi8(3), v = _mm512_set1_epi8(5);
    if (kind == 0) {
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < 16; ++i) f[i] = _mm512_fmadd_ps(f[i], x, y);
      ops += iters * 16.0 * 16 * 2;
    }
#if defined(__AVX512BF16__)
    if (kind == 1) {
      const __m512bh bx = (__m512bh)_mm512_set1_epi16(0x3f80), by = (__m512bh)_mm512_set1_epi16(0x3f80);
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < 16; ++i) f[i] = _mm512_dpbf16_ps(f[i], bx, by);
      ops += iters * 16.0 * 32 * 2;
    }
#endif
#if defined(__AVX512VNNI__)
    if (kind == 2) {
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < 16; ++i) q[i] = _mm512_dpbusd_epi32(q[i], u, v);
      ops += iters * 16.0 * 64 * 2;
    }
#endif
    float keep = 0.f;
    int keep_i = 0;
    for (int i = 0; i < 16; ++i) { keep += _mm512_reduce_add_ps(f[i]); keep_i += _mm512_reduce_add_epi32(q[i]); }
    if (keep == 12345.f && keep_i == 7) ops += 1;  // keeps the loops from being optimised away
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return ops / s;
}

bool has_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

bool has_vnni() {
#if defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_sum", &stream_sum);
  m.def("dot_rate", &dot_rate);
  m.def("has_bf16", &has_bf16);
  m.def("has_vnni", &has_vnni);
}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gib", type=float, default=1.0, help="buffer size for the bandwidth figures")
    args = parser.parse_args()
    from torch.utils.cpp_extension import load_inline

    build = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh")) / "machine_floor"
    build.mkdir(parents=True, exist_ok=True)
    ext = load_inline("expertmesh_machine_floor", cpp_sources=[SOURCE], extra_cflags=["-O3", "-march=native",
                      "-fopenmp"], extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    cores = os.cpu_count() or 1
    buf = torch.ones(int(args.gib * 2**30) // 4)
    nbytes = buf.numel() * 4
    info = {"machine": machine(), "buffer_gib": args.gib, "read_gbs": {}, "dot_gops": {}}
    for threads in sorted({1, cores}):
        t = best_of(lambda: ext.stream_sum(buf, threads), 7)
        info["read_gbs"][f"avx512_{threads}t"] = nbytes / t / 1e9
    previous = torch.get_num_threads()
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        info["read_gbs"][f"torch_sum_{threads}t"] = nbytes / best_of(lambda: buf.sum(), 7) / 1e9
    torch.set_num_threads(previous)
    kinds = {"fp32_fma": 0} | ({"bf16_dot": 1} if ext.has_bf16() else {}) | ({"int8_dot": 2} if ext.has_vnni() else {})
    for name, kind in kinds.items():
        info["dot_gops"][name] = max(ext.dot_rate(kind, 2_000_000, cores) for _ in range(3)) / 1e9
    print(json.dumps(info, indent=1))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
