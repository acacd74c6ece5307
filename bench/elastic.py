"""Elastic experts on the `small` preset (issue 15, item 5): live rebalancing under skewed traffic, our
rebalancer against EPLB on the loads it saw, the swap step, and expert shards scaling up and down while
requests decode. One run, one machine.

1. Prompts that concentrate routing. The offline model (local mode) decodes each candidate alone: prompts
   of one repeated token, and random ("ordinary") prompts. Its concentration is the share of its decode
   (token, expert) pairs that its top_k busiest experts take, per MoE layer, averaged over the layers (1.0:
   every decode token routed to the same experts). The batch is the `--hot-prompts` most concentrated
   prompts, copied to fill all but `--ordinary` sequences, plus that many ordinary ones. Local mode's
   greedy tokens for the batch are kept to check the actor graph's.
2. Rebalancing. An actor graph of 4 expert shards over gRPC, `--spare-slots` slots per shard beyond the
   64 / 4 = 16 its balanced placement (version 0) uses. Phases on the same batch, each a fresh generation
   of `--new-tokens` tokens: a warm-up; "before" (balanced table); "swap" (`ElasticExperts.rebalance(force=
   True)` before its `--rebalance-at`-th decode step, steps going on while the replicas load and until the
   swap commits); "after"; then, to see the noise on a shared machine, the balanced table and the
   rebalanced one swapped back in turn (`set_placement`) for `--ab-rounds` - 1 more before/after pairs.
   Per phase: its decode load (the router's load counts after the last step less those after the prefill
   step), each layer's busiest shard over mean under the table in force (1 / `layer_balancedness`), decode
   tok/s (sequences x decode steps / the steps' wall time), the router's per-layer dispatch round trip and
   the slowest shard's compute inside it (medians), and the cores used by this script's processes (the
   driver, Ray, the graph's actors) and by everything else on the machine (psutil).
3. Rebalancer against EPLB (`bench/eplb_reference.py`) on the router's load window that `rebalance` read
   (every step since the graph started, prefill steps included) and on the "before" phase's decode load:
   none (the balanced table in use), EPLB and ours each fitted to that load, the lower bound, same shards
   and slots; on the decode load also the table swapped in (ours, fitted to the window).
4. The swap step: the step that commits the new table against the median of the 4 decode steps on each
   side, and the swap's `seconds_to_swap` from `placement_swaps()`: from the start of the swap to the step
   boundary that commits it, i.e. the replicas' loading plus the wait for that boundary.
5. Scaling. An actor graph with `expert_shards: {min: 2, max: 3}`, `--scale-batch` requests kept in
   flight (a finished one is replaced, until a few steps after the scale-down). `ElasticExperts.scale(3)`
   from a thread, steps going on; the time from the call to the end of the first step after which the new
   shard's `pairs_served` is non-zero. Then `scale(2)`: the time from the call to the end of the step that
   commits the smaller table (the third shard is retired in that step). Every request must finish with all
   its tokens; they are compared with local mode's greedy tokens (a prefix of the batch's, same prompts).

Resources: this script starts the Ray cluster (`graph/runtime.connect`) with `--ray-cpus` logical CPUs
(room for the extra shard) and Ray's workers at niceness 0, as `expertmesh serve` does; every actor
shares the machine's cores, with torch threads = its num_cpus (attention 2, router 1, shards 1).

    python bench/elastic.py [--quick] [--json bench/elastic_results.json]
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
import threading
import time
from pathlib import Path

import numpy as np
import torch
from eplb_reference import busiest_over_mean, eplb, lower_bound, of_table  # bench/ is on sys.path
from machine_info import machine as base_machine

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
BAR_BALANCE = 1.15  # busiest shard over mean, every layer, after the rebalance
BAR_SCALE_UP_S = 5.0  # scale(n + 1) to the first step in which the new shard takes tokens
NEIGHBOURS = 4  # decode steps on each side of the commit step


def machine() -> dict:
    import grpc
    import ray

    return base_machine(ray=ray.__version__, grpc=grpc.__version__, numpy=np.__version__) | {
        "loadavg_at_start": list(os.getloadavg())}


def ensure_checkpoint(preset: str) -> Path:
    out = CACHE / preset
    if not (out / "config.json").is_file():
        from expertmesh.testing import write_random_checkpoint

        write_random_checkpoint(preset, out, seed=0)
    return out


def load_totals(executor) -> np.ndarray:
    counts = executor.load_counts()  # since the start
    return np.array([counts[layer] for layer in sorted(counts)], dtype=np.int64)  # [L, E]


def imbalance(table, load: np.ndarray) -> list[float]:
    """Per MoE layer, busiest shard over mean under `table` (1 / layer_balancedness)."""
    from expertmesh.experts import layer_balancedness

    return [1 / layer_balancedness(table, layer, row) for layer, row in zip(table.moe_layers, load.tolist())]


def cpu_now() -> tuple[float, float]:
    """CPU seconds so far of the whole machine, and of this process and its descendants (Ray's daemons and the
    graph's actors): the difference over a phase is other people's work on the shared machine."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    me = psutil.Process()
    ours = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            c = proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        ours += c.user + c.system
    return busy, ours


def cores(before: tuple[float, float], after: tuple[float, float], wall: float) -> dict[str, float]:
    busy, ours = after[0] - before[0], after[1] - before[1]
    return {"ours": ours / wall, "others": max(busy - ours, 0.0) / wall}


def summary(xs) -> str:
    return f"max {max(xs):.3f}, mean {statistics.fmean(xs):.3f}"


# -- 1. prompts ------------------------------------------------------------------------------------------
def concentration(load: np.ndarray, top_k: int) -> float:
    """Mean over layers of the share of pairs the `top_k` busiest experts take."""
    top = np.sort(load, axis=1)[:, ::-1][:, :top_k].sum(1)
    return float((top / np.maximum(load.sum(1), 1)).mean())


def probe_prompt(llm, prompt: list[int], new_tokens: int) -> np.ndarray:
    """The decode load [L, E] of one prompt generated alone (load after the prefill step left out)."""
    from expertmesh import SamplingParams

    engine, ex = llm.llm_engine, llm.llm_engine.executor
    engine.add_request("probe", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    engine.step()  # the prefill
    start = load_totals(ex)
    while engine.has_unfinished_requests():
        engine.step()
    return load_totals(ex) - start


def pick_traffic(llm, args, vocab: int, top_k: int, moe_layers) -> dict:
    from expertmesh.experts import PlacementTable

    g = torch.Generator().manual_seed(0)
    ordinary = [torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.ordinary)]
    tokens = np.linspace(4, vocab - 1, args.candidates).astype(int).tolist()
    candidates = [[t] * args.prompt_len for t in tokens]
    loads = [probe_prompt(llm, p, args.probe_tokens) for p in candidates + ordinary]
    scores = [concentration(x, top_k) for x in loads]
    ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])
    hot = ranked[:args.hot_prompts]
    skewed = [candidates[i] for i in itertools.islice(itertools.cycle(hot), args.batch - args.ordinary)]
    batch = skewed + ordinary
    # what the probes predict for the batch under the balanced 4-shard table
    mix = sum(loads[i] for i in itertools.islice(itertools.cycle(hot), args.batch - args.ordinary)) + sum(
        loads[len(candidates):])
    predicted = imbalance(PlacementTable.balanced(moe_layers, mix.shape[1], args.shards), mix)
    return {"prompts": batch, "candidates": [{"token": t, "concentration": s} for t, s in zip(tokens, scores)],
            "ordinary_concentration": scores[len(candidates):], "hot_tokens": [tokens[i] for i in hot],
            "predicted_balanced_imbalance": predicted}


