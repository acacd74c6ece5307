"""The fine-tuning job's driver: checks the config, the checkpoint and the data before anything starts, joins
the Ray cluster (or starts a private one), runs the workers under Ray Train's TorchTrainer (gloo on CPUs,
NCCL on GPUs), with the routed experts on the deployment's expert-shard actors when `deployment:` names
one, and leaves in `output_dir`: `adapter/` (peft format), `report.json`, `report.md` and the plots, and Ray
Train's run with
its checkpoints (`ray/`), which a job submitted again with the same `output_dir` resumes from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from expertmesh.engine.tokenizer import Tokenizer, load_eos_token_ids
from expertmesh.jobs.finetune.config import FinetuneConfig
from expertmesh.jobs.finetune.data import load_examples
from expertmesh.jobs.finetune.shard_mode import check_deployment, start_shards
from expertmesh.model import ModelConfig, check_checkpoint

RUN_FILE = "run.json"  # which config the output directory belongs to
MAX_FAILURES = 3  # worker-group restarts from the latest checkpoint before the run fails


def _as_dict(config: FinetuneConfig) -> dict:
    raw = dataclasses.asdict(config)
    for section in ("lora", "guard"):
        for key, value in raw[section].items():
            if isinstance(value, tuple):
                raw[section][key] = list(value)
    return raw


def _absolute(config: FinetuneConfig) -> FinetuneConfig:
    """The config with its paths absolute, from this process's working directory (a config file given by a
    relative path leaves them relative): Ray Train runs each worker in a directory of its own."""
    return dataclasses.replace(config, model=os.path.abspath(config.model),
                               output_dir=os.path.abspath(config.output_dir),
                               data=dataclasses.replace(config.data, path=os.path.abspath(config.data.path)))


def _check_targets(config: FinetuneConfig) -> None:
    """Every LoRA target must match something in the model."""
    model = ModelConfig.from_pretrained(config.model)
    missing = {"shared_experts": not model.shared_intermediate_size, "routed_experts": not any(model.moe_layers)}
    for i, target in enumerate(config.lora.targets):
        if missing.get(target):
            raise ValueError(f"lora.targets[{i}] {target!r} matches nothing in {config.model} ({model.model_type} "
                             f"has no {target.replace('_', ' ')}); drop it from lora.targets")


def prepare(config: FinetuneConfig) -> dict:
    """Everything that can be wrong is found here, before a worker starts: the checkpoint, the data (every
    line), the output directory holding another run. Returns the config the workers get, its paths absolute."""
    config = _absolute(config)
    check_checkpoint(config.model)
    _check_targets(config)
    if config.deployment is not None:
        check_deployment(config.deployment, config.model)
    tokenizer = Tokenizer.from_pretrained(config.model)
    load_examples(config.data, tokenizer, (load_eos_token_ids(config.model) or [None])[0])
    raw = _as_dict(config)
    out = Path(config.output_dir)
    digest = hashlib.sha256(json.dumps({k: v for k, v in raw.items() if k != "train"} | {
        "train": {k: v for k, v in raw["train"].items() if k != "steps"}}, sort_keys=True).encode()).hexdigest()
    run_file = out / RUN_FILE
    if run_file.exists() and json.loads(run_file.read_text()).get("config_sha256") != digest:
        raise ValueError(f"output_dir {out} holds a different run (another model, data or settings): give this "
                         "run a directory of its own, or the same config to resume that one")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"config_sha256": digest, "config": raw}, indent=2) + "\n")
    return raw


def run(config: FinetuneConfig) -> dict:
    """Runs the job to its end; returns report.json's contents."""
    raw = prepare(config)
    from expertmesh.graph import runtime  # sets Ray's environment before Ray loads

    import ray.train
    from ray.train.torch import TorchTrainer

    from expertmesh.jobs.finetune.worker import train_worker

    # log_to_driver: the workers' step lines reach this process's output, so `ray job logs` shows them
    started = runtime.connect(num_cpus=config.scaling.num_workers, log_to_driver=True)
    shards = None
    try:
        if config.deployment is not None:  # the routed experts on the deployment's shard actors
            shards = start_shards(config.deployment, raw["model"])
        out = Path(raw["output_dir"])
        trainer = TorchTrainer(
            train_worker, train_loop_config={"config": raw, "shards": shards and shards.for_workers()},
            scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers,
                                                   use_gpu=config.scaling.use_gpu),
            run_config=ray.train.RunConfig(name="finetune", storage_path=str(out / "ray"),
                                           failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES)),
        )
        trainer.fit()
    finally:
        if shards is not None:
            shards.stop()
        runtime.disconnect(started)
    return json.loads((Path(raw["output_dir"]) / "report.json").read_text())
