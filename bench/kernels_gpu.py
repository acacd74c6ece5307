"""Our Triton kernels against their torch references (`*_ref`), on a CUDA GPU, at decode and prefill shapes
of real MoE models, bf16.

For every case: the Triton output is checked against the reference (max abs error, bf16 tolerance), then
both are timed with CUDA events (warm-up, then the median of N runs, L2 flushed before each run, so the
numbers are GPU time with operands coming from HBM, as in serving where other layers evict them). Each
case also gets a floor measured in the same run: max(minimum bytes / copy bandwidth, FLOPs / bf16 matmul
rate), where the copy bandwidth is a 2 GiB device-to-device `copy_` counting read + write bytes and the
matmul rate an 8192^3 bf16 GEMM. "% of floor" = floor time / measured time.

    python bench/kernels_gpu.py [--quick] [--json out.json]
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --interpret-smoke   # CPU, one tiny shape per kernel

Imports only torch, triton and `expertmesh.kernels` (not the `expertmesh` package, whose `__init__` loads
the engine and with it tokenizers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if "--interpret-smoke" in sys.argv[1:]:
    # triton reads TRITON_INTERPRET when it is imported and when it decorates a kernel: set it before
    # torch (which may import triton) and triton load.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

MOE_NOTE = ("torch peer of fused MoE = fused_moe_ref, which already is the plain per-expert loop: pairs "
            "sorted by expert, two torch matmuls per used expert, one host sync for the counts")
MLA_NOTE = ("MLA: the serving path (mla_decode_absorbed) runs torch bmms for W_UK / W_UV around the latent-space "
            "attention timed here; torch peer = mla_decode_attention_ref (dense fp32 gather + einsum softmax)")


@dataclass(kw_only=True, slots=True)
class Case:
    kernel: str
    shape: str
    run_triton: Callable[[], object]
    run_torch: Callable[[], object]
    compare: Callable[[object, object], tuple[float, float, bool]]  # -> (max abs err, tolerance, ok)
    min_bytes: int  # what the op must read + write at least, see each builder
    flops: int


def import_kernels() -> types.ModuleType:
    """`expertmesh.kernels` without running `expertmesh/__init__` (engine, tokenizers): a bare parent
    package stands in for it, so only the kernels package and its own imports load."""
    if "expertmesh" not in sys.modules:
        parent = types.ModuleType("expertmesh")
        parent.__path__ = [str(ROOT / "expertmesh")]
        sys.modules["expertmesh"] = parent
    import expertmesh.kernels as kernels

    return kernels


def close(out, ref, rtol: float, atol_of_max: float) -> tuple[float, float, bool]:
    """Elementwise |out - ref| <= atol + rtol |ref|, atol scaled by max |ref| (outputs are O(1) but not unit)."""
    out, ref = out.float(), ref.float()
    atol = atol_of_max * max(ref.abs().max().item(), 1e-6)
    err = (out - ref).abs()
    return err.max().item(), atol, bool((err <= atol + rtol * ref.abs()).all())


# Case builders. Each yields its cases so that a model's tensors live only while its cases run.


def moe_cases(k, label, hidden, inter, experts, top_k, ms, device, dtype):
    """Routed experts only. Minimum bytes: the weights of the experts the batch hits (3 H I each), x read
    once, the output written once and the routing read; the [T*K, I] activation and fp32 per-pair
    buffers are the kernel's choice, not counted."""
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) / math.sqrt(hidden)  # [E, 2I, H]
    w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype) / math.sqrt(inter)  # [E, H, I]
    for m in ms:
        x = torch.randn(m, hidden, device=device, dtype=dtype)  # [T, H]
        ids = torch.rand(m, experts, device=device).topk(top_k, dim=-1).indices  # [T, K], distinct per token
        weights = torch.randn(m, top_k, device=device).softmax(-1)  # [T, K] fp32
        used = ids.unique().numel()
        size = dtype.itemsize
        min_bytes = used * 3 * hidden * inter * size + 2 * m * hidden * size + m * top_k * (4 + 8)
        yield Case(kernel="fused_moe", shape=f"{label} H{hidden} I{inter} E{experts} top{top_k} M{m}",
                   run_triton=lambda x=x, w=weights, i=ids: k.fused_moe_triton(x, w13, w2, w, i),
                   run_torch=lambda x=x, w=weights, i=ids: k.fused_moe_ref(x, w13, w2, w, i),
                   compare=lambda o, r: close(o, r, 2e-2, 2e-2),
                   min_bytes=min_bytes, flops=2 * m * top_k * 3 * hidden * inter)


