"""expertmesh against llama.cpp on the CPU, `small` preset, same checkpoint, same machine, one run.

llama.cpp is built here from the source distribution of `llama-cpp-python` on PyPI (its `vendor/llama.cpp`),
with cmake and this machine's compiler (`GGML_NATIVE`), cached under `$EXPERTMESH_CACHE/llamacpp` (default
`~/.cache/expertmesh/llamacpp`): the build is for this benchmark only, never a dependency of the package. The
checkpoint is written as GGUF by llama.cpp's own converter (`convert_hf_to_gguf.py`, with its `gguf-py`), in
f32, bf16 and Q8_0; llama.cpp loads it as `deepseek2` (MLA, 64 experts top-6).

Both engines decode the same shapes, `llama-batched-bench` for llama.cpp (prompt not shared): batch 1 with a
prompt of 32 and 64 new tokens, batch 32 with prompts of 256 and 32 new tokens, 2 threads. Decode tokens/s:
llama.cpp's S_TG (batch x new tokens / the generation's time); ours, batch / decode step time, the step
being (last token's time - first's) / (N - 1) inside one generation. Rounds interleave the engines; the
figure is the median over rounds. Pairs: f32 - float32, bf16 - bfloat16, bf16 - bfloat16 weights under
`activation_dtype="float32"` (float32 activations, each matmul reading its input rounded to bf16, as llama.cpp
runs its bf16 GGUF), Q8_0 - `quantization="int8"` (int8 weights with a scale per row in every linear layer but
the gates and MLA's kv_b_proj, float32 activations) and Q8_0 - `quantization="w8a8"` (the same weights,
activations quantised in blocks of 32), each also of the bf16 model under float32 activations. llama.cpp's Q8_0
quantises every weight matrix in blocks of 32, and its activations too.

    python bench/engine_vs_llamacpp.py [--rounds 3] [--json bench/engine_vs_llamacpp_results.json]
    make bench-llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

from actor_graph import ensure_checkpoint, prompts, stamps  # bench/ is on sys.path when run as a script
from machine_info import machine

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh")) / "llamacpp"
PACKAGE = "llama-cpp-python"
TOOLS = ("llama-batched-bench",)
CASES = ((1, 32, 64), (32, 256, 32))  # (batch, prompt, new tokens)
# pair -> (llama.cpp's GGUF type, our LLM settings)
_BF16_F32 = {"dtype": "bfloat16", "activation_dtype": "float32"}  # bf16 weights, float32 activations
PAIRS = {"f32": ("f32", {"dtype": "float32"}), "bf16": ("bf16", {"dtype": "bfloat16"}),
         "bf16-f32act": ("bf16", _BF16_F32),
         "q8_0": ("q8_0", {"quantization": "int8"}), "q8_0-w8a8": ("q8_0", {"quantization": "w8a8"}),
         # the same quantisations of the bf16 model under float32 activations: what quant_accuracy.py scores
         # against that bf16 ("int8_on_bf16_f32act")
         "q8_0-bf16": ("q8_0", {**_BF16_F32, "quantization": "int8"}),
         "q8_0-w8a8-bf16": ("q8_0", {**_BF16_F32, "quantization": "w8a8"})}
# llama.cpp 0.3.36's CPU weight repacking of Q8_0 aborts on this model's first step
# (`GGML_ASSERT(*cur_backend_id != -1)` in ggml-backend.cpp), with the converter's Q8_0 and with
# llama-quantize's alike; without repacking it runs.
LLAMA_ARGS = {"q8_0": ["--no-repack"]}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def llama_source() -> Path:
    """vendor/llama.cpp of the newest llama-cpp-python source distribution, downloaded once."""
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-binary", ":all:", "--no-deps", "-d", str(CACHE)])
    archive = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    return sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def llama_build(source: Path, tools: tuple[str, ...] = TOOLS) -> Path:
    """The built tools' directory (cmake, Release, native CPU flags, no network code)."""
    build = source / "build-bench"
    if all((build / "bin" / t).is_file() for t in tools):
        return build / "bin"
    run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *tools])
    return build / "bin"


