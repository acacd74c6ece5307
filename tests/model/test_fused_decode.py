"""The fused decode step (model/fused_decode.py over kernels/csrc/decode_stack.cpp) against the modules it stands
in for: the same logits and the same cache rows, bit for bit, step after step, in float32, bfloat16, int8 and
int8 experts, on transformers-written DeepSeek-V2 and V3 checkpoints (q_proj and q_lora, softmax and sigmoid
routing, group-limited selection, a correction bias, dense and MoE layers). Also: each MoE block's routing
observer hears the same decisions, a model changed after the stack was built gets a new one, and what the stack
does not run (LoRA adapters, experts elsewhere, too many tokens) runs on the modules. The grouped-query families
(Mixtral, Qwen2/3-MoE, OLMoE) likewise, by transformers variant."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.kernels.cpu_ext import small_m_kernels
from expertmesh.model import fused_decode
from expertmesh.model.attention_metadata import AttentionMetadata
from expertmesh.model.fused_decode import fused_decoder
from expertmesh.model.loader import load_model
from expertmesh.model.moe import MoEBlock, local_backend
from expertmesh.model.quantize import quantize_model
from tests.hf_models import build_hf_checkpoint, make_prompts

pytestmark = [
    pytest.mark.usefixtures("single_threaded_torch"),
    pytest.mark.skipif(small_m_kernels() is None, reason="the C++ CPU kernels could not be built here"),
]

BLOCK, PROMPT_LENS, STEPS = 16, [5, 17, 30], 6
# hidden 256 and q_lora 256: q_a_proj and the dense MLP reach the float32 streaming kernel's minimum size
WIDE = dict(hidden_size=256, q_lora_rank=256, intermediate_size=256)
# every input size a multiple of 32, so w8a8 quantises the activations of every int8 layer
BLOCKS_OF_32 = dict(WIDE, moe_intermediate_size=32, v_head_dim=16)

CASES = [
    ("deepseek_v2", {}, "float32", None),
    ("deepseek_v3", {}, "float32", None),
    ("deepseek_v3", WIDE, "float32", None),
    ("deepseek_v3", {}, "bfloat16", None),
    ("deepseek_v2", {}, "bfloat16", "int8"),
    ("deepseek_v3", WIDE, "float32", "int8"),
    ("deepseek_v3", {}, "bfloat16", "experts_int8"),
    ("deepseek_v3", BLOCKS_OF_32, "float32", "w8a8"),
    ("deepseek_v2", {}, "bfloat16", "w8a8"),  # sizes of 40: its int8 layers keep float32 activations
    # bf16 weights under float32 activations (activation_dtype): bf16 matmuls in a float32 residual stream
    ("deepseek_v3", {}, "bfloat16+float32", None),
    ("deepseek_v3", WIDE, "bfloat16+float32", None),
    ("deepseek_v3", {}, "bfloat16+float32", "int8"),
]


# The grouped-query families, by transformers variant (tests/hf_models.py): biases on q/k/v, q/k norms per head
# (Qwen3) and over the projection (OLMoE), clipping, sliding windows, a gated shared expert (Qwen2-MoE), dense
# layers, a single KV head. Hidden sizes of 40/48 keep every linear on F.linear; WIDE_GQA puts q_proj and
# o_proj on the streaming kernel.
WIDE_GQA = dict(hidden_size=256, num_attention_heads=8)
GQA_CASES = [
    ("mixtral", "default", {}, "float32", None),
    ("mixtral", "default", WIDE_GQA, "float32", None),
    ("mixtral", "sliding_window", {}, "bfloat16", None),
    ("mixtral", "default", {}, "bfloat16+float32", None),
    ("qwen2_moe", "default", {}, "float32", None),
    ("qwen2_moe", "mlp_only_layers", {}, "bfloat16", None),
    ("qwen2_moe", "sliding_window", {}, "float32", "int8"),
    ("qwen3_moe", "default", {}, "bfloat16", None),
    ("qwen3_moe", "attention_bias", {}, "float32", "w8a8"),
    ("olmoe", "clip_qkv", {}, "float32", None),
    ("olmoe", "gqa_bias", {}, "bfloat16", "experts_int8"),
]


def _checkpoint(tmp_path, family, overrides, dtype, variant="default"):
    torch_dtype = getattr(torch, dtype.split("+")[0])
    return build_hf_checkpoint(family, tmp_path / family, variant=variant, dtype=torch_dtype, seed=7, **overrides)


def _model(ckpt, dtype, quantization):
    weights, _, activations = dtype.partition("+")  # "bfloat16+float32": weights, then activations
    model = load_model(ckpt, weights, activation_dtype=activations or None)
    if quantization is not None:
        quantize_model(model, quantization)
    return model


@torch.inference_mode()
def _decode(model, fused: bool, prompts: list[list[int]], steps: int = STEPS, cache_dtype=None):
    """Prefill of every prompt, then greedy decode steps of all of them together: (each decode step's logits,
    the caches, each MoE layer's routing decisions in the order they were heard)."""
    model.fused_decode = fused
    heard: list[tuple[int, torch.Tensor]] = []
    for block in model.modules():
        if isinstance(block, MoEBlock):
            block.routing_observer = lambda layer, ids: heard.append((layer, ids.clone()))
    per_seq = -(-(max(map(len, prompts)) + steps) // BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    caches = model.allocate_kv_cache(per_seq * len(prompts), BLOCK, cache_dtype)
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata.build(query_lens=lens, context_lens=lens, block_tables=tables, block_size=BLOCK)
    ends = torch.tensor(lens).cumsum(0) - 1
    logits = model(torch.tensor([t for p in prompts for t in p]), meta, caches, ends)
    heard.clear()  # prefill never takes the stack
    out = []
    for _ in range(steps):
        lens = [n + 1 for n in lens]
        meta = AttentionMetadata.build(query_lens=[1] * len(lens), context_lens=lens, block_tables=tables,
                                       block_size=BLOCK)
        logits = model(logits.argmax(-1), meta, caches)
        out.append(logits)
    return out, caches, heard


def _count_stack_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = fused_decode.FusedDecoder.__call__

    def counted(self, *args):
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(fused_decode.FusedDecoder, "__call__", counted)
    return calls


def _fused_equals_modules(model, prompts, monkeypatch, steps: int = STEPS, cache_dtype=None):
    """Decodes `prompts` on the stack, then on the modules: every decode step of the first ran on the stack, none
    of the second did, and the two runs are the same bit for bit. Returns the stack's run."""
    calls = _count_stack_calls(monkeypatch)
    fused = _decode(model, True, prompts, steps, cache_dtype)
    assert calls[0] == steps, fused_decoder(model).reason  # every decode step ran on the stack
    modules = _decode(model, False, prompts, steps, cache_dtype)
    assert calls[0] == steps
    _assert_same_run(fused, modules)
    return fused


def _assert_same_run(got, want):
    (got_logits, got_caches, got_heard), (want_logits, want_caches, want_heard) = got, want
    for step, (g, w) in enumerate(zip(got_logits, want_logits, strict=True)):
        assert torch.equal(g, w), f"decode step {step}: max |diff| {(g - w).abs().max().item():.3g}"
    for layer, (g, w) in enumerate(zip(got_caches, want_caches, strict=True)):
        assert torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]), f"layer {layer}'s cache rows differ"
    assert [layer for layer, _ in got_heard] == [layer for layer, _ in want_heard]
    assert all(torch.equal(g, w) for (_, g), (_, w) in zip(got_heard, want_heard, strict=True))


