"""The `small` preset trained briefly as a language model, so that its next-token predictions carry signal.

The `small` checkpoint the benchmarks use has random weights: its next-token distribution is nearly flat, and
a rounding as small as bfloat16's already flips many top-1 choices, so what quantisation costs cannot be
judged on it (`bench/quant_accuracy.py`). This script starts from that checkpoint (seed 0) and trains every
weight (the routers' correction biases are buffers, not weights, and stay as they are) as a causal LM:
float32, AdamW, linear warmup then cosine decay, gradients clipped, `BATCH` windows of `SEQ_LEN` tokens per
step, through transformers' `DeepseekV3ForCausalLM` (its `grouped_mm` experts: a step of 8 x 128 tokens took
~3 s there on an idle 2-core CPU, ~20 s through our `MoECausalLM`, whose per-expert slices of the stacked
weights each back-propagate a full-size gradient). Float32 rather than bf16 autocast (~20% faster here): a
model trained under bf16 would be partly adapted to bf16's rounding, which `quant_accuracy.py` measures.
One torch thread by default: with two on a 2-core machine where another process holds a core, every op waits
for the descheduled thread (a step took ~29 s against ~2.5 s with one thread, at 4 x 128 tokens); on an idle
machine `--threads 2` is ~1.6x faster. Thread counts sum in different orders, so they give slightly
different weights.

The corpus is text any machine with Python 3.11 and a clone of this repository has, read deterministically:
the language reference of the standard library's `pydoc_data/topics.py` (its topics in sorted order) and the
repository's markdown files but README.md, each tokenized by the checkpoint's own tokenizer and concatenated.
Training windows are cut from it with a stride of `SEQ_LEN` and visited in a seeded shuffled order. README.md
is held out: its loss is measured before and after training (windows of `SEQ_LEN` + 1 tokens, every
position scored), with the trained model's top-1 accuracy and the share of positions whose top token has
probability >= 0.5.

The result is a checkpoint like the source (its config, tokenizer and generation files, the weights as
transformers' `save_pretrained` writes them, per-expert names as in the source) in the benchmarks' cache,
`.bench-cache/small-trained-<steps>`, with `training.json` (steps, tokens seen, corpus files and their
sha256, the train loss every `LOG_EVERY` steps, the README figures, our engine's logits against transformers'
on the written checkpoint, wall time). It is written into a temporary directory first and renamed into place;
an existing one is returned without training. The default steps took 22 minutes here with one thread while
another benchmark shared the machine (4.2-5.2 s a step), for a README loss of 4.84 (10.53 before; train loss
~3.4 at the end), top-1 accuracy 12% and a top token of probability >= 0.5 at 4% of the positions.

    python bench/trained_checkpoint.py [--steps 250] [--threads 1]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from actor_graph import CACHE, ROOT, ensure_checkpoint  # bench/ is on sys.path when run as a script

STEPS = 250
THREADS = 1
BATCH = 8  # windows per step
SEQ_LEN = 128  # tokens per window (quant_accuracy.py's default context)
LR = 1e-3
WARMUP = 0.05  # share of the steps
MIN_LR = 0.1  # the cosine decays to this share of LR
WEIGHT_DECAY = 0.1
CLIP = 1.0
SEED = 0
LOG_EVERY = 10
HELD_OUT = ROOT / "README.md"


def corpus_files() -> list[Path]:
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    markdown = sorted(p for d in ("bench", "infra", "terraform") for p in (ROOT / d).rglob("*.md"))
    return [topics, *markdown]


def read_text(path: Path) -> str:
    """A file's text; `pydoc_data/topics.py` is Python source: the prose of its `topics` dict, in key order."""
    if path.name != "topics.py":
        return path.read_text(encoding="utf-8")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    value = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets))
    topics: dict[str, str] = ast.literal_eval(value)
    return "\n\n".join(topics[key] for key in sorted(topics))


def windows(ids: list[int], length: int) -> torch.Tensor:
    """[N, length + 1]: windows at a stride of `length`, so every token but the first is a target once."""
    t = torch.tensor(ids)
    return t.unfold(0, length + 1, length)


