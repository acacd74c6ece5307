"""What crosses the router -> shards data plane, and the two interfaces around it.

`Dispatch` is the router's side (one implementation per transport); `ShardRuntime` is what a transport
needs of a shard: the expert math behind a request, with the shard's own checks. Transports never import
the actors: the shard actor hands its runtime to the transport's server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class ShardWork:
    """One shard's part of one MoE layer: the tokens with at least one expert on it."""

    shard: int
    tokens: torch.Tensor  # [Ts] int64 rows of the layer's hidden states
    hidden_states: torch.Tensor  # [Ts, H]
    expert_ids: torch.Tensor  # [Ts, K] int64 logical ids on this shard, -1 for slots on other shards
    weights: torch.Tensor  # [Ts, K] float32
    slots: torch.Tensor | None = None  # [Ts] int64 each token's LoRA adapter slot (-1: none); None: no adapter


class ShardRuntime(Protocol):
    shard_index: int
    hidden_size: int
    dtype: torch.dtype
    last_compute_s: float  # seconds the last `serve` spent on the expert math (its checks left out)

    def serve(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              version: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k weights[t, k] * expert(expert_ids[t, k])(hidden[t]) over this shard's slots, each pair with
        the LoRA adapter of its token's slot `slots[t]` where it adapts that expert: [T, H]. Raises ValueError
        naming what does not match (layer, shapes, dtypes, experts held, placement version, adapter slots)."""
        ...


class TrainRuntime(Protocol):
    """What the training side of the data plane needs of a shard in training mode."""

    last_compute_s: float

    def forward(self, worker: str, step: int, call: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, version: int, keep: bool) -> torch.Tensor:
        """The shard's weighted expert output [T, H] (adapters included); with `keep`, inputs kept for the
        backward. ValueError naming what does not match."""
        ...

    def backward(self, worker: str, step: int, call: int, layer: int,
                 grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient of the hidden states [T, H], of the routing weights [T, K]) of a kept forward."""
        ...


class Dispatch(Protocol):
    # the longest any shard spent on its experts in the last dispatch (0.0 where a transport cannot tell)
    last_compute_s: float

    def dispatch(self, step: int, layer: int, version: int, works: Sequence[ShardWork]) -> list[torch.Tensor]:
        """Each work's weighted expert output [Ts, H], in the order of `works`. Raises DataPlaneError (a
        PeerFault naming the shard when one stalled or answered wrongly)."""
        ...

    def close(self) -> None: ...


# The shards holding any expert of a layer, under the placement in force: transports read it at each call,
# so a placement swapped in between steps is used from the next step on.
LayerShards = Callable[[int], Sequence[int]]
