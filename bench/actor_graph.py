"""The actor graph against local mode on the `small` preset, same weights, same machine, one run.

Prints decode tokens/s of local mode (the whole model in this process) and of the actor graph (1 attention
actor, 1 router, N expert shards over a transport) at batch 1 and batch 32, the ratios actor graph / local,
and the per-layer dispatch round trip measured inside the router (sending one MoE layer's work to the shards
until the last shard's output is back). The issue's bars, on a 2-core CPU: at batch 32 the actor graph keeps
at least half of local mode's decode throughput, and a layer's dispatch round trip costs under 2 ms.

Decode is measured apart from prefill, inside one generation, as in `bench/engine_vs_hf.py`: prefill = time
until every request has its first token; decode step = (time of the last token - time of the first) /
(N - 1), stamped per engine step; best of `--repeats` generations after a short warm-up one. Every batch-32
prompt fits the token budget, so every decode step is a pure decode step. Round trips are the router's
records of those same generations (`RouterActor.round_trips`: tokens, seconds and, where the transport
reports it, the slowest shard's compute seconds inside the round trip), decode steps only: records of at
most `batch` tokens. With `--micro-batches 2` a batch-32 decode step goes out as two micro-batches of 16
tokens (each MoE layer's dispatch carries 16 tokens); with 1, and with the default "auto" on one machine
(the attention actor shares the node with the shards, so ping-pong cannot overlap anything), one of 32.
Prefill records carry whole prompts and are left out. "dispatch ms/step" is the
sum of a decode step's round trips (7 MoE layers x micro-batches), which the router runs one after another.
Greedy decoding with ignore_eos; the actor graph's tokens are checked against local mode's for every prompt.
For scale, the script also times one MoE layer's routed experts in this process with nothing else running
(every expert held, no transport, torch's threads, tokens routed by the checkpoint's gates): the floor of a
dispatch round trip on this machine, whatever the transport.

Resources (a 2-core machine). Local mode uses torch's default threads (2). The executor gives each actor
torch threads = int(num_cpus) of its Ray resources, and the local cluster it starts declares at least as
many logical CPUs as the deployment asks for, so num_cpus sets an actor's threads, not where it runs: every
actor shares the same two cores. Defaults (`--attention-cpus 2 --router-cpus 1 --shard-cpus 1`): the
attention actor gets 2 threads (attention, shared experts, the dense layer and the LM head: most of a
step's work, which local mode does with 2 threads), the router 1 (gating, split and combine of <= 32
tokens), each shard 1. Tried with `--quick --micro-batches 2` on this machine (noisy: other work shares it):
shard cpus 2 instead of 1 made no measurable difference with 2 shards (batch-32 step 217 against 226 ms,
back to back) and was slower with 4 (8 shard threads on 2 cores); attention cpus 1 was slower at batch 32
(0.25-0.28x of local against 0.35-0.42x). With `inprocess` there are no shard actors: the router's process runs every
shard's experts with int(router num_cpus) threads, so the script gives that router the machine's cores.

    python bench/actor_graph.py [--quick] [--transport grpc|collective|inprocess|all] [--shards 2,4]
                                [--micro-batches auto|1|2] [--quantization int8|w8a8|experts_int8]
                                [--json bench/actor_graph_results.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before `import ray` (graph/runtime.py does too)

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine_info import machine as base_machine  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
TRANSPORTS = ("grpc", "collective", "inprocess")
BAR_THROUGHPUT = 0.5  # actor graph / local decode tok/s at batch 32
BAR_ROUND_TRIP_S = 2e-3  # per-layer dispatch round trip at batch 32


def machine() -> dict:
    import grpc
    import ray

    return base_machine(ray=ray.__version__, grpc=grpc.__version__) | {"loadavg_at_start": list(os.getloadavg())}


def ensure_checkpoint(preset: str) -> Path:
    out = CACHE / preset
    if not (out / "config.json").is_file():
        from expertmesh.testing import write_random_checkpoint

        write_random_checkpoint(preset, out, seed=0)
    return out


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def stamps(llm, ids: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Wall-clock time at each engine step that completed a token for every request, from the start; and
    the tokens generated for each prompt."""
    from expertmesh import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(ids):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params)
    produced = dict.fromkeys(range(len(ids)), 0)
    tokens: list[list[int]] = [[] for _ in ids]
    times: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id.split("-")[1])
            produced[i] = len(out.outputs[0].token_ids)
            tokens[i] = list(out.outputs[0].token_ids)
        if min(produced.values()) > len(times):
            times.append(time.perf_counter() - start)
    return times, tokens


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure(name: str, llm, cases, repeats: int, router=None, attention=None) -> dict:
    """Per case: prefill, decode step (best of `repeats`), tokens; with a router, its decode round trips."""
    import ray

    out = {}
    for batch, length, n in cases:
        ids = prompts(batch, length, 32000)
        stamps(llm, ids, 2)  # warm-up: caches, page faults, streams
        if router is not None:
            ray.get(router.round_trips.remote(clear=True))
            ray.get(router.step_timings.remote(clear=True))
            ray.get(attention.step_timings.remote(clear=True))
        runs = [stamps(llm, ids, n) for _ in range(repeats)]
        steps = [(t[-1] - t[0]) / (len(t) - 1) for t, _ in runs]
        medians = [statistics.median(b - a for a, b in itertools.pairwise(t)) for t, _ in runs]
        step = min(steps)
        prefill = min(t[0] for t, _ in runs)
        tokens = runs[0][1]
        r = {"prompt_len": length, "new_tokens": n, "repeats": repeats, "prefill_s": prefill,
             "prefill_tok_s": batch * length / prefill, "decode_step_s": step, "decode_tok_s": batch / step,
             "decode_step_s_runs": steps, "decode_step_median_s_runs": medians,
             "tokens_stable_across_runs": all(tok == tokens for _, tok in runs), "tokens": tokens}
        line = (f"  {name} batch {batch:2d}: prefill {batch * length / prefill:7.1f} tok/s, decode step "
                f"{step * 1e3:7.1f} ms = {batch / step:6.1f} tok/s (runs: "
                f"{', '.join(f'{s * 1e3:.1f}' for s in steps)} ms)")
        if router is not None:
            trips = ray.get(router.round_trips.remote(clear=True))
            # (tokens, seconds[, slowest shard's compute seconds]); prefill dispatches carry whole prompts
            decode = [rec for rec in trips if rec[0] <= batch]
            secs = [rec[1] for rec in decode]
            compute = [rec[2] for rec in decode if len(rec) > 2 and rec[2] > 0]  # 0: the transport cannot tell
            rest = [rec[1] - rec[2] for rec in decode if len(rec) > 2 and rec[2] > 0]
            sizes = sorted({rec[0] for rec in decode})
            med = (lambda xs: statistics.median(xs) if xs else None)
            r["round_trip"] = {
                "count": len(secs), "micro_batch_tokens": sizes, "median_s": med(secs),
                "p90_s": _pct(secs, 0.9) if secs else None, "min_s": min(secs) if secs else None,
                "mean_s": statistics.fmean(secs) if secs else None,
                "per_step_s": sum(secs) / (repeats * (n - 1)) if secs else None,
                # the slowest shard's time on its experts inside each round trip, and the rest (transport,
                # queueing, waiting for a core)
                "shard_compute_median_s": med(compute), "outside_compute_median_s": med(rest),
            }
            if secs:
                line += (f"; dispatch round trip ({'/'.join(map(str, sizes))} tokens) median "
                         f"{r['round_trip']['median_s'] * 1e3:.2f} ms, p90 {r['round_trip']['p90_s'] * 1e3:.2f} ms")
            if compute:
                line += (f" (shard compute {med(compute) * 1e3:.2f} ms + {med(rest) * 1e3:.2f} ms outside it, "
                         "medians)")
        if router is not None:
            # where a step's time goes: the attention actor's own compute, its wait for routed experts, and
            # what is left of the engine step (Ray calls, logits transfer, scheduling, sampling)
            att = [a for a in ray.get(attention.step_timings.remote(clear=True)) if a[0] < 10 * step]
            rtr = ray.get(router.step_timings.remote(clear=True))
            med = (lambda xs: statistics.median(xs) if xs else None)
            if att:
                r["breakdown"] = {
                    "attention_step_s": med([a for a, _ in att]), "attention_compute_s": med([a - b for a, b in att]),
                    "attention_blocked_s": med([b for _, b in att]), "router_dispatch_s": med([c for _, _, c in rtr]),
                }
                b = r["breakdown"]
                line += (f"\n    step breakdown (medians over prefill and decode steps): attention compute "
                         f"{b['attention_compute_s'] * 1e3:.1f} ms, waiting for routed experts "
                         f"{b['attention_blocked_s'] * 1e3:.1f} ms (router dispatching {b['router_dispatch_s'] * 1e3:.1f}"
                         f" ms of it)")
        print(line, flush=True)
        out[f"b{batch}"] = r
    return out


