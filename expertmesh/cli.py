"""The `expertmesh` command line: a thin shell that parses, validates and calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from expertmesh.engine.llm_engine import KV_CACHE_DTYPES
from expertmesh.model.quantize import QUANTIZATIONS
from expertmesh.platform.server.settings import DOWNSCALE_DELAY_S, UPSCALE_DELAY_S


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Serve and fine-tune MoE LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init-model", help="write a deterministic random-init checkpoint")
    init.add_argument("--preset", required=True, help="tiny | small")
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    gen = sub.add_parser("generate", help="generate text from a prompt with the in-process engine")
    gen.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout, safetensors)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("--deployment", default=None,
                     help="YAML deployment config: run on a Ray actor graph instead of in this process")

    ft = sub.add_parser("finetune", help="expert-aware LoRA fine-tuning on Ray Train (python -m expertmesh.jobs.finetune)")
    ft.add_argument("--config", required=True, help="the job's YAML config")

    srv = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (Ray Serve)")
    srv.add_argument("--model", default=None,
                     help="checkpoint directory; default: the built-in tiny model (written to models/tiny)")
    srv.add_argument("--deployment", default=None,
                     help="YAML deployment config: run on a Ray actor graph (default: the engine in the replica)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key-file", default=None,
                     help="file of API keys, one per line; also read from $EXPERTMESH_API_KEY")
    srv.add_argument("--no-api-key", action="store_true",
                     help="serve without keys when none is configured (default: generate one and print it)")
    srv.add_argument("--served-model-name", default=None, help="the model id clients send (default: dir name)")
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--device", default=None, choices=["cpu", "cuda"],
                     help="where the engine runs in local mode (default cpu); with --deployment, each actor of the "
                          "graph runs on the GPU Ray gives it")
    srv.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                     help="int8: every linear layer's weights as int8 with a scale per output row (as llama.cpp's "
                          "Q8_0); w8a8: the same, and on the CPU the activations too (blocks of 32); experts_int8: "
                          "the routed experts only. Quantised at load")
    srv.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                     help="auto (default): the KV cache in the model's dtype; bfloat16: a float32 model's cache at "
                          "half the bytes")
    srv.add_argument("--activation-dtype", default=None, choices=["auto", "float32"],
                     help="auto (default): activations in --dtype; float32 with --dtype bfloat16 or float16: "
                          "float32 activations, each matmul reading its input rounded to the weights' dtype, as "
                          "llama.cpp runs a bf16 model (closer to the float32 model, same weight bytes)")
    srv.add_argument("--max-num-seqs", type=int, default=None, help="requests decoded together at most")
    srv.add_argument("--num-threads", type=int, default=None,
                     help="the engine's torch threads (default: every core); count only cores nothing else keeps "
                          "busy: a decode step waits at each parallel region for its slowest thread")
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--kv-cache-gib", type=float, default=None)
    srv.add_argument("--enable-lora", action="store_true",
                     help="serve LoRA adapters named by a request's model (implied by --lora-modules/--lora-dirs)")
    srv.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                     help="peft adapter directories served from the start, as name=path or vLLM's JSON "
                          "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    srv.add_argument("--lora-dirs", nargs="+", default=None, metavar="DIR",
                     help="directories adapter paths must resolve into (symlinks followed); turns on "
                          "POST /v1/load_lora_adapter and /v1/unload_lora_adapter (one replica only)")
    srv.add_argument("--max-loras", type=int, default=None,
                     help="LoRA adapters resident per replica (default 16); more may be served, the least "
                          "recently used evicted and loaded again when named")
    srv.add_argument("--max-lora-rank", type=int, default=None, help="the highest adapter rank served (default 16)")
    srv.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond it get 429")
    srv.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens a request may ask")
    srv.add_argument("--max-request-work", type=int, default=1 << 20,
                     help="the most token entries one answer may hold: prompts x n x max_tokens x (1 + logprobs)")
    srv.add_argument("--replicas", type=int, default=None,
                     help="Serve replicas, each with its own engine or actor graph (default 1); not with "
                          "--min/--max-replicas")
    srv.add_argument("--min-replicas", type=int, default=None,
                     help="with --max-replicas: Serve autoscales between them (default 1; 0 is refused: a cold "
                          "start loads the whole checkpoint)")
    srv.add_argument("--max-replicas", type=int, default=None, help="the most replicas Serve autoscales to")
    srv.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling adds replicas while each holds more requests than this (default: the "
                          "engine's batch, --max-num-seqs)")
    srv.add_argument("--autoscaling-config", default=None, metavar="JSON",
                     help="more fields of Ray Serve's AutoscalingConfig, e.g. '{\"downscale_delay_s\": 300}' "
                          f"(defaults: upscale_delay_s {UPSCALE_DELAY_S:g}, downscale_delay_s {DOWNSCALE_DELAY_S:g})")
    srv.add_argument("--print-serve-config", action="store_true",
                     help="print a Serve config file for `serve deploy`/`serve run` with these settings and exit")
    srv.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    return parser


def _serve(args: argparse.Namespace) -> int:
    if args.model is None:
        from expertmesh.testing import write_random_checkpoint

        default = os.path.join("models", "tiny")
        if not os.path.exists(os.path.join(default, "config.json")):
            write_random_checkpoint("tiny", default, seed=0, dtype="float32")
        args.model = default
    # a Serve config for a cluster names the model where the cluster keeps it (a volume), not here
    if not args.print_serve_config:
        from expertmesh.model.checkpoint_check import check_checkpoint

        check_checkpoint(args.model)  # before Ray starts: a bad checkpoint is one line, as from `generate`
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.device is not None and args.deployment:
        raise ValueError("--device is for local mode: with --deployment each actor runs where Ray places it "
                         "(give attention_resources/shard_resources num_gpus)")
    if args.device == "cuda" and not args.print_serve_config:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device here")
    from expertmesh.platform.server.runner import run

    return run(args)


def _init_model(args: argparse.Namespace) -> int:
    from expertmesh.testing import write_random_checkpoint

    out = write_random_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from expertmesh import LLM, SamplingParams
    from expertmesh.model.checkpoint_check import check_checkpoint

    check_checkpoint(args.model)  # the same check, and so the same error, as `serve`

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    executor = None
    if args.deployment is not None:
        from expertmesh.graph import ActorGraph

        executor = ActorGraph(args.deployment)
    with LLM(model=args.model, dtype=args.dtype, executor=executor) as llm:
        start = time.perf_counter()
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outs = llm.generate(args.prompt, params)
        elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompt, outs):
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": completion.text, "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}))
        else:
            print(f"prompt: {prompt!r}\noutput: {completion.text!r}\n"
                  f"({len(completion.token_ids)} tokens, finish_reason={completion.finish_reason})")
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"generated {total} tokens in {elapsed:.2f}s", file=sys.stderr)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """The job's own entry point in a child process: jobs are what `ray job submit` runs, and nothing in the
    package imports them."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "expertmesh.jobs.finetune", "--config", args.config])


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handlers = {"init-model": _init_model, "generate": _generate, "serve": _serve, "finetune": _finetune}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing, unreadable or unwritable path
        print(f"expertmesh {args.command}: error: {e}", file=sys.stderr)
        if os.environ.get("EXPERTMESH_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