# -- 2-4. phases of one batch on the actor graph ---------------------------------------------------------
_request_ids = itertools.count()


def run_phase(llm, prompts: list[list[int]], new_tokens: int, before_step=None) -> dict:
    """One generation of `prompts`; per step its wall time and the placement version after it; the decode
    load and decode tok/s. `before_step(i)` is called before step i."""
    import ray
    from expertmesh import SamplingParams

    engine, ex = llm.llm_engine, llm.llm_engine.executor
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    tag = next(_request_ids)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    steps: list[dict] = []
    prefilled_at, start_load = None, None
    while engine.has_unfinished_requests():
        if before_step is not None:
            before_step(len(steps))
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        for out in outs:
            tokens[int(out.request_id.split("-")[1])] = list(out.outputs[0].token_ids)
        steps.append({"start": start, "end": end, "seconds": end - start, "version": ex.placement.version})
        if prefilled_at is None and all(tokens):
            prefilled_at, start_load, start_cpu = len(steps) - 1, load_totals(ex), cpu_now()
            ray.get(ex.router.round_trips.remote(True))
    decode = [s["seconds"] for s in steps[prefilled_at + 1:]]
    cpu = cores(start_cpu, cpu_now(), steps[-1]["end"] - steps[prefilled_at]["end"])
    trips = ray.get(ex.router.round_trips.remote(True))  # (tokens, seconds, slowest shard's compute seconds)
    return {"steps": steps, "prefill_steps": prefilled_at + 1, "decode_steps": len(decode), "cores": cpu,
            "round_trip_median_s": statistics.median(t[1] for t in trips),
            "slowest_shard_compute_median_s": statistics.median(t[2] for t in trips),
            "decode_tok_s": len(prompts) * len(decode) / sum(decode), "decode_step_median_s": statistics.median(decode),
            "decode_load": load_totals(ex) - start_load, "tokens": tokens}


