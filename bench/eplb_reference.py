"""DeepSeek's EPLB restated from its description, as the peer `expertmesh.experts.rebalance` is measured
against, and a benchmark of both on synthetic skewed loads.

EPLB (github.com/deepseek-ai/EPLB), per layer, with R = num_shards * slots_per_shard replicas:
- hierarchical, when the routing groups divide over the nodes: pack the groups onto the nodes, the same
  number on each, heaviest group first onto the lightest node with room; inside each node, replicate (one
  replica each, then each of the node's spare replicas to the expert with the most load per replica), then
  pack the replicas onto the node's shards the same way, exactly `slots_per_shard` on each;
- global otherwise: the same with one group and one node.
Its packing does not stop two replicas of one expert landing on one shard; they are scored as they fall
(that shard takes both halves).

`python bench/eplb_reference.py` prints, per load pattern and setup, each layer's busiest shard over the mean
shard (mean and worst over the layers) with no rebalance (`PlacementTable.balanced`, round robin), EPLB and
ours, next to a lower bound no placement beats (the mean, or the heaviest replica after water-filling); the
layers where ours is busier than EPLB's; with nodes, the share of routing groups kept on one node; then the
CPU time `rebalance` takes for 61 layers x 256 experts on this machine. Loads: 65,536 (token, expert) pairs
per layer (8,192 tokens, top-8) drawn from Zipf s=1.0 and 1.2 over shuffled ranks, three experts at 15%
each, two of 8 routing groups at 35% each, and lognormal (nothing stands out).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from expertmesh.experts import PlacementTable, layer_balancedness, rebalance

Placement = list[list[int]]  # [expert] -> shards holding its replicas, a shard once per replica


def eplb(row: list[float], *, num_shards: int, slots_per_shard: int, num_nodes: int = 1,
         num_groups: int | None = None) -> Placement:
    """One layer's placement by EPLB. `num_groups` None: one group per expert."""
    groups = num_groups or len(row)
    if groups % num_nodes:
        groups, num_nodes = 1, 1
    size, per_node = len(row) // groups, num_shards // num_nodes
    node_of_group = _pack([sum(row[g * size:(g + 1) * size]) for g in range(groups)], num_nodes)
    placement: Placement = [[] for _ in row]
    for node in range(num_nodes):
        experts = [e for e in range(len(row)) if node_of_group[e // size] == node]
        count = replicate([row[e] for e in experts], per_node * slots_per_shard)
        replicas = [i for i, c in enumerate(count) for _ in range(c)]  # local expert of each replica
        shard_of = _pack([row[experts[i]] / count[i] for i in replicas], per_node)
        for i, shard in zip(replicas, shard_of):
            placement[experts[i]].append(node * per_node + shard)
    return placement


def replicate(weights: list[float], replicas: int) -> list[int]:
    """Replica counts: one each, then each spare to the expert with the most load per replica (no cap)."""
    count = [1] * len(weights)
    for _ in range(replicas - len(weights)):
        e = max(range(len(weights)), key=lambda e: weights[e] / count[e])
        count[e] += 1
    return count


def _pack(weights: list[float], packs: int) -> list[int]:
    """[item] -> pack: the same number of items in each pack, heaviest first onto the lightest pack with room."""
    per_pack = len(weights) // packs
    load, items, pack_of = [0.0] * packs, [0] * packs, [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        p = min((p for p in range(packs) if items[p] < per_pack), key=load.__getitem__)
        pack_of[i], load[p], items[p] = p, load[p] + weights[i], items[p] + 1
    return pack_of


def shard_load(row: list[float], placement: Placement, num_shards: int) -> list[float]:
    """Each shard's load, each expert's load split evenly over its replicas (twice on a shard holding two)."""
    load = [0.0] * num_shards
    for e, shards in enumerate(placement):
        for s in shards:
            load[s] += row[e] / len(shards)
    return load


def busiest_over_mean(row: list[float], placement: Placement, num_shards: int) -> float:
    """The busiest shard's load over the mean shard's."""
    load = shard_load(row, placement, num_shards)
    return max(load) / (sum(load) / num_shards) if sum(load) else 1.0


def lower_bound(row: list[float], num_shards: int, slots_per_shard: int) -> float:
    """What no placement goes below, over the mean: the mean itself, and the heaviest replica when the
    replicas go where they lower the heaviest most."""
    count = replicate(row, num_shards * slots_per_shard)
    mean = sum(row) / num_shards
    return max(mean, max(w / c for w, c in zip(row, count))) / mean


def of_table(table: PlacementTable, layer: int) -> Placement:
    return [list(table.replicas[layer, e]) for e in range(table.num_experts)]


def synthetic_load(pattern: str, num_layers: int, num_experts: int, rng: np.random.Generator,
                   *, pairs: int = 8192 * 8, num_groups: int = 8) -> np.ndarray:
    """[num_layers, num_experts] counts of `pairs` (token, expert) pairs per layer, drawn from `pattern`."""
    rows = []
    for _ in range(num_layers):
        if pattern.startswith("zipf"):  # rank r gets 1 / r^s, ranks shuffled over the experts
            p = 1.0 / np.arange(1, num_experts + 1) ** float(pattern[4:])
            p = p[rng.permutation(num_experts)]
        elif pattern == "3 dominant":  # three experts take 15% each, the rest spread with noise
            p = rng.lognormal(0.0, 0.5, num_experts)
            p *= 0.55 / p.sum()
            p[rng.choice(num_experts, 3, replace=False)] = 0.15
        elif pattern == "lognormal":  # no expert stands out: every group about as busy as the others
            p = rng.lognormal(0.0, 0.6, num_experts)
        elif pattern == "groups":  # two of the routing groups take 70%, Zipf-like inside each group
            size = num_experts // num_groups
            within = 1.0 / np.arange(1, size + 1)
            share = np.full(num_groups, 0.3 / (num_groups - 2))
            share[rng.choice(num_groups, 2, replace=False)] = 0.35
            p = np.concatenate([s * within[rng.permutation(size)] / within.sum() for s in share])
        else:
            raise ValueError(f"unknown load pattern {pattern!r}")
        rows.append(rng.multinomial(pairs, p / p.sum()))
    return np.array(rows)


def group_locality(placement: Placement, num_groups: int, per_node: int) -> float:
    """The fraction of routing groups whose experts' replicas all sit on one node."""
    size = len(placement) // num_groups
    return sum(len({s // per_node for e in range(g * size, (g + 1) * size) for s in placement[e]}) == 1
               for g in range(num_groups)) / num_groups


def compare(pattern, *, num_layers, num_experts, num_shards, slots, num_nodes=1, num_groups=None, seed=0):
    layers = list(range(3, 3 + num_layers))  # DeepSeek-V3: layers 0-2 dense
    load = synthetic_load(pattern, num_layers, num_experts, np.random.default_rng(seed))
    ours = rebalance(load, moe_layers=layers, num_shards=num_shards, slots_per_shard=slots,
                     num_nodes=num_nodes, num_groups=num_groups)
    none = PlacementTable.balanced(layers, num_experts, num_shards)
    figures = {"none": [], "eplb": [], "ours": [], "bound": []}
    locality = {"eplb": [], "ours": []}
    for layer, row in zip(layers, load.tolist()):
        ref = eplb(row, num_shards=num_shards, slots_per_shard=slots, num_nodes=num_nodes, num_groups=num_groups)
        mine = busiest_over_mean(row, of_table(ours, layer), num_shards)
        assert abs(mine * layer_balancedness(ours, layer, row) - 1) < 1e-9  # the package's own figure agrees
        figures["none"].append(busiest_over_mean(row, of_table(none, layer), num_shards))
        figures["eplb"].append(busiest_over_mean(row, ref, num_shards))
        figures["ours"].append(mine)
        figures["bound"].append(lower_bound(row, num_shards, slots))
        if num_nodes > 1:
            locality["eplb"].append(group_locality(ref, num_groups, num_shards // num_nodes))
            locality["ours"].append(group_locality(of_table(ours, layer), num_groups, num_shards // num_nodes))
    return figures, locality


def cpu_ms(load, layers, repeats, **kw) -> float:
    """The least CPU time of `repeats` calls (the machine may be shared: wall time would count the others)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        rebalance(load, moe_layers=layers, **kw)
        times.append(time.process_time() - start)
    return min(times) * 1e3


PATTERNS = ("zipf1.0", "zipf1.2", "3 dominant", "groups", "lognormal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setups = [dict(num_shards=32, slots=9), dict(num_shards=64, slots=10),
              dict(num_shards=32, slots=9, num_nodes=4, num_groups=8)]
    print(f"{args.layers} layers x {args.experts} experts; busiest shard / mean shard per layer: "
          "mean over the layers (worst layer)")
    print(f"{'load':<11} {'shards x slots':<22} {'none':>15} {'eplb':>15} {'ours':>15} {'bound':>15}  "
          "ours>eplb  groups on one node: eplb ours")
    for setup in setups:
        name = f"{setup['num_shards']}x{setup['slots']}" + (
            f", {setup['num_nodes']} nodes {setup['num_groups']} groups" if "num_nodes" in setup else "")
        for pattern in PATTERNS:
            figures, locality = compare(pattern, num_layers=args.layers, num_experts=args.experts, **setup)
            cells = " ".join(f"{np.mean(v):7.3f} ({max(v):.3f})" for v in figures.values())
            worse = sum(o > e + 1e-9 for o, e in zip(figures["ours"], figures["eplb"]))
            local = f"{np.mean(locality['eplb']):8.2f} {np.mean(locality['ours']):4.2f}" if locality["ours"] else ""
            print(f"{pattern:<11} {name:<22} {cells}  {worse:9d}  {local}")
    print(f"\nrebalance() CPU time, {args.layers} layers x {args.experts} experts, least of {args.repeats}:")
    layers = list(range(3, 3 + args.layers))
    for setup in setups:
        kw = {k: v for k, v in setup.items() if k != "slots"}
        times = [cpu_ms(synthetic_load(pattern, args.layers, args.experts, np.random.default_rng(1)), layers,
                        args.repeats, slots_per_shard=setup["slots"], **kw) for pattern in PATTERNS]
        print(f"  {str(setup):<62} " + "  ".join(f"{p} {t:.0f} ms" for p, t in zip(PATTERNS, times)))


if __name__ == "__main__":
    main()
