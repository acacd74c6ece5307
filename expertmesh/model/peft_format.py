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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertmesh.model.lora import ExpertLora, LoraLinear
from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.moe import MoEBlock

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


@dataclass(frozen=True, kw_only=True, slots=True)
class PeftAdapter:
    """A peft LoRA adapter as read from disk, its tensors named by our module paths (peft's `base_model.model.`
    prefix dropped, Qwen2-MoE's `shared_expert` spelt `shared_experts`)."""

    path: Path
    rank: int  # the config's r: every update has it (per-module ranks are refused)
    alpha: float
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])
    # MoE block path ("model.layers.3.mlp") -> {"w13" | "w2": (A [E * r, in], B [out, r * E])}, peft's fused layout
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def read_peft_adapter(adapter_dir: str | Path) -> PeftAdapter:
    """Reads a peft LoRA adapter directory. Refuses what cannot be applied exactly: another adapter type, DoRA,
    rsLoRA, per-module ranks, tensors that are not LoRA pairs."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise ValueError(f"{adapter_dir} does not exist")
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{adapter_dir} is not a peft adapter (adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise ValueError(f"{adapter_dir}: {flag} adapters are not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise ValueError(f"{adapter_dir}: per-module ranks ({pattern}) are not supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            raise ValueError(f"{adapter_dir}: adapter_config.json has no number {field!r}")
    targets = set(config.get("target_parameters") or [])
    both_experts = {"mlp.experts.down_proj", "mlp.experts.gate_up_proj"} <= targets
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(weights_path)).items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r}")
        path, which = key[len(PREFIX):-len(".weight")].rsplit(".", 1)
        pairs.setdefault(path.replace(".mlp.shared_expert.", ".mlp.shared_experts."), {})[which] = value
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{adapter_dir}: {path} has {sorted(pair)}, not both lora_A and lora_B")
        if path.endswith(".mlp.experts.base_layer") or path.endswith(".mlp.experts"):
            if both_experts:  # peft nests the wrappers: gate_up_proj's under base_layer (see the module doc)
                which = "w13" if path.endswith(".base_layer") else "w2"
            else:
                which = "w13" if "mlp.experts.gate_up_proj" in targets else "w2"
            block_path = path.removesuffix(".base_layer").removesuffix(".experts")
            experts.setdefault(block_path, {})[which] = (pair["lora_A"], pair["lora_B"])
        else:
            linears[path] = (pair["lora_A"], pair["lora_B"])
    return PeftAdapter(path=adapter_dir, rank=int(config["r"]), alpha=float(config["lora_alpha"]), linears=linears,
                       experts=experts)


def load_peft_adapter(model: MoECausalLM, adapter_dir: str | Path) -> list[str]:
    """Puts a peft LoRA adapter (made by peft on transformers' model of this checkpoint, or by us) onto
    `model`, frozen as `apply_lora` leaves it; returns the names of the modules it adapted. Refuses what
    it cannot apply exactly (see `read_peft_adapter`), tensors for modules the model does not have, or of
    the wrong shape."""
    adapter = read_peft_adapter(adapter_dir)
    adapted = [_load_linear(model, path, a, b, adapter.alpha) for path, (a, b) in adapter.linears.items()]
    for block_path, updates in adapter.experts.items():
        for which, (a, b) in sorted(updates.items()):
            adapted.append(_load_experts(model, block_path, which, a, b, adapter.alpha))
    return sorted(adapted)


def _module(model: MoECausalLM, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the adapter adapts {path}, which this model does not have") from None


def _load_linear(model: MoECausalLM, path: str, a: torch.Tensor, b: torch.Tensor, alpha: float) -> str:
    base = _module(model, path)
    if not isinstance(base, torch.nn.Linear):
        raise ValueError(f"the adapter adapts {path}, which is not a linear layer here")
    if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
        raise ValueError(f"{path}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                         f"{base.in_features} -> {base.out_features} layer")
    lora = LoraLinear(base, a.shape[0], alpha)
    with torch.no_grad():
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(b)
    parent, _, name = path.rpartition(".")
    setattr(_module(model, parent), name, lora)
    base.weight.requires_grad_(False)
    return path


def _load_experts(model: MoECausalLM, block_path: str, which: str, a: torch.Tensor, b: torch.Tensor,
                  alpha: float) -> str:
    block = _module(model, block_path)
    if not isinstance(block, MoEBlock):
        raise ValueError(f"the adapter adapts routed experts of {block_path}, which is not an MoE block here")
    experts = block.experts
    if not isinstance(experts, ExpertLora):
        num = experts.w13.shape[0]
        rank = a.shape[0] // num
        experts = block.experts = ExpertLora(experts, list(range(num)), rank, alpha)
        with torch.no_grad():
            for p in (experts.lora_w13_A, experts.lora_w13_B, experts.lora_w2_A, experts.lora_w2_B):
                p.zero_()
    base = experts.base.w13 if which == "w13" else experts.base.w2
    num, out_features, in_features = base.shape
    target_a, target_b = getattr(experts, f"lora_{which}_A"), getattr(experts, f"lora_{which}_B")
    rank = target_a.shape[1]
    if tuple(a.shape) != (num * rank, in_features) or tuple(b.shape) != (out_features, rank * num):
        raise ValueError(f"{block_path}.experts.{which}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                         f"{num} experts of {in_features} -> {out_features} at rank {rank}")
    with torch.no_grad():
        target_a.copy_(a.reshape(num, rank, in_features))
        target_b.copy_(b.reshape(out_features, rank, num).permute(2, 0, 1))
    return f"{block_path}.experts.{which}"