@pytest.mark.parametrize("family, overrides, dtype, quantization", CASES,
                         ids=[f"{f}-{'wide-' if o else ''}{d}-{q or 'float'}" for f, o, d, q in CASES])
def test_the_fused_step_equals_the_modules_bit_for_bit(tmp_path, monkeypatch, family, overrides, dtype,
                                                         quantization):
    model = _model(_checkpoint(tmp_path, family, overrides, dtype), dtype, quantization)
    if overrides is BLOCKS_OF_32:
        flags = {n: m.quantize_activations for n, m in model.named_modules() if hasattr(m, "quantize_activations")}
        assert all(flag != n.endswith("kv_b_proj") for n, flag in flags.items())  # kv_b is read whole, in float
    fused = _fused_equals_modules(model, make_prompts(model.config.vocab_size, PROMPT_LENS, seed=1), monkeypatch)
    moe_layers = sum(isinstance(m, MoEBlock) for m in model.modules())
    assert len(fused[2]) == STEPS * moe_layers


@pytest.mark.parametrize("family, variant, overrides, dtype, quantization", GQA_CASES,
                         ids=[f"{f}-{v}-{'wide-' if o else ''}{d}-{q or 'float'}" for f, v, o, d, q in GQA_CASES])
def test_the_grouped_query_families_fused_step_equals_the_modules(tmp_path, monkeypatch, family, variant, overrides,
                                                                   dtype, quantization):
    model = _model(_checkpoint(tmp_path, family, overrides, dtype, variant), dtype, quantization)
    fused = _fused_equals_modules(model, make_prompts(model.config.vocab_size, PROMPT_LENS, seed=1), monkeypatch)
    moe_layers = sum(isinstance(m, MoEBlock) for m in model.modules())
    assert len(fused[2]) == STEPS * moe_layers


def test_a_float32_grouped_query_model_over_a_bf16_cache(tmp_path, monkeypatch):
    model = _model(_checkpoint(tmp_path, "qwen3_moe", {}, "float32"), "float32", None)
    prompts = make_prompts(model.config.vocab_size, PROMPT_LENS, seed=6)
    fused = _fused_equals_modules(model, prompts, monkeypatch, cache_dtype=torch.bfloat16)
    assert fused[1][0][0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int8"),
                                                 ("bfloat16+float32", None)])
