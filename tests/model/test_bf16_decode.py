"""bfloat16 decode against transformers in bfloat16, on every family's tiny checkpoint: greedy tokens at batch 1
agree up to the first step where transformers itself stands at a near-tie (bf16 keeps 8 bits of mantissa, so
two engines that round at different places may pick either of two tokens a few ulps apart). The decode steps
run the bf16 streaming kernels (linear layers and routed experts read bf16 weights and sum in float32)."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM
from tests.hf_models import SUPPORTED_FAMILIES, build_hf_checkpoint, case_seed, load_reference, make_prompts
from tests.hf_models import assert_greedy_follows_up_to_a_near_tie

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

PROMPT_LENS, MAX_TOKENS = [5, 17, 30], 16
# A near-tie in bf16: the reference's top-1/top-2 gap, relative to max(1, max |logit|), below this at the step
# where the tokens part. bf16 rounds each product-sum to 2^-8 relative, and a step is dozens of them. (Run with
# the torch bf16 paths instead of the kernels, these cases part at gaps up to 0.052: deepseek_v2's 17-token
# prompt, at its step 3.)
TIE = 0.04


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_bf16_greedy_decode_follows_transformers_up_to_a_near_tie(tmp_path, family):
    ckpt = build_hf_checkpoint(family, tmp_path / family, dtype=torch.bfloat16, seed=case_seed((family, "default")))
    reference = load_reference(ckpt, dtype=torch.bfloat16)
    prompts = make_prompts(reference.config.vocab_size, PROMPT_LENS, seed=3)
    llm = LLM(model=str(ckpt), dtype="bfloat16", max_num_seqs=4)
    assert_greedy_follows_up_to_a_near_tie(llm, reference, prompts, MAX_TOKENS, TIE)


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_a_bf16_models_gates_are_float32_holding_transformers_bf16_values(tmp_path, family):
    """Routing scores in float32, so load_model keeps each gate in float32: the checkpoint's values rounded to
    bf16 first, as transformers' bf16 model holds them (one copy, nothing cached beside it)."""
    from expertmesh.model import load_model
    from expertmesh.model.moe import Router

    ckpt = build_hf_checkpoint(family, tmp_path / family, dtype=torch.float32, seed=case_seed((family, "gates")))
    reference = load_reference(ckpt, dtype=torch.bfloat16)
    theirs = {n: p for n, p in reference.named_parameters() if n.endswith("mlp.gate.weight")}
    model = load_model(ckpt, "bfloat16")
    ours = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, Router)}
    assert sorted(ours) == sorted(theirs) and ours
    for name, weight in ours.items():
        assert weight.dtype == torch.float32 and theirs[name].dtype == torch.bfloat16
        assert torch.equal(weight, theirs[name].float()), name
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in ours)
