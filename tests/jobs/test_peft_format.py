"""Our LoRA adapters against peft's: an adapter made on our model (random, non-zero updates on the attention,
the shared experts and a few routed experts per layer) and written in peft's layout loads onto transformers'
model of the same checkpoint through peft itself, and gives our logits."""

from __future__ import annotations

import pytest
import torch

from expertmesh.model.lora import ExpertLora, apply_lora
from expertmesh.model.peft_format import save_peft_adapter
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


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_an_adapter_made_by_peft_loads_into_ours_with_peft_logits(tmp_path, family):
    from expertmesh.model.peft_format import load_peft_adapter

    ckpt = build_hf_checkpoint(family, tmp_path / family)
    attention = (["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] if family == "deepseek_v3"
                 else ["q_proj", "k_proj", "v_proj", "o_proj"])
    parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if family == "deepseek_v3":
        parameters += [f"mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=attention, target_parameters=parameters,
                             init_lora_weights=False)  # random B too: every update says something
    made = peft.get_peft_model(load_reference(ckpt), config)
    made.save_pretrained(tmp_path / "peft-adapter")
    prompt = make_prompts(made.config.vocab_size, [10], seed=7)[0]
    with torch.no_grad():
        want = made.eval()(input_ids=torch.tensor([prompt])).logits[0].float()

    ours = load_model(ckpt)
    adapted = load_peft_adapter(ours, tmp_path / "peft-adapter")
    assert any(name.endswith("experts.w13") for name in adapted) and any(name.endswith("o_proj") for name in adapted)
    with torch.no_grad():
        got = ours(torch.tensor(prompt), AttentionMetadata.without_cache([len(prompt)]), None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_an_adapter_that_does_not_fit_is_refused(tmp_path, tiny_model_dir):
    from expertmesh.model.peft_format import load_peft_adapter

    ours = load_model(tiny_model_dir)
    apply_lora(ours, rank=2, alpha=4, targets=("attention",))
    save_peft_adapter(ours, tmp_path / "a", rank=2, alpha=4, base_model=str(tiny_model_dir))
    other = load_model(tiny_model_dir)
    other.model.layers = other.model.layers[:1]  # a model without the adapter's later layers
    with pytest.raises(ValueError, match="which this model does not have"):
        load_peft_adapter(other, tmp_path / "a")
    with pytest.raises(ValueError, match="is not a peft adapter"):
        load_peft_adapter(other, tmp_path)
