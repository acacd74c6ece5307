"""How many expert shards a graph should run, from how much of each step the routed experts take.

The router times every step and, inside it, the dispatch round trips to the shards. When the dispatch takes
more than `scale_up_above` of the step time over the last `window_steps` steps, the experts are what the
steps wait for: one more shard (up to `max_shards`). Below `scale_down_below`, they wait for the rest: one
fewer (down to `min_shards`). One shard at a time, with a cooldown after each change (longer down than up:
a shard given back costs a load to get again). Pure Python over figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardAutoscalePolicy:
    min_shards: int
    max_shards: int
    scale_up_above: float = 0.6  # the experts' share of step time past which a shard is added
    scale_down_below: float = 0.2  # ...and below which one is given back
    window_steps: int = 32  # the steps the share is taken over
    up_cooldown_s: float = 30.0  # after any change, before adding a shard
    down_cooldown_s: float = 120.0  # after any change, before giving one back
    interval_s: float = 5.0  # how often the controller asks

    def __post_init__(self) -> None:
        for name in ("min_shards", "max_shards", "window_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                label = {"min_shards": "expert_shards.min", "max_shards": "expert_shards.max"}.get(
                    name, f"shard_autoscaling.{name}")
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if self.min_shards > self.max_shards:
            raise ValueError(f"expert_shards.min ({self.min_shards}) is above expert_shards.max ({self.max_shards})")
        for name in ("scale_up_above", "scale_down_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"shard_autoscaling.{name} must be in (0, 1), got {value!r}")
        if self.scale_down_below >= self.scale_up_above:
            raise ValueError(f"shard_autoscaling.scale_down_below ({self.scale_down_below}) must be below "
                             f"scale_up_above ({self.scale_up_above})")
        for name in ("up_cooldown_s", "down_cooldown_s", "interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    name == "interval_s" and value == 0):
                raise ValueError(f"shard_autoscaling.{name} must be a number of seconds >= 0 (interval_s > 0), "
                                 f"got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.max_shards > self.min_shards

    def check_target(self, shards: int) -> None:
        """Refuses a shard count outside [min, max] (a request by hand), naming the bounds."""
        if isinstance(shards, bool) or not isinstance(shards, int) or not self.min_shards <= shards <= self.max_shards:
            raise ValueError(f"expert_shards must be an integer in [{self.min_shards}, {self.max_shards}] (the "
                             f"deployment's expert_shards.min and .max), got {shards!r}")

    def expert_share(self, timings: Sequence[Sequence[float]]) -> float | None:
        """The dispatch's share of step time over the last `window_steps` steps (each (step seconds, waiting
        for hidden states, dispatching)); None with fewer steps than that."""
        recent = list(timings)[-self.window_steps:]
        total = sum(t[0] for t in recent)
        if len(recent) < self.window_steps or total <= 0:
            return None
        return sum(t[2] for t in recent) / total

    def target(self, shards: int, timings: Sequence[Sequence[float]], since_change_s: float) -> tuple[int, str]:
        """(the shard count to run, why) given the count now, recent step timings and the seconds since the last
        change."""
        share = self.expert_share(timings)
        if share is None:
            return shards, f"fewer than {self.window_steps} steps timed since the last change"
        if share > self.scale_up_above and shards < self.max_shards:
            if since_change_s < self.up_cooldown_s:
                return shards, f"experts take {share:.2f} of step time; the last change was {since_change_s:.0f} s ago"
            return shards + 1, f"experts take {share:.2f} of step time (above {self.scale_up_above:g})"
        if share < self.scale_down_below and shards > self.min_shards:
            if since_change_s < self.down_cooldown_s:
                return shards, f"experts take {share:.2f} of step time; the last change was {since_change_s:.0f} s ago"
            return shards - 1, f"experts take {share:.2f} of step time (below {self.scale_down_below:g})"
        return shards, f"experts take {share:.2f} of step time"