def swap_to(llm, table) -> None:
    """Loads `table`'s replicas; the next phase's first step commits it."""
    llm.llm_engine.executor.set_placement(table, wait=True)


def rebalancing(llm, traffic: list[list[int]], args) -> dict:
    from expertmesh.experts import rebalance
    from expertmesh.platform.elastic import ElasticExperts

    ex = llm.llm_engine.executor
    elastic = ElasticExperts(ex)
    balanced = ex.placement
    out: dict = {"slots_per_shard": elastic.policy.slots_per_shard}
    run_phase(llm, traffic, 4)  # warm-up: caches, page faults, streams
    phases = [("before", run_phase(llm, traffic, args.new_tokens))]
    seen: dict = {}

    def before_step(i: int) -> None:
        if i == 1 + args.rebalance_at:
            seen["window"] = np.array([row for _, row in sorted(ex.load_counts(window=True).items())])
            started = time.perf_counter()
            seen["decision"] = elastic.rebalance(force=True)
            seen["call_s"], seen["at"] = time.perf_counter() - started, i

    swap = run_phase(llm, traffic, args.new_tokens, before_step)
    rebalanced = ex.placement
    phases.append(("after", run_phase(llm, traffic, args.new_tokens)))
    for _ in range(args.ab_rounds - 1):
        swap_to(llm, balanced)
        phases.append(("before", run_phase(llm, traffic, args.new_tokens)))
        swap_to(llm, rebalanced)
        phases.append(("after", run_phase(llm, traffic, args.new_tokens)))
    tables = {"before": balanced, "after": rebalanced}
    out["phases"] = [{"name": name, "version": p["steps"][-1]["version"],
                      "imbalance": imbalance(tables[name], p["decode_load"]),
                      **{k: p[k] for k in ("decode_tok_s", "decode_step_median_s", "decode_steps", "cores",
                                           "round_trip_median_s", "slowest_shard_compute_median_s")}}
                     for name, p in phases]
    out["tokens_equal_across_phases"] = all(p["tokens"] == swap["tokens"] for _, p in phases)
    out["tokens"] = swap["tokens"]
    out["decision"] = seen["decision"]
    out["rebalance_call_s"] = seen["call_s"]
    out["swap"] = swap_step(swap, seen["at"], ex.placement_swaps()[0])
    # 3. the placements on the window rebalance read, and on the "before" phase's decode load
    layers, shards, slots = list(balanced.moe_layers), balanced.num_shards, elastic.policy.slots_per_shard
    ours = rebalance(seen["window"], moe_layers=layers, num_shards=shards, slots_per_shard=slots, base=balanced)
    assert dict(ours.replicas) == dict(rebalanced.replicas)  # what ElasticExperts swapped in
    out["peers"] = {name: peers(load, balanced, slots) for name, load in
                    (("window", seen["window"]), ("before_decode", phases[0][1]["decode_load"]))}
    out["peers"]["before_decode"]["swapped_in"] = imbalance(ours, phases[0][1]["decode_load"])
    out["peers"]["window"]["pairs_per_layer"] = seen["window"].sum(1).tolist()
    out["window_rows"] = seen["window"].tolist()
    return out


