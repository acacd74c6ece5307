"""Write a deterministic random-init checkpoint in the layout of the published DeepSeek-V3 release.

The directory holds `config.json`, safetensors weights with per-expert names (one file, or shards
with `model.safetensors.index.json`), a byte-level BPE `tokenizer.json` trained here on a built-in
corpus, `tokenizer_config.json` with a DeepSeek-V3-style chat template and `generation_config.json`.
transformers' `AutoModelForCausalLM`/`AutoTokenizer` load it as they load the real release.

Each tensor is drawn from its own generator, seeded from (seed, tensor name): values do not depend
on sharding or write order, and any tensor can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from expertmesh.testing.presets import preset_config

__all__ = ["TensorSpec", "checkpoint_tensor_specs", "write_random_checkpoint"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A checkpoint larger than one shard is split; a shard is the most the writer holds in memory.
_MAX_SHARD_BYTES = 200 * 10**6

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Trained first, so they get ids 0..3: BOS 0 and EOS 1 as in presets.preset_config.
_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)

# DeepSeek-V3 style: BOS, the system prompts, then <｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜> turns.
CHAT_TEMPLATE = "\n".join([
    "{%- set ns = namespace(system='') -%}",
    "{%- for message in messages if message['role'] == 'system' -%}",
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}",
    "{%- endfor -%}",
    "{{- bos_token + ns.system -}}",
    "{%- for message in messages -%}",
    "{%- if message['role'] == 'user' -%}",
    "{{- '" + USER_TOKEN + "' + message['content'] -}}",
    "{%- elif message['role'] == 'assistant' -%}",
    "{{- '" + ASSISTANT_TOKEN + "' + message['content'] + eos_token -}}",
    "{%- elif message['role'] != 'system' -%}",
    "{{- raise_exception('unsupported role ' + message['role'] + ': use system, user or assistant') -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "{{- '" + ASSISTANT_TOKEN + "' -}}",
    "{%- endif -%}",
])


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std), "ones" (norm weights) or "bias" (router correction bias, kept float32)
    std: float = 0.0


def write_random_checkpoint(preset: str, out_dir: str | Path, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write preset `preset` with weights drawn from `seed` to `out_dir`; return the directory.

    Files of an earlier checkpoint in `out_dir` that this one would not overwrite (a single file
    where shards are written now, or the reverse) are removed, so loaders never mix two checkpoints.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = preset_config(preset, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(config, out, seed=seed, dtype=_DTYPES[dtype], max_shard_bytes=_MAX_SHARD_BYTES)
    _write_tokenizer_files(config, out)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False,
    })
    return out


def checkpoint_tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of a DeepSeek-V3 checkpoint (no MTP layers), in write order."""
    c, std = config, 0.02
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head_dim = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]

    def linear(name: str, out_features: int, in_features: int, init_std: float = std) -> TensorSpec:
        return TensorSpec(name=f"{name}.weight", shape=(out_features, in_features), init="normal", std=init_std)

    def norm(name: str, size: int) -> TensorSpec:
        return TensorSpec(name=f"{name}.weight", shape=(size,), init="ones")

    def mlp(prefix: str, inter: int) -> list[TensorSpec]:
        return [linear(f"{prefix}.gate_proj", inter, hidden), linear(f"{prefix}.up_proj", inter, hidden),
                linear(f"{prefix}.down_proj", hidden, inter)]

    specs = [TensorSpec(name="model.embed_tokens.weight", shape=(c["vocab_size"], hidden), init="normal", std=std)]
    for i in range(c["num_hidden_layers"]):
        layer, attn = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        specs += [
            norm(f"{layer}.input_layernorm", hidden),
            linear(f"{attn}.q_a_proj", c["q_lora_rank"], hidden),
            norm(f"{attn}.q_a_layernorm", c["q_lora_rank"]),
            linear(f"{attn}.q_b_proj", heads * qk_head_dim, c["q_lora_rank"]),
            linear(f"{attn}.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden),
            norm(f"{attn}.kv_a_layernorm", c["kv_lora_rank"]),
            linear(f"{attn}.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
            linear(f"{attn}.o_proj", hidden, heads * c["v_head_dim"]),
            norm(f"{layer}.post_attention_layernorm", hidden),
        ]
        if i < c["first_k_dense_replace"]:
            specs += mlp(f"{layer}.mlp", c["intermediate_size"])
            continue
        n_experts, moe_inter = c["n_routed_experts"], c["moe_intermediate_size"]
        # Router logits of unit variance for unit-RMS inputs: sigmoid scores spread out and top-k
        # picks differ between tokens, unlike the zero init transformers uses.
        specs.append(linear(f"{layer}.mlp.gate", n_experts, hidden, init_std=hidden**-0.5))
        bias = f"{layer}.mlp.gate.e_score_correction_bias"
        specs.append(TensorSpec(name=bias, shape=(n_experts,), init="bias", std=0.01))
        for e in range(n_experts):
            specs += mlp(f"{layer}.mlp.experts.{e}", moe_inter)
        specs += mlp(f"{layer}.mlp.shared_experts", c["n_shared_experts"] * moe_inter)
    specs += [norm("model.norm", hidden), linear("lm_head", c["vocab_size"], hidden)]
    return specs


def _make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    values = torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, spec.std, generator=generator)
    return values if spec.init == "bias" else values.to(dtype)  # DeepSeek stores the bias in float32


def _tensor_bytes(spec: TensorSpec, dtype: torch.dtype) -> int:
    itemsize = 4 if spec.init == "bias" else dtype.itemsize
    return math.prod(spec.shape) * itemsize


def _write_weights(config: dict[str, Any], out: Path, *, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Write one `model.safetensors`, or shards of at most `max_shard_bytes` (a tensor larger than
    that gets a shard of its own) plus the index; only one shard's tensors are in memory at a time."""
    index_path = out / "model.safetensors.index.json"
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", index_path]:
        stale.unlink(missing_ok=True)
    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in checkpoint_tensor_specs(config):
        size = _tensor_bytes(spec, dtype)
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += size
    if len(shards) == 1:
        _save_shard(shards[0], out / "model.safetensors", seed=seed, dtype=dtype)
        return
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, out / filename, seed=seed, dtype=dtype)
        weight_map.update((s.name, filename) for s in shard)
    total_size = sum(_tensor_bytes(s, dtype) for shard in shards for s in shard)
    _write_json(index_path, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _save_shard(specs: list[TensorSpec], path: Path, *, seed: int, dtype: torch.dtype) -> None:
    save_file({s.name: _make_tensor(s, seed, dtype) for s in specs}, path, metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates the file owner-only; a checkpoint is read by other users


def _write_tokenizer_files(config: dict[str, Any], out: Path) -> None:
    (out / "tokenizer.json").write_text(_trained_tokenizer_json(config["vocab_size"]), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    })


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(vocab_size: int) -> str:
    return _train_tokenizer(vocab_size).to_str(pretty=True)


def _train_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE trained on `_CORPUS` to exactly `vocab_size` ids. When the corpus runs out of
    merges first, the rest are reserved special tokens, as DeepSeek's own tokenizer has."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    assert trained <= vocab_size, (trained, vocab_size)
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(f"<｜place▁holder▁no▁{i}｜>", special=True, normalized=False)
        for i in range(vocab_size - trained)
    ])
    # The same template transformers builds from add_bos_token=True: BOS before each sequence.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))],
    )
    return tokenizer


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Training text for the tokenizer: varied English prose, code, numbers and a little of other scripts,
# enough for about 1,600 BPE ids (the tiny preset's 1,024 all come from merges).
_CORPUS = """\
A mixture-of-experts model replaces the dense feed-forward block of a transformer with many smaller
feed-forward networks, called experts, and a router that sends each token to a few of them. The router
is a linear layer followed by a scoring function. DeepSeek-V3 scores experts with a sigmoid, adds a
learned correction bias that balances the load without an auxiliary loss, picks the best groups of
experts first and then the top experts inside those groups. The chosen scores are normalized and
scaled before the expert outputs are summed. Shared experts see every token; routed experts see only
the tokens sent to them. Because each token touches only a small fraction of the weights, the model
can hold hundreds of billions of parameters while spending the compute of a much smaller one.

Serving such a model is a problem of memory and of communication. The attention layers keep a cache of
keys and values for every sequence in flight. Multi-head latent attention compresses that cache into a
low-rank latent vector and a small rotary key, so a long conversation costs far fewer bytes per token.
The cache is split into fixed-size blocks, and a block table maps the positions of each sequence onto
physical blocks, the way an operating system maps virtual pages onto frames of memory. When memory runs
short, the scheduler preempts the newest request, frees its blocks and recomputes it later.

Continuous batching lets new requests join the running batch at every step instead of waiting for the
whole batch to finish. A long prompt is split into chunks so that prefill and decode share each step
fairly. The sampler turns logits into tokens: greedy decoding takes the most likely token, while
temperature, top-k and top-p sampling trade accuracy for variety. A stop string or the end-of-sentence
token finishes a request, and the text is streamed back to the client one piece at a time.

Experts can live on different machines. A router process gathers hidden states, decides where each
token goes, groups the tokens by destination and sends them over the network in one message per shard.
The shards run their experts with a fused kernel that sorts tokens by expert and multiplies them in a
single grouped matrix product. Hot experts are copied onto spare slots, cold ones are packed together,
and the placement table changes between steps so that no request is dropped. If a machine dies, the
router waits for a replacement, reloads its weights and retries the step.

Computers store numbers in binary. A byte holds eight bits, and text is written as bytes in the UTF-8
encoding, where a letter of the Latin alphabet takes one byte and a Chinese character or an emoji takes
three or four. A tokenizer learns frequent sequences of bytes from a corpus and merges them into a
vocabulary of subwords. Byte-pair encoding starts from single bytes and repeatedly merges the most
frequent adjacent pair, so common words become single tokens and rare words are spelled out in pieces.

Graphics processors run thousands of threads at once. A kernel written in Triton describes the work of
one block of a matrix; the compiler maps it onto warps, shared memory and tensor cores. Performance
depends on keeping the arithmetic units busy: load tiles from high-bandwidth memory, reuse them many
times, and avoid waiting on the slow path to the host. Small batches are limited by memory bandwidth,
large batches by arithmetic. Mixed precision stores weights in bfloat16 or eight-bit floating point
and accumulates in float32 to keep the sums accurate.

Fine-tuning adapts a pretrained model to a new task. Low-rank adaptation freezes the original weights
and learns two thin matrices whose product is added to a layer. For a mixture of experts, one can tune
only the experts that the new data actually uses, and keep the router frozen so that the balance of the
load does not drift. Training runs on many workers that exchange gradients after every step, and a
checkpoint is written regularly so that a failed job can resume where it stopped.

The weather today is mild, with clouds in the morning and sun in the afternoon. A river runs through the
old town, past the market, the library and the train station. Children play football in the park while
their parents drink coffee and read the news. In the evening the streets fill with people walking home,
and the smell of fresh bread comes from the bakery on the corner. Music plays from an open window.

Questions and answers: What is the capital of France? Paris. How many days are in a week? Seven. Which
planet is closest to the sun? Mercury. Who wrote the play about a prince of Denmark? William Shakespeare.
What is two plus two? Four. Why is the sky blue? Because air scatters blue light more than red light.

def route(hidden_states, weight, bias, top_k):
    scores = sigmoid(hidden_states @ weight.T)
    choice = scores + bias
    return choice.topk(top_k, dim=-1).indices

for step in range(1000):
    batch = scheduler.schedule()
    logits = model(batch.input_ids, batch.positions)
    tokens = sampler(logits, batch.params)
    print(f"step {step}: {len(tokens)} tokens, {memory_used / 1024**3:.2f} GiB")

Numbers and symbols appear in every text: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 65536,
3.14159, 2.71828, 1e-6, -1, +1, 50%, $20, #1, @user, a/b, x = y * z, {key: value}, [list], (group),
"quoted text", 'single quotes', a; b: c! d? e... and the email address is team@example.com.
Multilingual text also shows up: bonjour le monde, hola mundo, hallo Welt, ciao mondo, 你好，世界,
こんにちは世界, 안녕하세요 세계, Привет, мир, γειά σου κόσμε, and emoji such as 🚀 🤖 ✨ 🎉 👍.
"""
