"""The end of a fine-tuning run, for people: `report.json` as the job has always written it, `report.md` that
reads it out (status, losses, the guard's events, the chosen experts, whether the frozen router stayed
frozen) and three plots: the loss with the guard's actions marked, each MoE layer's max/mean load over the
steps, and the per-expert load of the base model against the trained one."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from expertmesh.experts import expert_shares

STATUS_MEANING = {
    "completed": "The run finished every step it was given.",
    "stopped_by_guard": "The imbalance guard stopped the run: expert load drifted past its stop line "
                        "(see the guard events).",
    "failed": "The run failed before finishing; the figures cover only the steps it completed.",
}
ACTION_COLORS = {"warn": "tab:orange", "lower_lr": "tab:purple", "stop": "tab:red"}
# Keys report.md reads out in their own sections; any other key is listed as it is under "Other figures".
KNOWN_KEYS = {"status", "steps_completed", "losses", "guard_events", "selected_experts", "selection_shares",
              "router_checksums", "tokens_per_s", "restarts", "lr_drops", "final_lr"}
PLOTS = {"loss.png": "Loss over steps", "max_over_mean.png": "Busiest expert's load over the mean, per MoE layer",
         "expert_load.png": "Per-expert load, base model against trained model"}


def write_report(out_dir: Path, report: dict, history: list[dict], load_before: dict[int, list[int]],
                 load_after: dict[int, list[int]]) -> list[Path]:
    """Writes report.json, report.md and the three plots into `out_dir`; returns their paths, in that order.
    `history`: one {"step", "loss", "lr", "max_over_mean": {layer: float}, "entropy": {layer: float}} per
    step; `load_before` / `load_after`: {MoE layer: per-expert pair counts} of the base and the trained model
    on the same sample (either may be empty, for a run that failed before it measured them)."""
    if not isinstance(report, Mapping) or "status" not in report:
        raise ValueError(f"report must be a mapping with a 'status', got {report!r:.200}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = list(report.get("guard_events") or [])
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    figures = {"loss.png": _loss_figure(report, history, events),
               "max_over_mean.png": _max_over_mean_figure(history, events),
               "expert_load.png": _expert_load_figure(load_before, load_after)}
    for name, figure in figures.items():
        # Made without pyplot, a figure never enters pyplot's global figure manager: there is nothing to close,
        # and the garbage collector frees it once this function lets go of it (the test counts them).
        figure.savefig(out_dir / name, dpi=100)
    return [out_dir / "report.json", out_dir / "report.md", *(out_dir / name for name in PLOTS)]


def render_markdown(report: Mapping) -> str:
    status = report["status"]
    losses = list(report.get("losses") or [])
    lines = ["# Fine-tuning report", "",
             f"**Status: `{status}`.** {STATUS_MEANING.get(status, 'A status this report does not know.')}", "",
             f"- Steps completed: {report.get('steps_completed', len(losses))}",
             f"- Loss: first {losses[0]:.4f}, final {losses[-1]:.4f}" if losses else "- Loss: no step completed",
             f"- Tokens/s: {_number(report.get('tokens_per_s'), '.1f')}",
             f"- Restarts: {report.get('restarts', 'n/a')}",
             f"- Learning-rate drops: {report.get('lr_drops', 'n/a')}, final learning rate "
             f"{_number(report.get('final_lr'), '.3g')}", ""]
    lines += ["## Guard events", "", *_events_table(report.get("guard_events") or []), ""]
    lines += ["## Chosen experts", "", *_experts_section(report.get("selected_experts", "all"),
                                                         report.get("selection_shares")), ""]
    lines += ["## Frozen router", "", router_verdict(report.get("router_checksums")), ""]
    other = sorted(set(report) - KNOWN_KEYS)
    if other:
        lines += ["## Other figures", "", *(f"- `{key}`: `{json.dumps(report[key])}`" for key in other), ""]
    lines += ["## Plots", "", *(f"![{title}]({name})\n" for name, title in PLOTS.items())]
    return "\n".join(lines)


def router_verdict(checksums: Mapping | None) -> str:
    """One line when every router tensor is bitwise the same before and after; loud, naming each tensor, when
    not (the router is frozen: a changed tensor means something trained it)."""
    if not checksums or not checksums.get("before"):
        return "No router checksums recorded."
    if not checksums.get("after"):  # a run that ended before taking them
        return f"Not checked: {len(checksums['before'])} router checksums before training, none after."
    before, after = checksums["before"], checksums["after"]
    names = sorted(set(before) | set(after))
    how = {(True, True): "changed", (True, False): "only before", (False, True): "only after"}
    changed = [f"`{name}` ({how[name in before, name in after]})"
               for name in names if before.get(name) != after.get(name)]
    if not changed:
        return f"Unchanged: {len(before)} router tensors bitwise equal before and after."
    return "\n".join([f"**WARNING: THE FROZEN ROUTER CHANGED: {len(changed)} of {len(names)} "
                      "router tensors differ between before and after training:**", "",
                      *(f"- {entry}" for entry in changed)])


def _events_table(events: Sequence[Mapping]) -> list[str]:
    if not events:
        return ["None."]
    rows = ["| step | layer | metric | value | threshold | action |", "|---:|---:|---|---:|---:|---|"]
    rows += [f"| {e['step']} | {e['layer']} | {e['metric']} | {e['value']:.3f} | {e['threshold']:.3f} | {e['action']} |"
             for e in events]
    return rows


def _experts_section(selected, shares: Mapping | None) -> list[str]:
    if selected == "all":
        return ["All routed experts (no selection)."]
    rows = ["| layer | experts |", "|---:|---|"]
    for layer in sorted(selected, key=int):
        layer_shares = (shares or {}).get(str(layer)) or {}
        experts = [f"{e} ({layer_shares[str(e)]:.1%})" if str(e) in layer_shares else str(e) for e in selected[layer]]
        rows.append(f"| {layer} | {', '.join(experts) or 'none'} |")
    return rows


def _number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg straight away: no pyplot, no global backend switch for the rest of the process
    return figure


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _loss_figure(report: Mapping, history: Sequence[Mapping], events: Sequence[Mapping]):
    figure = _new_figure(8, 4.5)
    ax = figure.add_subplot()
    if history:
        steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    else:  # no per-step history: the report's losses are steps 1..n
        losses = list(report.get("losses") or [])
        steps = list(range(1, len(losses) + 1))
    if not losses:
        _nothing(ax, "no step completed")
        ax.set_title("Loss")
        return figure
    ax.plot(steps, losses, color="tab:blue", lw=1.2, label="loss")
    for action, color in ACTION_COLORS.items():
        for i, step in enumerate(sorted({e["step"] for e in events if e["action"] == action})):
            ax.axvline(step, color=color, ls="--", lw=1.0, label=f"guard: {action}" if i == 0 else None)
    ax.set(title="Loss (dashed: steps where the guard acted)", xlabel="step", ylabel="loss")
    _integer_steps(ax)
    ax.legend(loc="upper right", fontsize="small")
    return figure


def _max_over_mean_figure(history: Sequence[Mapping], events: Sequence[Mapping]):
    figure = _new_figure(8, 4.5)
    ax = figure.add_subplot()
    per_layer: dict[int, list[tuple[int, float]]] = {}
    for h in history:
        for layer, value in (h.get("max_over_mean") or {}).items():  # layer keys are str once read from JSON
            per_layer.setdefault(int(layer), []).append((h["step"], value))
    ax.set_title("Busiest expert's load over the mean, per MoE layer")
    if not per_layer:
        _nothing(ax, "no step completed")
        return figure
    # The warn line is base x guard.max_over_mean[0], per layer; the report only carries it in warn events.
    warn_lines = {int(e["layer"]): e["threshold"] for e in events
                  if e["metric"] == "max_over_mean" and e["action"] == "warn"}
    palette = [f"C{i % 10}" for i in range(len(per_layer))]
    for color, layer in zip(palette, sorted(per_layer)):
        steps, values = zip(*per_layer[layer])
        ax.plot(steps, values, color=color, lw=1.0, label=f"layer {layer}")
        if layer in warn_lines:
            ax.axhline(warn_lines[layer], color=color, ls="--", lw=0.8, label=f"layer {layer} warn line")
    ax.axhline(1.0, color="grey", lw=0.5)  # perfectly even load
    ax.set(xlabel="step", ylabel="max / mean")
    _integer_steps(ax)
    if len(per_layer) <= 12:  # beyond that a legend hides the plot
        ax.legend(loc="upper left", fontsize="x-small", ncols=2)
    return figure


def _load_matrix(load: Mapping[int, Sequence[int]], layers: list[int], num_experts: int):
    """[L, E] each expert's share of its layer's (token, expert) pairs (the report has no top_k to turn pairs
    into tokens: with top_k 1 they are the same); NaN for a layer not measured."""
    matrix = np.full((len(layers), num_experts), np.nan)  # [L, E]
    for row, layer in enumerate(layers):
        if layer in load:
            shares = expert_shares(list(load[layer]), top_k=1)
            matrix[row, :len(shares)] = shares
    return matrix


def _expert_load_figure(load_before: Mapping[int, Sequence[int]], load_after: Mapping[int, Sequence[int]]):
    layers = sorted(set(load_before) | set(load_after))
    figure = _new_figure(12, min(3 + 0.25 * len(layers), 16))
    axes = figure.subplots(1, 2, sharey=True)
    if not layers:
        for ax, title in zip(axes, ("base model", "trained model")):
            _nothing(ax, "no expert load measured")
            ax.set_title(title)
        return figure
    num_experts = max(len(c) for c in (*load_before.values(), *load_after.values()))
    matrices = [_load_matrix(load, layers, num_experts) for load in (load_before, load_after)]
    top = float(np.nanmax(np.stack(matrices))) or 1.0  # one colour scale for both, so they compare
    tick_every = math.ceil(len(layers) / 24)
    for ax, matrix, title, load in zip(axes, matrices, ("base model", "trained model"), (load_before, load_after)):
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=top)
        ax.set(title=title, xlabel="expert")
        if not load:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_yticks(range(0, len(layers), tick_every), labels=[str(l) for l in layers[::tick_every]])
    axes[0].set_ylabel("MoE layer")
    figure.colorbar(image, ax=list(axes), label="share of the layer's routed (token, expert) pairs")
    figure.suptitle("Per-expert load on the same sample, before and after training")
    return figure
