"""What each Ray Train worker runs: the same model, data and adapter initialisation on every worker (so they
start equal and stay equal: each step sums their gradients), this worker's share of each batch, the guard
fed the load of every worker, checkpoints through `ray.train.report` and, on rank 0, the adapter and the
report at the end."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from expertmesh.engine.tokenizer import Tokenizer, load_eos_token_ids
from expertmesh.experts import LayerHealth, layer_health, relevance_shares, select_experts
from expertmesh.jobs.finetune.config import FinetuneConfig
from expertmesh.jobs.finetune.data import load_examples
from expertmesh.jobs.finetune.esft import expert_scores
from expertmesh.jobs.finetune.guard import ImbalanceGuard
from expertmesh.jobs.finetune.local_step import LocalTrainer, barrier, router_checksums, routing_counts
from expertmesh.jobs.finetune.loss import pack
from expertmesh.jobs.finetune.probe import probe_routing, topk_overlap
from expertmesh.jobs.finetune.report import write_report
from expertmesh.jobs.finetune.shard_mode import (ShardBackend, ShardHandles, ShardSteps, expert_adapters,
                                                 load_worker_model)
from expertmesh.model.lora import apply_lora
from expertmesh.model.peft_format import save_peft_adapter
from expertmesh.model import load_model
from expertmesh.model.attention_metadata import AttentionMetadata

SAMPLE_SIZE = 64  # examples the base model's figures (ESFT scores, the guard's baseline) are measured on
STATE_FILE = "trainer_state.pt"


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """The examples of global step `step` (1-based): a fresh shuffle of the dataset per epoch, in order."""
    first = (step - 1) * batch_size
    out = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[offset]))
    return out


BASE_DRAWS = 256  # random batches the base model's figures are taken over


@torch.no_grad()
def base_figures(model, sample: list, batch_size: int, seed: int = 0) -> dict[int, LayerHealth]:
    """The base model's own load figures per MoE layer, as a step sees them: over random batches of the
    training batch size drawn from the sample (each example routed once; a batch's counts are the sum of its
    examples'), the worst of them (highest max/mean, lowest entropy). A small batch's figures scatter, so a
    baseline from the whole sample, or from the mean batch, would make many steps look skewed; the guard's
    lines sit beyond what the base model itself does on some batch."""
    top_k = model.config.routing.top_k
    per_example = []
    for ex in sample:
        with routing_counts(model) as counts:
            device = model.lm_head.weight.device
            ids = torch.tensor(ex.input_ids, device=device)
            model(ids, AttentionMetadata.without_cache([len(ids)], device), None, logits_indices=ids[:0])
        per_example.append({layer: torch.tensor(c) for layer, c in counts.items()})
    gen = torch.Generator().manual_seed(seed)
    seen: dict[int, list[LayerHealth]] = {}
    for _ in range(BASE_DRAWS):
        picks = torch.randint(len(sample), (batch_size,), generator=gen).tolist()
        for layer in per_example[0]:
            counts = sum(per_example[i][layer] for i in picks)
            seen.setdefault(layer, []).append(layer_health(layer, counts.tolist(), top_k))
    return {layer: dataclasses.replace(figures[0], max_over_mean=max(f.max_over_mean for f in figures),
                                       entropy=min(f.entropy for f in figures))
            for layer, figures in seen.items()}


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker's whole run. `loop_config`: {"config": the job's config as a dict, "shards": how to
    reach the expert shards (deployment mode) or None}."""
    import ray.train
    import ray.train.torch

    config = FinetuneConfig.from_dict(loop_config["config"])
    shards = loop_config.get("shards")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed)
    tokenizer = Tokenizer.from_pretrained(config.model)
    eos = (load_eos_token_ids(config.model) or [None])[0]
    examples = load_examples(config.data, tokenizer, eos)
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    backend = handles = None
    if shards is None:
        model = load_model(config.model, device=str(device))
    else:  # the routed experts live on the deployment's shard actors; this worker keeps the rest
        backend = ShardBackend(config.model, shards, worker=f"rank{rank}")
        model = load_worker_model(config.model, backend, device=str(device))
        handles = ShardHandles(shards) if rank == 0 else None
        if handles is not None:
            handles.start({}, config.lora.r, config.lora.alpha, config.train.weight_decay)  # the base experts
        barrier()
    top_k = model.config.routing.top_k
    sample = examples[:SAMPLE_SIZE]

    checksums_before = router_checksums(model)
    base = base_figures(model, sample, config.train.batch_size, config.train.seed)
    load_before = _sample_load(model, sample)
    probe = examples[:config.guard.probe_examples]
    probe_base = probe_routing(model, probe) if probe else None
    selected = shares = None
    if config.experts.select != "all" and "routed_experts" in config.lora.targets:
        scores = expert_scores(model, sample, config.experts.select)
        selected = select_experts(scores, config.experts.threshold)
        shares = {layer: relevance_shares(totals) for layer, totals in scores.items()}

    torch.manual_seed(config.train.seed)  # the same adapter initialisation on every worker, in every mode
    trainable = apply_lora(model, rank=config.lora.r, alpha=config.lora.alpha, targets=config.lora.targets,
                           experts=selected, dropout=config.lora.dropout)
    local = trainable if shards is None else {n: p for n, p in trainable.items() if ".experts.lora_" not in n}
    remote = None if shards is None else ShardSteps(backend, handles)
    trainer = LocalTrainer(model, local, lr=config.train.lr, weight_decay=config.train.weight_decay, remote=remote,
                           aux_loss_coef=config.guard.aux_loss_coef)
    guard = ImbalanceGuard(config.guard, base)
    state = {"step": 0, "losses": [], "restarts": 0, "tokens": 0, "seconds": 0.0, "history": []}

    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint is not None:  # a restarted worker group, or the same job submitted again: go on from there
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / STATE_FILE, weights_only=False, map_location=device)
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved["adapters"][name])
        if trainer.optimizer is not None:
            trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.load_lr(saved["lr"])
        trainer.steps = saved["state"]["step"]
        guard.restore(saved["guard"])
        state = saved["state"]
        state["restarts"] += 1
    if handles is not None:  # the shards train from the adapters this worker drew (or the checkpoint held)
        handles.start(expert_adapters(model), config.lora.r, config.lora.alpha, config.train.weight_decay)
        if saved is not None:
            handles.load_state(saved["shards"])
    if shards is not None:
        barrier()

    status = "completed"
    for step in range(state["step"] + 1, config.train.steps + 1):
        batch = [examples[i] for i in batch_indices(step, config.train.batch_size, len(examples), config.train.seed)]
        start = time.perf_counter()
        result = trainer.step(batch[rank::world])
        elapsed = time.perf_counter() - start
        state["seconds"] += elapsed
        state["tokens"] += result.tokens
        state["step"] = step
        state["losses"].append(result.loss)
        overlap = None
        if probe_base is not None and step % config.guard.probe_every == 0:
            overlap = topk_overlap(probe_base, probe_routing(model, probe))
        events = guard.observe(step, result.counts, top_k, overlap)
        for event in events:
            if event.action == "lower_lr":
                trainer.scale_lr(config.guard.lr_factor)
        health = {layer: layer_health(layer, c, top_k) for layer, c in result.counts.items() if sum(c)}
        worst = max((h.max_over_mean / base[layer].max_over_mean for layer, h in health.items()), default=0.0)
        state["history"].append({"step": step, "loss": result.loss, "lr": result.lr,
                                 "max_over_mean": {layer: h.max_over_mean for layer, h in health.items()},
                                 "entropy": {layer: h.entropy for layer, h in health.items()},
                                 "overlap": overlap or {}, "aux_loss": result.aux_loss})
        if rank == 0:
            # written, not print()ed: Ray Train also copies print() into its own log, and `ray job logs`
            # would show every line twice
            line = (f"step {step}/{config.train.steps} loss {result.loss:.4f} lr {result.lr:.3g} "
                    f"tokens/s {result.tokens / max(elapsed, 1e-9):.1f} worst max/mean vs base {worst:.2f}x"
                    + (f" min overlap {min(overlap.values()):.2f}" if overlap else "")
                    + (f" aux {result.aux_loss:.4f}" if config.guard.aux_loss_coef > 0 else "")
                    + "".join(f" [guard: {e.action} layer {e.layer} {e.metric}={e.value:.3f}]" for e in events))
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        metrics = {"step": step, "loss": result.loss, "lr": result.lr, "worst_max_over_mean_vs_base": worst}
        if guard.stopped or step % config.train.checkpoint_every == 0 or step == config.train.steps:
            _report_with_checkpoint(metrics, rank, model, trainable, trainer, guard, state, handles)
        else:
            ray.train.report(metrics)
        if guard.stopped:
            status = "stopped_by_guard"
            break
    if handles is not None:
        handles.pull(model)
    if rank == 0:
        out = Path(config.output_dir)
        save_peft_adapter(model, out / "adapter", rank=config.lora.r, alpha=config.lora.alpha, base_model=config.model)
        report = {
            "status": status, "steps_completed": state["step"], "losses": state["losses"],
            "guard_events": [e.to_dict() for e in guard.events],
            "selected_experts": {str(k): v for k, v in selected.items()} if selected is not None else "all",
            "selection_shares": ({str(layer): {str(e): shares[layer][e] for e in chosen}
                                  for layer, chosen in selected.items()} if selected is not None else None),
            "router_checksums": {"before": checksums_before, "after": router_checksums(model)},
            "tokens_per_s": state["tokens"] / state["seconds"] if state["seconds"] else 0.0,
            "restarts": state["restarts"], "lr_drops": guard.lr_drops, "final_lr": trainer.lr,
            "experts_on": "shards" if shards is not None else "workers",
        }
        write_report(out, report, state["history"], load_before, _sample_load(model, sample))
    if backend is not None:
        backend.close()


