"""`kv_cache_dtype="bfloat16"` (vLLM's name): a float32 model keeps its KV cache (MLA's latent cache, GQA's keys
and values) in bf16, at half the bytes: the same memory holds twice the blocks. Rows are written rounded once
and read back in float32; predictions stay close to the float32 cache's. Bad values are refused naming the
field."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM
from expertmesh.cli import main
from expertmesh.model import load_model
from expertmesh.model.attention_metadata import AttentionMetadata
from tests.hf_models import build_hf_checkpoint, make_prompts

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@torch.inference_mode()
def logits_over_steps(model, caches, prompts, steps=4):
    """Prefill, then greedy decode steps of all prompts together: every step's logits [S, V]."""
    lens = [len(p) for p in prompts]
    per_seq = -(-(max(lens) + steps) // 16)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    meta = AttentionMetadata.build(query_lens=lens, context_lens=lens, block_tables=tables, block_size=16)
    out = [model(torch.tensor([t for p in prompts for t in p]), meta, caches, torch.tensor(lens).cumsum(0) - 1)]
    for _ in range(steps):
        lens = [n + 1 for n in lens]
        meta = AttentionMetadata.build(query_lens=[1] * len(lens), context_lens=lens, block_tables=tables,
                                       block_size=16)
        out.append(model(out[-1].argmax(-1), meta, caches))
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])  # MLA's latent cache; GQA's keys and values
def test_a_bf16_cache_stays_close_to_the_float32_one(tmp_path, family):
    model = load_model(build_hf_checkpoint(family, tmp_path / family, seed=3))
    prompts = make_prompts(model.config.vocab_size, [5, 17, 30], seed=6)
    exact_caches, bf16_caches = model.allocate_kv_cache(9, 16), model.allocate_kv_cache(9, 16, torch.bfloat16)
    assert bf16_caches[0][0].dtype == torch.bfloat16
    torch.manual_seed(0)
    exact = logits_over_steps(model, exact_caches, prompts)
    got = logits_over_steps(model, bf16_caches, prompts)
    # prefill and decode both attend over what the cache holds: rounded to bf16, read back in float32
    for step, (g, e) in enumerate(zip(got, exact)):
        assert float((g - e).norm() / e.norm()) < 2e-2, f"step {step}"
    assert not torch.equal(got[-1], exact[-1])  # the bf16 cache is what was read
    # the first layer's rows of the prompts (the same inputs in both runs): the float32 rows rounded once
    per_seq = -(-(30 + 4) // 16)
    slots = torch.tensor([i * per_seq * 16 + p for i, prompt in enumerate(prompts) for p in range(len(prompt))])
    for got_cache, exact_cache in zip(bf16_caches[0], exact_caches[0]):
        rows = got_cache.flatten(0, 1)[slots]
        torch.testing.assert_close(rows, exact_cache.flatten(0, 1)[slots].bfloat16(), rtol=0, atol=0)

def test_the_engine_holds_twice_the_blocks_in_the_same_memory(tiny_model_dir):
    def blocks(**kw):
        llm = LLM(str(tiny_model_dir), kv_cache_gib=0.002, **kw)
        caches = llm.llm_engine.executor.kv_caches
        return caches[0][0].dtype, caches[0][0].shape[0], llm

    (dtype_f32, n_f32, _), (dtype_bf16, n_bf16, llm) = blocks(), blocks(kv_cache_dtype="bfloat16")
    assert (dtype_f32, dtype_bf16) == (torch.float32, torch.bfloat16)
    assert n_bf16 in (2 * n_f32, 2 * n_f32 + 1)  # the budget over half the bytes a block, rounded down
    from expertmesh import SamplingParams

    out = llm.generate([{"prompt_token_ids": [5, 9, 13]}], SamplingParams(max_tokens=6, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 6


def test_unsupported_kv_cache_dtypes_are_refused(tiny_model_dir, capsys):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'bfloat16'\], got 'fp8'"):
        LLM(str(tiny_model_dir), kv_cache_dtype="fp8")
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tiny_model_dir), "--kv-cache-dtype", "fp8"])
    assert "argument --kv-cache-dtype: invalid choice: 'fp8'" in capsys.readouterr().err