def peers(load: np.ndarray, none, slots: int) -> dict:
    """Per layer, busiest / mean on `load` under the table in use (`none`), EPLB's and ours fitted to `load`
    with the same shards and slots, and the lower bound."""
    from expertmesh.experts import rebalance

    n, layers = none.num_shards, list(none.moe_layers)
    ours = rebalance(load, moe_layers=layers, num_shards=n, slots_per_shard=slots, base=none)
    figures: dict[str, list[float]] = {"none": [], "eplb": [], "ours": [], "bound": []}
    for layer, row in zip(none.moe_layers, load.tolist()):
        figures["none"].append(busiest_over_mean(row, of_table(none, layer), n))
        figures["eplb"].append(busiest_over_mean(row, eplb(row, num_shards=n, slots_per_shard=slots), n))
        figures["ours"].append(busiest_over_mean(row, of_table(ours, layer), n))
        figures["bound"].append(lower_bound(row, n, slots))
    return figures


def swap_step(phase: dict, called_at: int, record: dict) -> dict:
    """The step that committed the swap against its decode neighbours, and the swap's record."""
    steps, first = phase["steps"], phase["prefill_steps"]
    commit = next(i for i, s in enumerate(steps) if s["version"] == record["version"])
    window = range(max(first, commit - NEIGHBOURS), min(len(steps), commit + NEIGHBOURS + 1))
    loading = [s["seconds"] for s in steps[called_at:commit]]
    return {"record": record, "called_before_step": called_at, "commit_step": commit,
            "steps_while_loading": len(loading),
            "step_while_loading_median_s": statistics.median(loading) if loading else None,
            "commit_step_s": steps[commit]["seconds"],
            "neighbours_median_s": statistics.median(steps[i]["seconds"] for i in window if i != commit),
            "call_to_commit_end_s": steps[commit]["end"] - steps[called_at]["start"],
            "previous_step_s": steps[commit - 1]["seconds"],
            "step_s_around_commit": [steps[i]["seconds"] for i in window]}


