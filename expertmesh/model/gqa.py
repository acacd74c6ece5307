"""Grouped-query attention (Mixtral, Qwen-MoE, OLMoE) over a paged K/V cache."""

from __future__ import annotations

import torch
from torch import nn

from expertmesh import kernels
from expertmesh.model.attention_metadata import AttentionMetadata
from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import Linear, RMSNorm
from expertmesh.model.paged import (
    attend_by_sequence,
    attention_mask,
    gather_context,
    masked_softmax_attention,
    write_cache,
)
from expertmesh.model.rope import RotaryEmbedding


class GQAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.attention_scale
        self.rotary = rotary
        self.window = sliding_window
        self.clip_qkv = config.clip_qkv
        self.qk_norm = config.qk_norm
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, hidden, bias=config.o_bias)
        if config.qk_norm == "head":  # Qwen3: per head
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "full":  # OLMoE: over the whole projection
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, config.rms_norm_eps)

    def cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], ...]:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return shape, shape

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if kv_cache is not None:
            write_cache(kv_cache[0], meta.slot_mapping, k)
            write_cache(kv_cache[1], meta.slot_mapping, v)

        if kv_cache is not None and meta.is_decode_only:  # the common serving step
            out = self._decode(q, kv_cache, meta.block_tables, meta.context_lens_t)
            return self.o_proj(out.flatten(1))

        def decode(rows, seqs):
            return self._decode(q[rows], kv_cache, meta.block_tables[seqs], meta.context_lens_t[seqs])

        def chunk(s, rows):
            if kv_cache is None:
                ctx_k, ctx_v = k[rows], v[rows]
            else:
                # a cache kept in another dtype (kv_cache_dtype) is read back in the activations'
                ctx_k = gather_context(kv_cache[0], meta.block_tables[s], meta.context_lens[s]).to(q.dtype)
                ctx_v = gather_context(kv_cache[1], meta.block_tables[s], meta.context_lens[s]).to(q.dtype)
            return self._attend(q[rows], ctx_k, ctx_v, meta.positions[rows])

        out = attend_by_sequence(meta, x.new_empty(T, self.num_heads, self.head_dim), cached=kv_cache is not None,
                                 decode=decode, chunk=chunk)
        return self.o_proj(out.flatten(1))

    def _attend(self, q, ctx_k, ctx_v, query_pos) -> torch.Tensor:
        """Tq queries [Tq, H, D] against L keys [L, KVH, D] -> [Tq, H, D]."""
        L, rep = ctx_k.shape[0], self.num_heads // self.num_kv_heads
        qg = q.view(-1, self.num_kv_heads, rep, self.head_dim).permute(1, 2, 0, 3)  # [KVH, rep, Tq, D]
        k = ctx_k.transpose(0, 1)[:, None]  # [KVH, 1, L, D]
        v = ctx_v.transpose(0, 1)[:, None]
        mask = attention_mask(query_pos, L, window=self.window)  # [Tq, L]
        o = masked_softmax_attention(qg, k, v, mask, self.scale)  # [KVH, rep, Tq, D]
        return o.permute(2, 0, 1, 3).reshape(-1, self.num_heads, self.head_dim)

    def _decode(self, q, kv_cache, block_tables, ctx_lens) -> torch.Tensor:
        """B single-token queries [B, H, D] against their cached contexts -> [B, H, D]."""
        return kernels.gqa_decode(q, kv_cache[0], kv_cache[1], block_tables, ctx_lens, self.scale, self.window)