def gating_cases(k, ms, device, small: bool):
    """Router logits in fp32, as the DeepSeek gates compute them (which also keeps ties, whose order
    differs between topk and our kernel, unlikely). Minimum bytes: logits (+ bias) in, weights and ids out.
    FLOPs are negligible: the op is bound by memory, or in practice by latency."""
    configs = [  # label, experts, top_k, keyword arguments
        ("softmax, DSv2-Lite", 8 if small else 64, 2 if small else 6, {}),
        ("sigmoid+bias+groups, DSv3", 16 if small else 256, 4 if small else 8,
         dict(scoring_func="sigmoid", n_group=4 if small else 8, topk_group=2 if small else 4,
              group_score="top2_sum", renormalize=True, scaling_factor=2.5)),
    ]
    for label, experts, top_k, kw in configs:
        if kw:
            kw = dict(kw, correction_bias=0.1 * torch.randn(experts, device=device))
        for m in ms:
            logits = torch.randn(m, experts, device=device)  # [T, E] fp32
            groups = f" G{kw['n_group']}/{kw['topk_group']}" if kw else ""
            yield Case(kernel="topk_gating", shape=f"{label} E{experts}{groups} top{top_k} M{m}",
                       run_triton=lambda lg=logits, kk=top_k, kw=kw: k.topk_gating_triton(lg, kk, **kw),
                       run_torch=lambda lg=logits, kk=top_k, kw=kw: k.topk_gating_ref(lg, kk, **kw),
                       compare=compare_gating,
                       min_bytes=m * experts * 4 + (experts * 4 if kw else 0) + m * top_k * (4 + 8), flops=0)


def compare_gating(out, ref) -> tuple[float, float, bool]:
    """Same set of ids per token (order of equal scores may differ), and their weights close."""
    (w_out, ids_out), (w_ref, ids_ref) = out, ref
    ids_out_sorted, order_out = ids_out.sort(dim=-1)
    ids_ref_sorted, order_ref = ids_ref.sort(dim=-1)
    err, tol, ok = close(w_out.gather(1, order_out), w_ref.gather(1, order_ref), 1e-5, 1e-5)
    return err, tol, ok and torch.equal(ids_out_sorted, ids_ref_sorted)


def mla_cases(k, batches, contexts, heads, rank, rope_dim, page_size, device, dtype):
    """Latent-space MLA decode (absorbed weights), every sequence at the full context, pages shuffled.
    Minimum bytes: each sequence's latent + rope cache read once (all heads share it), the block tables,
    q in and the output out. FLOPs: per (sequence, head, token) 2(R+Dr) for QK and 2R for PV."""
    scale = 1 / math.sqrt(128 + rope_dim)  # DeepSeek-V2-Lite: qk_nope_head_dim 128 + qk_rope_head_dim
    size = dtype.itemsize
    for batch in batches:
        for context in contexts:
            pages_per_seq = -(-context // page_size)
            num_pages = batch * pages_per_seq
            ckv = torch.randn(num_pages, page_size, rank, device=device, dtype=dtype)  # [N, P, R]
            kpe = torch.randn(num_pages, page_size, rope_dim, device=device, dtype=dtype)  # [N, P, Dr]
            tables = torch.randperm(num_pages, device=device).int().view(batch, pages_per_seq)  # [B, pages]
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)  # [B]
            q_latent = torch.randn(batch, heads, rank, device=device, dtype=dtype)  # [B, H, R]
            q_rope = torch.randn(batch, heads, rope_dim, device=device, dtype=dtype)  # [B, H, Dr]
            args = (q_latent, q_rope, ckv, kpe, tables, lens, scale)
            min_bytes = (batch * context * (rank + rope_dim) * size + tables.numel() * 4 + batch * 4
                         + batch * heads * (2 * rank + rope_dim) * size)
            shape = f"H{heads} R{rank} Dr{rope_dim} page{page_size} B{batch} ctx{context}"
            yield Case(kernel="mla_decode", shape=shape,
                       run_triton=lambda a=args: k.mla_decode_attention_triton(*a),
                       run_torch=lambda a=args: k.mla_decode_attention_ref(*a),
                       compare=lambda o, r: close(o, r, 2e-2, 2e-2),
                       min_bytes=min_bytes, flops=batch * heads * context * (4 * rank + 2 * rope_dim))
            del ckv, kpe, args


