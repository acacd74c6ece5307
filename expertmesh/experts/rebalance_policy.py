"""When a new placement is worth swapping in: the rebalancer always has an answer, but moving weights costs
loads and a swap, so the live controller takes it only when it lowers the busiest shard enough.

The figure is the worst MoE layer's busiest shard over the mean shard (1 / balancedness) on the recent load
window, under the placement in use and under the proposed one; the gain is the share by which it falls.
Pure Python over ids and counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from expertmesh.experts.balance import layer_balancedness
from expertmesh.experts.placement import PlacementTable


@dataclass(frozen=True, slots=True)
class Verdict:
    before: float  # the worst layer's busiest shard over the mean, under the placement in use
    after: float  # the same under the proposed placement
    gain: float  # (before - after) / before
    worth_it: bool
    reason: str

    def to_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "gain": self.gain, "worth_it": self.worth_it,
                "reason": self.reason}


@dataclass(frozen=True, kw_only=True, slots=True)
class RebalancePolicy:
    slots_per_shard: int  # replicas of each MoE layer every shard holds after a rebalance
    interval_s: float | None = None  # how often the controller tries on its own; None: only when asked
    min_gain: float = 0.05  # the least gain worth a swap
    min_pairs: int = 256  # the least (token, expert) pairs per layer in the window to judge on

    def __post_init__(self) -> None:
        if isinstance(self.slots_per_shard, bool) or not isinstance(self.slots_per_shard, int) \
                or self.slots_per_shard < 1:
            raise ValueError(f"expert_slots_per_shard must be an integer >= 1, got {self.slots_per_shard!r}")
        if self.interval_s is not None and (isinstance(self.interval_s, bool) or
                                            not isinstance(self.interval_s, (int, float)) or self.interval_s <= 0):
            raise ValueError(f"rebalance_interval_s must be a number of seconds > 0 or null, got {self.interval_s!r}")
        if isinstance(self.min_gain, bool) or not isinstance(self.min_gain, (int, float)) or not 0 <= self.min_gain < 1:
            raise ValueError(f"rebalance_min_gain must be in [0, 1), got {self.min_gain!r}")
        if isinstance(self.min_pairs, bool) or not isinstance(self.min_pairs, int) or self.min_pairs < 0:
            raise ValueError(f"rebalance_min_pairs must be an integer >= 0, got {self.min_pairs!r}")

    def judge(self, current: PlacementTable, proposed: PlacementTable, load: Mapping[int, Sequence[int]],
              *, force: bool = False) -> Verdict:
        """Whether to swap `proposed` in for `current`, on `load` ({layer: per-expert pairs}); `force` takes any
        proposal that is not worse."""
        layers = [layer for layer in current.moe_layers if layer in load]
        pairs = min((sum(load[layer]) for layer in layers), default=0)
        before = worst_imbalance(current, load)
        after = worst_imbalance(proposed, load)
        gain = (before - after) / before if before else 0.0
        if pairs < self.min_pairs and not force:
            return Verdict(before, after, gain, False, f"the load window holds {pairs} pairs in its quietest layer, "
                                                       f"fewer than the {self.min_pairs} needed to judge")
        if force:
            ok = after <= before
            return Verdict(before, after, gain, ok, "asked for" if ok else "the proposal would be less balanced")
        if gain < self.min_gain:
            return Verdict(before, after, gain, False, f"gain {gain:.3f} is below the {self.min_gain:g} asked for")
        return Verdict(before, after, gain, True, f"gain {gain:.3f}")


def worst_imbalance(table: PlacementTable, load: Mapping[int, Sequence[int]]) -> float:
    """The highest busiest-shard-over-mean of any MoE layer (1.0: every layer perfectly even)."""
    return max((1.0 / layer_balancedness(table, layer, load[layer])
                for layer in table.moe_layers if layer in load), default=1.0)