def lr_at(step: int, steps: int) -> float:
    warmup = max(1, round(WARMUP * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return LR * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross entropy of the windows `batch` [B, S + 1], and the logits [B, S, V]."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), logits


@torch.no_grad()
def held_out(model: torch.nn.Module, data: torch.Tensor) -> dict:
    """Loss, perplexity, top-1 accuracy and the share of confident positions (top probability >= 0.5)."""
    model.eval()
    total, correct, confident = 0.0, 0, 0
    for batch in data.split(BATCH):
        loss, logits = next_token_loss(model, batch)
        probs = logits.float().softmax(-1)
        total += float(loss) * batch[:, 1:].numel()
        correct += int((probs.argmax(-1) == batch[:, 1:]).sum())
        confident += int((probs.amax(-1) >= 0.5).sum())
    n = data[:, 1:].numel()
    return {"positions": n, "loss": total / n, "perplexity": math.exp(total / n), "top1_accuracy": correct / n,
            "confident_share": confident / n}


def train(source: Path, out: Path, steps: int) -> dict:
    """Trains `source` for `steps` steps with torch's threads and writes the result to `out`; returns what
    training.json holds."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from expertmesh.engine.tokenizer import Tokenizer

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    start = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(source)
    files = corpus_files()
    ids = [i for f in files for i in tokenizer.encode(read_text(f), add_special_tokens=False)]
    data = windows(ids, SEQ_LEN)
    readme = windows(tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"), add_special_tokens=False), SEQ_LEN)
    print(f"corpus: {len(ids)} tokens from {len(files)} files, {len(data)} windows of {SEQ_LEN + 1}; "
          f"{steps} steps of {BATCH} windows", flush=True)

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, experts_implementation="grouped_mm")
    before = held_out(model, readme)
    print(f"README before training: loss {before['loss']:.3f}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY, fused=True)
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    curve, losses = [], []
    model.train()
    for step in range(steps):
        if len(order) < BATCH:  # a new pass over the corpus, in a new order
            order += torch.randperm(len(data), generator=generator).tolist()
        batch, order = data[order[:BATCH]], order[BATCH:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        loss, _ = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": sum(losses) / len(losses)})
            print(f"step {step + 1}/{steps}: train loss {curve[-1]['loss']:.3f}, lr {lr_at(step, steps):.2e}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            losses = []
    train_s = time.perf_counter() - start
    after = held_out(model, readme)
    print(f"README after training: loss {after['loss']:.3f} (perplexity {after['perplexity']:.1f}), top-1 "
          f"accuracy {after['top1_accuracy']:.3f}, confident at {after['confident_share']:.3f} of positions",
          flush=True)

    model.save_pretrained(out)
    for f in source.iterdir():  # the source's config (the format it was written in), tokenizer, generation
        if not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    for f in out.glob("model*.safetensors"):
        f.chmod(0o644)  # safetensors creates the file owner-only
    diff = engine_vs_transformers(model, out, readme[0, :64])
    print(f"expertmesh against transformers on the written checkpoint, 64 tokens: max |logit diff| {diff:.2e}",
          flush=True)
    corpus = [{"path": str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f),
               "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]
    return {
        "source": source.name, "steps": steps, "batch": BATCH, "seq_len": SEQ_LEN,
        "tokens_seen": steps * BATCH * SEQ_LEN, "lr": LR, "warmup": WARMUP, "min_lr": MIN_LR,
        "weight_decay": WEIGHT_DECAY, "clip": CLIP, "seed": SEED, "corpus": {"tokens": len(ids), "files": corpus},
        "train_loss": curve, "held_out": HELD_OUT.name, "held_out_before": before, "held_out_after": after,
        "engine_vs_transformers_max_abs_logit_diff": diff, "train_s": train_s,
        "wall_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
    }


@torch.inference_mode()
def engine_vs_transformers(model: torch.nn.Module, path: Path, ids: torch.Tensor) -> float:
    """Max |logit difference| over the tokens `ids` [S] between our engine's model loaded from `path` and
    transformers' `model` (the one `path` was written from)."""
    from expertmesh.model import AttentionMetadata, load_model

    model.eval()
    ours = load_model(path)(ids, AttentionMetadata.without_cache([len(ids)]), None)
    theirs = model(input_ids=ids[None], use_cache=False).logits[0].float()
    return float((ours - theirs).abs().max())


def ensure_trained_checkpoint(steps: int = STEPS, threads: int = THREADS) -> Path:
    """`.bench-cache/small-trained-<steps>`, trained now (with `threads` torch threads) unless it exists."""
    out = CACHE / f"small-trained-{steps}"
    if out.is_dir():
        return out
    tmp = CACHE / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        info = train(ensure_checkpoint("small"), tmp, steps)
    finally:
        torch.set_num_threads(before)
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    tmp.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    print(ensure_trained_checkpoint(args.steps, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
