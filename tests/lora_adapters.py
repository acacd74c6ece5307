"""LoRA adapters for tests, made two ways: by peft on transformers' model of a checkpoint (the reference nobody
here wrote), and by our own writer (`apply_lora` + `save_peft_adapter`) on a few experts."""

from __future__ import annotations

from pathlib import Path

import torch

from expertmesh.model import load_model
from expertmesh.model.lora import apply_lora
from expertmesh.model.peft_format import save_peft_adapter
from tests.hf_models import load_reference


def make_peft_adapter(ckpt: Path, family: str, out: Path, *, rank: int, seed: int) -> Path:
    """An adapter made by peft on transformers' model: attention, shared experts and every routed expert, with
    random A and B (`init_lora_weights=False`), so every update changes the outputs."""
    import peft

    attention = (["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] if family == "deepseek_v3"
                 else ["q_proj", "k_proj", "v_proj", "o_proj"])
    parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if family == "deepseek_v3":
        parameters += [f"mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    if family == "qwen2_moe":
        attention.append("shared_expert_gate")
        parameters += [f"mlp.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=attention, target_parameters=parameters,
                             init_lora_weights=False)
    peft.get_peft_model(load_reference(ckpt), config).save_pretrained(out)
    return out


def write_adapter(model_dir, out: Path, *, rank: int, seed: int = 0) -> Path:
    """Our own writer's adapter: attention, and two routed experts of the first MoE layer, random A and B."""
    model = load_model(model_dir)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    trainable = apply_lora(model, rank=rank, alpha=2 * rank, targets=("attention", "routed_experts"),
                           experts={moe_layers[0]: [0, 3]})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return save_peft_adapter(model, out, rank=rank, alpha=2 * rank, base_model=str(model_dir))
