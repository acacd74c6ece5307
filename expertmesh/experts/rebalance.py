"""The rebalancer: from a window of per-expert load, a placement table that evens out the shards' load.

Per MoE layer every shard holds exactly `slots_per_shard` replicas, every expert at least one and a hot
expert as many as balance needs, never two on one shard. An expert's tokens split evenly over its replicas
(`PlacementTable.assign`), so a replica weighs its expert's load over its replica count. The aim is the
lowest busiest-shard load of each layer. Our own take on DeepSeek's EPLB (restated in
`bench/eplb_reference.py`), which does steps 1 and 2 only and lets two replicas of an expert share a shard:

1. replicate by water-filling: one replica each, then each spare slot to the expert whose replicas carry
   the most load (at most one replica per shard);
2. pack replicas heaviest first, each onto the least-loaded shard with room that lacks its expert (LPT);
3. local search on the busiest shard while that lowers it, until it is within 0.1% of the mean shard
   above a lower bound: swap one of its replicas with a lighter one of another shard; or re-split, turning one
   replica of an expert into one of another (water-filling gives a 3 of loads [3, 3, 2, 2, 2] the spare
   slot of 2 shards x 3 slots, 6.5 at best, where a 2 taking it packs into 6 + 6); or un-split, taking a
   replica from an expert the busiest shard holds so that its now heavier one can move onto a shard of
   light ones (what EPLB gets by stacking two replicas of an expert on one shard).

With `num_nodes > 1` the hierarchical variant first packs whole expert groups onto nodes, balancing node
load, then runs 1-3 inside each node, so an expert's replicas and its group's experts stay on one node
(DeepSeek-V3 routes a token to experts of a few groups, so fewer nodes take part in its dispatch). It is kept
when its busiest shard is within `locality_slack` of the node-blind placement's. Pure Python over counts;
numpy only reads `load`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence

import numpy as np

from expertmesh.experts.placement import PlacementTable

# Of the mean shard load: the search stops this close to the lowest the busiest shard can go. A window of
# load counts is a sample and the next window differs per shard by far more; polishing further would buy
# nothing and cost most of the time.
_CLOSE_ENOUGH = 1e-3


def rebalance(
    load, *, moe_layers: Sequence[int], num_shards: int, slots_per_shard: int, num_nodes: int = 1,
    num_groups: int | None = None, locality_slack: float = 0.05, base: PlacementTable | None = None,
) -> PlacementTable:
    """A placement for `load`, `[num_moe_layers, num_experts]` token counts over a recent window (rows in
    `moe_layers` order), in which every shard has `slots_per_shard` slots per layer, all used.

    Shards are numbered node-major: node n holds shards [n * num_shards / num_nodes, (n + 1) * ...).
    `num_groups` splits the experts into that many contiguous routing groups (default: one per expert). Node
    locality needs the groups to divide over the nodes and each node to have at least `slots_per_shard`
    experts; otherwise the placement ignores nodes, as EPLB does. `base` is the table in use: the result is
    its next version (the router and the shards swap tables between steps by version; 0 without a base),
    with its nodes and shards numbered, greedily, to keep replicas where `base` has them, so fewer weights
    move (shards of a layer are interchangeable, as are the nodes of a node-local one).
    """
    rows = _check_load(load, moe_layers)
    num_experts = len(rows[0])
    _check_sizes(num_experts, num_shards, slots_per_shard, num_nodes, num_groups, locality_slack)
    if base is not None:
        base.check_fits(moe_layers, num_experts)
    groups = num_groups or num_experts
    local = num_nodes > 1 and groups % num_nodes == 0 and slots_per_shard <= num_experts // num_nodes
    replicas: dict[tuple[int, int], tuple[int, ...]] = {}
    for layer, row in zip(moe_layers, rows):
        packing = _Packing(row, num_shards, slots_per_shard)
        bins, busiest = packing.bins, max(packing.load)
        block = num_shards  # the shards a bin may be renumbered within
        if local:
            limit = busiest * (1 + locality_slack)
            node_local = _pack_hierarchical(row, num_shards, slots_per_shard, num_nodes, groups, limit)
            if node_local is not None and node_local[1] <= limit:
                bins, block = node_local[0], num_shards // num_nodes
        if base is not None:
            bins = _follow(bins, base, layer, block)
        shards_of: list[list[int]] = [[] for _ in row]
        for shard, held in enumerate(bins):
            for e in held:
                shards_of[e].append(shard)
        replicas.update(((layer, e), tuple(shards)) for e, shards in enumerate(shards_of))
    return PlacementTable(
        num_shards=num_shards, num_experts=num_experts, moe_layers=tuple(moe_layers), replicas=replicas,
        version=0 if base is None else base.version + 1, slots=(slots_per_shard,) * num_shards)


def _check_load(load, moe_layers: Sequence[int]) -> list[list[float]]:
    if not moe_layers or len(set(moe_layers)) != len(moe_layers):
        raise ValueError(f"moe_layers must be distinct layer ids, at least one, got {list(moe_layers)}")
    try:
        array = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load must be a [num_moe_layers, num_experts] array of token counts: {exc}") from None
    if array.ndim != 2 or array.shape[0] != len(moe_layers) or array.shape[1] < 1:
        raise ValueError(f"load must have shape [num_moe_layers={len(moe_layers)}, num_experts], "
                         f"got {list(array.shape)}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError("load must hold finite non-negative token counts")
    return array.tolist()


def _check_sizes(num_experts, num_shards, slots_per_shard, num_nodes, num_groups, locality_slack) -> None:
    for name, value in (("num_shards", num_shards), ("slots_per_shard", slots_per_shard), ("num_nodes", num_nodes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_shards * slots_per_shard < num_experts:
        raise ValueError(f"num_shards * slots_per_shard = {num_shards} * {slots_per_shard} slots per layer "
                         f"cannot hold {num_experts} experts")
    if slots_per_shard > num_experts:
        raise ValueError(f"slots_per_shard = {slots_per_shard} exceeds the {num_experts} experts: a shard "
                         f"holds at most one replica of each")
    if num_shards % num_nodes:
        raise ValueError(f"num_shards = {num_shards} is not divisible by num_nodes = {num_nodes}")
    if num_groups is not None and (num_groups < 1 or num_experts % num_groups):
        raise ValueError(f"num_groups = {num_groups} does not divide the {num_experts} experts")
    if locality_slack < 0:
        raise ValueError(f"locality_slack must be >= 0, got {locality_slack}")


def _pack_hierarchical(weights: list[float], num_shards: int, slots: int, num_nodes: int, num_groups: int,
                       limit: float) -> tuple[list[list[int]], float] | None:
    """[shard] -> experts it holds, every group's experts (and so their replicas) on one node, and the busiest
    shard's load; None when the groups cannot spread over the nodes evenly enough for that to stay under
    `limit`."""
    size, per_node = len(weights) // num_groups, num_shards // num_nodes
    nodes = _Packing([sum(weights[g * size:(g + 1) * size]) for g in range(num_groups)], num_nodes,
                     num_groups // num_nodes)
    if max(nodes.load) / per_node > limit:  # the busiest node's mean shard already is
        return None
    bins, busiest = [], 0.0
    for groups in nodes.bins:
        experts = [g * size + i for g in sorted(groups) for i in range(size)]
        packing = _Packing([weights[e] for e in experts], per_node, slots)
        bins += [[experts[i] for i in held] for held in packing.bins]
        busiest = max(busiest, *packing.load)
    return bins, busiest


def _follow(bins: list[list[int]], base: PlacementTable, layer: int, block: int) -> list[list[int]]:
    """`bins` renumbered, whole blocks of `block` shards (nodes) first, then shards inside a block, so that as
    many replicas as possible stay where `base` holds them."""
    old = [[s for e in held for s in base.replicas[layer, e] if s < len(bins)] for held in bins]
    blocks = range(len(bins) // block)
    out: list[list[int]] = [[] for _ in bins]
    block_to = _match(Counter((i // block, s // block) for i, shards in enumerate(old) for s in shards), blocks, blocks)
    for n, m in block_to.items():
        mine, theirs = range(n * block, (n + 1) * block), range(m * block, (m + 1) * block)
        for i, s in _match(Counter((i, s) for i in mine for s in old[i] if s in theirs), mine, theirs).items():
            out[s] = bins[i]
    return out


def _match(shared: Counter, sources: Sequence[int], targets: Sequence[int]) -> dict[int, int]:
    """A one-to-one map of `sources` onto as many `targets`, greedily the pairs that share most first."""
    out, free = {}, set(targets)
    for (i, j), _ in sorted(shared.items(), key=lambda pair: (-pair[1], pair[0])):
        if i not in out and j in free:
            out[i] = j
            free.remove(j)
    rest = iter(sorted(free))
    return out | {i: next(rest) for i in sources if i not in out}


class _Packing:
    """One layer's experts (or one layer's groups, over the nodes) replicated into `num_shards` shards of
    exactly `slots` replicas each, the busiest shard made as light as steps 1-3 find."""

    def __init__(self, weights: list[float], num_shards: int, slots: int):
        self.weights, self.num_shards, self.slots = weights, num_shards, slots
        self.count = _water_fill(weights, num_shards * slots, cap=num_shards)
        self.unit = [w / c for w, c in zip(weights, self.count)]
        self.bins: list[list[int]] = [[] for _ in range(num_shards)]  # [shard] -> experts
        self.where: list[list[int]] = [[] for _ in weights]  # [expert] -> shards
        self.load = [0.0] * num_shards
        self.fillers: list[int] | None = None  # see _fillers
        mean = sum(weights) / num_shards
        self.tol = 1e-9 * mean  # below this a change is rounding, not progress: it keeps the search finite
        self._pack()
        # No shard can be below the mean, nor below the heaviest replica after water-filling.
        self.good_enough = max(mean, max(self.unit)) + _CLOSE_ENOUGH * mean + self.tol
        self._improve()

    def _pack(self) -> None:
        heap = [(0.0, s) for s in range(self.num_shards)]  # (load, shard) of the shards with room
        bins, load, unit, where, slots, count = self.bins, self.load, self.unit, self.where, self.slots, self.count
        for e in sorted(range(len(self.weights)), key=[-u for u in unit].__getitem__):
            if count[e] == 1:  # most experts: onto the lightest shard
                s = heap[0][1]
                bins[s].append(e)
                where[e].append(s)
                load[s] += unit[e]
                if len(bins[s]) < slots:
                    heapq.heapreplace(heap, (load[s], s))
                else:
                    heapq.heappop(heap)
                continue
            taken = [heapq.heappop(heap)[1] for _ in range(min(count[e], len(heap)))]  # the lightest shards
            for s in taken:
                bins[s].append(e)
                load[s] += unit[e]
            where[e] += taken
            for _ in range(count[e] - len(taken)):
                self._make_room(e, taken)
            for s in taken:
                if len(bins[s]) < slots:
                    heapq.heappush(heap, (load[s], s))

    def _make_room(self, e: int, taken: list[int]) -> None:
        """Places one more replica of `e` when the shards with room all hold it: a full shard without `e`
        hands one of its replicas to a shard with room (which exists: the slots add up)."""
        to = next(s for s in taken if len(self.bins[s]) < self.slots)
        full = min((s for s in range(self.num_shards) if e not in self.bins[s]), key=self.load.__getitem__)
        x = max((x for x in self.bins[full] if x not in self.bins[to]), key=self.unit.__getitem__)
        self._take(x, full)
        self._put(x, to)
        self._put(e, full)

    def _improve(self) -> None:
        load = self.load
        # Each move lowers the busiest load, or the number of shards at it: the cap only bounds the time.
        for _ in range(4 * self.num_shards * self.slots):
            b = load.index(max(load))
            limit = load[b] - self.tol
            if load[b] <= self.good_enough or not (
                    self._swap_with(b, load.index(min(load)), limit)
                    or any(self._swap_with(b, o, limit) for o in sorted(range(len(load)), key=load.__getitem__)[1:])
                    or self._unsplit(b) or self._resplit(b)):
                return

    def _swap_with(self, b: int, o: int, limit: float) -> bool:
        """Swaps a replica of `b` with one of `o` so that both end below `limit`, the swap that comes closest
        to evening out the pair; whether there was one."""
        lo, hi = self.load[b] - limit, limit - self.load[o]  # how much heavier b's replica must be than o's
        if hi <= lo:
            return False
        unit, held, other = self.unit, self.bins[b], self.bins[o]
        even, best, best_score = (lo + hi) / 2, None, hi - lo
        theirs = [(unit[y], y) for y in other]
        for x in held:
            if x not in other:
                ux = unit[x]
                for uy, y in theirs:
                    d = ux - uy
                    if lo < d < hi and abs(d - even) < best_score and y not in held:
                        best, best_score = (x, y), abs(d - even)
        if best is not None:
            x, y = best
            self._take(x, b), self._take(y, o), self._put(y, b), self._put(x, o)
        return best is not None

    def _resplit(self, b: int) -> bool:
        """Turns the replica of an expert `a` on shard `s` into one of an expert `c` where every shard that
        touches ends lighter than the busiest shard `b` was (`a`'s other replicas grow, `c`'s shrink): with
        `s` = `b`, which lacks `c`, or with `b` holding `c`. The best such move, if any."""
        top, held, n = self.load[b], self.bins[b], len(self.weights)
        best = (top - self.tol, None)
        shrinkable = [a for a in range(n) if self.count[a] > 1 and self._may_shrink(a, top)]
        for a in shrinkable:
            if a in held:
                for c in range(n):
                    if (self.count[c] < self.num_shards and c not in held
                            and self.weights[c] / (self.count[c] + 1) < self.unit[a] - self.tol):
                        best = min(best, (self._peak_after(a, c, b), (a, c, b)), key=lambda p: p[0])
        for c in held:
            if self.count[c] < self.num_shards:
                for a in shrinkable:
                    for s in self.where[a]:
                        if a != c and c not in self.bins[s]:
                            best = min(best, (self._peak_after(a, c, s), (a, c, s)), key=lambda p: p[0])
        if best[1] is not None:
            self._move_replica(*best[1])
            self.fillers = None
        return best[1] is not None

    def _unsplit(self, b: int) -> bool:
        """Takes from an expert `a` held by the busiest shard `b` its replica on another shard `s`, which gets
        the lightest new replica it can hold instead, then swaps one of `b`'s replicas onto the lightest shard:
        kept if every shard ends below where `b` was. Two heavy replicas that pair badly on `b` can be better
        as one on a shard of light replicas, which neither swaps nor water-filling reach."""
        top, lightest = self.load[b], min(self.load)
        for a in [a for a in self.bins[b] if self.count[a] > 1]:
            grow = self.weights[a] / (self.count[a] - 1) - self.unit[a]  # on a's other replicas, b's among them
            others = sorted((t for t in self.where[a] if t != b), key=self.load.__getitem__, reverse=True)
            if len(others) > 1 and self.load[others[1]] + grow >= top - self.tol:
                continue  # whichever replica goes, one of a's other shards reaches `top`
            for s in others if self.load[others[0]] + grow < top - self.tol else others[:1]:
                c = next((c for c in self._fillers() if c not in self.bins[s]), None)
                if c is None:
                    continue
                wc, rc = self.weights[c], self.count[c]
                if min(lightest - wc / rc + wc / (rc + 1), self.load[s] - self.unit[a] + wc / (rc + 1)) >= top - grow:
                    continue  # no shard would be light enough to take `grow` off b
                self._move_replica(a, c, s)
                touched = {*self.where[a], *self.where[c]} - {b}
                o = min(range(self.num_shards), key=self.load.__getitem__)
                if max(self.load[t] for t in touched) < top - self.tol and self._swap_with(b, o, top - self.tol):
                    self.fillers = None
                    return True
                self._move_replica(c, a, s)
        return False

    def _fillers(self) -> list[int]:
        """The experts that may take one more replica, lightest new replica first (kept until counts change)."""
        if self.fillers is None:
            lightest = [w / (c + 1) for w, c in zip(self.weights, self.count)]
            self.fillers = sorted((c for c in range(len(self.weights)) if self.count[c] < self.num_shards),
                                  key=lightest.__getitem__)
        return self.fillers

    def _may_shrink(self, a: int, top: float) -> bool:
        """Whether `a` may lose a replica without its other shards, all but one, reaching `top`."""
        grow = self.weights[a] / (self.count[a] - 1) - self.unit[a]
        return sorted(self.load[t] for t in self.where[a])[-2] + grow < top - self.tol

    def _peak_after(self, a: int, c: int, s: int) -> float:
        """The heaviest shard `_move_replica(a, c, s)` would touch, after it."""
        wa, wc, ra, rc = self.weights[a], self.weights[c], self.count[a], self.count[c]
        new = {t: self.load[t] + wa / (ra - 1) - wa / ra for t in self.where[a] if t != s}
        for t in self.where[c]:
            new[t] = new.get(t, self.load[t]) - (wc / rc - wc / (rc + 1))
        new[s] = self.load[s] - wa / ra + wc / (rc + 1)
        return max(new.values())

    def _move_replica(self, a: int, c: int, s: int) -> None:
        """The replica of `a` on `s` becomes one of `c`; both experts' tokens split anew."""
        self._take(a, s)
        for e, step in ((a, -1), (c, 1)):
            self.count[e] += step
            unit = self.weights[e] / self.count[e]
            for t in self.where[e]:
                self.load[t] += unit - self.unit[e]
            self.unit[e] = unit
        self._put(c, s)

    def _put(self, e: int, s: int) -> None:
        self.bins[s].append(e)
        self.where[e].append(s)
        self.load[s] += self.unit[e]

    def _take(self, e: int, s: int) -> None:
        self.bins[s].remove(e)
        self.where[e].remove(s)
        self.load[s] -= self.unit[e]


def _water_fill(weights: list[float], replicas: int, *, cap: int) -> list[int]:
    """Replica counts adding up to `replicas`, at most `cap` each, that minimise the largest weight per replica:
    one each, then each spare replica to the expert carrying the most per replica (ties: the lower index)."""
    count = [1] * len(weights)
    heap = [(-w, e) for e, w in enumerate(weights)] if cap > 1 else []  # (-weight per replica, expert)
    heapq.heapify(heap)
    for _ in range(replicas - len(weights)):
        e = heap[0][1]
        count[e] += 1
        if count[e] < cap:
            heapq.heapreplace(heap, (-weights[e] / count[e], e))
        else:
            heapq.heappop(heap)
    return count
