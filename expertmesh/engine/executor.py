"""Executors run a scheduled batch through the model and return logits.

The engine never imports Ray: `LocalExecutor` runs the model in this process; the actor graph provides
another executor with the same `execute` method.
"""

from __future__ import annotations

import torch

from expertmesh.engine.expert_load import ExpertLoad
from expertmesh.engine.scheduler import ScheduledBatch
from expertmesh.kernels.cpu_ext import small_m_kernels
from expertmesh.model import AttentionMetadata, MoECausalLM
from expertmesh.model.moe import MoEBlock


class LocalExecutor:
    """Owns the model and its paged KV cache, and counts the tokens routed to each expert."""

    def __init__(self, model: MoECausalLM, *, num_blocks: int, block_size: int):
        self.model = model
        blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
        config = model.config
        self.load = ExpertLoad([b.layer_idx for b in blocks], config.routing.num_experts)
        for block in blocks:
            block.backend = self._counting_backend
        self.block_size = block_size
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.device = model.lm_head.weight.device
        if self.device.type == "cpu":
            small_m_kernels()  # build the C++ decode kernels now rather than during the first request

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, *, all_logits: bool = False) -> torch.Tensor:
        """Logits [N, V] float32: by default one row per sequence of `batch.sample_mask`; with `all_logits`
        one row per scheduled token."""
        input_ids, query_lens, context_lens, tables = [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
        meta = AttentionMetadata.build(
            query_lens=query_lens, context_lens=context_lens, block_tables=tables,
            block_size=self.block_size, device=self.device,
        )
        if all_logits:
            logits_indices = None
        else:
            ends = torch.tensor(query_lens).cumsum(0) - 1  # last row of each sequence
            logits_indices = ends[torch.tensor(batch.sample_mask, dtype=torch.bool)].to(self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        logits = self.model(ids, meta, self.kv_caches, logits_indices)
        self.load.finish_step()
        return logits

    def _counting_backend(self, layer_idx: int, block: MoEBlock, hidden_states: torch.Tensor) -> torch.Tensor:
        """The local backend (gate and experts in this process), counting the routing decisions."""
        topk_weights, topk_ids = block.gate(hidden_states)
        self.load.add(layer_idx, topk_ids)
        return block.experts(hidden_states, topk_weights, topk_ids)

    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        """Pairs routed to each expert per MoE layer: since the start, or over the recent window."""
        return self.load.counts(window)
