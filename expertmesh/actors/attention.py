"""The attention side of the actor graph: embeddings, attention, norms, shared experts and the LM head.

`AttentionWorker` holds the model without its gates and routed experts, and the paged (MLA: latent) KV
cache of the sequences assigned to it. Its MoE blocks' backend hands each layer's hidden states to the
router over a link and returns a pending result, so the shared experts run while the routed ones do. A
step's sequences come as up to two micro-batches, run on two threads: while one waits for its routed
experts, the other computes attention (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.model import AttentionMetadata, load_model
from expertmesh.model.moe import MoEBlock


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One micro-batch's share of a step on one attention actor (what the executor sends)."""

    input_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int]  # rows of this micro-batch's tokens whose logits are returned

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class AttentionWorker:
    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", num_blocks: int, block_size: int):
        self.model = load_model(model_dir, dtype, routed_experts=False)
        self.block_size = block_size
        self.kv_caches = self.model.allocate_kv_cache(num_blocks, block_size)
        self.link = None  # set by the actor graph: GrpcRouterLink or CollectiveRouterLink
        self._context = threading.local()  # (step, micro-batch) of the forward pass on this thread
        for layer in self.model.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.backend = self._routed
        self._second = ThreadPoolExecutor(max_workers=1, thread_name_prefix="micro-batch-1")

    def _routed(self, layer_idx: int, block: MoEBlock, hidden: torch.Tensor):
        return self.link.submit(self._context.step, self._context.micro_batch, layer_idx, hidden)

    @torch.inference_mode()
    def _forward(self, step: int, index: int, mb: MicroBatch) -> torch.Tensor:
        self._context.step, self._context.micro_batch = step, index
        meta = AttentionMetadata.build(
            query_lens=mb.query_lens, context_lens=mb.context_lens, block_tables=mb.block_tables,
            block_size=self.block_size, device=torch.device("cpu"),
        )
        ids = torch.tensor(mb.input_ids, dtype=torch.int64)
        return self.model(ids, meta, self.kv_caches, torch.tensor(mb.logits_indices, dtype=torch.int64))

    def execute(self, step: int, micro_batches: list[MicroBatch | None]) -> list[torch.Tensor | None]:
        """Logits [rows, V] per micro-batch (None where this actor has none of it)."""
        if self.link is None:
            raise RuntimeError("the attention actor is not connected to a router")
        self.link.start_step(step)
        work = [(i, mb) for i, mb in enumerate(micro_batches) if mb is not None and mb.num_tokens]
        out: list[torch.Tensor | None] = [None] * len(micro_batches)
        if not work:
            return out
        others = [(i, self._second.submit(self._forward, step, i, mb)) for i, mb in work[1:]]
        try:
            i, mb = work[0]
            out[i] = self._forward(step, i, mb)
        except BaseException as e:
            self.link.fail(step, f"attention micro-batch {i} failed: {e}")  # so the other one does not wait on
            raise
        finally:
            for i, fut in others:
                try:
                    out[i] = fut.result()
                except BaseException as e:
                    self.link.fail(step, f"attention micro-batch {i} failed: {e}")
                    raise
        return out