def rms_cases(k, hiddens, ms, device, dtype):
    """Minimum bytes: x read and the output written once, plus the weight."""
    for hidden in hiddens:
        weight = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        for m in ms:
            x = torch.randn(m, hidden, device=device, dtype=dtype)  # [T, H]
            yield Case(kernel="rms_norm", shape=f"H{hidden} M{m}",
                       run_triton=lambda x=x, w=weight: k.rms_norm_triton(x, w, 1e-6),
                       run_torch=lambda x=x, w=weight: k.rms_norm_ref(x, w, 1e-6),
                       compare=lambda o, r: close(o, r, 1e-2, 1e-2),
                       min_bytes=(2 * m * hidden + hidden) * dtype.itemsize, flops=4 * m * hidden)


def all_cases(k, device, smoke: bool):
    bf16 = torch.bfloat16
    if smoke:  # one tiny shape per kernel (two for gating: both routers); non-power-of-2 sizes test masking
        yield from moe_cases(k, "tiny", 32, 48, 4, 2, [3], device, bf16)
        yield from gating_cases(k, [3], device, small=True)
        yield from mla_cases(k, [2], [20], 4, 32, 16, 16, device, bf16)
        yield from rms_cases(k, [48], [3], device, bf16)
        return
    ms = [1, 32, 256, 2048]
    yield from moe_cases(k, "DSv2-Lite", 2048, 1408, 64, 6, ms, device, bf16)
    yield from moe_cases(k, "Mixtral", 4096, 14336, 8, 2, ms, device, bf16)
    yield from gating_cases(k, [32, 2048], device, small=False)
    yield from mla_cases(k, [1, 32, 128], [1024, 4096], 16, 512, 64, 16, device, bf16)
    yield from rms_cases(k, [2048, 7168], [1, 256, 4096], device, bf16)


# Timing and floors.


