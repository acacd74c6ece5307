"""Tiny random MoE checkpoints written by transformers, and the other formats such checkpoints ship in.

transformers is the reference nobody here wrote: every checkpoint is made by its own `from_config` +
`save_pretrained`, so the bytes on disk are exactly what transformers 5 writes (per-expert tensors,
`rope_parameters`). The format helpers rewrite a checkpoint into the fused-expert layout, the config
spelling of the published checkpoints, and several shards.

Random tiny models have nearly flat logits and router scores, so greedy tokens and expert choices would
hinge on rounding. `_reinit` therefore draws every weight with a large std (`WEIGHT_STD`), norm gains
around 1 and a non-zero DeepSeek-V3 `e_score_correction_bias`; `reference_greedy` and `RouterProbe`
measure the reference's margins, and `test_parity.py` asserts they are far above float32 noise.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

SUPPORTED_FAMILIES = ("deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
WEIGHT_STD = 0.3  # large enough that top-1/top-2 logit and router gaps dwarf float32 rounding
BOS_ID, EOS_ID = 1, 2

_COMMON = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None, max_position_embeddings=256)

# Odd sizes on purpose: hidden 40/48, 5/6 heads, head_dim 12, 6/7/12 experts, vocab 211/223.
_BASE: dict[str, dict] = {
    "deepseek_v2": dict(
        vocab_size=211, hidden_size=40, intermediate_size=40, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5,
        q_lora_rank=None, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12,
        n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=0,
        topk_method="greedy", routed_scaling_factor=1.0,
        norm_topk_prob=False,  # transformers' V2 router never normalises, whatever this says
    ),
    "deepseek_v3": dict(
        vocab_size=223, hidden_size=48, intermediate_size=40, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=6,
        q_lora_rank=28, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12,
        n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
    ),
    "mixtral": dict(
        vocab_size=211, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, num_local_experts=7, num_experts_per_tok=2,
        sliding_window=None,
    ),
    "qwen2_moe": dict(
        vocab_size=211, hidden_size=40, intermediate_size=40, moe_intermediate_size=24,
        shared_expert_intermediate_size=36, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, num_experts=7, num_experts_per_tok=3, norm_topk_prob=False, qkv_bias=True,
    ),
    "qwen3_moe": dict(
        vocab_size=211, hidden_size=40, intermediate_size=40, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=12,  # != hidden_size // num_attention_heads
        num_experts=12, num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "olmoe": dict(
        vocab_size=211, hidden_size=48, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=6, num_experts=7, num_experts_per_tok=2,
        norm_topk_prob=False, clip_qkv=None,
    ),
}


def _yarn(mscale: float, mscale_all_dim: float) -> dict:
    # max_position_embeddings (256) == factor * original_max_position_embeddings, as in the real configs
    return dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                beta_fast=32.0, beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale_all_dim)


_VARIANTS: dict[tuple[str, str], dict] = {
    ("deepseek_v2", "default"): {},
    ("deepseek_v2", "group_limited_yarn"): dict(
        topk_method="group_limited_greedy", n_routed_experts=12, n_group=3, topk_group=2,
        num_experts_per_tok=3, q_lora_rank=28, routed_scaling_factor=1.75, first_k_dense_replace=1,
        n_shared_experts=1, num_hidden_layers=3, rope_parameters=_yarn(mscale=0.9, mscale_all_dim=0.707),
    ),
    ("deepseek_v3", "default"): dict(rope_parameters=_yarn(mscale=1.0, mscale_all_dim=0.8)),
    ("deepseek_v3", "plain_rope_tied"): dict(
        q_lora_rank=None, rope_interleave=False, norm_topk_prob=False, routed_scaling_factor=1.5,
        first_k_dense_replace=0, tie_word_embeddings=True,
    ),
    ("deepseek_v3", "yarn_one_group"): dict(
        rope_interleave=False, n_routed_experts=7, n_group=1, topk_group=1, num_experts_per_tok=2,
        rope_parameters=_yarn(mscale=0.707, mscale_all_dim=0.707),
    ),
    ("deepseek_v3", "attention_bias"): dict(attention_bias=True, num_hidden_layers=3),
    ("mixtral", "default"): {},
    ("mixtral", "sliding_window"): dict(sliding_window=8, head_dim=12),
    ("qwen2_moe", "default"): {},
    ("qwen2_moe", "sparse_step2"): dict(num_hidden_layers=3, decoder_sparse_step=2, norm_topk_prob=True),
    ("qwen2_moe", "mlp_only_layers"): dict(mlp_only_layers=[0], num_key_value_heads=1),
    ("qwen2_moe", "sliding_window"): dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=2,
    ),
    ("qwen3_moe", "default"): {},
    ("qwen3_moe", "mlp_only_top1"): dict(
        num_hidden_layers=3, mlp_only_layers=[1], num_experts_per_tok=1, norm_topk_prob=False,
    ),
    ("olmoe", "default"): {},
    ("olmoe", "clip_qkv"): dict(clip_qkv=1.0),
    ("olmoe", "gqa_bias"): dict(num_key_value_heads=2, attention_bias=True),
    ("qwen3_moe", "attention_bias"): dict(attention_bias=True),
}

CASES: list[tuple[str, str]] = list(_VARIANTS)

# Model seeds, 0 unless seed 0 gave the reference a near-tie (test_reference_is_decisive finds them).
_CASE_SEEDS = {
    ("olmoe", "clip_qkv"): 1,
    ("deepseek_v3", "plain_rope_tied"): 1,
    ("deepseek_v3", "attention_bias"): 1,
}


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


def case_seed(case: tuple[str, str]) -> int:
    return _CASE_SEEDS.get(case, 0)


def hf_config(family: str, variant: str = "default", **overrides):
    if (family, variant) not in _VARIANTS:
        raise ValueError(f"unknown case {(family, variant)!r}; known: {CASES}")
    kwargs = {**_COMMON, **_BASE[family], **_VARIANTS[family, variant], **overrides}
    return AutoConfig.for_model(family, **kwargs)


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Redraws every weight from one seeded generator, in `named_parameters` order."""
    gen = torch.Generator().manual_seed(seed)

    def draw(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * std + mean)

    for name, param in model.named_parameters():  # tied weights are listed once
        if param.ndim == 1 and "norm" in name:
            draw(param, 0.2, mean=1.0)  # RMSNorm gains around 1, not all equal
        elif param.ndim == 1:
            draw(param, 0.1)  # qkv biases
        else:
            draw(param, WEIGHT_STD)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            draw(buf, 0.1)  # zero would hide a missing bias in expert selection


