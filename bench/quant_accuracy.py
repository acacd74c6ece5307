"""How far quantisation moves next-token predictions, ours next to llama.cpp's, the way llama.cpp measures it.

llama.cpp: `llama-perplexity --kl-divergence-base` over the f32 GGUF of the checkpoint stores its logits for a
text, then `--kl-divergence` runs the bf16 and Q8_0 GGUFs over the same text and prints the mean KL divergence
from f32 and how often the top token agrees ("Same top p"); and the Q8_0 GGUF again against the bf16 GGUF's
stored logits. It scores the second half of each context of `--ctx` tokens. Ours: the same text through our
tokenizer, cut into the same contexts, the same half scored, `quantization="int8"`, `"w8a8"`,
`"experts_int8"`, `dtype="bfloat16"` and bf16 weights under float32 activations (`bfloat16_f32act`,
`activation_dtype="float32"`, as llama.cpp runs its bf16 GGUF) against our float32, `int8` and `w8a8` against our
bfloat16 (both kinds), and the bf16 models with their weights quantised (`int8_on_bf16`, `w8a8_on_bf16`,
`..._on_bf16_f32act`) against the bf16 model they were made from, so that only the weights differ
(`expertmesh.testing.agreement`). Each engine is measured against its own float32 (or bf16), so the figures
compare how much each quantisation costs, not the engines' outputs. The text is this repository's README.

The checkpoint (`--checkpoint`): `trained` (default), the `small` preset trained briefly as a language model
on text other than the README (`bench/trained_checkpoint.py`, trained on first use, ~20 minutes), or `random`,
the `small` preset's random weights, whose nearly flat next-token distributions let even bf16 flip many top-1
choices. The GGUFs are cached per checkpoint directory name (`small-*.gguf`, `small-trained-<steps>-*.gguf`).

    python bench/quant_accuracy.py [--checkpoint trained|random] [--ctx 128] [--json bench/quant_accuracy_results.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from actor_graph import ensure_checkpoint  # bench/ is on sys.path when run as a script
from engine_vs_llamacpp import LLAMA_ARGS, gguf, llama_build, llama_source, run
from machine_info import machine
from trained_checkpoint import ensure_trained_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "README.md"


def llama_kl(tools: Path, base: Path, model: Path, text: Path, ctx: int, logits: Path, threads: int,
             extra: list[str]) -> dict:
    """`llama-perplexity --kl-divergence` of `model` against `base`'s stored logits over `text`."""
    common = ["-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t", str(threads), "--kl-divergence-base",
              str(logits)]
    if not logits.is_file():
        run([str(tools / "llama-perplexity"), "-m", str(base), *common], capture_output=True)
    out = run([str(tools / "llama-perplexity"), "-m", str(model), *common, "--kl-divergence", *extra],
              capture_output=True)
    text_out = out.stdout + out.stderr
    mean_kl = re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", text_out)
    same_top = re.search(r"Same top p:\s+([0-9.]+)", text_out)
    if mean_kl is None or same_top is None:
        raise RuntimeError(f"llama-perplexity printed no KL statistics:\n{text_out[-3000:]}")
    return {"mean_kl": float(mean_kl.group(1)), "top1_agreement": float(same_top.group(1)) / 100}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", choices=("trained", "random"), default="trained")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "quant_accuracy_results.json")
    args = parser.parse_args()

    import torch

    from expertmesh.engine.tokenizer import Tokenizer
    from expertmesh.model import load_model
    from expertmesh.model.quantize import quantize_model
    from expertmesh.testing.agreement import next_token_agreement

    checkpoint = ensure_trained_checkpoint() if args.checkpoint == "trained" else ensure_checkpoint("small")
    training = checkpoint / "training.json"
    source = llama_source()
    tools = llama_build(source, ("llama-perplexity",))
    info = {"machine": machine(), "checkpoint": checkpoint.name, "text": TEXT.name, "ctx": args.ctx,
            "training": json.loads(training.read_text()) if training.is_file() else None,
            "llama_cpp": {}, "expertmesh": {}}
    print(json.dumps(info["machine"]), f"checkpoint {checkpoint.name}", flush=True)
    digest = hashlib.sha256(TEXT.read_bytes()).hexdigest()[:12]  # the stored logits are of this very text
    ggufs = {outtype: gguf(source, checkpoint, outtype) for outtype in ("f32", "bf16", "q8_0")}
    for base_type, outtype in (("f32", "bf16"), ("f32", "q8_0"), ("bf16", "q8_0")):
        base = ggufs[base_type]
        logits = base.with_suffix(f".{TEXT.stem}-{digest}.ctx{args.ctx}.kld")  # per base GGUF, text and ctx
        key = outtype if base_type == "f32" else f"{outtype}_vs_{base_type}"
        info["llama_cpp"][key] = llama_kl(tools, base, ggufs[outtype], TEXT, args.ctx, logits, args.threads,
                                          LLAMA_ARGS.get(outtype, []))
        print(f"llama.cpp {outtype} against {base_type}: {info['llama_cpp'][key]}", flush=True)

    ids = Tokenizer.from_pretrained(checkpoint).encode(TEXT.read_text(), add_special_tokens=False)
    sequences = [ids[i : i + args.ctx] for i in range(0, len(ids) - args.ctx + 1, args.ctx)]
    # "bfloat16_f32act": bf16 weights under float32 activations (activation_dtype), as llama.cpp runs bf16
    loads = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
             "bfloat16_f32act": (torch.bfloat16, torch.float32)}
    references = {name: load_model(checkpoint, dtype, activation_dtype=act) for name, (dtype, act) in loads.items()}
    # (what runs, the model it is made from, the references it is judged against): "int8_on_bf16" is the bf16
    # model with its weights quantised, so that against our bf16 only the weights differ
    every_base = ("float32", "bfloat16", "bfloat16_f32act")
    cases = [("experts_int8", "float32", ("float32",)), ("int8", "float32", every_base),
             ("w8a8", "float32", every_base), ("int8_on_bf16", "bfloat16", ("bfloat16",)),
             ("w8a8_on_bf16", "bfloat16", ("bfloat16",)),
             ("int8_on_bf16_f32act", "bfloat16_f32act", ("bfloat16_f32act",)),
             ("w8a8_on_bf16_f32act", "bfloat16_f32act", ("bfloat16_f32act",)),
             ("bfloat16", "bfloat16", ("float32",)), ("bfloat16_f32act", "bfloat16_f32act", ("float32",))]
    for name, source, bases in cases:
        if name in references:
            model = references[name]
        else:
            dtype, act = loads[source]
            model = load_model(checkpoint, dtype, activation_dtype=act)
            quantize_model(model, name.split("_on_")[0])
        for base in bases:
            a = next_token_agreement(references[base], model, sequences, skip=args.ctx // 2)
            key = name if base == "float32" else f"{name}_vs_{base}"
            info["expertmesh"][key] = {"positions": a.positions, "mean_kl": a.mean_kl, "top1_agreement": a.top1,
                                       "max_kl": a.max_kl}
            print(f"expertmesh {name} against {base}: {info['expertmesh'][key]}", flush=True)
    args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
