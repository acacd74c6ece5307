"""Load on `expertmesh serve` over HTTP: throughput, time to first token and inter-token latency at
concurrency 1, 8 and 32, and continuous batching's gain, c=32 output tokens/s over c=1 (bar: 8x on `small`).

By default the script starts the server itself (`python -m expertmesh serve` on a free port of 127.0.0.1,
with a private Ray and a generated API key), waits for GET /health, runs the load and stops the server with
SIGTERM (the process group is killed if it has not exited 60 s later). With `--url` it loads a server that
is already running instead (127.0.0.1 or localhost only; the key from --api-key or $EXPERTMESH_API_KEY).

Method. For each concurrency c: c workers send streaming completions back to back (`prompt` as a list of
--prompt-tokens random token ids, `max_tokens` --max-tokens with `ignore_eos`, `temperature` 0, and
`stream_options.include_usage` for the exact completion_tokens) until --duration-s is over or each has sent
--max-requests, whichever comes first; a request in flight at the deadline runs to its end. One warm-up round
of c short requests comes first and is not counted. Output tokens/s = completion tokens of successful
requests / (end of the level's last request - start of the level).

Latencies are timed per token: requests ask for `logprobs: 0`, which makes the server send one chunk for
every token (listing it), not only for tokens that add text. Without it (--no-logprobs, a plain client's
request) the server skips tokens that decode to no text, and on our random-weight presets most do (the
`small` tokenizer has 30k added tokens, skipped when decoding): 36 tokens a chunk at c=1 in one run, so
TTFT becomes "time to the first visible text". A chunk per token is also what a real model's stream costs
the server (JSON, the Serve proxy), which plain requests would mostly skip here. TTFT = request sent to
the first chunk with a token. ITL = gaps between successive chunks with tokens, pooled over the level's
requests. TPOT per request = (last such chunk - first) / (completion tokens - 1), p50/p99 over requests,
as in vLLM's benchmark_serving.
From /metrics, scraped before and after each level: engine steps and generated tokens, so the mean batch
(tokens/step) and the mean step time (level wall / steps). When the script started the server, it also
records the CPU each of the server's processes used over the level (replica, Serve proxy, Ray's daemons)
and its own, in cores: on a small machine the load generator and the proxy take cores from the engine.

For scale, before the server starts, the offline engine (`expertmesh.LLM`, same checkpoint, engine
settings and dtype) generates the same shapes in this process: batch c, c*max_tokens tokens / wall time of
one `generate` (prefill included, as the server's figure includes its prefills), best of 2 after a warm-up.
Skip it with --no-offline.

    python bench/serve_load.py [--quick] [--preset small | --model DIR | --url http://127.0.0.1:8000]
        [--deployment deploy.yaml] [--max-num-seqs N] [--concurrency 1,8,32] [--duration-s 45]
        [--max-tokens 64] [--prompt-tokens 32] [--json bench/serve_load_results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from machine_info import (
    machine as base_machine,  # bench/ is on sys.path when run as a script
)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
BAR_RATIO = 8.0  # output tokens/s at concurrency 32 over concurrency 1, `small` preset
STOP_DEADLINE_S = 60
OFFLINE_REPEATS = 2  # timed generations per batch, best kept
LOCAL_HOSTS = ("127.0.0.1", "localhost")
ENV_RECORDED = ("RAY_worker_niceness", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # the server inherits them
# (piece of a command line, what the process is) for the server's CPU use by process
CPU_LABELS = (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("ServeController", "controller"),
              ("expertmesh serve", "driver"), ("raylet", "raylet"), ("gcs_server", "gcs"))


def machine() -> dict:
    import aiohttp
    import ray

    return base_machine(ray=ray.__version__, aiohttp=aiohttp.__version__) | {"loadavg_at_start": list(os.getloadavg())}


def ensure_checkpoint(preset: str) -> Path:
    out = CACHE / preset
    if not (out / "config.json").is_file():
        from expertmesh.testing import write_random_checkpoint

        print(f"writing the {preset} preset to {out} (once) ...", flush=True)
        write_random_checkpoint(preset, out, seed=0)
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# -- the server ---------------------------------------------------------------------------------------
class Server:
    """`python -m expertmesh serve` as a child process in its own session, stopped on exit."""

    def __init__(self, model: Path, args, workdir: Path):
        with socket.socket() as s:  # a free port; the server binds it a moment later
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "em-bench-" + secrets.token_urlsafe(16)
        key_file = workdir / "api_key"
        key_file.write_text(self.key + "\n")
        self.cmd = [sys.executable, "-m", "expertmesh", "serve", "--model", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--api-key-file", str(key_file), "--dtype", args.dtype]
        if args.deployment:
            self.cmd += ["--deployment", str(args.deployment)]
        if args.max_num_seqs:
            self.cmd += ["--max-num-seqs", str(args.max_num_seqs)]
        if args.device != "cpu":
            self.cmd += ["--device", args.device]
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EXPERTMESH_API_KEY")}  # private Ray
        print("starting:", " ".join(self.cmd), flush=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.tail()}")

    def processes(self) -> list[tuple[str, float, int]]:
        """(what it is, CPU seconds so far, niceness) of the server's processes: itself, Ray's daemons and
        workers, the Serve actors."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        out = []
        for proc in procs:
            try:
                cmd, t, nice = " ".join(proc.cmdline()), proc.cpu_times(), proc.nice()
            except psutil.Error:  # exited meanwhile
                continue
            out.append((next((name for key, name in CPU_LABELS if key in cmd), "ray_misc"), t.user + t.system, nice))
        return out

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, seconds, _ in self.processes():
            out[label] = out.get(label, 0.0) + seconds
        return out

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_DEADLINE_S)
            print(f"server stopped (exit code {self.proc.returncode})", flush=True)
        except subprocess.TimeoutExpired:
            print(f"!!! the server did not exit {STOP_DEADLINE_S} s after SIGTERM: killing its process group",
                  flush=True)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def wait_ready(session, url: str, deadline_s: float, server: Server | None) -> float:
    import aiohttp

    start = time.perf_counter()
    while time.perf_counter() - start < deadline_s:
        if server is not None:
            server.check_alive()
        try:
            async with session.get(f"{url}/health") as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except aiohttp.ClientError:  # not listening yet
            pass
        await asyncio.sleep(1.0)
    raise TimeoutError(f"{url}/health did not answer 200 within {deadline_s:.0f} s"
                       + (f"; server log:\n{server.tail()}" if server else ""))


