"""Decode speed with many LoRA adapters in one batch, against the base model, `small` preset, one run.

End to end: batch-32 decode tokens/s of six cases, interleaved (each round runs every case once, in order):
- `plain`: an LLM without LoRA;
- `lora-none`: the LoRA LLM (enable_lora, every adapter below resident), no adapter requested;
- `aware-4`, `aware-16`: 4 or 16 distinct expert-aware adapters, like our fine-tuning job writes (rank 8, LoRA on
  2-4 routed experts per MoE layer, attention and shared experts), the 32 requests spread round-robin;
- `dense-4`, `dense-16`: 4 or 16 adapters with every routed expert adapted, as peft writes them (plus attention
  and shared experts).
Decode step = median of the steps after every request has its first token (the token budget holds the whole
batch's prompts, so those steps are pure decode); a case's figure is the median over rounds. Ratios are against
`plain` and `lora-none`. One more, untimed round with timers on the adapter hooks says where the time goes.

Kernels (`--kernels`, also run by default first): one layer at batch 32, the serving paths against the torch
loop over slots they replace and against the references, medians of interleaved repeats.

    python bench/lora_serving.py [--quick] [--rounds N] [--threads N] [--json bench/lora_serving_results.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from engine_vs_hf import CACHE, ensure_checkpoint, prompts  # bench/ is on sys.path when run as a script
from machine_info import machine

RANK, ALPHA = 8, 16  # the fine-tuning job's defaults (lora.r, lora.alpha)
MAX_ADAPTERS = 16
BATCH = 32


def write_adapters(ckpt: Path, kind: str, count: int) -> list[Path]:
    """`count` random adapters of `kind` ("aware": 2-4 routed experts per MoE layer; "dense": all of them),
    each with attention and shared experts, written once under the bench cache."""
    from expertmesh.model import load_model
    from expertmesh.model.lora import apply_lora
    from expertmesh.model.peft_format import save_peft_adapter

    out = []
    for i in range(count):
        path = CACHE / "lora-adapters" / f"{kind}-r{RANK}-{i}"
        out.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        model = load_model(ckpt)
        rng = random.Random(i)
        moe_layers = [j for j, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
        num_experts = model.config.routing.num_experts
        experts = None if kind == "dense" else {j: rng.sample(range(num_experts), rng.randint(2, 4))
                                                for j in moe_layers}
        trainable = apply_lora(model, rank=RANK, alpha=ALPHA,
                               targets=("attention", "shared_experts", "routed_experts"), experts=experts)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in trainable.values():  # B nonzero: an expert whose update is zero is not adapted
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_peft_adapter(model, path, rank=RANK, alpha=ALPHA, base_model=str(ckpt))
    return out


def decode_steps(llm, ids: list[list[int]], new_tokens: int, loras: list) -> list[float]:
    """Seconds of each engine step after every request has its first token."""
    from expertmesh import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(ids, loras)):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params, lora_request=lora)
    produced = dict.fromkeys(range(len(ids)), 0)
    steps, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[int(out.request_id.split("-")[1])] = len(out.outputs[0].token_ids)
        now = time.perf_counter()
        if last is not None:
            steps.append(now - last)
        if min(produced.values()) > 0:
            last = now
    return steps


class HookTimers:
    """Wall time spent in the adapter hooks and the modules around them, while active (a context manager)."""

    def __init__(self):
        from expertmesh.model.adapters import LinearAdapters
        from expertmesh.model.mla import MLAttention
        from expertmesh.model.moe import RoutedExperts

        self.targets = {"linear hooks (add_rows)": (LinearAdapters, "add_rows"),
                        "kv_b per-slot decode (by_slot)": (LinearAdapters, "by_slot"),
                        "MLA attention, all of it": (MLAttention, "forward"),
                        "routed experts": (RoutedExperts, "forward")}
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def __enter__(self):
        self.saved = {}
        for name, (cls, attr) in self.targets.items():
            fn = self.saved[name] = getattr(cls, attr)

            def timed(*args, fn=fn, name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - start

            setattr(cls, attr, timed)
        return self

    def __exit__(self, *exc):
        for name, (cls, attr) in self.targets.items():
            setattr(cls, attr, self.saved[name])


def per_step_breakdown(llm, ids, loras, new_tokens: int) -> dict[str, float]:
    """ms per decode step in each timed piece (prefill excluded: it runs before the timers start)."""
    from expertmesh import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(ids, loras)):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params, lora_request=lora)
    engine.step()  # the whole prefill: the token budget holds every prompt
    steps = 0
    with HookTimers() as timers:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        total = time.perf_counter() - start
    return {"decode step": total / steps * 1e3, **{k: timers.seconds[k] / steps * 1e3 for k in timers.targets}}


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median microseconds of each function, interleaved, after two warm-up calls each."""
    times = {name: [] for name in fns}
    for _ in range(2):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