def build_hf_checkpoint(family: str, out_dir, *, variant: str = "default", dtype=torch.float32,
                        seed: int = 0, **overrides) -> Path:
    """Writes a tiny random `family` checkpoint with transformers' own `save_pretrained`."""
    config = hf_config(family, variant, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit(model, seed)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.to(dtype)
    for module in model.modules():  # published DeepSeek-V3 checkpoints keep this bias in float32
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


# --- checkpoint formats -------------------------------------------------------------------------


def read_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(ckpt_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _write_checkpoint(src_dir: Path, out_dir: Path, shards: list[dict[str, torch.Tensor]]) -> Path:
    """Copies the json files of `src_dir` and writes `shards` (one file, or several plus an index)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(src_dir).glob("*.json"):
        if path.name != "model.safetensors.index.json":
            shutil.copy(path, out_dir / path.name)
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return out_dir
    weight_map, total_size = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


# `<prefix>.experts.<e>.<proj>.weight`; Mixtral spells the projections w1 (gate), w3 (up), w2 (down).
_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def to_fused_experts(ckpt_dir, out_dir) -> Path:
    """Rewrites per-expert tensors into transformers 5's in-memory layout.

    `<prefix>.experts.gate_up_proj` is [E, 2I, H] (each expert's gate rows, then its up rows) and
    `<prefix>.experts.down_proj` is [E, H, I]. Names become those of transformers 5's state dict, so
    Mixtral's `block_sparse_moe.` is renamed `mlp.` as transformers' own loader does.
    """
    per_expert: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    fused: dict[str, torch.Tensor] = {}
    for key, tensor in read_tensors(ckpt_dir).items():
        key = key.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT_KEY.match(key)
        if match is None:
            fused[key] = tensor
            continue
        proj = _PROJ.get(match["proj"], match["proj"])
        per_expert.setdefault(match["prefix"], {}).setdefault(proj, {})[int(match["e"])] = tensor
    for prefix, projs in per_expert.items():
        experts = sorted(projs["down_proj"])
        assert experts == list(range(len(experts))), f"{prefix}: experts {experts} are not 0..E-1"
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]]) for e in experts]
        )  # [E, 2I, H]
        fused[f"{prefix}.down_proj"] = torch.stack([projs["down_proj"][e] for e in experts])  # [E, H, I]
    return _write_checkpoint(Path(ckpt_dir), Path(out_dir), [dict(sorted(fused.items()))])


def reshard(ckpt_dir, out_dir, n_shards: int) -> Path:
    """Deals the tensors round-robin into `n_shards` files, so one layer's tensors span several files."""
    tensors = sorted(read_tensors(ckpt_dir).items())
    shards = [dict(tensors[i::n_shards]) for i in range(n_shards)]
    return _write_checkpoint(Path(ckpt_dir), Path(out_dir), shards)


def to_published_config(ckpt_dir) -> Path:
    """Rewrites config.json in place the way the published checkpoints on the Hub spell it.

    Top-level `rope_theta` and `rope_scaling` with `"type"` (not `rope_parameters`), `torch_dtype`,
    DeepSeek's `scoring_func`/`topk_method`/`n_routed_experts` without the derived head dims (and V3
    without `rope_interleave` when it is the default, True), Qwen's `num_experts`, Mixtral's
    `num_local_experts`, and no `head_dim` where it is hidden_size // heads.
    """
    path = Path(ckpt_dir) / "config.json"
    cfg = json.loads(path.read_text())
    family = cfg["model_type"]
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **rope}
    elif family == "qwen3_moe":
        cfg["rope_scaling"] = None  # Qwen3 configs carry an explicit null
    cfg["torch_dtype"] = cfg.pop("dtype")
    if family.startswith("deepseek"):
        cfg.pop("head_dim", None)
        cfg.pop("qk_head_dim", None)
        cfg["scoring_func"] = "sigmoid" if family == "deepseek_v3" else "softmax"
        if family == "deepseek_v3":
            cfg["topk_method"] = "noaux_tc"
        cfg.update(moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True, ep_size=1)
        if cfg.get("rope_interleave"):  # DeepSeek-V3's configs leave out the default, True
            del cfg["rope_interleave"]
    elif cfg.get("head_dim") in (None, cfg["hidden_size"] // cfg["num_attention_heads"]) and family != "qwen3_moe":
        cfg.pop("head_dim", None)
    if family == "qwen2_moe":  # transformers 5 derives these; Qwen1.5-MoE spells a window it does not use
        del cfg["layer_types"]
        if not cfg.get("use_sliding_window"):
            cfg["sliding_window"] = 4096
    if family in ("qwen2_moe", "qwen3_moe", "olmoe") and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return Path(ckpt_dir)


# --- the transformers reference -----------------------------------------------------------------


def load_reference(ckpt_dir, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype, attn_implementation="eager")
    # EOS off, as the engine runs with ignore_eos. It must go from the model's own generation config:
    # generate() treats an `eos_token_id=None` it is passed as "unset" and falls back to that one.
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.no_grad()
def reference_logits(model, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """One full-sequence forward per sequence; row i is the logits after token i.  # [P + C, V] each"""
    return [model(input_ids=torch.tensor([p + c])).logits[0].float() for p, c in zip(prompts, continuations)]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens at batch 1 with EOS disabled, and the smallest top-1/top-2 logit gap seen.

    The gap is relative, divided by max(1, max |logit|) of its step, like the parity tolerance.
    """
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              eos_token_id=None, bos_token_id=BOS_ID, pad_token_id=0,
                              output_logits=True, output_scores=True, return_dict_in_generate=True)
    input_ids = torch.tensor([prompt])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    assert all(torch.isfinite(step).all() for step in out.scores), "a logits processor masked a token (EOS?)"
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens
    margin = min(_relative_top2_gap(step[0].float()) for step in out.logits)
    return tokens, margin


@torch.no_grad()
def reference_greedy_steps(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """`reference_greedy`'s tokens, and each step's relative top-1/top-2 gap."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              eos_token_id=None, bos_token_id=BOS_ID, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    input_ids = torch.tensor([prompt])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return out.sequences[0, len(prompt):].tolist(), [_relative_top2_gap(step[0].float()) for step in out.logits]


def assert_greedy_follows_up_to_a_near_tie(llm, reference, prompts: list[list[int]], max_tokens: int,
                                           tie: float) -> None:
    """`llm`'s greedy tokens (batch 1, EOS ignored) equal `reference`'s on each prompt up to the first step where
    they part, which must be a near-tie of the reference (relative top-1/top-2 gap below `tie`); at least a
    prompt's worth of steps agree in all."""
    from expertmesh import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    agreed = 0
    for prompt in prompts:
        want, gaps = reference_greedy_steps(reference, prompt, max_tokens)
        got = list(llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids)
        first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is not None:
            assert gaps[first] < tie, (f"step {first}: got {got[first]}, transformers {want[first]} with a gap of "
                                       f"{gaps[first]:.3g} (not a near-tie)\n got  {got}\n want {want}")
        agreed += max_tokens if first is None else first
    assert agreed >= max_tokens


def _relative_top2_gap(logits: torch.Tensor) -> float:
    top2 = logits.topk(2).values
    return float((top2[0] - top2[1]) / max(1.0, float(logits.abs().max())))


class RouterProbe:
    """Hooks every router of a transformers model and keeps the smallest selection gap it sees.

    The gap is between the last expert (or group) picked and the first one left out, in router
    logits for softmax routers (softmax keeps their order) and in biased sigmoid scores for
    DeepSeek-V3. If float32 noise could flip a pick, engine and reference could rightly diverge.
    """

    def __init__(self, model):
        self.min_gap = float("inf")
        self._handles = [m.register_forward_hook(self._record) for m in model.modules()
                         if type(m).__name__.lower().endswith("topkrouter")]
        assert self._handles, f"no router found in {type(model).__name__}"

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _record(self, router, args, outputs) -> None:
        logits = outputs[0].float().reshape(-1, router.num_experts)  # [T, E]
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3: sigmoid + bias, groups ranked by the sum of their top-2
            gap = _grouped_gap(logits.sigmoid() + bias.float(), router.num_group, router.topk_group,
                               router.top_k, lambda g: g.topk(2, dim=-1).values.sum(-1))
        elif getattr(router, "topk_method", None) == "group_limited_greedy":  # softmax is monotone:
            gap = _grouped_gap(logits, router.num_group, router.topk_group, router.top_k,  # rank logits
                               lambda g: g.max(dim=-1).values)
        else:
            gap = _topk_gap(logits, router.top_k)
        self.min_gap = min(self.min_gap, gap)


def _topk_gap(scores: torch.Tensor, k: int) -> float:
    if k >= scores.shape[-1]:
        return float("inf")
    top = scores.topk(k + 1, dim=-1).values  # [T, k + 1]
    return float((top[:, k - 1] - top[:, k]).min())  # -inf left out (masked) gives +inf


def _grouped_gap(scores: torch.Tensor, n_group: int, topk_group: int, k: int, group_score) -> float:
    tokens, n_experts = scores.shape
    group_scores = group_score(scores.view(tokens, n_group, n_experts // n_group))  # [T, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    masked = scores.masked_fill(~keep.repeat_interleave(n_experts // n_group, dim=1), float("-inf"))
    return min(_topk_gap(group_scores, topk_group), _topk_gap(masked, k))


def assert_logits_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-4) -> None:
    """Max |diff| per sequence within `rtol` * max(1, max |reference logit|)."""
    assert len(got) == len(want), f"{len(got)} sequences of logits, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"sequence {i}: logits shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        diff = (g.float() - w.float()).abs()  # [P + C, V]
        bound = rtol * max(1.0, float(w.abs().max()))
        worst = int(diff.amax(dim=-1).argmax())
        assert float(diff.max()) <= bound, (
            f"sequence {i}: max |logit diff| {float(diff.max()):.3g} at row {worst} of {len(w)} > {bound:.3g}"
        )
