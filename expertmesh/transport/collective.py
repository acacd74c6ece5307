"""The data plane over torch.distributed point-to-point messages (gloo; tensors staged on the CPU).

One process group per graph: rank 0 the router, then the attention actors, then the shards. Messages are
tagged by (layer, micro-batch, kind). A receive blocked in gloo cannot be interrupted, so the executor
restarts a collective graph as a whole when a step fails; gloo's own timeout (the data plane's deadline)
bounds every receive. gloo accepts any peer that reaches its rendezvous, so right after joining every
member proves it holds the graph's secret (`auth.proof`) and a group with a stranger in it is torn down.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import torch

from expertmesh.transport.auth import proof
from expertmesh.transport.errors import DataPlaneError
from expertmesh.transport.work import LayerShards, ShardRuntime

_TAG_KINDS = ("attn_hidden", "attn_out", "shard_header", "shard_hidden", "shard_ids", "shard_weights", "shard_out",
              "shard_time")


def tag(layer: int, micro_batch: int, kind: str) -> int:
    return (layer * 2 + micro_batch) * len(_TAG_KINDS) + _TAG_KINDS.index(kind)


def join_group(init_method: str, rank: int, world_size: int, *, secret: str, timeout_s: float) -> None:
    """Joins the graph's gloo group, then checks that every member holds the graph's secret."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    mine = torch.frombuffer(bytearray(proof(secret, rank)), dtype=torch.uint8)
    proofs = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(proofs, mine)
    strangers = [r for r, p in enumerate(proofs) if bytes(p.tolist()) != proof(secret, r)]
    if strangers:
        dist.destroy_process_group()
        raise DataPlaneError(f"ranks {strangers} of the collective group do not hold this graph's secret")


class CollectiveDispatch:
    """Router side of the router -> shards messages. `shard_ranks[s]` is shard s's rank in the group."""

    def __init__(self, shard_ranks: Mapping[int, int], layer_shards: LayerShards, hidden_size: int,
                 dtype: torch.dtype):
        self.shard_ranks = dict(shard_ranks)
        self.layer_shards = layer_shards
        self.hidden_size, self.dtype = hidden_size, dtype
        self.micro_batch = 0  # set by the router before each dispatch: part of the message tags
        self.last_compute_s = 0.0

    def dispatch(self, step, layer, version, works):
        import torch.distributed as dist

        mb = self.micro_batch
        by_shard = {w.shard: w for w in works}
        self.last_compute_s = 0.0
        sends = []  # (handle, tensor): each tensor kept alive until its send completes
        for shard in self.layer_shards(layer):  # every shard holding experts of this layer expects a header
            rank, w = self.shard_ranks[shard], by_shard.get(shard)
            if w is None:
                messages = [("shard_header", torch.tensor([0, 0, version], dtype=torch.int64))]
            else:
                num_tokens, top_k = w.expert_ids.shape
                messages = [("shard_header", torch.tensor([num_tokens, top_k, version], dtype=torch.int64)),
                            ("shard_hidden", w.hidden_states.contiguous()), ("shard_ids", w.expert_ids.contiguous()),
                            ("shard_weights", w.weights.contiguous())]
            for kind, t in messages:
                sends.append((dist.isend(t, rank, tag=tag(layer, mb, kind)), t))
        outs, compute = [], torch.zeros(1, dtype=torch.float64)
        for w in works:
            out = torch.empty(w.hidden_states.shape[0], self.hidden_size, dtype=self.dtype)
            dist.recv(out, self.shard_ranks[w.shard], tag=tag(layer, mb, "shard_out"))
            dist.recv(compute, self.shard_ranks[w.shard], tag=tag(layer, mb, "shard_time"))
            outs.append(out)
            self.last_compute_s = max(self.last_compute_s, compute.item())
        for handle, _ in sends:
            handle.wait()
        return outs

    def close(self) -> None:
        pass