# -- 5. scaling ------------------------------------------------------------------------------------------
def scaling(llm, traffic: list[list[int]], local: list[list[int]], args) -> dict:
    """Keeps `--scale-batch` requests in flight; scales up after a few steps, down once the new shard serves
    and some steps passed, stops adding requests a few steps after that and drains."""
    import ray
    from expertmesh import SamplingParams
    from expertmesh.platform.elastic import ElasticExperts

    engine, ex = llm.llm_engine, llm.llm_engine.executor
    elastic = ElasticExperts(ex)
    params = SamplingParams(temperature=0.0, max_tokens=args.scale_tokens, ignore_eos=True)
    start_shards = ex.placement.num_shards
    pool = itertools.cycle(range(len(traffic)))
    submitted: dict[str, int] = {}
    finished: dict[str, list[int]] = {}
    ev: dict = {}
    up: dict = {}

    def submit() -> None:
        p = next(pool)
        rid = f"scale-{len(submitted)}"
        engine.add_request(rid, {"prompt_token_ids": traffic[p]}, params)
        submitted[rid] = p

    def scale_up() -> None:
        try:
            up["change"] = elastic.scale(start_shards + 1)
        except Exception as e:  # noqa: BLE001 - reported in the results
            up["error"] = f"{type(e).__name__}: {e}"
        up["returned"] = time.perf_counter()

    for _ in range(args.scale_batch):
        submit()
    thread = threading.Thread(target=scale_up, name="scale-up")
    steps: list[dict] = []
    cpu_start, wall_start = cpu_now(), time.perf_counter()
    deadline = time.monotonic() + args.scale_deadline_s
    while engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            ev["error"] = f"gave up after {args.scale_deadline_s} s: {ev}"
            break
        i = len(steps)
        if i == 3:  # past the first prefill
            ev["up_called"] = time.perf_counter()
            thread.start()
        if "up_served" in ev and "down_called" not in ev and i >= ev["up_served_step"] + args.steps_between:
            ev["down_called"] = time.perf_counter()
            # up to here: the shard retired below takes its CPU time with it when it exits
            ev["cores"] = cores(cpu_start, cpu_now(), ev["down_called"] - wall_start)
            ev["down_change"] = elastic.scale(start_shards)
            ev["down_return_s"] = time.perf_counter() - ev["down_called"]
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        shards = ex.placement.num_shards
        steps.append({"start": start, "end": end, "seconds": end - start, "shards": shards,
                      "version": ex.placement.version})
        if "up_called" in ev and "up_commit_step" not in ev and shards == start_shards + 1:
            ev["up_commit_step"] = i
        if "up_commit_step" in ev and "up_served" not in ev:
            new = next(m.handle for m in ex.shard_members if m.index == start_shards)
            if ray.get(new.ping.remote(), timeout=30)["pairs_served"] > 0:
                ev["up_served"], ev["up_served_step"] = end, i
        if "down_called" in ev and "down_commit" not in ev and shards == start_shards:
            ev["down_commit"], ev["down_commit_step"] = end, i
        for out in outs:
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
                if "error" not in up and ("down_commit" not in ev or i < ev["down_commit_step"] + args.steps_between):
                    submit()
    thread.join(timeout=60)
    complete = sum(len(finished.get(r, [])) == args.scale_tokens for r in submitted)
    equal = sum(finished.get(r) == local[p][:args.scale_tokens] for r, p in submitted.items())
    t = ev.get
    return {
        "from_shards": start_shards, "up": up.get("change"), "up_error": up.get("error"), "error": ev.get("error"),
        "up_call_return_s": up["returned"] - ev["up_called"] if "returned" in up else None,
        "up_to_first_tokens_s": t("up_served", np.nan) - ev["up_called"],
        "down": ev.get("down_change"), "down_call_return_s": ev.get("down_return_s"),
        "down_to_commit_s": t("down_commit", np.nan) - t("down_called", np.nan),
        "requests": len(submitted), "completed_all_tokens": complete, "failed": len(submitted) - complete,
        "equal_local_tokens": equal, "recoveries": list(ex.recoveries), "swaps": ex.placement_swaps(),
        "shards_at_end": len(ex.shard_members), "steps": len(steps),
        **{k: ev.get(k) for k in ("up_commit_step", "up_served_step", "down_commit_step")},
        "step_s": [s["seconds"] for s in steps],
        "cores": ev.get("cores", {"ours": np.nan, "others": np.nan}),  # from the start to scale-down
        "step_median_s": {"before_up": _median(steps, 3, since=1),
                          "while_starting": _median(steps, ev.get("up_commit_step"), since=3),
                          "three_shards": _median(steps, ev.get("down_commit_step"), since=ev.get("up_commit_step"))},
    }


def _median(steps: list[dict], until: int | None, since: int | None) -> float | None:
    xs = [s["seconds"] for s in steps[since:until]] if since is not None and until is not None else []
    return statistics.median(xs) if xs else None