@torch.inference_mode()
def kernel_figures(repeats: int) -> dict:
    """One adapted linear layer (q_b_proj, 384 -> 1152) and one MoE layer of `small` at batch 32, rank 8."""
    from expertmesh import kernels
    from expertmesh.model.adapters import b_stack
    from expertmesh.model.lora import expert_lora_forward

    out = {}
    for slots in (4, 16):
        x, y = torch.randn(BATCH, 384), torch.randn(BATCH, 1152)
        a, b = torch.randn(slots, RANK, 384) * 0.05, b_stack(x, slots, 1152, RANK).normal_(0, 0.05)
        rows = torch.arange(BATCH) % slots
        groups = [(s, (rows == s).nonzero().squeeze(1)) for s in range(slots)]

        def loop():  # what adapters.py did: one gather, two linears and an index_add per slot
            for s, sel in groups:
                y.index_add_(0, sel, F.linear(F.linear(x[sel], a[s]), b[s]))

        def reference():
            kernels.lora_expand_ref(y, kernels.lora_shrink_ref(x, a, rows), b, rows)

        def serving():
            kernels.lora_expand(y, kernels.lora_shrink(x, a, rows), b, rows)

        out[f"linear q_b_proj, {slots} slots"] = timed({"torch loop over slots (before)": loop,
                                                        "reference (gather + bmm)": reference,
                                                        "lora_shrink + lora_expand (C++)": serving}, repeats)

    num_experts, hidden, inter, top_k = 64, 768, 256, 6
    copies = [(torch.randn(num_experts, 2 * inter, hidden) * 0.03, torch.randn(num_experts, hidden, inter) * 0.03)
              for _ in range(8)]  # 1.2 GB: cold weights, as in a step over 7 MoE layers
    x = torch.randn(BATCH, hidden)
    for slots, per_slot in ((4, 3), (16, 3), (4, num_experts), (16, num_experts)):
        token_slots = torch.arange(BATCH) % slots
        index = torch.full((slots, num_experts), -1, dtype=torch.int64)
        for s in range(slots):
            index[s, torch.randperm(num_experts)[:per_slot]] = torch.arange(s * per_slot, (s + 1) * per_slot)
        n = slots * per_slot
        a13, b13 = torch.randn(n, RANK, hidden) * 0.05, b_stack(x, n, 2 * inter, RANK).normal_(0, 0.05)
        a2, b2 = torch.randn(n, RANK, inter) * 0.05, b_stack(x, n, hidden, RANK).normal_(0, 0.05)
        step = iter(range(10**9))

        def routed():  # a fresh routing and the next copy of the weights
            weights, ids = torch.randn(BATCH, num_experts).softmax(-1).topk(top_k)
            return (*copies[next(step) % len(copies)], weights, ids)

        def before():  # adapted pairs at weight 0 in the fused kernel, then through their expert once more per slot
            w13, w2, weights, ids = routed()
            rows = kernels.expert_lora_rows(index, token_slots, ids)
            moe = kernels.fused_moe(x, w13, w2, weights.masked_fill(rows >= 0, 0.0), ids)
            for s in range(slots):
                tokens = (token_slots == s).nonzero().squeeze(1)
                pairs = rows[tokens] >= 0
                if bool(pairs.any()):
                    moe.index_add_(0, tokens, expert_lora_forward(x[tokens], weights[tokens], ids[tokens].masked_fill(
                        ~pairs, -1), w13, w2, index[s], (a13, b13, a2, b2), 1.0))

        def lora_path(fn):
            def run():
                w13, w2, weights, ids = routed()
                fn(x, w13, w2, weights, ids, kernels.expert_lora_rows(index, token_slots, ids), a13, b13, a2, b2)
            return run

        def base():
            w13, w2, weights, ids = routed()
            kernels.fused_moe(x, w13, w2, weights, ids)

        label = "expert-aware (3 experts)" if per_slot < num_experts else "dense (all 64 experts)"
        out[f"MoE layer, {slots} slots, {label}"] = timed({
            "fused_moe, no adapter": base,
            "masked fused_moe + expert_lora_forward per slot (before)": before,
            "fused_moe_lora_ref": lora_path(kernels.fused_moe_lora_ref),
            "fused_moe_lora (C++ hook)": lora_path(kernels.fused_moe_lora),
        }, max(repeats // 3, 5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short prompts, few tokens and rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--kernels", action="store_true", help="only the kernel figures")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_len, new_tokens = (128, 17) if not args.quick else (16, 4)
    rounds = args.rounds or (7 if not args.quick else 1)

    info = {"machine": machine(), "setup": {"batch": BATCH, "prompt_len": prompt_len, "new_tokens": new_tokens,
                                            "rounds": rounds, "rank": RANK, "alpha": ALPHA}}
    info["load_average_1m"] = {"start": os.getloadavg()[0]}  # the machine is shared: say how busy it was
    print("machine:", json.dumps(info["machine"]), f"load average {info['load_average_1m']['start']:.2f}", flush=True)
    info["kernels_us"] = kernel_figures(10 if args.quick else 60)
    for case, figures in info["kernels_us"].items():
        print(f"{case}:")
        for name, us in figures.items():
            print(f"  {name:58s} {us:9.1f} us")
    if not args.kernels:
        info.update(end_to_end(prompt_len, new_tokens, rounds))
    info["load_average_1m"]["end"] = os.getloadavg()[0]
    print(f"load average (1 min) at the start {info['load_average_1m']['start']:.2f}, at the end "
          f"{info['load_average_1m']['end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")


def end_to_end(prompt_len: int, new_tokens: int, rounds: int) -> dict:
    from expertmesh import LLM, LoRARequest

    ckpt = ensure_checkpoint("small")
    adapters = {kind: write_adapters(ckpt, kind, MAX_ADAPTERS) for kind in ("aware", "dense")}
    requests = {kind: [LoRARequest(f"{kind}-{i}", 1 + i + (0 if kind == "aware" else MAX_ADAPTERS), str(p))
                       for i, p in enumerate(paths)] for kind, paths in adapters.items()}
    engine = dict(dtype="float32", max_num_seqs=BATCH, max_num_batched_tokens=BATCH * prompt_len, kv_cache_gib=0.5)
    plain = LLM(str(ckpt), **engine)
    # Every adapter resident, so no step loads one: the cases differ only in what the batch asks for.
    lora = LLM(str(ckpt), enable_lora=True, max_loras=2 * MAX_ADAPTERS, max_lora_rank=RANK, **engine)
    ids = prompts(BATCH, prompt_len, 32000)
    cases = {"plain": (plain, [None] * BATCH), "lora-none": (lora, [None] * BATCH)}
    for kind in ("aware", "dense"):
        for n in (4, 16):
            cases[f"{kind}-{n}"] = (lora, [requests[kind][i % n] for i in range(BATCH)])
    for llm, loras in cases.values():  # warm-up; loads every adapter
        decode_steps(llm, ids, 3, loras)

    per_round: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, (llm, loras) in cases.items():
            step = statistics.median(decode_steps(llm, ids, new_tokens, loras))
            per_round[name].append(step)
            print(f"  round {r + 1}/{rounds} {name:9s}: decode step {step * 1e3:6.1f} ms = {BATCH / step:6.1f} tok/s",
                  flush=True)

    results = {}
    for name, steps in per_round.items():
        step = statistics.median(steps)
        results[name] = {"decode_step_s": step, "decode_tok_s": BATCH / step, "rounds_s": steps}
    base, none = results["plain"]["decode_tok_s"], results["lora-none"]["decode_tok_s"]
    print("\n| case | decode ms/step | decode tok/s | vs plain | vs lora-none |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        res["vs_plain"], res["vs_lora_none"] = res["decode_tok_s"] / base, res["decode_tok_s"] / none
        print(f"| {name} | {res['decode_step_s'] * 1e3:.1f} | {res['decode_tok_s']:.1f} | **{res['vs_plain']:.2f}x** "
              f"| {res['vs_lora_none']:.2f}x |")
    bar = results["aware-4"]["vs_plain"]
    print(f"\nbar: aware-4 at {bar:.2f}x of the base model's decode tok/s (needs >= 0.80x): "
          f"{'met' if bar >= 0.8 else 'NOT met'}")

    breakdown = {name: per_step_breakdown(llm, ids, loras, new_tokens) for name, (llm, loras) in cases.items()
                 if name != "plain"}
    pieces = list(next(iter(breakdown.values())))
    print("\nwhere the time goes, ms per decode step (one untimed round with timers on):")
    print("| case | " + " | ".join(pieces) + " |")
    print("|---|" + "---|" * len(pieces))
    for name, row in breakdown.items():
        print(f"| {name} | " + " | ".join(f"{row[p]:.1f}" for p in pieces) + " |")
    return {"results": results, "breakdown_ms_per_step": breakdown}


if __name__ == "__main__":
    sys.exit(main())
