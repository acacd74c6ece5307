"""Expert-aware selection, as in ESFT (Wang et al., 2024): the routed experts of each layer that a task's
data actually uses, to put LoRA on those only.

Each expert's relevance is its share of the layer's total: of the gate scores given to it (ESFT-Gate) or of
the tokens routed to it (ESFT-Token) over a sample of the training data. Per layer, experts are taken most
relevant first until their shares add up to `threshold`; a task concentrated on few experts gets few."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def relevance_shares(totals: Sequence[float]) -> list[float]:
    """Each expert's share of a layer's total (gate scores or routed tokens); zeros for a layer that saw none."""
    if not totals or any(t < 0 for t in totals):
        raise ValueError("totals must be a non-empty list of non-negative numbers")
    whole = float(sum(totals))
    return [t / whole if whole else 0.0 for t in totals]


def select_experts(totals: Mapping[int, Sequence[float]], threshold: float) -> dict[int, list[int]]:
    """{layer: chosen experts, ascending}: per layer the fewest most relevant experts whose shares reach
    `threshold` (in (0, 1]; ties go to the lower index). A layer that saw no token gets none."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    chosen: dict[int, list[int]] = {}
    for layer in sorted(totals):
        shares = relevance_shares(totals[layer])
        picked, covered = [], 0.0
        for expert in sorted(range(len(shares)), key=lambda e: (-shares[e], e)):
            if covered >= threshold - 1e-12 or shares[expert] == 0.0:
                break
            picked.append(expert)
            covered += shares[expert]
        chosen[layer] = sorted(picked)
    return chosen