def settle(timeout_s: float = 60) -> None:
    """Until the last graph's actors have given their CPUs back."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            raise RuntimeError("the previous graph's actors still hold CPUs")
        time.sleep(0.2)


# -- the run ---------------------------------------------------------------------------------------------
def deployment(shards, slots: int | None) -> dict:
    return {"expert_shards": shards, "transport": "grpc", "expert_slots_per_shard": slots,
            "placement_strategy": "PACK",  # one node: SPREAD would place them on it anyway
            "attention_resources": {"num_cpus": 2}, "router_resources": {"num_cpus": 1},
            "shard_resources": {"num_cpus": 1}}


def local_phase(path: Path, args, engine_kwargs: dict, model) -> tuple[dict, list[list[int]]]:
    from expertmesh import LLM, SamplingParams

    llm = LLM(str(path), **engine_kwargs)
    moe_layers = [i for i, is_moe in enumerate(model.moe_layers) if is_moe]
    started = time.perf_counter()
    traffic = pick_traffic(llm, args, model.vocab_size, model.routing.top_k, moe_layers)
    traffic["probe_s"] = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max(args.new_tokens, args.scale_tokens), ignore_eos=True)
    local = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in traffic["prompts"]],
                                                          params)]
    del llm
    gc.collect()
    return traffic, [list(t) for t in local]


def report(info: dict) -> None:
    rb, sc = info["rebalance"], info["scaling"]
    layers = info["moe_layers"]
    print(f"\n== rebalancing: 4 shards x {rb['slots_per_shard']} slots, batch {info['args']['batch']} ==")
    print("decode load per phase, busiest shard / mean shard per layer (" + ", ".join(map(str, layers)) + ")")
    for p in rb["phases"]:
        print(f"  {p['name']:<6} v{p['version']}: {' '.join(f'{x:.3f}' for x in p['imbalance'])}  "
              f"({summary(p['imbalance'])}); decode {p['decode_tok_s']:.1f} tok/s "
              f"(median step {p['decode_step_median_s'] * 1e3:.0f} ms, {p['decode_steps']} steps; cores used by "
              f"the graph {p['cores']['ours']:.2f}, by other work {p['cores']['others']:.2f}; per-layer dispatch "
              f"{_ms(p['round_trip_median_s'])}, slowest shard's compute in it "
              f"{_ms(p['slowest_shard_compute_median_s'])})")
    before = [p["decode_tok_s"] for p in rb["phases"] if p["name"] == "before"]
    after = [p["decode_tok_s"] for p in rb["phases"] if p["name"] == "after"]
    ratios = [a / b for a, b in zip(after, before)]
    print(f"  decode tok/s after / before, per round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    d = rb["decision"]
    print(f"  rebalance(force=True): worst layer on the window {d['before']:.3f} -> {d['after']:.3f} "
          f"(gain {d['gain']:.1%}), decided in {d['decide_seconds'] * 1e3:.0f} ms, call "
          f"{rb['rebalance_call_s'] * 1e3:.0f} ms, "
          f"{d['replicas_loaded']} replicas loaded, {d['replicas_dropped']} dropped")
    print(f"  greedy tokens: equal across phases {rb['tokens_equal_across_phases']}, equal local mode "
          f"{info['rebalance_tokens_equal_local']}")
    for name, figs in rb["peers"].items():
        print(f"\n-- peers on the {name} load: busiest / mean per layer --")
        for k, v in figs.items():
            if k != "pairs_per_layer":
                print(f"  {k:<6} {' '.join(f'{x:.3f}' for x in v)}  ({summary(v)})")
    s = rb["swap"]
    print(f"\n-- the swap --\n  called before step {s['called_before_step']}, committed in step {s['commit_step']} "
          f"({s['steps_while_loading']} steps while loading, median {_ms(s['step_while_loading_median_s'])}); "
          f"commit step {_ms(s['commit_step_s'])} against {_ms(s['neighbours_median_s'])} (median of "
          f"{NEIGHBOURS} decode steps each side); seconds_to_swap {s['record']['seconds_to_swap']:.2f} s (the step before "
          f"the commit took {_ms(s['previous_step_s'])}); call to end of commit step {s['call_to_commit_end_s']:.2f} s")
    print(f"  step times around it (ms): {', '.join(f'{x * 1e3:.0f}' for x in s['step_s_around_commit'])}")
    print(f"\n== scaling {sc['from_shards']} -> {sc['from_shards'] + 1} -> {sc['from_shards']} shards, "
          f"{info['args']['scale_batch']} requests in flight ==")
    if sc.get("up_error") or sc.get("error"):
        print(f"  !!! {sc.get('up_error') or sc.get('error')}")
    print(f"  up: scale() returned after {_s(sc['up_call_return_s'])} (shard start "
          f"{_s((sc['up'] or {}).get('start_seconds'))}); "
          f"its replicas loaded and the swap waiting for a step boundary {_s(sc['swaps'][0]['seconds_to_swap'])}; "
          f"end of the commit step, the first with tokens on the new shard {_s(sc['up_to_first_tokens_s'])}")
    print(f"  down: scale() returned after {_s(sc['down_call_return_s'])}; commit (and retirement) "
          f"{_s(sc['down_to_commit_s'])}")
    print(f"  requests {sc['requests']}: completed with all tokens {sc['completed_all_tokens']}, "
          f"failed {sc['failed']}, "
          f"tokens equal local mode {sc['equal_local_tokens']}; recoveries {sc['recoveries']}; "
          f"swaps {[(w['outcome'], w.get('num_shards'), round(w['seconds_to_swap'], 2)) for w in sc['swaps']]}")
    m = sc["step_median_s"]
    print(f"  step medians: before {_ms(m['before_up'])}, while the shard starts {_ms(m['while_starting'])}, "
          f"on 3 shards {_ms(m['three_shards'])}; cores used by the graph {sc['cores']['ours']:.2f}, by other work "
          f"{sc['cores']['others']:.2f}")
    print("\n== bars ==")
    for k, v in info["verdicts"].items():
        print(f"  {k}: {v}")


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def _s(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer candidates, tokens and rounds (smoke run)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "elastic_results.json")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ordinary", type=int, default=8, help="random prompts in the batch")
    parser.add_argument("--hot-prompts", type=int, default=4, help="distinct concentrated prompts in the batch")
    parser.add_argument("--candidates", type=int, default=None, help="repeated-token prompts probed (24)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--probe-tokens", type=int, default=None, help="tokens each probe decodes (16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per phase generation (48)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--spare-slots", type=int, default=2, help="slots per shard beyond experts / shards")
    parser.add_argument("--rebalance-at", type=int, default=3, help="decode step of the swap phase to rebalance at")
    parser.add_argument("--ab-rounds", type=int, default=None, help="before/after pairs (3)")
    parser.add_argument("--scale-batch", type=int, default=16)
    parser.add_argument("--scale-tokens", type=int, default=None, help="tokens per request while scaling (32)")
    parser.add_argument("--steps-between", type=int, default=6, help="steps on 3 shards before scaling down")
    parser.add_argument("--scale-deadline-s", type=float, default=300.0)
    parser.add_argument("--ray-cpus", type=int, default=12)
    args = parser.parse_args()
    quick = args.quick
    args.candidates = args.candidates or (8 if quick else 24)
    args.probe_tokens = args.probe_tokens or (8 if quick else 16)
    args.new_tokens = args.new_tokens or (16 if quick else 48)
    args.ab_rounds = args.ab_rounds or (1 if quick else 3)
    args.scale_tokens = args.scale_tokens or (12 if quick else 32)
    if args.ordinary >= args.batch:
        parser.error("--ordinary must leave room for skewed sequences in --batch")

    from expertmesh import LLM
    from expertmesh.graph import ActorGraph
    from expertmesh.graph.runtime import connect, disconnect
    from expertmesh.model.config import ModelConfig

    wall = time.perf_counter()
    info: dict = {"machine": machine(),
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "bars": {"busiest_over_mean_after_max": BAR_BALANCE, "scale_up_s_max": BAR_SCALE_UP_S}}
    print("machine:", json.dumps(info["machine"]), flush=True)
    path = ensure_checkpoint("small")
    model = ModelConfig.from_pretrained(path)
    info["moe_layers"] = [i for i, is_moe in enumerate(model.moe_layers) if is_moe]
    engine_kwargs = {"dtype": "float32", "max_num_seqs": 64, "kv_cache_gib": 1.0,
                     "max_num_batched_tokens": max(args.batch * args.prompt_len, 512)}

    traffic, local = local_phase(path, args, engine_kwargs, model)
    prompts = traffic.pop("prompts")
    info["traffic"] = traffic
    cand = sorted(traffic["candidates"], key=lambda c: -c["concentration"])
    print(f"probed {len(cand)} repeated-token prompts and {args.ordinary} ordinary ones in {traffic['probe_s']:.0f} s; "
          f"concentration (top-{model.routing.top_k} share of decode pairs): repeated "
          f"{cand[-1]['concentration']:.3f}-{cand[0]['concentration']:.3f}, ordinary "
          f"{min(traffic['ordinary_concentration']):.3f}-{max(traffic['ordinary_concentration']):.3f}; hot tokens "
          f"{traffic['hot_tokens']}; the batch under the balanced table, as the probes predict: "
          f"{summary(traffic['predicted_balanced_imbalance'])}", flush=True)

    slots = model.routing.num_experts // args.shards + args.spare_slots
    owns_ray = connect(num_cpus=args.ray_cpus, worker_niceness=0)
    try:
        dep = deployment(args.shards, slots)
        print(f"actor graph: {json.dumps(dep)}", flush=True)
        with LLM(str(path), executor=ActorGraph(dep), **engine_kwargs) as llm:
            info["rebalance"] = rebalancing(llm, prompts, args)
            info["rebalance"]["recoveries"] = list(llm.llm_engine.executor.recoveries)
        info["rebalance"]["deployment"] = dep
        info["rebalance_tokens_equal_local"] = all(
            t == local[i][:args.new_tokens] for i, t in enumerate(info["rebalance"].pop("tokens")))
        settle()
        dep = deployment({"min": 2, "max": 3}, None)
        print(f"actor graph: {json.dumps(dep)}", flush=True)
        with LLM(str(path), executor=ActorGraph(dep), **engine_kwargs) as llm:
            info["scaling"] = scaling(llm, prompts, local, args)
        info["scaling"]["deployment"] = dep
    finally:
        disconnect(owns_ray)

    rb, sc = info["rebalance"], info["scaling"]
    after = [p for p in rb["phases"] if p["name"] == "after"]
    worst_after = max(max(p["imbalance"]) for p in after)
    info["verdicts"] = {
        "balance_after": {"worst_layer": worst_after, "bar": BAR_BALANCE, "met": worst_after <= BAR_BALANCE},
        "scale_up": {"seconds": sc["up_to_first_tokens_s"], "bar": BAR_SCALE_UP_S,
                     "met": bool(sc["up_to_first_tokens_s"] <= BAR_SCALE_UP_S)},
        "no_failed_requests": {"failed": sc["failed"], "met": sc["failed"] == 0 and not sc["recoveries"]},
    }
    info["loadavg_at_end"] = list(os.getloadavg())
    info["total_s"] = time.perf_counter() - wall
    report(info)
    print(f"\n(total {info['total_s']:.0f} s; load average at start {info['machine']['loadavg_at_start']}, "
          f"at end {info['loadavg_at_end']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2, default=_jsonable))
    print(f"wrote {args.json}")
    return 0


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
