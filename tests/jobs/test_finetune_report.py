"""The fine-tuning run's human report: report.json as before, report.md naming the status, every guard event,
the chosen experts and the router verdict (quiet when unchanged, loud when not), and three readable PNGs, also
for a run that failed before its first step."""

import gc
import json
import struct

import matplotlib.image
import pytest
from matplotlib.figure import Figure

from expertmesh.jobs.finetune.report import write_report

LAYERS, E, STEPS = (1, 2, 3), 8, 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHECKSUMS = {f"model.layers.{layer}.mlp.gate.{t}": f"{layer:02d}{t}" * 8
             for layer in LAYERS for t in ("weight", "e_score_correction_bias")}
EVENTS = [
    {"step": 5, "layer": 1, "metric": "max_over_mean", "value": 1.71, "threshold": 1.5, "action": "warn"},
    {"step": 9, "layer": 2, "metric": "entropy", "value": 0.78, "threshold": 0.8, "action": "lower_lr"},
    {"step": 14, "layer": 3, "metric": "overlap", "value": 0.18, "threshold": 0.2, "action": "stop"},
]


def synthetic(steps: int = STEPS, **report):
    history = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "max_over_mean": {layer: 1.2 + 0.05 * s * layer / 3
                                                                          for layer in LAYERS},
                "entropy": {layer: 0.95 - 0.01 * s for layer in LAYERS}} for s in range(1, steps + 1)]
    base = {"status": "stopped_by_guard", "steps_completed": steps, "losses": [h["loss"] for h in history],
            "guard_events": EVENTS, "selected_experts": {"1": [0, 3], "2": [5], "3": [1, 6, 7]},
            "selection_shares": {"1": {"0": 0.12, "3": 0.41}, "2": {"5": 0.5}, "3": {"1": 0.1, "6": 0.1, "7": 0.2}},
            "router_checksums": {"before": CHECKSUMS, "after": dict(CHECKSUMS)},
            "tokens_per_s": 1234.5, "restarts": 1, "lr_drops": 1, "final_lr": 5e-4}
    before = {layer: [100 + 10 * e for e in range(E)] for layer in LAYERS}
    after = {layer: [400 if e == layer else 80 for e in range(E)] for layer in LAYERS}
    return base | report, history, before, after


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def check_plots(paths) -> None:
    names = [p.name for p in paths]
    assert names == ["report.json", "report.md", "loss.png", "max_over_mean.png", "expert_load.png"]
    for path in paths[2:]:
        width, height = png_size(path)
        assert 400 <= width <= 3000 and 200 <= height <= 3000, (path.name, width, height)
        pixels = matplotlib.image.imread(path)  # decodes whole: a truncated file fails here
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 0, f"{path.name} is blank"


def test_writes_every_file_and_the_report_round_trips(tmp_path):
    report, history, before, after = synthetic()
    paths = write_report(tmp_path / "out", report, history, before, after)
    assert all(p.parent == tmp_path / "out" and p.is_file() for p in paths)
    check_plots(paths)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_report_md_names_status_events_experts_and_an_unchanged_router(tmp_path):
    report, history, before, after = synthetic()
    write_report(tmp_path, report, history, before, after)
    md = (tmp_path / "report.md").read_text()
    assert "stopped_by_guard" in md and "imbalance guard stopped the run" in md
    for e in EVENTS:
        assert f"| {e['step']} | {e['layer']} | {e['metric']} | {e['value']:.3f} | {e['threshold']:.3f} | " \
               f"{e['action']} |" in md
    assert "| 1 | 0 (12.0%), 3 (41.0%) |" in md and "| 2 | 5 (50.0%) |" in md and "| 3 | 1 (10.0%)" in md
    assert f"Unchanged: {len(CHECKSUMS)} router tensors bitwise equal before and after." in md
    assert "CHANGED" not in md
    assert "first 3.0000, final 0.1500" in md and "1234.5" in md and "Restarts: 1" in md
    for name in ("loss.png", "max_over_mean.png", "expert_load.png"):
        assert f"]({name})" in md  # relative links, next to report.md


def test_a_changed_router_tensor_is_named_loudly(tmp_path):
    changed = "model.layers.2.mlp.gate.weight"
    report, history, before, after = synthetic()
    report["router_checksums"]["after"] = dict(CHECKSUMS) | {changed: "f" * 64}
    write_report(tmp_path, report, history, before, after)
    md = (tmp_path / "report.md").read_text()
    assert f"THE FROZEN ROUTER CHANGED: 1 of {len(CHECKSUMS)}" in md
    assert f"`{changed}` (changed)" in md
    assert "Unchanged" not in md
    assert md.count("model.layers.") == 1  # only the changed tensor is listed


def test_selection_all_completed_run_and_unknown_keys(tmp_path):
    report, history, before, after = synthetic(status="completed", guard_events=[], selected_experts="all",
                                               overlap_probe={"1": 0.9})
    del report["selection_shares"]
    # history read back from JSON has str layer keys
    history = json.loads(json.dumps(history))
    paths = write_report(tmp_path, report, history, before, after)
    check_plots(paths)
    md = (tmp_path / "report.md").read_text()
    assert "`completed`" in md and "finished every step" in md
    assert "## Guard events\n\nNone." in md
    assert "All routed experts (no selection)." in md
    assert '`overlap_probe`: `{"1": 0.9}`' in md


def test_a_run_that_failed_before_step_one_does_not_crash(tmp_path):
    report = {"status": "failed", "steps_completed": 0, "losses": [], "guard_events": [],
              "selected_experts": "all", "router_checksums": {"before": CHECKSUMS, "after": {}},
              "tokens_per_s": 0.0, "restarts": 0, "lr_drops": 0, "final_lr": 1e-3}
    before = {layer: [100] * E for layer in LAYERS}
    paths = write_report(tmp_path, report, [], before, {})
    check_plots(paths)
    md = (tmp_path / "report.md").read_text()
    assert "`failed`" in md and "Steps completed: 0" in md and "no step completed" in md
    assert "Not checked" in md and "CHANGED" not in md
    paths = write_report(tmp_path / "bare", {"status": "failed"}, [], {}, {})
    check_plots(paths)


def live_figures() -> int:
    gc.collect()
    return sum(type(o) is Figure for o in gc.get_objects())  # type(): isinstance wakes lazy torch attributes


def test_figures_do_not_outlive_the_call(tmp_path):
    report, history, before, after = synthetic()
    alive = live_figures()
    for i in range(3):
        write_report(tmp_path / str(i), report, history, before, after)
    assert live_figures() <= alive


def test_a_report_without_status_is_refused(tmp_path):
    with pytest.raises(ValueError, match="status"):
        write_report(tmp_path, {"steps_completed": 3}, [], {}, {})
