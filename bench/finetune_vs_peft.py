"""One LoRA fine-tuning step of expertmesh against transformers + peft on the `small` preset, same weights,
same machine, one run.

A step is forward + backward + AdamW on the adapters, float32, on a batch of B random sequences of S tokens
(labels = inputs, so the loss is next-token cross entropy over B * (S - 1) positions on both sides). The
LoRA targets are the same on both sides: the attention projections (q_a, q_b, kv_a, kv_b, o), the shared
experts (gate, up, down) and every routed expert of every MoE layer (peft's `target_parameters` on the fused
`gate_up_proj` / `down_proj`), at the same rank and alpha; the script checks that both sides train the same
number of parameters and start from the same loss (B is zero at init, so that is the base model's loss).

Speed: after a warm-up step each, the two sides' steps are interleaved (ours, peft, ours, peft, ...) and the
median step time of each is reported as tokens/s = B * S / step time (the best step too: the machine is
shared, and a burst of other work slows the two sides unequally). Memory: each side also runs in a
fresh subprocess (load, adapt, `--memory-steps` steps) that reports its peak resident set size
(`VmHWM` of `/proc/self/status`, the kernel's high-water mark of the process's resident memory: Python,
torch, the weights, the activations and the optimizer state; not `getrusage`'s `ru_maxrss`, which a child
inherits across fork and exec from a larger parent), next to its RSS (`VmRSS`) after loading the model and
reading every weight once; the difference is what training added on top of the weights.

    python bench/finetune_vs_peft.py [--checkpoint DIR] [--shapes 4x256,1x256] [--rank 16] [--repeats 7]
                                     [--json bench/finetune_vs_peft_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine_info import machine as base_machine  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
SHARED = ("gate_proj", "up_proj", "down_proj")
LR = 1e-4
BAR, AIM = 1.5, 3.0  # ours / peft tokens/s on the `small` preset


def machine() -> dict:
    import peft
    import transformers

    return base_machine(transformers=transformers.__version__, peft=peft.__version__) | {
        "loadavg_at_start": list(os.getloadavg())}  # a shared machine: other work shows here


def ensure_checkpoint(out: Path) -> Path:
    """The `small` preset written by the CLI (seed 0), reused when `out` already holds one."""
    if not (out / "config.json").is_file():
        subprocess.check_call([sys.executable, "-m", "expertmesh", "init-model", "--preset", "small",
                               "--out", str(out)])
    return out


def batch_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    return torch.randint(3, vocab, (batch, seq), generator=g)  # [B, S]


class Ours:
    """expertmesh's model with `apply_lora` and the fine-tuning job's `LocalTrainer`."""

    name = "expertmesh"

    def __init__(self, path: Path, rank: int, alpha: float):
        from expertmesh.jobs.finetune.local_step import LocalTrainer
        from expertmesh.model import load_model
        from expertmesh.model.lora import apply_lora

        self.model = load_model(path)
        torch.manual_seed(0)
        trainable = apply_lora(self.model, rank=rank, alpha=alpha,
                               targets=("attention", "shared_experts", "routed_experts"))
        self.trainable = sum(p.numel() for p in trainable.values())
        self.trainer = LocalTrainer(self.model, trainable, lr=LR)

    def step(self, ids: torch.Tensor) -> float:
        from expertmesh.jobs.finetune.data import Example

        return self.trainer.step([Example(row, row) for row in ids.tolist()]).loss


class Peft:
    """transformers' model of the same checkpoint with peft's LoRA, AdamW on its trainable parameters."""

    name = "peft"

    def __init__(self, path: Path, rank: int, alpha: float):
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                      *(f"mlp.shared_experts.{p}.weight" for p in SHARED)]
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTENTION),
                                 target_parameters=parameters, lora_dropout=0.0)
        torch.manual_seed(0)
        self.model = peft.get_peft_model(model, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step(self, ids: torch.Tensor) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()


SIDES = {"ours": Ours, "peft": Peft}


def timed(side, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    side.step(ids)
    return time.perf_counter() - start


def measure_speed(path: Path, shapes: list[tuple[int, int]], rank: int, alpha: float,
                  repeats: int) -> tuple[dict, dict]:
    """(each side's loss at its first step, {"BxS": step times and tokens/s of both sides})."""
    sides = [Ours(path, rank, alpha), Peft(path, rank, alpha)]
    ours, ref = sides
    if ours.trainable != ref.trainable:
        raise RuntimeError(f"the sides train different adapters: ours {ours.trainable}, peft {ref.trainable}")
    vocab = ours.model.config.vocab_size
    start = {side.name: side.step(batch_ids(*shapes[0], vocab)) for side in sides}  # B = 0: the base model's
    print(f"trainable parameters: {ours.trainable:,} on both sides; first-step loss {start['expertmesh']:.6f} "
          f"(expertmesh) / {start['peft']:.6f} (peft)", flush=True)
    if abs(start["expertmesh"] - start["peft"]) > 1e-4 * abs(start["peft"]):
        raise RuntimeError(f"the sides do not compute the same loss: {start}")
    out = {}
    for i, (batch, seq) in enumerate(shapes):
        ids = batch_ids(batch, seq, vocab)
        if i:  # warm-up (the first shape's was the step above)
            for side in sides:
                side.step(ids)
        times: dict[str, list[float]] = {side.name: [] for side in sides}
        for _ in range(repeats):
            for side in sides:
                times[side.name].append(timed(side, ids))
        row: dict = {"batch": batch, "seq": seq}
        for name, ts in times.items():
            median = statistics.median(ts)
            row[name] = {"step_s": ts, "median_step_s": median, "tok_s": batch * seq / median,
                         "best_tok_s": batch * seq / min(ts)}
        row["ratio"] = row["expertmesh"]["tok_s"] / row["peft"]["tok_s"]
        row["best_ratio"] = row["expertmesh"]["best_tok_s"] / row["peft"]["best_tok_s"]
        out[f"{batch}x{seq}"] = row
        print(f"  {batch}x{seq}: expertmesh {row['expertmesh']['tok_s']:7.1f} tok/s "
              f"({row['expertmesh']['median_step_s']:.3f} s), peft {row['peft']['tok_s']:7.1f} tok/s "
              f"({row['peft']['median_step_s']:.3f} s), ratio {row['ratio']:.2f}x (best steps: "
              f"{row['expertmesh']['best_tok_s']:.1f} / {row['peft']['best_tok_s']:.1f} tok/s, "
              f"{row['best_ratio']:.2f}x)", flush=True)
    return start, out


def memory_child(side: str, path: Path, batch: int, seq: int, rank: int, alpha: float, steps: int) -> None:
    """Runs in a fresh process: prints {rss after load, peak rss} in bytes, as JSON. Every weight is read once
    before "after load" is taken: our loader maps the safetensors files, transformers' copies them, and
    pages a training step would fault in anyway should not count as the step's own memory."""
    torch.set_num_threads(2)
    model = SIDES[side](path, rank, alpha)
    with torch.no_grad():
        for p in model.model.parameters():
            p.sum()
    loaded = _status_bytes("VmRSS")
    ids = batch_ids(batch, seq, model.model.config.vocab_size)
    for _ in range(steps):
        model.step(ids)
    print(json.dumps({"rss_after_load": loaded, "peak_rss": _status_bytes("VmHWM")}))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(path: Path, shapes: list[tuple[int, int]], rank: int, alpha: float, steps: int) -> dict:
    out = {}
    for batch, seq in shapes:
        row = {}
        for side in SIDES:
            cmd = [sys.executable, __file__, "--checkpoint", str(path), "--rank", str(rank), "--alpha", str(alpha),
                   "--memory-child", f"{side}:{batch}x{seq}", "--memory-steps", str(steps)]
            row[side] = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
        out[f"{batch}x{seq}"] = row
        o, p = row["ours"], row["peft"]
        print(f"  {batch}x{seq}: peak RSS expertmesh {o['peak_rss'] / 2**30:.2f} GiB (+{_gib(o)} over the loaded "
              f"model), peft {p['peak_rss'] / 2**30:.2f} GiB (+{_gib(p)})", flush=True)
    return out


def _gib(row: dict) -> str:
    return f"{(row['peak_rss'] - row['rss_after_load']) / 2**30:.2f} GiB"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(b), int(s)) for b, s in (item.split("x") for item in text.split(","))]
    except ValueError:
        raise ValueError(f"--shapes takes BxS[,BxS...], got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "small",
                        help="where the `small` preset is (written there by `expertmesh init-model` if missing)")
    parser.add_argument("--shapes", default="4x256,1x256", help="batch x sequence length, comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per side and shape, after a warm-up")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "side:BxS", internal
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = ensure_checkpoint(args.checkpoint)
    if args.memory_child:
        side, shape = args.memory_child.split(":")
        (batch, seq), = parse_shapes(shape)
        return memory_child(side, path, batch, seq, args.rank, args.alpha, args.memory_steps)

    shapes = parse_shapes(args.shapes)
    info = {"machine": machine(), "rank": args.rank, "alpha": args.alpha, "lr": LR, "repeats": args.repeats}
    print("machine:", json.dumps(info["machine"]), flush=True)
    if not args.skip_memory:  # first, while this process is small
        print(f"memory (peak RSS of a fresh process: load, adapt, {args.memory_steps} steps):", flush=True)
        info["memory"] = measure_memory(path, shapes, args.rank, args.alpha, args.memory_steps)
    print(f"speed (median of {args.repeats} interleaved steps after a warm-up, rank {args.rank}):", flush=True)
    info["first_step_loss"], info["speed"] = measure_speed(path, shapes, args.rank, args.alpha, args.repeats)

    print("\n| batch x seq | expertmesh tok/s | peft tok/s | ratio | expertmesh peak RSS | peft peak RSS |")
    print("|---|---|---|---|---|---|")
    for key, row in info["speed"].items():
        mem = info.get("memory", {}).get(key)
        rss = (f"{mem['ours']['peak_rss'] / 2**30:.2f} GiB | {mem['peft']['peak_rss'] / 2**30:.2f} GiB" if mem
               else "- | -")
        print(f"| {key} | {row['expertmesh']['tok_s']:.1f} | {row['peft']['tok_s']:.1f} | **{row['ratio']:.2f}x** | "
              f"{rss} |")
    first = info["speed"][f"{shapes[0][0]}x{shapes[0][1]}"]["ratio"]
    print(f"\nbar: expertmesh >= {BAR}x peft tokens/s at {shapes[0][0]}x{shapes[0][1]} (aim {AIM}x): "
          f"{'met' if first >= BAR else 'NOT met'} ({first:.2f}x)")
    info["loadavg_at_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