def serve_collective_layer(runtime: ShardRuntime, layer: int, micro_batch: int, router_rank: int) -> None:
    """Shard side of one (layer, micro-batch): a header, then, if any token was routed here, the work;
    answers with the output. A request the shard refuses (version, layer, shapes) raises."""
    import torch.distributed as dist

    header = torch.empty(3, dtype=torch.int64)
    dist.recv(header, router_rank, tag=tag(layer, micro_batch, "shard_header"))
    num_tokens, top_k, version = header.tolist()
    hidden = torch.empty(num_tokens, runtime.hidden_size, dtype=runtime.dtype)
    ids = torch.empty(num_tokens, max(top_k, 1), dtype=torch.int64)
    weights = torch.empty(num_tokens, max(top_k, 1), dtype=torch.float32)
    if num_tokens:
        dist.recv(hidden, router_rank, tag=tag(layer, micro_batch, "shard_hidden"))
        dist.recv(ids, router_rank, tag=tag(layer, micro_batch, "shard_ids"))
        dist.recv(weights, router_rank, tag=tag(layer, micro_batch, "shard_weights"))
    out = runtime.serve(layer, hidden, ids, weights, version)  # with no token: only the checks
    if not num_tokens:
        return
    elapsed = torch.tensor([runtime.last_compute_s], dtype=torch.float64)
    dist.send(out.contiguous(), router_rank, tag=tag(layer, micro_batch, "shard_out"))
    dist.send(elapsed, router_rank, tag=tag(layer, micro_batch, "shard_time"))


class _CollectivePending:
    def __init__(self, send_handle, out: torch.Tensor, src: int, tag_: int):
        self.send_handle, self.out, self.src, self.tag = send_handle, out, src, tag_

    def wait(self) -> torch.Tensor:
        import torch.distributed as dist

        dist.recv(self.out, self.src, tag=self.tag)
        self.send_handle.wait()
        return self.out


class CollectiveRouterLink:
    """Attention side; the router is `router_rank` in the group."""

    reconnects = 0  # a broken group is rebuilt whole by the executor, never reopened from here

    def __init__(self, router_rank: int = 0):
        self.router_rank = router_rank

    def submit(self, step: int, micro_batch: int, layer: int, hidden: torch.Tensor) -> _CollectivePending:
        import torch.distributed as dist

        hidden = hidden.contiguous()
        handle = dist.isend(hidden, self.router_rank, tag=tag(layer, micro_batch, "attn_hidden"))
        return _CollectivePending(handle, torch.empty_like(hidden), self.router_rank,
                                  tag(layer, micro_batch, "attn_out"))

    def fail(self, step: int, reason: str) -> None:
        pass  # a blocked receive cannot be interrupted: the executor restarts a failed collective graph

    def start_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class CollectiveAttentionSide:
    """Router side of the attention messages; `ranks[r]` is attention actor r's rank in the group."""

    def __init__(self, ranks: Mapping[int, int], dtype: torch.dtype):
        self.ranks, self.dtype = dict(ranks), dtype
        self._sends: list = []

    def receive(self, step, micro_batch, layer, rank, num_tokens, hidden_size):
        import torch.distributed as dist

        hidden = torch.empty(num_tokens, hidden_size, dtype=self.dtype)
        dist.recv(hidden, self.ranks[rank], tag=tag(layer, micro_batch, "attn_hidden"))
        return hidden

    def reply(self, step, micro_batch, layer, rank, out):
        import torch.distributed as dist

        out = out.contiguous()  # kept alive, with its handle, until the send completes
        self._sends.append((dist.isend(out, self.ranks[rank], tag=tag(layer, micro_batch, "attn_out")), out))

    def start_step(self, step: int) -> None:
        self._sends = []

    def finish_step(self) -> None:
        for handle, _ in self._sends:
            handle.wait()
        self._sends = []

    def fail(self, step, reason, ranks) -> None:
        pass
