"""Int8 weight-only quantisation and bfloat16 against float32 on the `small` preset, one process, one run.

Decode tokens/s at batch 1 (prompt 32) and batch 32 (prompts 256) for `LLM(model)`, `LLM(model,
dtype="bfloat16")`, `LLM(model, quantization="experts_int8")` (routed experts only) and `LLM(model,
quantization="int8")` (every linear layer but the gates and kv_b_proj), in interleaved rounds, each a fresh
generation; the
decode step is (time of the last token - time of the first) / (N - 1), best and median over the rounds. Then
the accuracy of each against float32, teacher-forced over every position of random sequences: top-1 agreement
of the next-token predictions and mean KL(float32 || int8), the figures llama.cpp's `llama-perplexity
--kl-divergence` reports for its Q8_0. And the bytes of routed-expert weights one batch-1 decode step reads.

    python bench/int8_experts.py [--quick] [--json bench/int8_experts_results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from actor_graph import ensure_checkpoint, prompts, stamps  # bench/ is on sys.path when run as a script
from machine_info import machine

ROOT = Path(__file__).resolve().parents[1]


def decode_step(llm, ids: list[list[int]], new_tokens: int) -> float:
    times, _ = stamps(llm, ids, new_tokens)
    return (times[-1] - times[0]) / (len(times) - 1)


def expert_bytes_per_token(model) -> dict:
    """Routed-expert bytes one token's decode reads: top_k experts per MoE layer, int8 or float32."""
    from expertmesh.model.moe import MoEBlock

    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)]
    experts = blocks[0].experts
    per_expert = sum(t[0].nbytes for t in (experts.w13, experts.w2))
    per_expert += sum(t[0].nbytes for t in (getattr(experts, "w13_scale", None), getattr(experts, "w2_scale", None))
                      if t is not None)
    return {"per_expert": per_expert, "per_token": per_expert * model.config.routing.top_k * len(blocks)}


def step_bytes(model) -> int:
    """Weight bytes one batch-1 decode step reads: every parameter and buffer but the embedding table (one row)
    and the routed experts (top_k of them per MoE layer, `expert_bytes_per_token`)."""
    from expertmesh.model.moe import MoEBlock

    routed = {id(t) for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)
              for t in layer.mlp.experts.state_dict(keep_vars=True).values()}
    embed = model.model.embed_tokens.weight
    seen = {id(t) for t in model.model.rotary.buffers()}  # RoPE tables: a few rows a step
    total = embed[0].nbytes
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in routed or t is embed:
            continue
        seen.add(id(t))
        total += t.nbytes
    return total + expert_bytes_per_token(model)["per_token"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, tokens and positions")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rounds = 2 if args.quick else 3
    cases = [(1, 32, 24 if args.quick else 64), (32, 256, 12 if args.quick else 32)]
    positions = (16, 32) if args.quick else (64, 64)  # sequences x tokens for the accuracy figures

    from expertmesh import LLM
    from expertmesh.testing.agreement import next_token_agreement

    path = ensure_checkpoint("small")
    info = {"machine": machine(), "preset": "small", "rounds": rounds, "decode": {}}
    print(json.dumps(info["machine"]), flush=True)
    engines = {"float32": LLM(str(path)), "bfloat16": LLM(str(path), dtype="bfloat16"),
               "experts_int8": LLM(str(path), quantization="experts_int8"),
               "int8": LLM(str(path), quantization="int8")}
    vocab = engines["float32"].llm_engine.model_config.vocab_size
    for batch, length, new in cases:
        ids = prompts(batch, length, vocab)
        for llm in engines.values():
            stamps(llm, ids, 2)  # warm-up
        steps: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):
            for name, llm in engines.items():
                steps[name].append(decode_step(llm, ids, new))
        row = {name: {"best_step_s": min(s), "median_step_s": statistics.median(s), "steps_s": s,
                      "tok_s": batch / min(s)} for name, s in steps.items()}
        for name in ("bfloat16", "experts_int8", "int8"):
            row[f"{name}_over_float32"] = row[name]["tok_s"] / row["float32"]["tok_s"]
        info["decode"][f"b{batch}"] = row
        print(f"batch {batch:2d} (prompt {length}, {new} new): " + ", ".join(
            f"{name} {row[name]['tok_s']:7.1f} tok/s" for name in engines) + " -> " + ", ".join(
            f"{name} {row[f'{name}_over_float32']:.2f}x" for name in ("bfloat16", "experts_int8", "int8"))
            + " float32", flush=True)

    models = {name: llm.llm_engine.executor.model for name, llm in engines.items()}
    info["expert_bytes"] = {name: expert_bytes_per_token(m) for name, m in models.items()}
    info["weight_bytes_per_token"] = {name: step_bytes(m) for name, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(4, vocab, (positions[1],), generator=gen).tolist() for _ in range(positions[0])]
    info["accuracy"] = {}
    for name in ("experts_int8", "int8", "bfloat16"):  # bf16 against float32: the yardstick of what rounding alone does here
        start = time.perf_counter()
        agreement = next_token_agreement(models["float32"], models[name], sequences)
        info["accuracy"][name] = {"positions": agreement.positions, "top1_agreement": agreement.top1,
                                  "mean_kl": agreement.mean_kl, "max_kl": agreement.max_kl,
                                  "seconds": time.perf_counter() - start}
        print(f"{name} against float32 over {agreement.positions} positions: top-1 agreement {agreement.top1:.4f}, "
              f"mean KL {agreement.mean_kl:.3g} nats (max {agreement.max_kl:.3g})", flush=True)
    print("weight bytes a batch-1 decode step reads: " + ", ".join(
        f"{name} {b / 2**20:.1f} MiB" for name, b in info["weight_bytes_per_token"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
