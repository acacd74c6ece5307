"""expertmesh against transformers `generate` on the `small` preset, same weights, same machine, one run.

Prints prefill and decode tokens/s at batch 1 and batch 32, the ratios, the machine's floors for the same
work (FLOPs / measured matmul rate, bytes of active weights / measured read bandwidth) and the peak
resident memory of loading the checkpoint. Decode is measured apart from prefill, inside one generation:
prefill = time until every request has its first token; decode step = (time of the last token - time of
the first) / (N - 1), stamped per step (a logits processor in transformers, the engine's step loop here).

    python bench/engine_vs_hf.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine_info import machine as base_machine  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"


def machine() -> dict:
    import transformers

    return base_machine(transformers=transformers.__version__)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: primitive caches, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floors() -> dict:
    """Measured matmul rate and read bandwidth of this machine."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = best_of(lambda: a @ b, 10)
    big = torch.ones(128 * 2**20)  # 512 MiB
    read = best_of(lambda: big.sum(), 5)
    return {"matmul_gflops": 2 * 2048**3 / mm / 1e9, "read_gbs": big.numel() * 4 / read / 1e9}


def ensure_checkpoint(preset: str) -> Path:
    out = CACHE / preset
    if not (out / "config.json").is_file():
        from expertmesh.testing import write_random_checkpoint

        write_random_checkpoint(preset, out, seed=0)
    return out


def load_peak_rss(path: Path) -> dict:
    """Peak RSS of a fresh process that only loads the model, against the bytes of its weights."""
    code = (
        "import resource, torch; from expertmesh import load_model; "
        f"m = load_model({str(path)!r}); "
        "n = sum(p.numel() * p.element_size() for p in m.parameters()); "
        "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    baseline = "import resource, torch, expertmesh; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    # Every weight page touched: load, then one generation (a 64 MiB KV cache).
    serving = (
        "import resource, torch; from expertmesh import LLM, SamplingParams; "
        f"llm = LLM({str(path)!r}, kv_cache_gib=1 / 16); "
        "llm.generate([{'prompt_token_ids': [5, 6, 7]}], SamplingParams(max_tokens=2)); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    base = int(subprocess.check_output([sys.executable, "-c", baseline], text=True).split()[-1])
    weights, peak = map(int, subprocess.check_output([sys.executable, "-c", code], text=True).split()[-2:])
    served = int(subprocess.check_output([sys.executable, "-c", serving], text=True).split()[-1])
    return {"weights_bytes": weights, "peak_rss_bytes": peak, "import_rss_bytes": base,
            "peak_over_weights": peak / weights, "peak_minus_import_over_weights": (peak - base) / weights,
            "serving_peak_rss_bytes": served, "serving_peak_over_weights": served / weights}


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def stamps_hf(model, ids: list[list[int]], new_tokens: int) -> list[float]:
    """Wall-clock time at each generated token of one `generate` call, from its start."""
    from transformers import LogitsProcessor, LogitsProcessorList

    times: list[float] = []

    class Stamp(LogitsProcessor):  # called once per step, after that step's forward pass
        def __call__(self, input_ids, scores):
            times.append(time.perf_counter())
            return scores

    input_ids = torch.tensor(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Stamp()]))
    return [t - start for t in times]


def stamps_ours(llm, ids: list[list[int]], new_tokens: int) -> list[float]:
    """Wall-clock time at each engine step that completed a token for every request, from the start."""
    from expertmesh import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(ids):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params)
    produced = dict.fromkeys(range(len(ids)), 0)
    times: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[int(out.request_id.split("-")[1])] = len(out.outputs[0].token_ids)
        if min(produced.values()) > len(times):
            times.append(time.perf_counter() - start)
    return times


def measure(name: str, stamps, model, cases) -> dict:
    """Prefill = time to every request's first token; decode step = mean time per later token (best of 2)."""
    out = {}
    for batch, length, n in cases:
        ids = prompts(batch, length, 32000)
        stamps(model, ids, 2)  # warm-up
        runs = [stamps(model, ids, n) for _ in range(2)]
        prefill = min(r[0] for r in runs)
        step = min((r[-1] - r[0]) / (len(r) - 1) for r in runs)
        out[f"b{batch}"] = {"prompt_len": length, "prefill_s": prefill, "prefill_tok_s": batch * length / prefill,
                            "decode_step_s": step, "decode_tok_s": batch / step}
        print(f"  {name} batch {batch}: prefill {batch * length / prefill:8.1f} tok/s, decode step "
              f"{step * 1e3:7.1f} ms = {batch / step:7.1f} tok/s", flush=True)
    return out