def cuda_time_us(fn, warmup: int, reps: int, flush) -> float:
    """Median over `reps` runs of the GPU time between CUDA events around `fn`. Runs are queued back to back
    (no sync between them), so host launch cost is hidden while the GPU work (flush + fn) outlasts the
    launches; it shows where `fn` syncs (fused_moe_ref) or launches many tiny kernels (fused MoE at M=1)."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.zero_()  # evicts L2 (H200: 60 MiB); outside the events
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def measure_floors(reps: int) -> dict:
    """Copy bandwidth (read + write bytes of a 2 GiB device-to-device copy) and bf16 GEMM rate."""
    src = torch.empty(2**30, dtype=torch.float16, device="cuda").fill_(1.0)  # 2 GiB
    dst = torch.empty_like(src)
    no_flush = torch.empty(1, device="cuda")  # 2 GiB leaves nothing in L2 worth flushing
    copy_us = cuda_time_us(lambda: dst.copy_(src), 2, reps, no_flush)
    del src, dst
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_us = cuda_time_us(lambda: a @ b, 3, reps, no_flush)
    return {"copy_bytes": 2 * 2**31, "copy_us": copy_us, "copy_gbs": 2 * 2**31 / copy_us / 1e3,
            "matmul_shape": [n, n, n], "matmul_us": mm_us, "matmul_tflops": 2 * n**3 / mm_us / 1e6}


def floor_us(case: Case, floors: dict) -> tuple[float, str]:
    mem_us = case.min_bytes / floors["copy_gbs"] / 1e3
    compute_us = case.flops / floors["matmul_tflops"] / 1e6
    return (mem_us, "memory") if mem_us >= compute_us else (compute_us, "compute")


def run_case(case: Case, args, floors: dict | None, flush) -> dict:
    row = {"kernel": case.kernel, "shape": case.shape, "min_bytes": case.min_bytes, "flops": case.flops}
    with torch.inference_mode():
        err, tol, ok = case.compare(case.run_triton(), case.run_torch())  # first Triton call compiles
        row.update(max_abs_err=err, tolerance=tol, ok=ok)
        if floors is None:
            return row
        t_us = cuda_time_us(case.run_triton, args.warmup, args.reps, flush)
        r_us = cuda_time_us(case.run_torch, args.warmup, args.reps, flush)
    fl_us, bound = floor_us(case, floors)
    achieved = case.min_bytes / t_us / 1e3 if bound == "memory" else case.flops / t_us / 1e6
    row.update(triton_us=t_us, torch_us=r_us, speedup=r_us / t_us, bound=bound, floor_us=fl_us,
               triton_achieved=achieved, triton_achieved_unit="GB/s" if bound == "memory" else "TFLOP/s",
               triton_frac_of_floor=fl_us / t_us, torch_frac_of_floor=fl_us / r_us)
    return row


def print_row(row: dict, timed: bool) -> None:
    if "error" in row:
        print(f"| {row['kernel']} | {row['shape']} | ERROR: {row['error']} |", flush=True)
        return
    check = f"{row['max_abs_err']:.2e} ({row['tolerance']:.1e}) | {'yes' if row['ok'] else '**NO**'}"
    if not timed:
        print(f"| {row['kernel']} | {row['shape']} | {check} |", flush=True)
        return
    print(f"| {row['kernel']} | {row['shape']} | {check} | {row['triton_us']:.1f} | {row['torch_us']:.1f} | "
          f"**{row['speedup']:.2f}x** | {row['bound']} | {row['triton_achieved']:.1f} {row['triton_achieved_unit']} | "
          f"{100 * row['triton_frac_of_floor']:.1f}% | {100 * row['torch_frac_of_floor']:.1f}% |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, one tiny shape per kernel, correctness only")
    args = parser.parse_args()
    args.warmup, args.reps = (2, 10) if args.quick else (5, 50)
    if not args.interpret_smoke and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: timings would be of the interpreter; unset it or pass --interpret-smoke",
              file=sys.stderr)
        return 2

    import triton

    if not args.interpret_smoke and not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run with --interpret-smoke for a CPU correctness check", file=sys.stderr)
        return 2
    kernels = import_kernels()
    from machine_info import machine

    device = torch.device("cpu" if args.interpret_smoke else "cuda")
    mode = "interpret-smoke" if args.interpret_smoke else "quick" if args.quick else "full"
    info = {"machine": machine(triton=triton.__version__), "mode": mode, "notes": [MOE_NOTE, MLA_NOTE]}
    if not args.interpret_smoke:
        info.update(warmup=args.warmup, reps=args.reps)
    floors, flush = None, None
    if not args.interpret_smoke:
        info["machine"].update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        floors = info["floors"] = measure_floors(args.reps)
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    print("machine:", json.dumps(info["machine"]), flush=True)
    if floors:
        print(f"floors: copy {floors['copy_gbs']:.0f} GB/s (read + write of a 2 GiB copy_), "
              f"bf16 matmul {floors['matmul_tflops']:.0f} TFLOP/s (8192^3)", flush=True)
    for note in info["notes"]:
        print("note:", note)

    timed = floors is not None
    header = "| kernel | shape | max abs err (tol) | ok |"
    if timed:
        header += " triton µs | torch µs | torch/triton | bound | triton achieved | triton % floor | torch % floor |"
    print("\n" + header + "\n" + "|---" * (header.count("|") - 1) + "|")
    torch.manual_seed(0)
    rows, begin = [], time.perf_counter()
    for case in all_cases(kernels, device, args.interpret_smoke):
        try:
            row = run_case(case, args, floors, flush)
        except Exception as exc:  # one broken case must not cost the rest of the GPU run; reported and failed
            traceback.print_exc()
            row = {"kernel": case.kernel, "shape": case.shape, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print_row(row, timed)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info["cases"], info["wall_s"] = rows, time.perf_counter() - begin
    failed = [r for r in rows if not r.get("ok")]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases match the reference; {info['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
