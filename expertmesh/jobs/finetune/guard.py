"""The imbalance guard: a frozen router does not freeze routing (LoRA on the experts moves the hidden states
the gates read), so every step the guard reads each MoE layer's expert load and acts when it drifts.

Per layer it watches the busiest expert's load over the mean and the routing entropy, against the base
model's own figures on the training data (measured before step 1), and, when given, the top-k overlap with
the base model's routing on a fixed probe batch. Each figure has three thresholds (GuardConfig): past the
first it warns, past the second it lowers the learning rate (by `lr_factor`, at most `max_lr_drops` times,
`cooldown_steps` apart; one due beyond that stops the run), past the third it stops the run. The trainer
carries out the actions; the events go into the log and the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from expertmesh.experts import LayerHealth, layer_health
from expertmesh.jobs.finetune.config import GuardConfig

ACTIONS = ("warn", "lower_lr", "stop")


@dataclass(frozen=True)
class GuardEvent:
    step: int
    layer: int
    metric: str  # max_over_mean | entropy | overlap
    value: float
    threshold: float
    action: str  # warn | lower_lr | stop

    def to_dict(self) -> dict:
        return asdict(self)


class ImbalanceGuard:
    def __init__(self, config: GuardConfig, base: Mapping[int, LayerHealth]):
        """`base`: each MoE layer's figures for the base model on the training data."""
        if not base:
            raise ValueError("the guard needs the base model's figures of at least one MoE layer")
        self.config, self.base = config, dict(base)
        self.lr_drops = 0
        self.stopped = False
        self.events: list[GuardEvent] = []
        self._last_drop: int | None = None
        self._levels: dict[tuple[int, str], int] = {}  # how far past its thresholds each figure was last step

    def _thresholds(self, layer: int, metric: str) -> tuple[tuple[float, ...], bool]:
        """The (warn, lower_lr, stop) values of a figure, and whether it is bad when above them."""
        base = self.base[layer]
        if metric == "max_over_mean":
            return tuple(base.max_over_mean * f for f in self.config.max_over_mean), True
        if metric == "entropy":
            return tuple(base.entropy * f for f in self.config.entropy), False
        return self.config.overlap, False

    def snapshot(self) -> dict:
        """What a checkpoint keeps of the guard, so a resumed run acts as the uninterrupted one would."""
        return {"lr_drops": self.lr_drops, "last_drop": self._last_drop, "events": [e.to_dict() for e in self.events],
                "levels": [[layer, metric, level] for (layer, metric), level in self._levels.items()]}

    def restore(self, snapshot: Mapping) -> None:
        self.lr_drops, self._last_drop = snapshot["lr_drops"], snapshot["last_drop"]
        self.events = [GuardEvent(**e) for e in snapshot["events"]]
        self._levels = {(layer, metric): level for layer, metric, level in snapshot["levels"]}

    def observe(self, step: int, counts: Mapping[int, Sequence[int]], top_k: int,
                overlap: Mapping[int, float] | None = None) -> list[GuardEvent]:
        """This step's per-layer expert counts (summed over every worker and shard) and, when measured, the
        probe batch's top-k overlap with the base routing: the events it raises, actions included."""
        if self.stopped:
            raise RuntimeError("the guard has stopped the run; nothing observes after that")
        unknown = sorted(set(counts) - set(self.base))
        if unknown:
            raise ValueError(f"counts for MoE layers {unknown} that have no base figures")
        events: list[GuardEvent] = []
        worst: tuple[int, GuardEvent] | None = None  # the figure furthest past its lines, and how far
        for layer in sorted(counts):
            health = layer_health(layer, list(counts[layer]), top_k)
            if health.routed_pairs == 0:
                continue
            figures = {"max_over_mean": health.max_over_mean, "entropy": health.entropy}
            if overlap is not None and layer in overlap:
                figures["overlap"] = overlap[layer]
            for metric, value in figures.items():
                lines, rising = self._thresholds(layer, metric)
                level = sum(value > t if rising else value < t for t in lines)
                before = self._levels.get((layer, metric), 0)
                self._levels[layer, metric] = level
                if level and not before:  # a warning when a figure first passes a line (again after a return)
                    events.append(GuardEvent(step, layer, metric, value, lines[0], "warn"))
                if level >= 2 and (worst is None or level > worst[0]):
                    worst = (level, GuardEvent(step, layer, metric, value, lines[level - 1], ACTIONS[level - 1]))
        if worst is not None:
            level, event = worst
            action = event.action
            if action == "lower_lr":
                if self._last_drop is not None and step - self._last_drop < self.config.cooldown_steps:
                    action = None  # the last drop has not had time to tell
                elif self.lr_drops >= self.config.max_lr_drops:
                    action = "stop"  # lowered as often as allowed, and still past the line
            if action is not None:
                events.append(GuardEvent(event.step, event.layer, event.metric, event.value, event.threshold, action))
                if action == "lower_lr":
                    self.lr_drops += 1
                    self._last_drop = step
                else:
                    self.stopped = True
        self.events.extend(events)
        return events