def expert_floor(path: Path, sizes: tuple[int, ...], reps: int = 21, quantization: str | None = None) -> dict:
    """What one MoE layer's routed experts cost with no transport and no other process on the cores: the
    shards' runtime holding every expert, in this process with torch's threads, on the tokens a dispatch
    carries (routed by the checkpoint's own gates). The dispatch round trip's floor on this machine, since
    the shards share its cores."""
    from expertmesh.actors.expert_shard import ExpertShard
    from expertmesh.actors.router import RouterCore
    from expertmesh.kernels.cpu_ext import small_m_kernels
    from expertmesh.model.config import ModelConfig
    from expertmesh.experts import PlacementTable

    small_m_kernels()
    cfg = ModelConfig.from_pretrained(path)
    layers = [i for i, is_moe in enumerate(cfg.moe_layers) if is_moe]
    table = PlacementTable.balanced(layers, cfg.routing.num_experts, 1)
    router, shard = RouterCore(path, table), ExpertShard(path, table.shard_experts(0), quantization=quantization)
    g = torch.Generator().manual_seed(0)
    out = {}
    for size in sizes:
        times, unique = [], []
        for rep in range(reps + len(layers)):  # the first pass over the layers is a warm-up
            layer = layers[rep % len(layers)]  # a new layer each time: its experts are not in the caches
            hidden = torch.randn(size, cfg.hidden_size, generator=g)
            weights, ids = router.route(layer, hidden)
            start = time.perf_counter()
            shard.forward(layer, hidden, ids, weights)
            if rep >= len(layers):
                times.append(time.perf_counter() - start)
                unique.append(ids.unique().numel())
        out[size] = {"median_s": statistics.median(times), "min_s": min(times),
                     "experts_hit": statistics.fmean(unique)}
    del router, shard
    gc.collect()
    return out


