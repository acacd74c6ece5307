"""Maps checkpoint tensor names onto our module's parameters.

Our parameter names are the Hugging Face names with one exception: routed experts are stored stacked,
`...mlp.experts.w13` [E, 2I, H] (gate rows, then up) and `...mlp.experts.w2` [E, H, I]. A checkpoint may
hold them per expert (`experts.N.gate_proj`, Mixtral's `block_sparse_moe.experts.N.w1/w3/w2`) or fused as
transformers 5 writes them (`experts.gate_up_proj`, `experts.down_proj`).
"""

from __future__ import annotations

import re

import torch

from expertmesh.model.config import ModelConfig
from expertmesh.model.weights import SafetensorsCheckpoint

_MOE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.*)$")
# Stacked expert tensor -> (fused spellings, per-expert parts in stacking order with their spellings).
_EXPERT_NAMES = {
    "w13": (("gate_up_proj",), (("gate_proj", "w1"), ("up_proj", "w3"))),
    "w2": (("down_proj",), (("down_proj", "w2"),)),
}


class StateDictAdapter:
    def __init__(self, config: ModelConfig, checkpoint: SafetensorsCheckpoint):
        self.config = config
        self.ckpt = checkpoint

    def load(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor for our parameter `name`, checked against `shape`, in `dtype`."""
        m = _MOE.match(name)
        if m and self.config.moe_layers[int(m.group(1))]:
            layer, rest = int(m.group(1)), m.group(2)
            if rest in ("experts.w13", "experts.w2"):
                return self.load_experts(layer, rest.removeprefix("experts."), range(shape[0]), shape, dtype)
            return self._direct(self._moe_candidates(layer, rest), shape, dtype)
        return self._direct([name], shape, dtype)

    def _moe_prefixes(self, layer: int) -> list[str]:
        prefixes = [self.config.moe_prefix, "mlp"]
        return [f"model.layers.{layer}.{p}" for p in dict.fromkeys(prefixes)]

    def _moe_candidates(self, layer: int, rest: str) -> list[str]:
        alternatives = [rest]
        if rest.startswith("shared_experts."):  # Qwen2-MoE spells it in the singular
            alternatives.append("shared_expert." + rest.removeprefix("shared_experts."))
        return [f"{p}.{r}" for p in self._moe_prefixes(layer) for r in alternatives]

    def _direct(self, candidates: list[str], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        for cand in candidates:
            if cand in self.ckpt:
                return self._checked(cand, shape, dtype)
        raise ValueError(f"checkpoint is missing tensor {candidates[0]!r} (expected shape {list(shape)})")

    def _checked(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        found = self.ckpt.shape(name)
        if tuple(found) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)}")
        t = self.ckpt.tensor(name)
        if t.dtype == dtype:
            return t  # zero-copy view of the mapped file
        out = t.to(dtype)
        self.ckpt.release(name)
        return out

    def load_experts(self, layer: int, which: str, experts, full_shape: tuple[int, int, int],
                     dtype: torch.dtype) -> torch.Tensor:
        """`which` ("w13" or "w2") of the given experts of one layer, stacked in that order: [len(experts), ...].

        `full_shape` is the stacked shape of all the layer's experts. Reads only those experts' tensors (or
        rows of a fused tensor), so an expert shard never loads the rest of the model.
        """
        experts = list(experts)
        fused_names, per_expert = _EXPERT_NAMES[which]
        for prefix in self._moe_prefixes(layer):
            for fused in fused_names:
                name = f"{prefix}.experts.{fused}"
                if name in self.ckpt:
                    full = self._checked(name, full_shape, self.ckpt.tensor(name).dtype)  # zero-copy view
                    if experts == list(range(full_shape[0])) and full.dtype == dtype:
                        return full
                    out = full[experts].to(dtype)  # a copy of just these rows, in the asked dtype
                    self.ckpt.release(name)
                    return out
        _, rows, cols = full_shape
        part_rows = rows // len(per_expert)
        out = torch.empty((len(experts), rows, cols), dtype=dtype)
        for i, e in enumerate(experts):
            for part, spellings in enumerate(per_expert):
                src = self._find_expert_tensor(layer, e, spellings, (part_rows, cols))
                out[i, part * part_rows : (part + 1) * part_rows].copy_(self.ckpt.tensor(src))
                self.ckpt.release(src)  # the stacked copy replaces the mapped pages
        return out

    def _find_expert_tensor(self, layer: int, expert: int, spellings: tuple[str, ...], shape) -> str:
        candidates = [
            f"{prefix}.experts.{expert}.{s}.weight" for prefix in self._moe_prefixes(layer) for s in spellings
        ]
        for cand in candidates:
            if cand in self.ckpt:
                found = self.ckpt.shape(cand)
                if tuple(found) != tuple(shape):
                    raise ValueError(f"tensor {cand!r} has shape {list(found)}, expected {list(shape)}")
                return cand
        # Name the tensor the way this checkpoint names its other experts' tensors.
        schemes = [(p, s) for p in self._moe_prefixes(layer) for s in spellings]
        used = next((f"{p}.experts.{expert}.{s}.weight" for p, s in schemes
                     if any(f"{p}.experts.{e}.{s}.weight" in self.ckpt for e in range(expert + 2))), candidates[0])
        raise ValueError(f"checkpoint is missing tensor {used!r} (expected shape {list(shape)})")