def active_bytes(cfg: dict, batch: int, context: int) -> tuple[float, float]:
    """(bytes a decode step must read: active weights plus the latent cache, FLOPs per token) for the
    DeepSeek-V3-shaped preset in float32."""
    h, v, e, k = cfg["hidden_size"], cfg["vocab_size"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    heads, qr, kvr = cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    attn = h * qr + qr * heads * (nope + rope) + h * (kvr + rope) + kvr * heads * (nope + vd) + heads * vd * h
    expert = 3 * h * cfg["moe_intermediate_size"]
    layers, dense = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    moe_layers = layers - dense
    unique = e * (1 - (1 - k / e) ** batch)  # experts hit per layer under uniform routing
    params_read = (layers * attn + dense * 3 * h * cfg["intermediate_size"]
                   + moe_layers * (cfg["n_shared_experts"] * expert + e * h + unique * expert) + v * h)
    flops_per_token = 2 * (layers * attn + dense * 3 * h * cfg["intermediate_size"]
                           + moe_layers * ((cfg["n_shared_experts"] + k) * expert + e * h) + v * h)
    latent_cache = layers * batch * context * (kvr + rope)
    return (params_read + latent_cache) * 4, flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter prompts, fewer tokens (smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cases = [(1, 32, 17), (32, 256, 9)] if not args.quick else [(1, 16, 5), (32, 64, 3)]

    info = {"machine": machine()}
    print("machine:", json.dumps(info["machine"]), flush=True)
    path = ensure_checkpoint("small")
    info["memory"] = load_peak_rss(path)
    mem = info["memory"]
    print(f"load: peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB for {mem['weights_bytes'] / 2**30:.2f} GiB of "
          f"weights = {mem['peak_over_weights']:.2f}x "
          f"(python + torch alone: {mem['import_rss_bytes'] / 2**30:.2f} GiB); "
          f"load + first generation: {mem['serving_peak_rss_bytes'] / 2**30:.2f} GiB = "
          f"{mem['serving_peak_over_weights']:.2f}x", flush=True)
    info["floors"] = floors()
    print(f"floors: matmul {info['floors']['matmul_gflops']:.0f} GFLOP/s, read {info['floors']['read_gbs']:.1f} GB/s",
          flush=True)

    from transformers import AutoModelForCausalLM

    from expertmesh import LLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    info["transformers"] = measure("transformers", stamps_hf, hf, cases)
    del hf
    # A token budget that holds the whole batch's prompts, so that (as with transformers' padded batch) every
    # decode step is a pure decode step: decode is measured apart from prefill.
    budget = max(b * p for b, p, _ in cases)
    llm = LLM(str(path), dtype="float32", max_num_seqs=64, max_num_batched_tokens=budget, kv_cache_gib=1.0)
    info["expertmesh"] = measure("expertmesh  ", stamps_ours, llm, cases)

    cfg = json.loads((path / "config.json").read_text())
    print("\n| batch | metric | transformers | expertmesh | ratio | floor | expertmesh / floor |")
    print("|---|---|---|---|---|---|---|")
    for batch, length, _ in cases:
        key = f"b{batch}"
        hf_r, ours = info["transformers"][key], info["expertmesh"][key]
        read_bytes, flops = active_bytes(cfg, batch, length)
        decode_floor = max(read_bytes / (info["floors"]["read_gbs"] * 1e9),
                           batch * flops / (info["floors"]["matmul_gflops"] * 1e9))
        prefill_floor = batch * length * flops / (info["floors"]["matmul_gflops"] * 1e9)
        rows = [
            ("prefill tok/s", hf_r["prefill_tok_s"], ours["prefill_tok_s"], batch * length / prefill_floor),
            ("decode tok/s", hf_r["decode_tok_s"], ours["decode_tok_s"], batch / decode_floor),
        ]
        for metric, a, b, floor in rows:
            print(f"| {batch} (prompt {length}) | {metric} | {a:.1f} | {b:.1f} | **{b / a:.2f}x** | {floor:.1f} | "
                  f"{b / floor:.2f} |")
        info.setdefault("ratios", {})[key] = {"prefill": ours["prefill_tok_s"] / hf_r["prefill_tok_s"],
                                               "decode": ours["decode_tok_s"] / hf_r["decode_tok_s"]}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    sys.exit(main())
