"""Launch-config sweep of the Triton fused MoE (`fused_moe_triton`) on a CUDA GPU, bf16.

For DeepSeek-V2-Lite-like (H 2048, I 1408, 64 experts, top-6) and Mixtral-like (H 4096, I 14336, 8 experts,
top-2) experts at M in {1, 32, 256, 2048} tokens (random routing, distinct experts per token, fixed seed):

- `moe_align_block_size` alone, and a sync check (`torch.cuda.set_sync_debug_mode("error")`) of it and of
  `fused_moe_triton`;
- `fused_moe_triton` with its default config (`tile_config`), GPU time and host wall time per call (20
  back-to-back calls, one sync at the end; the enqueue time before that sync is reported too);
- a grid of configs: BLOCK_M from `tile_config` when M < 256, else {16, 32, 64}; BLOCK_N {64, 128}, BLOCK_K
  {64, 128}, num_warps {4, 8}, num_stages {3, 4}; configs whose estimated shared memory
  (BLOCK_M*BLOCK_K + 2*BLOCK_K*BLOCK_N) * 2 B * num_stages exceeds 227 KiB are skipped. Each config's output
  is checked once against `fused_moe_ref` (atol 2e-2 * max|ref|, rtol 2e-2); mismatches are reported, not timed.

GPU times: CUDA events, 3 warm-ups, median of 20, a 256 MiB buffer zeroed before each run outside the events
(L2 flush). Floor = max(bytes / 4.29 TB/s, FLOPs / 767 TFLOP/s), bytes = experts hit * 3 H I * 2 + x in +
out + routing. Grid: 16 configs per BLOCK_M, of which 14 at BLOCK_M 16, 14 at 32 and 12 at 64 pass the memory
estimate (40 distinct); the kernels do not specialize on the token count and both shapes share the same
divisibility of sizes and strides, so a cold cache compiles (40 grid + 2 defaults) * 2 kernels = 84 times.
A wall-clock budget (--budget-s) stops the grid early if compiles run long.

    python bench/gpu/fused_moe_sweep.py [--json out.json] [--budget-s 240]
    TRITON_INTERPRET=1 python bench/gpu/fused_moe_sweep.py --interpret-smoke   # CPU, tiny shape, 2 configs

Imports only torch, triton and `expertmesh.kernels` (via bench/kernels_gpu.py's `import_kernels`, which
skips `expertmesh/__init__`, i.e. the engine and tokenizers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
# kernels_gpu sets TRITON_INTERPRET=1 for --interpret-smoke before torch / triton load, and puts the repo on sys.path.
import kernels_gpu  # noqa: E402
import torch  # noqa: E402

BANDWIDTH = 4.29e12  # B/s, H200 measured copy (read + write)
MATMUL = 767e12  # FLOP/s, H200 measured bf16 8192^3 GEMM
SMEM_LIMIT = 227 * 1024  # H200 shared memory per block
SHAPES = [  # label, hidden, intermediate, experts, top_k
    ("DSv2-Lite", 2048, 1408, 64, 6),
    ("Mixtral", 4096, 14336, 8, 2),
]
MS = [1, 32, 256, 2048]
WARMUP, REPS, HOST_CALLS = 3, 20, 20


def smem_estimate(cfg: dict) -> int:
    """Bytes of shared memory the gate/up kernel's pipeline would want: an x tile and two weight tiles
    (gate, up), bf16, per stage."""
    return (cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * 2 * cfg["num_stages"]


def config_grid(default: dict, num_tokens: int) -> tuple[list[dict], list[dict]]:
    """(configs to try, configs skipped for shared memory)."""
    block_ms = [16, 32, 64] if num_tokens >= 256 else [default["BLOCK_M"]]
    keep, skip = [], []
    for bm, bn, bk, warps, stages in itertools.product(block_ms, [64, 128], [64, 128], [4, 8], [3, 4]):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
        (keep if smem_estimate(cfg) <= SMEM_LIMIT else skip).append(cfg)
    return keep, skip


def cfg_name(cfg: dict) -> str:
    return f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} K{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


def make_inputs(hidden, inter, experts, top_k, m, device, dtype, w13=None, w2=None):
    if w13 is None:
        w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) / math.sqrt(hidden)  # [E, 2I, H]
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype) / math.sqrt(inter)  # [E, H, I]
    x = torch.randn(m, hidden, device=device, dtype=dtype)  # [T, H]
    ids = torch.rand(m, experts, device=device).topk(top_k, dim=-1).indices  # [T, K], distinct per token
    weights = torch.randn(m, top_k, device=device).softmax(-1)  # [T, K] fp32
    return x, w13, w2, weights, ids


def check(k, out, ref) -> dict:
    err, tol, ok = kernels_gpu.close(out, ref, 2e-2, 2e-2)
    return {"max_abs_err": err, "tolerance": tol, "ok": ok}


def sync_check(fn) -> str:
    """'none', or the error raised by the first synchronizing op under set_sync_debug_mode('error')."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        result = "none"
    except RuntimeError as exc:
        result = f"SYNCS: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return result


