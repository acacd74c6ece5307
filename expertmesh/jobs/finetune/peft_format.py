"""Our adapters in peft's own layout (`adapter_config.json` + `adapter_model.safetensors`), so that peft loads
them onto transformers' model of the same checkpoint.

Linear layers are peft's usual `<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r]: attention's matched
by a `target_modules` regex of their exact names, the shared experts' by `target_parameters` on their weights
(peft 0.21 reads a `gate_proj`/`up_proj`/`down_proj` target module of a transformers-5 MoE model as the fused
routed experts' old names and retargets it there; a parameter target is taken as it is). Routed experts are transformers' fused 3-D parameters
(`mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], laid out as our w13 and w2), which peft
adapts through `target_parameters`: one A of [E * r, in] whose rows are expert-major, one B of [out, r * E]
whose columns are expert-minor (peft reshapes them to [E, r, in] and [out, r, E]). With both parameters of a
block targeted, peft nests its wrappers: gate_up_proj's under `experts.base_layer`, down_proj's under
`experts`. Experts without an adapter are written as zeros, which adds nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertmesh.jobs.finetune.lora import ExpertLora, LoraLinear
from expertmesh.model import MoECausalLM

PREFIX = "base_model.model."


def _full(adapter: ExpertLora, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot A [S, r, in] and B [S, out, r] as peft's fused A [E * r, in] and B [out, r * E]."""
    num_experts = adapter.slot.shape[0]
    rank, out_features = a.shape[1], b.shape[1]
    full_a = a.new_zeros(num_experts, rank, a.shape[2])
    full_b = b.new_zeros(num_experts, out_features, rank)
    full_a[adapter.chosen], full_b[adapter.chosen] = a, b
    return full_a.reshape(num_experts * rank, -1), full_b.permute(1, 2, 0).reshape(out_features, rank * num_experts)


def save_peft_adapter(model: MoECausalLM, out_dir: str | Path, *, rank: int, alpha: float,
                      base_model: str) -> Path:
    """Writes every LoRA update of `model` (see `apply_lora`) as a peft adapter directory."""
    tensors: dict[str, torch.Tensor] = {}
    linear_names: list[str] = []
    parameters: set[str] = set()
    expert_params = False
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            if ".shared_experts." in name:
                parameters.add("mlp.shared_experts." + name.rsplit(".", 1)[1] + ".weight")
            else:
                linear_names.append(name)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.detach()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.detach()
        elif isinstance(module, ExpertLora):
            expert_params = True
            up_a, up_b = _full(module, module.lora_w13_A.detach(), module.lora_w13_B.detach())
            down_a, down_b = _full(module, module.lora_w2_A.detach(), module.lora_w2_B.detach())
            tensors[f"{PREFIX}{name}.base_layer.lora_A.weight"], tensors[f"{PREFIX}{name}.base_layer.lora_B.weight"] = \
                up_a, up_b
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = down_a, down_b
    if not tensors:
        raise ValueError("the model carries no LoRA update to save")
    if expert_params:  # peft wraps every layer's experts: the layers we did not adapt get zeros
        for i, layer in enumerate(model.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            key = f"{PREFIX}model.layers.{i}.mlp.experts"
            if experts is not None and not isinstance(experts, ExpertLora):
                num_experts, two_i, hidden = experts.w13.shape
                inter = experts.w2.shape[2]
                zeros = lambda *shape: torch.zeros(*shape, dtype=experts.w13.dtype)  # noqa: E731
                tensors[f"{key}.base_layer.lora_A.weight"] = zeros(num_experts * rank, hidden)
                tensors[f"{key}.base_layer.lora_B.weight"] = zeros(two_i, rank * num_experts)
                tensors[f"{key}.lora_A.weight"] = zeros(num_experts * rank, inter)
                tensors[f"{key}.lora_B.weight"] = zeros(hidden, rank * num_experts)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": ("^(" + "|".join(re.escape(n) for n in linear_names) + ")$") if linear_names else None,
        "target_parameters": sorted(parameters | ({"mlp.experts.down_proj", "mlp.experts.gate_up_proj"}
                                                  if expert_params else set())) or None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out