def test_a_batch_of_twenty_runs_on_the_stack(tmp_path, monkeypatch, dtype, quantization):
    """20 sequences: float32 linears put the tokens in a register's lanes (16-64 rows), bf16 linears leave the
    streaming kernel past 8 rows for at::linear, in the stack as in the modules. (A hidden size of 1024: at 256 the
    two bf16 GEMMs round every output alike, and the test could not tell them apart.)"""
    model = _model(_checkpoint(tmp_path, "deepseek_v3", {**WIDE, "hidden_size": 1024}, dtype), dtype, quantization)
    _fused_equals_modules(model, make_prompts(model.config.vocab_size, [3 + i % 7 for i in range(20)], seed=4),
                          monkeypatch, steps=2)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_float32_model_over_a_bf16_latent_cache(tmp_path, monkeypatch, quantization):
    """kv_cache_dtype="bfloat16": the stack reads and writes the bf16 cache as the modules do."""
    model = _model(_checkpoint(tmp_path, "deepseek_v3", {}, "float32"), "float32", quantization)
    prompts = make_prompts(model.config.vocab_size, PROMPT_LENS, seed=5)
    fused = _fused_equals_modules(model, prompts, monkeypatch, cache_dtype=torch.bfloat16)
    assert fused[1][0][0].dtype == torch.bfloat16


def test_a_model_changed_after_the_stack_was_built_gets_a_new_one(tmp_path, monkeypatch):
    model = _model(_checkpoint(tmp_path, "deepseek_v3", {}, "float32"), "float32", None)
    prompts = make_prompts(model.config.vocab_size, PROMPT_LENS, seed=2)
    float_run = _decode(model, True, prompts)
    first = fused_decoder(model)
    quantize_model(model, "int8")  # every linear and the experts replaced by int8 modules
    calls = _count_stack_calls(monkeypatch)
    int8_run = _decode(model, True, prompts)
    assert calls[0] == STEPS and fused_decoder(model) is not first
    _assert_same_run(int8_run, _decode(model, False, prompts))
    assert not torch.equal(int8_run[0][0], float_run[0][0])  # a stale stack would still compute in float


def test_weights_changed_in_place_show_in_the_next_step(tmp_path, monkeypatch):
    """The stack reads the modules' own tensors every step: a bf16 model's norms scaled in place and its router
    gates given new data (`.data =`) after it was built change its output as they change the modules', with no
    rebuild (a float32 copy of a bf16 weight, or a view of a gate, made once at build would go stale)."""
    model = _model(_checkpoint(tmp_path, "deepseek_v3", {}, "bfloat16"), "bfloat16", None)
    prompts = make_prompts(model.config.vocab_size, PROMPT_LENS, seed=3)
    before = _decode(model, True, prompts)
    first = fused_decoder(model)
    params = dict(model.named_parameters())
    assert any("kv_a_layernorm" in name for name in params) and any(n.endswith("gate.weight") for n in params)
    with torch.no_grad():
        for name, p in params.items():
            if "norm" in name:
                p.mul_(1.5)
            elif name.endswith("gate.weight"):
                p.data = p.data * 1.5
    after = _fused_equals_modules(model, prompts, monkeypatch)
    assert fused_decoder(model) is first
    assert not torch.equal(after[0][0], before[0][0])


def test_what_the_stack_does_not_run_runs_on_the_modules(tmp_path, monkeypatch):
    model = _model(_checkpoint(tmp_path, "deepseek_v2", {}, "bfloat16"), "bfloat16", None)
    calls = _count_stack_calls(monkeypatch)
    # 65 sequences: past the 64 rows at which float32 linears leave the streaming kernel
    lens = [3 + i % 4 for i in range(65)]
    many = _decode(model, True, make_prompts(model.config.vocab_size, lens, seed=3), steps=2)
    assert calls[0] == 0
    _assert_same_run(many, _decode(model, False, make_prompts(model.config.vocab_size, lens, seed=3), steps=2))
    assert fused_decoder(model).stack is not None
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    block.backend = lambda layer_idx, blk, hidden: blk.experts(hidden, *blk.gate(hidden))  # experts "elsewhere"
    assert fused_decoder(model).stack is None and "elsewhere" in fused_decoder(model).reason
    block.backend = local_backend
    block.experts.adapters = object()  # what attaching a LoRA adapter does
    assert fused_decoder(model).stack is None and "LoRA" in fused_decoder(model).reason
    del block.experts.adapters
    assert fused_decoder(model).stack is not None




def test_the_engine_counts_the_same_expert_load_with_the_stack(tmp_path):
    ckpt = _checkpoint(tmp_path, "deepseek_v3", {}, "float32")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in make_prompts(223, PROMPT_LENS, seed=4)]
    runs = []
    for fused in (True, False):
        llm = LLM(model=str(ckpt), max_num_seqs=4)
        llm.llm_engine.executor.model.fused_decode = fused
        tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        runs.append((tokens, llm.llm_engine.executor.load_counts()))
    assert runs[0] == runs[1]
    assert sum(sum(c) for c in runs[0][1].values()) > 0