def host_wall_us(fn) -> tuple[float, float]:
    """(enqueue µs per call, wall µs per call incl. one final sync) over HOST_CALLS back-to-back calls."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return (enqueued - start) / HOST_CALLS * 1e6, (end - start) / HOST_CALLS * 1e6


def sweep_case(k, label, hidden, inter, experts, top_k, m, w13, w2, flush, deadline) -> dict:
    x, w13, w2, weights, ids = make_inputs(hidden, inter, experts, top_k, m, "cuda", torch.bfloat16, w13, w2)
    used = ids.unique().numel()
    nbytes = used * 3 * hidden * inter * 2 + 2 * m * hidden * 2 + m * top_k * (4 + 8)
    flops = 2 * m * top_k * 3 * hidden * inter
    floor_us = max(nbytes / BANDWIDTH, flops / MATMUL) * 1e6
    default = k.tile_config(m, top_k, experts, hidden, inter, 2)
    row = {"shape": label, "hidden": hidden, "intermediate": inter, "experts": experts, "top_k": top_k, "M": m,
           "experts_hit": used, "bytes": nbytes, "flops": flops, "floor_us": floor_us,
           "floor_bound": "memory" if nbytes / BANDWIDTH >= flops / MATMUL else "compute", "default_config": default}
    ref = k.fused_moe_ref(x, w13, w2, weights, ids)

    def run(cfg=None):
        return k.fused_moe_triton(x, w13, w2, weights, ids, config=cfg)

    align = lambda: k.moe_align_block_size(ids, default["BLOCK_M"], experts)  # noqa: E731
    row["align_us"] = kernels_gpu.cuda_time_us(align, WARMUP, REPS, flush)
    t0 = time.perf_counter()
    row["default_check"] = check(k, run(), ref)  # compiles the default config
    row["default_first_call_s"] = time.perf_counter() - t0
    row["sync_align"] = sync_check(align)
    row["sync_fused_moe"] = sync_check(run)
    row["default_us"] = kernels_gpu.cuda_time_us(run, WARMUP, REPS, flush)
    row["default_enqueue_us"], row["default_host_wall_us"] = host_wall_us(run)

    configs, too_big = config_grid(default, m)
    row["skipped_smem"] = [cfg_name(c) for c in too_big]
    results, mismatched, failed, budget_skipped = [], [], [], []
    for cfg in configs:
        name = cfg_name(cfg)
        if time.perf_counter() > deadline:
            budget_skipped.append(name)
            continue
        try:
            t0 = time.perf_counter()
            chk = check(k, run(cfg), ref)
            first_s = time.perf_counter() - t0
            if not chk["ok"]:
                mismatched.append({"config": name, **chk})
                continue
            us = kernels_gpu.cuda_time_us(lambda cfg=cfg: run(cfg), WARMUP, REPS, flush)
            results.append({"config": name, **cfg, "us": us, "first_call_s": first_s,
                            "frac_of_floor": floor_us / us, **chk})
        except Exception as exc:  # e.g. out of shared memory at compile: reported, the sweep goes on
            failed.append({"config": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
    row.update(grid=results, mismatched=mismatched, failed=failed, skipped_budget=budget_skipped)
    if results:
        best = min(results, key=lambda r: r["us"])
        row.update(best_config=best["config"], best_us=best["us"], best_frac_of_floor=floor_us / best["us"])
    del x, weights, ids, ref
    return row


def print_row(row: dict) -> None:
    best = (f"best {row['best_config']}: {row['best_us']:.1f} µs ({100 * row['best_frac_of_floor']:.1f}% of floor)"
            if "best_us" in row else "best: none")
    print(f"{row['shape']:9s} M={row['M']:<5d} floor {row['floor_us']:7.1f} µs ({row['floor_bound']}) | "
          f"align {row['align_us']:6.1f} µs | default {cfg_name(row['default_config'])}: {row['default_us']:7.1f} µs "
          f"({100 * row['floor_us'] / row['default_us']:.1f}%), host wall {row['default_host_wall_us']:.1f} µs/call "
          f"(enqueue {row['default_enqueue_us']:.1f}) | {best} | tried {len(row['grid'])}, "
          f"mismatch {len(row['mismatched'])}, failed {len(row['failed'])}, smem-skip {len(row['skipped_smem'])}, "
          f"budget-skip {len(row['skipped_budget'])} | syncs: align {row['sync_align']}, moe {row['sync_fused_moe']}",
          flush=True)
    for bad in row["mismatched"]:
        print(f"    MISMATCH {bad['config']}: max abs err {bad['max_abs_err']:.3e} (tol {bad['tolerance']:.1e})")
    for bad in row["failed"]:
        print(f"    FAILED {bad['config']}: {bad['error']}")


def interpret_smoke(k) -> int:
    """CPU interpreter: one tiny shape (odd sizes), the default config and one other, correctness only."""
    torch.manual_seed(0)
    hidden, inter, experts, top_k, m = 32, 48, 4, 2, 3
    x, w13, w2, weights, ids = make_inputs(hidden, inter, experts, top_k, m, "cpu", torch.bfloat16)
    sorted_ids, block_experts, num_padded = k.moe_align_block_size(ids, 16, experts)
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    expected_padded = int(((counts + 15) // 16 * 16).sum())
    ok = int(num_padded) == expected_padded
    print(f"align: num_padded {int(num_padded)} (expected {expected_padded}) {'ok' if ok else 'MISMATCH'}")
    ref = k.fused_moe_ref(x, w13, w2, weights, ids)
    default = k.tile_config(m, top_k, experts, hidden, inter, 2)
    other = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
    for cfg in (None, other):
        chk = check(k, k.fused_moe_triton(x, w13, w2, weights, ids, config=cfg), ref)
        ok &= chk["ok"]
        print(f"config {cfg_name(cfg or default)}{' (default)' if cfg is None else ''}: max abs err "
              f"{chk['max_abs_err']:.2e} (tol {chk['tolerance']:.1e}) {'ok' if chk['ok'] else 'MISMATCH'}")
    print("interpret smoke:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="stop trying grid configs after this many seconds (defaults are always timed)")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, tiny shape, two configs, correctness only")
    args = parser.parse_args()
    k = kernels_gpu.import_kernels()
    from expertmesh.kernels.triton import fused_moe as triton_moe

    # The Triton module itself: registry.fused_moe_triton (what expertmesh.kernels exports) does not take
    # `config`, and tile_config is not re-exported.
    k = types.SimpleNamespace(fused_moe_ref=k.fused_moe_ref, moe_align_block_size=k.moe_align_block_size,
                              fused_moe_triton=triton_moe.fused_moe_triton, tile_config=triton_moe.tile_config)
    if args.interpret_smoke:
        return interpret_smoke(k)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: timings would be of the interpreter; unset it or pass --interpret-smoke",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("fused_moe_sweep.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run with --interpret-smoke for a CPU correctness check", file=sys.stderr)
        return 2
    import triton

    begin = time.perf_counter()
    deadline = begin + args.budget_s
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "bandwidth_Bps": BANDWIDTH, "matmul_flops": MATMUL,
            "warmup": WARMUP, "reps": REPS, "host_calls": HOST_CALLS, "smem_limit": SMEM_LIMIT,
            "budget_s": args.budget_s}
    print(json.dumps(info), flush=True)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for label, hidden, inter, experts, top_k in SHAPES:
            _, w13, w2, _, _ = make_inputs(hidden, inter, experts, top_k, 1, "cuda", torch.bfloat16)
            for m in MS:
                try:
                    row = sweep_case(k, label, hidden, inter, experts, top_k, m, w13, w2, flush, deadline)
                except Exception as exc:
                    traceback.print_exc()
                    row = {"shape": label, "M": m, "error": f"{type(exc).__name__}: {exc}"}
                    print(f"{label} M={m}: ERROR {row['error']}", flush=True)
                else:
                    print_row(row)
                rows.append(row)
            del w13, w2
            torch.cuda.empty_cache()
    info["cases"], info["wall_s"] = rows, time.perf_counter() - begin
    print(f"done in {info['wall_s']:.1f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2))
    bad = [r for r in rows if "error" in r or not r["default_check"]["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
