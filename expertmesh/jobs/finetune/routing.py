"""Watching the routing of forwards: a callback gets each MoE layer's routing weights and expert ids as its
gate computes them (the load the guard reads, the scores ESFT ranks experts by)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from expertmesh.model import MoECausalLM
from expertmesh.model.moe import Router


def moe_gates(model: MoECausalLM) -> dict[int, Router]:
    """{layer index: its gate} for every MoE layer."""
    return {i: layer.mlp.gate for i, layer in enumerate(model.model.layers)
            if isinstance(getattr(layer.mlp, "gate", None), Router)}


@contextmanager
def on_routing(model: MoECausalLM, callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Calls `callback(layer, topk_weights [T, K], topk_ids [T, K])` (detached) for every gate call inside."""
    handles = [gate.register_forward_hook(
        lambda _m, _i, out, layer=layer: callback(layer, out[0].detach(), out[1].detach()))
        for layer, gate in moe_gates(model).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
