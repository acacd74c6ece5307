"""Builds a model from a checkpoint directory without materialising random weights first."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from expertmesh.model.config import ModelConfig
from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.layers import RMSNorm
from expertmesh.model.moe import MoEBlock, Router
from expertmesh.model.rope import rope_inv_freq
from expertmesh.model.state_dict_adapter import StateDictAdapter
from expertmesh.model.weights import SafetensorsCheckpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of: float32, bfloat16, float16")
    return _DTYPES[dtype]


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", *, routed_experts: bool = True,
    activation_dtype: str | torch.dtype | None = None,
) -> MoECausalLM:
    """Loads a Hugging Face MoE checkpoint (safetensors) of any supported family, in eval mode, frozen.

    `activation_dtype` (None: `dtype`): a residual stream wider than the weights, float32 over bfloat16 or
    float16 weights, as llama.cpp runs a bf16 model. The weights stay in `dtype` (each matmul reads its input rounded
    to it, see `layers.Linear`); the norms' weights, like the gates', are kept in the activations' dtype.

    With `routed_experts=False` the MoE blocks keep only their shared experts: the gates and routed experts
    are neither read nor allocated (what an attention actor holds; the router and the expert shards own the
    rest), and each block's `backend` must be set before a forward pass.
    """
    config = ModelConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype)
    activations = check_activation_dtype(dtype, activation_dtype)
    checkpoint = SafetensorsCheckpoint(model_dir)
    with torch.device("meta"):
        model = MoECausalLM(config)
    if not routed_experts:
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.gate = None
                layer.mlp.experts = None
                layer.mlp.backend = _missing_backend
    adapter = StateDictAdapter(config, checkpoint)
    tied = config.tie_word_embeddings or "lm_head.weight" not in checkpoint
    gates = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Router)}
    norms = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if name == "lm_head.weight" and tied:
            continue
        tensor = adapter.load(name, tuple(param.shape), dtype)
        if name in gates:
            tensor = tensor.float()  # routing scores in float32: the gate is kept in it (rounded to `dtype` first)
        elif name in norms and activations != dtype:
            tensor = tensor.to(activations)  # a norm scales the residual stream's rows, in its dtype
        _set(model, name, nn.Parameter(tensor.to(device), requires_grad=False))
    for name, buf in list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):  # kept in float32, as DeepSeek does
            _set(model, name, adapter.load(name, tuple(buf.shape), torch.float32).to(device))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.inv_freq = rope_inv_freq(config.rope)[0].to(device)
    model.checkpoint = checkpoint  # keeps the mapped files alive as long as the model's views of them
    if activations != dtype:
        model.activation_dtype = activations
    return model.eval()


def check_activation_dtype(dtype: torch.dtype, activation_dtype: str | torch.dtype | None) -> torch.dtype:
    """The activations' dtype for weights in `dtype` (None: `dtype`); ValueError naming the field unless it is
    `dtype` itself or float32 over bfloat16 or float16 weights."""
    if activation_dtype is None or activation_dtype == "auto":
        return dtype
    try:
        activations = resolve_dtype(activation_dtype)
    except ValueError:
        activations = None
    if activations != dtype and (activations != torch.float32 or dtype == torch.float32):
        weights = str(dtype).removeprefix("torch.")
        raise ValueError(f"activation_dtype={activation_dtype!r} does not fit dtype={weights!r}: activations run "
                         "in the weights' dtype, or in float32 over bfloat16 or float16 weights")
    return activations


def _missing_backend(layer_idx: int, block: MoEBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    raise RuntimeError(f"layer {layer_idx}'s routed experts were not loaded and no backend was set for them")


@dataclass(frozen=True, slots=True)
class LayerGate:
    """One MoE layer's router weights: what the router actor holds."""

    weight: torch.Tensor  # [E, H] float32 (the checkpoint's values rounded to the model's dtype)
    correction_bias: torch.Tensor | None  # [E] float32


def load_gates(model_dir: str | Path, dtype: str | torch.dtype = "float32") -> tuple[ModelConfig, dict[int, LayerGate]]:
    """The gate weight (and correction bias) of every MoE layer, and nothing else of the checkpoint."""
    config = ModelConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype)
    adapter = StateDictAdapter(config, SafetensorsCheckpoint(model_dir))
    e, h = config.routing.num_experts, config.hidden_size
    gates = {}
    for layer, is_moe in enumerate(config.moe_layers):
        if not is_moe:
            continue
        prefix = f"model.layers.{layer}.mlp.gate"
        bias = None
        if config.routing.correction_bias:
            bias = adapter.load(f"{prefix}.e_score_correction_bias", (e,), torch.float32).clone()
        weight = adapter.load(f"{prefix}.weight", (e, h), dtype).float()  # as load_model keeps it
        gates[layer] = LayerGate(weight=weight, correction_bias=bias)
    return config, gates


@dataclass(frozen=True, slots=True)
class LayerExperts:
    """Some routed experts of one MoE layer, stacked in the order of `expert_ids`: float weights, or int8 ones
    with a float32 scale per output row (`kernels.quantize_int8`; weight = w * scale[..., None])."""

    expert_ids: tuple[int, ...]  # logical ids in the checkpoint
    w13: torch.Tensor  # [n, 2I, H], gate rows then up
    w2: torch.Tensor  # [n, H, I]
    w13_scale: torch.Tensor | None = None  # [n, 2I] with int8 weights
    w2_scale: torch.Tensor | None = None  # [n, H]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The stacks, in field order: (w13, w2), then (w13_scale, w2_scale) when int8. Row r of each is expert
        `expert_ids[r]`'s."""
        return (self.w13, self.w2) if self.w13_scale is None else (self.w13, self.w2, self.w13_scale, self.w2_scale)


def load_experts(
    model_dir: str | Path, experts: Iterable[tuple[int, int]], dtype: str | torch.dtype = "float32"
) -> dict[int, LayerExperts]:
    """Only the given (layer, expert) pairs' weights, per layer: what an expert shard holds. Nothing else of
    the checkpoint is read."""
    config = ModelConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype)
    by_layer: dict[int, list[int]] = {}
    for layer, expert in experts:
        if not 0 <= layer < config.num_layers or not config.moe_layers[layer]:
            raise ValueError(f"layer {layer} has no routed experts in this {config.model_type} checkpoint")
        if not 0 <= expert < config.routing.num_experts:
            raise ValueError(f"expert {expert} is out of range [0, {config.routing.num_experts})")
        by_layer.setdefault(layer, []).append(expert)
    adapter = StateDictAdapter(config, SafetensorsCheckpoint(model_dir))
    e, h, i = config.routing.num_experts, config.hidden_size, config.moe_intermediate_size
    out = {}
    for layer, ids in sorted(by_layer.items()):
        ids = sorted(set(ids))
        out[layer] = LayerExperts(
            expert_ids=tuple(ids),
            w13=adapter.load_experts(layer, "w13", ids, (e, 2 * i, h), dtype),
            w2=adapter.load_experts(layer, "w2", ids, (e, h, i), dtype),
        )
    return out


def _set(model: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(value, nn.Parameter):
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value
