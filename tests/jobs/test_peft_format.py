"""Our LoRA adapters against peft's: an adapter made on our model (random, non-zero updates on the attention,
the shared experts and a few routed experts per layer) and written in peft's layout loads onto transformers'
model of the same checkpoint through peft itself, and gives our logits."""

from __future__ import annotations

import pytest
import torch

from expertmesh.jobs.finetune.lora import ExpertLora, apply_lora
from expertmesh.jobs.finetune.peft_format import save_peft_adapter
from expertmesh.model import load_model
from expertmesh.model.attention_metadata import AttentionMetadata
from tests.hf_models import build_hf_checkpoint, load_reference, make_prompts

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_our_adapter_loads_into_peft_with_our_logits(tmp_path, family):
    ckpt = build_hf_checkpoint(family, tmp_path / family)
    ours = load_model(ckpt)
    moe_layers = [i for i, layer in enumerate(ours.model.layers) if hasattr(layer.mlp, "gate")]
    experts = {layer: [1, 3] for layer in moe_layers[:1]}  # later MoE layers: no routed adapter at all
    trainable = apply_lora(ours, rank=4, alpha=8, targets=("attention", "shared_experts", "routed_experts"),
                           experts=experts)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable.values():  # B starts at zero: give every update something to say
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    assert any(isinstance(m, ExpertLora) for m in ours.modules())
    assert not any(".mlp.gate." in name for name in trainable)  # the router has no adapter

    prompt = make_prompts(ours.config.vocab_size, [11], seed=5)[0]
    with torch.no_grad():
        got = ours(torch.tensor(prompt), AttentionMetadata.without_cache([len(prompt)]), None)
        base = load_model(ckpt)(torch.tensor(prompt), AttentionMetadata.without_cache([len(prompt)]), None)
    assert (got - base).abs().max() > 1e-2  # the adapter changes the logits

    adapter = save_peft_adapter(ours, tmp_path / "adapter", rank=4, alpha=8, base_model=str(ckpt))
    ref = peft.PeftModel.from_pretrained(load_reference(ckpt), str(adapter)).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