@torch.no_grad()
def _sample_load(model, sample: list) -> dict[int, list[int]]:
    """Per MoE layer, the (token, expert) pairs each expert gets over the sample (the report's heatmap)."""
    was_training = model.training
    model.eval()
    try:
        with routing_counts(model) as counts:
            for start in range(0, len(sample), 8):
                device = model.lm_head.weight.device
                ids, _, lens = pack(sample[start:start + 8], device)
                model(ids, AttentionMetadata.without_cache(lens, device), None, logits_indices=ids[:0])
    finally:
        model.train(was_training)
    return dict(counts)


def _report_with_checkpoint(metrics: dict, rank: int, model, trainable: dict, trainer: LocalTrainer,
                            guard: ImbalanceGuard, state: dict, handles: ShardHandles | None) -> None:
    import ray.train

    if rank != 0:  # every worker holds the same adapters (the shards hold theirs once): one copy is enough
        ray.train.report(metrics)
        return
    shard_states = None
    if handles is not None:
        handles.pull(model)
        shard_states = handles.state()
    with tempfile.TemporaryDirectory() as directory:
        torch.save({"adapters": {n: p.detach().clone() for n, p in trainable.items()},
                    "optimizer": trainer.optimizer.state_dict() if trainer.optimizer is not None else None,
                    "lr": trainer.lr, "guard": guard.snapshot(), "state": dict(state), "shards": shard_states},
                   Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
