"""This machine's floors for a decode step: read bandwidth measured the way a decode step reads, and the rates
of the dot products the kernels run.

- Read bandwidth: every core (OpenMP, one thread per core) sums its own contiguous share of a buffer far
  larger than the caches with 512-bit loads, 8 independent accumulators per thread, as the kernels' weight
  streams do; best of several passes. Also a torch `sum` over the same buffer (what `bench/RESULTS.md` once
  called the floor), and each at one thread.
- A decode step's floor: the bytes a batch-1 step of `small` reads (`--step-floor`: float32, bfloat16, int8), read
  from the model's own tensors in a step's order (each layer's weights, then `top_k` of its routed experts chosen
  at random, new ones every step; the LM head last), each tensor split evenly across the cores, in one parallel
  region with no barrier: what a step would take if its kernels did nothing but read. The weights every step
  reads (attention, shared experts, norms, gates, the LM head: 202 MiB of `small`'s 298 in float32) stay in
  the last-level cache from one step to the next where it is large enough, so this floor is below the one the
  DRAM bandwidth alone gives; the median over steps is reported.
- Compute: float32 FMA, bf16 dot (`vdpbf16ps`, where the CPU has AVX512-BF16) and int8 dot (`vpdpbusd`, where it
  has AVX512-VNNI) rates on registers and an L1-resident block, all cores.

The C++ is compiled here for this machine (`-march=native`), for the benchmark only.

    python bench/machine_floor.py [--step-floor] [--json bench/machine_floor_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from engine_vs_hf import best_of  # bench/ is on sys.path when run as a script
from machine_info import machine

SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <vector>

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

// Reads every range (address, bytes; bytes a multiple of 64), each split evenly across the threads, in one
// parallel region without barriers; returns the sum of what it read as floats (kept so the reads stay).
double stream_ranges(const std::vector<int64_t>& addresses, const std::vector<int64_t>& sizes, int64_t threads) {
  double total = 0.0;
  const int64_t count = addresses.size();
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    __m512 a[4];
    for (int i = 0; i < 4; ++i) a[i] = _mm512_setzero_ps();
    for (int64_t r = 0; r < count; ++r) {
      const float* p = reinterpret_cast<const float*>(addresses[r]);
      const int64_t lines = sizes[r] / 64, per = (lines + nt - 1) / nt;
      const int64_t begin = std::min(lines, t * per), end = std::min(lines, begin + per);
      int64_t i = begin;
      for (; i + 4 <= end; i += 4)
        for (int j = 0; j < 4; ++j) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(p + 16 * (i + j)));
      for (; i < end; ++i) a[0] = _mm512_add_ps(a[0], _mm512_loadu_ps(p + 16 * i));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
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
  m.def("stream_ranges", &stream_ranges);
  m.def("dot_rate", &dot_rate);
  m.def("has_bf16", &has_bf16);
  m.def("has_vnni", &has_vnni);
}
"""


def step_ranges(model) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """A batch-1 decode step's reads of `model`, in order: for each layer, the tensors it reads whole, and its
    routed experts' tensors (stacked [E, ...]: one expert is a row); the final norm and LM head come last.
    The embedding table and the RoPE tables are left out (a row of each)."""
    from expertmesh.model.moe import MoEBlock

    layers, experts = [], []
    for layer in model.model.layers:
        routed = layer.mlp.experts.state_dict(keep_vars=True) if isinstance(layer.mlp, MoEBlock) else {}
        routed_ids = {id(t) for t in routed.values()}
        layers.append([t for t in layer.state_dict(keep_vars=True).values() if id(t) not in routed_ids])
        experts.append(list(routed.values()))
    tail = [*model.model.norm.state_dict(keep_vars=True).values(),
            *model.lm_head.state_dict(keep_vars=True).values()]
    return [*layers, tail], [*experts, []]


def step_floor(model, steps: int, threads: int, ext) -> dict:
    """Median time of `steps` simulated batch-1 steps (see the module docstring) and the bytes each reads."""
    fixed, experts = step_ranges(model)
    top_k, rng = model.config.routing.top_k, random.Random(0)

    def ranges() -> tuple[list[int], list[int]]:
        addresses, sizes = [], []
        for layer, stacked in zip(fixed, experts):
            reads = [(t.data_ptr(), t.nbytes) for t in layer]
            if stacked:
                for e in rng.sample(range(stacked[0].shape[0]), top_k):
                    reads += [(t[e].data_ptr(), t[e].nbytes) for t in stacked]
            for address, size in reads:
                addresses.append(address)
                sizes.append(size // 64 * 64)
        return addresses, sizes

    plans = [ranges() for _ in range(steps + 5)]
    times = []
    for addresses, sizes in plans:
        start = time.perf_counter()
        ext.stream_ranges(addresses, sizes, threads)
        times.append(time.perf_counter() - start)
    times = sorted(times[5:])
    return {"step_ms": 1e3 * times[len(times) // 2], "bytes_per_step": sum(plans[0][1]),
            "gbs": sum(plans[0][1]) / times[len(times) // 2] / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gib", type=float, default=1.0, help="buffer size for the bandwidth figures")
    parser.add_argument("--step-floor", action="store_true", help="also the decode-step floor of `small`")
    parser.add_argument("--steps", type=int, default=200, help="simulated steps per dtype for --step-floor")
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
    if args.step_floor:
        from actor_graph import ensure_checkpoint

        from expertmesh.model import load_model
        from expertmesh.model.quantize import quantize_model

        info["step_floor"] = {}
        for name, dtype, quantization in (("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
                                          ("int8", torch.float32, "int8")):
            model = load_model(ensure_checkpoint("small"), dtype)
            if quantization:
                quantize_model(model, quantization)
            info["step_floor"][name] = step_floor(model, args.steps, cores, ext)
            del model
    print(json.dumps(info, indent=1))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