async def scrape(session, url: str, headers: dict) -> dict[str, float]:
    """The unlabelled series of /metrics (engine steps, generated tokens, running, ...)."""
    async with session.get(f"{url}/metrics", headers=headers) as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# -- the load -----------------------------------------------------------------------------------------
async def one_request(session, url: str, headers: dict, payload: dict, timeout_s: float) -> dict:
    """One streaming completion: its TTFT, the gaps between chunks with tokens, its tokens, or its error."""
    import aiohttp

    sent = time.perf_counter()
    r = {"start": sent, "end": None, "ttft_s": None, "itl_s": [], "chunks": 0, "tokens": 0, "error": None}
    last = None
    done = False
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                r["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for raw in resp.content:  # one SSE line at a time
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    r["error"] = f"stream error: {json.dumps(event['error'])[:200]}"
                    return r
                if event.get("usage"):
                    r["tokens"] = event["usage"]["completion_tokens"]
                if any(_carries_token(c) for c in event.get("choices", [])):
                    if last is None:
                        r["ttft_s"] = now - sent
                    else:
                        r["itl_s"].append(now - last)
                    last = now
                    r["chunks"] += 1
        if not done:
            r["error"] = "the stream ended without data: [DONE]"
    except TimeoutError:  # aiohttp's total timeout
        r["error"] = f"timed out after {timeout_s:.0f} s"
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: a chunk that is not JSON
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        r["end"] = time.perf_counter()
    return r


def _carries_token(choice: dict) -> bool:
    """With logprobs, a chunk lists its tokens; without, only its text shows that one came."""
    lp = choice.get("logprobs")
    return bool(lp["tokens"]) if lp else bool(choice.get("text"))


def payload(model: str, ids: list[int], max_tokens: int, logprobs: bool) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if logprobs:  # logprobs 0: the sampled token's only, but it makes the server send a chunk for every token
        body["logprobs"] = 0
    return body


async def run_level(session, url: str, headers: dict, model: str, c: int, args, vocab: int,
                    server: Server | None) -> dict:
    rng = random.Random(1000 + c)

    def prompt() -> list[int]:  # ids 4..vocab-1: past bos/eos and the other specials of our presets
        return [rng.randrange(4, vocab) for _ in range(args.prompt_tokens)]

    def request(max_tokens: int):
        return one_request(session, url, headers, payload(model, prompt(), max_tokens, args.logprobs), args.timeout_s)

    warm = await asyncio.gather(*(request(4) for _ in range(c)))
    before = await scrape(session, url, headers)
    cpu_before = cpu_snapshot(server)
    start = time.perf_counter()
    deadline = start + args.duration_s
    results: list[dict] = []

    async def worker():
        for _ in range(args.max_requests):
            if time.perf_counter() >= deadline:
                return
            results.append(await request(args.max_tokens))

    await asyncio.gather(*(worker() for _ in range(c)))
    wall = max((r["end"] for r in results), default=start) - start
    cpu_after = cpu_snapshot(server)
    after = await scrape(session, url, headers)
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    steps = after.get("expertmesh_engine_steps", 0) - before.get("expertmesh_engine_steps", 0)
    gen = (after.get("expertmesh_generation_tokens_total", 0)
           - before.get("expertmesh_generation_tokens_total", 0))
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [x for r in ok for x in r["itl_s"]]
    # per request: (last chunk with a token - first) / (tokens - 1), per token whatever the chunking
    tpot = [sum(r["itl_s"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and r["itl_s"]]
    chunks = sum(r["chunks"] for r in ok)
    errors = [r["error"] for r in results if r["error"] is not None]
    return {
        "concurrency": c, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5], "warmup_errors": sum(r["error"] is not None for r in warm),
        "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "tokens_not_max_tokens": sum(r["tokens"] != args.max_tokens for r in ok),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "ttft_max_s": max(ttft, default=None),
        "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99), "itl_count": len(itl),
        "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99),
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "engine_steps": steps, "engine_generated_tokens": gen,
        "mean_tokens_per_step": gen / steps if steps else None, "mean_step_s": wall / steps if steps else None,
        # cores' worth of CPU each process used over the level (the client is this script)
        "cpu_cores": cpu_cores(cpu_before, cpu_after, wall) if wall > 0 else {},
        "loadavg_at_end": list(os.getloadavg()),
    }


def cpu_snapshot(server: Server | None) -> dict[str, float]:
    """CPU seconds so far: the server's processes by kind, this script ("client") and the whole machine."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return (server.cpu_seconds() if server else {}) | {"client": time.process_time(), "machine": busy}


def cpu_cores(before: dict, after: dict, wall: float) -> dict[str, float]:
    """Cores' worth of CPU each used over `wall` seconds; "elsewhere": the rest of the machine (other people's
    work on a shared box; with --url, the server too)."""
    cores = {k: (after[k] - before.get(k, 0.0)) / wall for k in after}
    cores["elsewhere"] = max(0.0, cores.pop("machine") - sum(cores.values()))
    return cores


# -- the offline engine, for scale --------------------------------------------------------------------
def offline(path: Path, levels: list[int], args, vocab: int) -> dict:
    import gc

    from expertmesh import LLM, SamplingParams

    kwargs = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    if args.device != "cpu":
        kwargs["device"] = args.device
    rng = random.Random(7)
    out = {}
    executor = None
    if args.deployment:
        from expertmesh.graph import ActorGraph

        executor = ActorGraph(args.deployment)
    with LLM(str(path), dtype=args.dtype, executor=executor, **kwargs) as llm:
        for b in levels:
            prompts = [{"prompt_token_ids": [rng.randrange(4, vocab) for _ in range(args.prompt_tokens)]}
                       for _ in range(b)]
            llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
            walls, elsewhere = [], []
            for _ in range(OFFLINE_REPEATS):
                before, start = cpu_snapshot(None), time.perf_counter()
                outs = llm.generate(prompts, params)
                walls.append(time.perf_counter() - start)
                elsewhere.append(cpu_cores(before, cpu_snapshot(None), walls[-1])["elsewhere"])
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            wall = min(walls)
            out[b] = {"batch": b, "tokens": tokens, "wall_s": wall, "wall_s_runs": walls, "output_tok_s": tokens / wall,
                      "elsewhere_cores_runs": elsewhere}
            print(f"  offline batch {b:2d}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s (best of "
                  f"{OFFLINE_REPEATS}: {', '.join(f'{w:.2f}' for w in walls)} s; other work on the machine: "
                  f"{', '.join(f'{o:.2f}' for o in elsewhere)} cores)", flush=True)
    gc.collect()
    return out


# -- the report ---------------------------------------------------------------------------------------
def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def report(info: dict) -> None:
    levels, off = info["levels"], info.get("offline", {})
    print("\n| concurrency | requests (errors) | output tok/s | offline tok/s | server/offline | TTFT p50 / p99 ms "
          "| ITL p50 / p99 ms | TPOT p50 / p99 ms | tokens/step | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        o = off.get(lv["concurrency"])
        offline_cols = f"{o['output_tok_s']:.1f} | {lv['output_tok_s'] / o['output_tok_s']:.2f}x" if o else "- | -"
        tps = f"{lv['mean_tokens_per_step']:.1f}" if lv["mean_tokens_per_step"] else "-"
        print(f"| {lv['concurrency']} | {lv['requests']} ({lv['errors']}) | {lv['output_tok_s']:.1f} | "
              f"{offline_cols} | {ms(lv['ttft_p50_s'])} / {ms(lv['ttft_p99_s'])} | {ms(lv['itl_p50_s'])} / "
              f"{ms(lv['itl_p99_s'])} | {ms(lv['tpot_p50_s'])} / {ms(lv['tpot_p99_s'])} | {tps} | "
              f"{ms(lv['mean_step_s'])} |")
    for lv in levels:
        if lv["errors"] or lv["warmup_errors"] or lv["tokens_not_max_tokens"]:
            print(f"!!! concurrency {lv['concurrency']}: {lv['errors']} errors, {lv['warmup_errors']} in warm-up, "
                  f"{lv['tokens_not_max_tokens']} requests with other than max_tokens tokens: {lv['error_samples']}")
    v = info.get("verdict")
    if v:
        note = "" if info["bar_applies"] else " (the bar is for the `small` preset: not judged on this run)"
        print(f"continuous batching: output tok/s at c={v['high']} / c={v['low']} = **{v['ratio']:.2f}x** "
              f"({'PASS' if v['pass'] else 'FAIL'}, bar >= {BAR_RATIO:.0f}x){note}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the --preset, cached in .bench-cache)")
    p.add_argument("--preset", default=None, help="small (default) or tiny (default with --quick); written if missing")
    p.add_argument("--url", help="load this running server (http://127.0.0.1:PORT) instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="key for --url")
    p.add_argument("--deployment", type=Path, help="actor graph YAML, passed to the server (default: local mode)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="passed to the server (its default: 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the engine's device, server and offline")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration-s", type=float, default=None, help="per level (default 45, --quick 6)")
    p.add_argument("--max-requests", type=int, default=None, help="per worker and level (default 1000, --quick 20)")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 64, --quick 16)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="per request (default 32, --quick 16)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--no-offline", action="store_true", help="skip the offline engine's figures")
    p.add_argument("--no-logprobs", dest="logprobs", action="store_false",
                   help="plain requests: time chunks by their text (see the docstring)")
    p.add_argument("--quick", action="store_true", help="small numbers and the tiny preset (smoke run)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "serve_load_results.json")
    args = p.parse_args()
    q = args.quick
    args.duration_s = args.duration_s or (6.0 if q else 45.0)
    args.max_requests = args.max_requests or (20 if q else 1000)
    args.max_tokens = args.max_tokens or (16 if q else 64)
    args.prompt_tokens = args.prompt_tokens or (16 if q else 32)
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    if not levels or levels[0] < 1:
        p.error(f"--concurrency must be positive integers, got {args.concurrency!r}")
    if args.url and urlparse(args.url).hostname not in LOCAL_HOSTS:
        p.error(f"--url must point at 127.0.0.1 or localhost, got {args.url!r}")

    path = args.model or (None if args.url else ensure_checkpoint(args.preset or ("tiny" if q else "small")))
    # with --url and no --model: the server's checkpoint if /v1/models names one on this machine, else ids < 256
    vocab = json.loads((path / "config.json").read_text())["vocab_size"] if path else 256
    info: dict = {"machine": machine(), "quick": q, "model": str(path) if path else None, "url": args.url,
                  "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                               if k not in ("api_key", "json")},
                  "bar_ratio": BAR_RATIO, "env": {k: v for k, v in os.environ.items() if k in ENV_RECORDED}}
    print("machine:", json.dumps(info["machine"]), flush=True)
    wall = time.perf_counter()
    if not args.no_offline and path is not None:
        print(f"offline engine ({path.name}, prompts of {args.prompt_tokens}, {args.max_tokens} new tokens)",
              flush=True)
        info["offline"] = offline(path, levels, args, vocab)
    info["levels"] = asyncio.run(serve_and_load(args, path, levels, vocab, info))
    info["loadavg_at_end"] = list(os.getloadavg())
    info["total_s"] = time.perf_counter() - wall
    by_c = {lv["concurrency"]: lv for lv in info["levels"]}
    lo, hi = levels[0], levels[-1]
    if hi > lo and by_c[lo]["output_tok_s"] > 0:
        ratio = by_c[hi]["output_tok_s"] / by_c[lo]["output_tok_s"]
        info["verdict"] = {"low": lo, "high": hi, "ratio": ratio, "pass": ratio >= BAR_RATIO}
    report(info)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2))
    print(f"(total {info['total_s']:.0f} s) wrote {args.json}")
    return 0 if all(lv["errors"] == 0 for lv in info["levels"]) else 1


async def serve_and_load(args, path: Path | None, levels: list[int], vocab: int, info: dict) -> list[dict]:
    import aiohttp

    # One connection per worker; the connector's default limit of 100 must not cap the concurrency.
    connector = aiohttp.TCPConnector(limit=max(levels) + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
            server = None if args.url else Server(path, args, Path(tmp))
            with server or contextlib.nullcontext():
                url = args.url.rstrip("/") if args.url else server.url
                key = args.api_key if args.url else server.key
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                info["startup_s"] = await wait_ready(session, url, args.startup_timeout_s, server)
                print(f"server ready at {url} ({info['startup_s']:.1f} s)", flush=True)
                async with session.get(f"{url}/v1/models", headers=headers) as r:
                    card = (await r.json())["data"][0]
                model = card["id"]
                if path is None and (Path(card.get("root", "")) / "config.json").is_file():  # --url: same machine
                    path = Path(card["root"])
                    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
                info["model"] = str(path) if path else model
                info["bar_applies"] = path is not None and path.name == "small" and not args.quick
                if server is not None:  # Ray starts its workers (the replica among them) at niceness 15
                    info["server_niceness"] = {label: nice for label, _, nice in server.processes()}
                    print("server processes' niceness:", json.dumps(info["server_niceness"]), flush=True)
                out = []
                for c in levels:
                    print(f"concurrency {c}: {args.duration_s:.0f} s ...", flush=True)
                    lv = await run_level(session, url, headers, model, c, args, vocab, server)
                    print(f"  {lv['requests']} requests ({lv['errors']} errors), {lv['output_tok_s']:.1f} tok/s, "
                          f"TTFT p50 {ms(lv['ttft_p50_s'])} ms, ITL p50 {ms(lv['itl_p50_s'])} ms, "
                          f"load avg {lv['loadavg_at_end'][0]:.2f}", flush=True)
                    print("  CPU cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(
                        lv["cpu_cores"].items(), key=lambda kv: -kv[1])), flush=True)
                    out.append(lv)
                if server is not None:
                    server.check_alive()
                return out


if __name__ == "__main__":
    sys.exit(main())
