"""The fine-tuning job end to end, as a user runs it: `python -m expertmesh.jobs.finetune --config` starts a
private Ray, two Ray Train workers (gloo) train LoRA adapters on ESFT-chosen experts, and the output holds a
peft adapter and the report; the same job submitted again with more steps resumes from its checkpoint. A bad
config is refused before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from expertmesh.model.peft_format import load_peft_adapter
from expertmesh.model import load_model
from expertmesh.model.attention_metadata import AttentionMetadata

REPO = Path(__file__).resolve().parents[2]


def run_job(config: dict, tmp_path: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "expertmesh.jobs.finetune", "--config", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def job_config(tmp_path, tiny_model_dir):
    words = ["experts", "route", "tokens", "to", "the", "gate", "layers", "share", "a", "latent", "cache"]
    lines = [{"text": " ".join(words[(i + j) % len(words)] for j in range(6 + i % 5))} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {
        "model": str(tiny_model_dir), "data": {"path": "train.jsonl", "format": "text", "max_seq_len": 32},
        "output_dir": "runs/demo", "lora": {"r": 4, "alpha": 8},
        "experts": {"select": "esft_gate", "threshold": 0.3},
        "train": {"steps": 4, "batch_size": 4, "lr": 1.0e-3, "seed": 0, "checkpoint_every": 2},
        "scaling": {"num_workers": 2, "use_gpu": False},
    }


def test_the_job_trains_writes_a_peft_adapter_and_a_report_and_resumes(tmp_path, job_config, tiny_model_dir):
    done = run_job(job_config, tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "fine-tuning completed: 4 steps" in done.stdout
    out = tmp_path / "runs" / "demo"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and report["steps_completed"] == 4 and len(report["losses"]) == 4
    assert report["router_checksums"]["before"] == report["router_checksums"]["after"]
    assert report["restarts"] == 0 and report["tokens_per_s"] > 0
    assert report["guard_events"] == []  # varied data at a normal learning rate: the guard stays quiet
    chosen = report["selected_experts"]
    num_experts = load_model(tiny_model_dir).config.routing.num_experts
    assert chosen and all(0 < len(v) < num_experts for v in chosen.values())
    logs = done.stdout + done.stderr
    assert all(f"step {s}/4 loss" in logs for s in range(1, 5))  # one line per step
    for name in ("report.md", "loss.png", "max_over_mean.png", "expert_load.png"):
        assert (out / name).is_file(), name
    assert "Status: `completed`" in (out / "report.md").read_text()

    # the adapter changes the model, and loads back
    prompt = torch.tensor([5, 17, 42, 7])
    meta = AttentionMetadata.without_cache([4])
    base = load_model(tiny_model_dir)
    with torch.no_grad():
        before = base(prompt, meta, None)
        load_peft_adapter(base, out / "adapter")
        after = base(prompt, meta, None)
    assert (after - before).abs().max() > 1e-4

    # the same job, submitted again with more steps: it resumes from its step-4 checkpoint
    job_config["train"]["steps"] = 6
    again = run_job(job_config, tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps_completed"] == 6 and len(report["losses"]) == 6 and report["restarts"] == 1
    assert "step 5/6 loss" in again.stdout + again.stderr and "step 1/6 loss" not in again.stdout + again.stderr


def test_a_bad_config_is_refused_before_ray_starts(tmp_path, job_config):
    start = time.monotonic()
    bad = run_job({**job_config, "lora": {"r": 0}}, tmp_path, timeout=60)
    assert bad.returncode == 2 and "lora.r must be an integer >= 1, got 0" in bad.stderr
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n{broken\n')
    bad = run_job(job_config, tmp_path, timeout=60)
    assert bad.returncode == 2 and "train.jsonl, line 2: not valid JSON" in bad.stderr
    assert "Started a local Ray instance" not in bad.stdout + bad.stderr
    cli = subprocess.run([sys.executable, "-m", "expertmesh", "finetune", "--config", str(tmp_path / "finetune.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "line 2: not valid JSON" in cli.stderr  # `expertmesh finetune` is the same job
    assert time.monotonic() - start < 90


def test_the_guard_stops_a_run_that_unbalances_the_experts(tmp_path, job_config):
    """Every example the same short text, at a learning rate three times the default: the probe's routing
    drifts from the base model's step by step, and the guard warns, lowers the learning rate, then stops the run with a checkpoint, the adapter and the report, naming the layer and the
    figure."""
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "gate gate gate"}) + "\n")
    job_config["train"] = {"steps": 30, "batch_size": 4, "lr": 3.0e-3, "seed": 0, "checkpoint_every": 10}
    job_config["guard"] = {"cooldown_steps": 3}
    job_config["experts"] = {"select": "all"}
    done = run_job(job_config, tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = tmp_path / "runs" / "demo"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "stopped_by_guard" and report["steps_completed"] < 30
    actions = [e["action"] for e in report["guard_events"]]
    assert actions[0] == "warn" and "lower_lr" in actions and actions.index("lower_lr") < actions.index("stop")
    assert report["lr_drops"] >= 1 and report["final_lr"] == pytest.approx(3.0e-3 * 0.5 ** report["lr_drops"])
    stop = report["guard_events"][-1]
    assert stop["action"] == "stop" and stop["step"] == report["steps_completed"]
    assert {"layer", "metric", "value", "threshold"} <= set(stop)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert any(p.name.startswith("checkpoint") for p in (out / "ray" / "finetune").iterdir())