def _deployment(transport: str, shards: int, args) -> dict:
    router_cpus = args.router_cpus
    if transport == "inprocess":
        # no shard actors: the router's process runs every shard's experts, with int(router num_cpus)
        # threads: give it the machine's cores, as local mode's experts have
        router_cpus = float(os.cpu_count() or 2)
    return {
        "attention_actors": 1, "expert_shards": shards, "transport": transport,
        "placement_strategy": "PACK",  # one node: SPREAD would place them on it anyway
        "attention_resources": {"num_cpus": args.attention_cpus},
        "router_resources": {"num_cpus": router_cpus},
        "shard_resources": {"num_cpus": args.shard_cpus},
        "micro_batches": args.micro_batches if args.micro_batches == "auto" else int(args.micro_batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter prompts, fewer tokens (smoke run)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "actor_graph_results.json")
    parser.add_argument("--transport", default="grpc", help="grpc, collective, inprocess, a list, or all")
    parser.add_argument("--shards", default="2,4", help="expert shard counts to run, comma separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per case (best is kept)")
    parser.add_argument("--attention-cpus", type=float, default=2.0)
    parser.add_argument("--router-cpus", type=float, default=1.0)
    parser.add_argument("--shard-cpus", type=float, default=1.0)
    parser.add_argument("--micro-batches", default="auto", choices=["auto", "1", "2"],
                        help="micro-batches per step (deployment micro_batches)")
    parser.add_argument("--quantization", default=None, choices=["int8", "w8a8", "experts_int8"],
                        help="quantise at load, local mode and the graph alike (default: float32 weights)")
    args = parser.parse_args()
    transports = TRANSPORTS if args.transport == "all" else tuple(args.transport.split(","))
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad:
        parser.error(f"unknown transport {bad}; pick from {', '.join(TRANSPORTS)} or all")
    shard_counts = [int(s) for s in args.shards.split(",")]
    # (batch, prompt length, new tokens): decode steps = new tokens - 1
    cases = [(1, 32, 33), (32, 128, 17)] if not args.quick else [(1, 32, 9), (32, 64, 5)]
    repeats = args.repeats or (3 if not args.quick else 2)

    from expertmesh import LLM
    from expertmesh.graph import ActorGraph

    info: dict = {"machine": machine(), "cases": [{"batch": b, "prompt_len": p, "new_tokens": n} for b, p, n in cases],
                  "quick": args.quick, "bars": {"b32_throughput_ratio_min": BAR_THROUGHPUT,
                                                "b32_round_trip_max_s": BAR_ROUND_TRIP_S}}
    print("machine:", json.dumps(info["machine"]), flush=True)
    path = ensure_checkpoint("small")
    # A token budget that holds the whole batch's prompts: every decode step is a pure decode step.
    engine_kwargs = {"dtype": "float32", "max_num_seqs": 64, "kv_cache_gib": 1.0,
                     "max_num_batched_tokens": max(b * p for b, p, _ in cases), "quantization": args.quantization}
    info["quantization"] = args.quantization
    wall = time.perf_counter()

    print(f"local mode (torch threads: {torch.get_num_threads()})", flush=True)
    llm = LLM(str(path), **engine_kwargs)
    info["local"] = measure("local        ", llm, cases, repeats)
    del llm
    gc.collect()
    sizes = sorted({1, *(b // 2 for b, _, _ in cases if b > 1), *(b for b, _, _ in cases)})  # 1, 16 and 32
    info["expert_floor"] = expert_floor(path, tuple(sizes), quantization=args.quantization)
    print(f"expert compute per MoE layer, in this process, no transport ({torch.get_num_threads()} threads): "
          + ", ".join(f"{t} tokens {v['median_s'] * 1e3:.2f} ms ({v['experts_hit']:.0f} experts hit)"
                      for t, v in info["expert_floor"].items()), flush=True)

    import ray

    info["graphs"] = {}
    for transport in transports:
        for shards in shard_counts:
            key = f"{transport}/{shards}"
            dep = _deployment(transport, shards, args)
            print(f"actor graph {key}: {json.dumps(dep)}", flush=True)
            started = time.perf_counter()
            try:
                with LLM(str(path), executor=ActorGraph(dep), **engine_kwargs) as llm:
                    start_s = time.perf_counter() - started
                    print(f"  started in {start_s:.1f} s", flush=True)
                    res = measure(f"{key:13s}", llm, cases, repeats, router=llm.llm_engine.executor.router,
                                  attention=llm.llm_engine.executor.attention[0])
                    res["recoveries"] = list(llm.llm_engine.executor.recoveries)
                    res["micro_batches_used"] = llm.llm_engine.executor.micro_batches
                    if res["recoveries"]:
                        print(f"  !!! the graph recovered from failed steps during the run: {res['recoveries']}")
            except Exception as e:  # noqa: BLE001 -- report it and go on with the other graphs
                print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
                info["graphs"][key] = {"deployment": dep, "error": f"{type(e).__name__}: {e}"}
                if ray.is_initialized():
                    ray.shutdown()
                continue
            res["deployment"], res["start_s"] = dep, start_s
            info["graphs"][key] = res

    # -- the table --------------------------------------------------------------------------------------
    print(f"\n(total {time.perf_counter() - wall:.0f} s; decode = best of {repeats}; round trips = per MoE layer "
          "dispatch, router-side, decode steps only)\n")
    local = info["local"]
    head = ("| mode | batch | prompt | decode ms/step | decode tok/s | vs local | dispatch RT median | RT p90 | "
            "RT tokens | shard compute / rest (medians) | dispatch ms/step |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for batch, length, _ in cases:
        r = local[f"b{batch}"]
        print(f"| local | {batch} | {length} | {r['decode_step_s'] * 1e3:.1f} | {r['decode_tok_s']:.1f} | 1.00x | "
              "- | - | - | - | - |")
    mismatches = []
    for key, res in info["graphs"].items():
        if "error" in res:
            print(f"| {key} | - | - | FAILED | - | - | - | - | - | - | - |")
            continue
        for batch, length, _ in cases:
            r, base = res[f"b{batch}"], local[f"b{batch}"]
            ratio = r["decode_tok_s"] / base["decode_tok_s"]
            rt = r.get("round_trip", {})
            med = f"{rt['median_s'] * 1e3:.2f} ms" if rt.get("median_s") is not None else "-"
            p90 = f"{rt['p90_s'] * 1e3:.2f} ms" if rt.get("p90_s") is not None else "-"
            sizes = "/".join(map(str, rt.get("micro_batch_tokens", []))) or "-"
            per_step = f"{rt['per_step_s'] * 1e3:.1f}" if rt.get("per_step_s") is not None else "-"
            split = "-"
            if rt.get("shard_compute_median_s") is not None:
                split = f"{rt['shard_compute_median_s'] * 1e3:.2f} / {rt['outside_compute_median_s'] * 1e3:.2f} ms"
            print(f"| {key} | {batch} | {length} | {r['decode_step_s'] * 1e3:.1f} | {r['decode_tok_s']:.1f} | "
                  f"**{ratio:.2f}x** | {med} | {p90} | {sizes} | {split} | {per_step} |")
            same = r["tokens"] == base["tokens"]
            r["tokens_equal_local"] = same
            r["ratio_vs_local"] = ratio
            if not same:
                diff = sum(a != b for a, b in zip(r["tokens"], base["tokens"]))
                mismatches.append(f"{key} batch {batch}: {diff}/{batch} prompts differ")
    floor = info["expert_floor"]
    print("\nexpert compute floor of one dispatch (every expert in one process, no transport, "
          f"{info['machine']['torch_threads']} threads): "
          + ", ".join(f"{t} tokens {v['median_s'] * 1e3:.2f} ms" for t, v in floor.items()))
    ok_graphs = [k for k, v in info["graphs"].items() if "error" not in v]
    if not mismatches and ok_graphs:
        print(f"greedy tokens: every actor graph ({', '.join(ok_graphs)}) matches local mode on every benchmark prompt")
    for m in mismatches:
        print(f"!!!!!!!! GREEDY TOKENS DIFFER FROM LOCAL MODE: {m} !!!!!!!!")
    info["tokens_equal_local"] = not mismatches

    verdicts = {}
    b32 = f"b{max(b for b, _, _ in cases)}"
    for key in ok_graphs:
        r = info["graphs"][key][b32]
        rt = r.get("round_trip", {}).get("median_s")
        verdicts[key] = {"throughput": r["ratio_vs_local"] >= BAR_THROUGHPUT,
                         "round_trip": rt is not None and rt < BAR_ROUND_TRIP_S}
        print(f"bars {key} at batch {b32[1:]}: throughput {r['ratio_vs_local']:.2f}x of local "
              f"({'PASS' if verdicts[key]['throughput'] else 'FAIL'}, bar >= {BAR_THROUGHPUT}x); dispatch round trip "
              f"median {rt * 1e3 if rt is not None else float('nan'):.2f} ms "
              f"({'PASS' if verdicts[key]['round_trip'] else 'FAIL'}, bar < {BAR_ROUND_TRIP_S * 1e3:.0f} ms)")
    info["verdicts"] = verdicts
    info["loadavg_at_end"] = list(os.getloadavg())
    info["total_s"] = time.perf_counter() - wall

    # Tokens are only for the comparison: keep the JSON small.
    for res in [info["local"], *info["graphs"].values()]:
        for b, _, _ in cases:
            res.get(f"b{b}", {}).pop("tokens", None)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