# llama.cpp's converter names the tokenizer's pre-tokenizer by hashing what it makes of a test text, and knows
# only published tokenizers'. Ours is none of them, and the benchmark feeds token ids, never text: the GGUF
# says "default".
_CONVERT = """
import runpy, sys
sys.path[:0] = [{source!r}, {gguf_py!r}]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def gguf(source: Path, checkpoint: Path, outtype: str) -> Path:
    out = CACHE / f"{checkpoint.name}-{outtype}.gguf"
    if not out.is_file():
        code = _CONVERT.format(source=str(source), gguf_py=str(source / "gguf-py"),
                               script=str(source / "convert_hf_to_gguf.py"),
                               args=[str(checkpoint), "--outtype", outtype, "--outfile", str(out)])
        run([sys.executable, "-c", code])
    return out


def llama_decode(tools: Path, model: Path, batch: int, prompt: int, new: int, threads: int,
                 extra: list[str]) -> dict:
    """llama-batched-bench's figures for one (prompt, new tokens, batch)."""
    ctx = batch * (prompt + new) + 16
    out = run([str(tools / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", str(prompt), "-ntg", str(new), "-npl", str(batch), "-t", str(threads), "-tb", str(threads),
               "--output-format", "jsonl", *extra], capture_output=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    row = next(r for r in rows if r.get("pl") == batch and r.get("pp") == prompt and r.get("tg") == new)
    return {"decode_tok_s": row["speed_tg"], "prefill_tok_s": row["speed_pp"]}


def ours_decode(llm, batch: int, prompt: int, new: int, vocab: int) -> dict:
    ids = prompts(batch, prompt, vocab)
    times, _ = stamps(llm, ids, new)
    step = (times[-1] - times[0]) / (len(times) - 1)
    return {"decode_tok_s": batch / step, "prefill_tok_s": batch * prompt / times[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "engine_vs_llamacpp_results.json")
    args = parser.parse_args()
    if shutil.which("cmake") is None:
        print("cmake is needed to build llama.cpp (pip install cmake)", file=sys.stderr)
        return 2

    from expertmesh import LLM

    checkpoint = ensure_checkpoint("small")
    source = llama_source()
    tools = llama_build(source)
    info = {"machine": machine(), "llama_cpp_source": source.parents[1].name, "threads": args.threads,
            "rounds": args.rounds, "results": {}}
    print(json.dumps(info["machine"]), flush=True)
    for pair in args.pairs:
        outtype, settings = PAIRS[pair]
        model = gguf(source, checkpoint, outtype)
        llm = LLM(str(checkpoint), **settings)
        vocab = llm.llm_engine.model_config.vocab_size
        for batch, prompt, new in CASES:
            stamps(llm, prompts(batch, prompt, vocab), 2)  # warm-up
            theirs, ours = [], []
            for _ in range(args.rounds):
                theirs.append(llama_decode(tools, model, batch, prompt, new, args.threads, LLAMA_ARGS.get(outtype, [])))
                ours.append(ours_decode(llm, batch, prompt, new, vocab))
            med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
            row = {"llama_cpp": {k: med(theirs, k) for k in theirs[0]},
                   "expertmesh": {k: med(ours, k) for k in ours[0]},
                   "rounds": {"llama_cpp": theirs, "expertmesh": ours}}
            row["decode_ratio"] = row["expertmesh"]["decode_tok_s"] / row["llama_cpp"]["decode_tok_s"]
            row["prefill_ratio"] = row["expertmesh"]["prefill_tok_s"] / row["llama_cpp"]["prefill_tok_s"]
            info["results"][f"{pair}/b{batch}"] = row
            print(f"{pair:9s} batch {batch:2d} (prompt {prompt}, {new} new): decode llama.cpp "
                  f"{row['llama_cpp']['decode_tok_s']:7.1f} tok/s, expertmesh {row['expertmesh']['decode_tok_s']:7.1f}"
                  f" -> {row['decode_ratio']:.2f}x; prefill {row['llama_cpp']['prefill_tok_s']:.0f} against "
                  f"{row['expertmesh']['prefill_tok_s']:.0f} tok/s -> {row['prefill_ratio']:.2f}x", flush=True)
        llm.shutdown()
        del llm
    if set(args.pairs) != set(PAIRS) and args.json.is_file():  # a partial run updates the pairs it measured
        kept = json.loads(args.json.read_text())
        info = {**kept, "results": {**kept.get("results", {}), **info["results"]},
                "runs": [*kept.get("runs", []), {k: v for k, v in info.items() if k != "results"}]}
    args.json.write_text(json.dumps(info, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
