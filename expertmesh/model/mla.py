"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of the compressed latent.

The cache holds, per token, the normalised latent `c_kv` [R] and the rotated shared RoPE key [Dr], never
per-head keys and values. Prefill expands the latent through `kv_b_proj` once per chunk; decode uses the
absorbed form: W_UK folds into the query and W_UV into the output, so attention runs in latent space and
no step ever expands the whole cache. A LoRA adapter on kv_b_proj (model/adapters.py) applies per sequence: in
prefill to the chunk's expanded context, in decode through kv_b_proj's weight merged with each slot's update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from expertmesh import kernels
from expertmesh.model.attention_metadata import AttentionMetadata
from expertmesh.model.config import ModelConfig
from expertmesh.model.int8_layers import Int8Linear
from expertmesh.model.layers import Linear, RMSNorm
from expertmesh.model.paged import (
    attend_by_sequence,
    attention_mask,
    gather_context,
    masked_softmax_attention,
    write_cache,
)
from expertmesh.model.rope import RotaryEmbedding

if TYPE_CHECKING:
    from expertmesh.model.adapters import LinearAdapters


class MLAttention(nn.Module):
    kv_b_adapters: LinearAdapters | None = None  # LoRA adapters served on kv_b_proj, applied per sequence

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        mla = config.mla
        assert mla is not None
        self.num_heads = config.num_heads
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        self.scale = config.attention_scale
        self.rotary = rotary
        hidden, heads, bias = config.hidden_size, config.num_heads, config.mla_bias
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * mla.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(mla.q_lora_rank, heads * mla.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = Linear(heads * mla.v_head_dim, hidden, bias=bias)

    def cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], ...]:
        return (num_blocks, block_size, self.kv_lora_rank), (num_blocks, block_size, self.rope_dim)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, self.num_heads, self.nope + self.rope_dim)  # [T, H, nope + rope]
        kv_a = self.kv_a_proj_with_mqa(x)  # [T, R + rope]
        cos, sin = cos_sin
        kv_b = self.kv_b_adapters if self.kv_b_adapters is not None and self.kv_b_adapters.in_use else None
        if kv_cache is not None and meta.is_decode_only and kv_b is None:  # the common serving step, fused
            kv_b_weight, kv_b_scale = self._kv_b_weight()
            out = kernels.mla_decode_step(
                q, kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin, self.rotary.interleave,
                kv_b_weight, kv_cache[0], kv_cache[1], meta.slot_mapping, meta.block_tables, meta.context_lens_t,
                self.scale, kv_b_scale,
            )  # [T, H, v]
            return self.o_proj(out.flatten(1))
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [T, R]
        q_pe = self.rotary(q_pe, cos, sin)  # [T, H, rope]
        k_pe = self.rotary(k_pe[:, None, :], cos, sin)[:, 0]  # [T, rope]
        if kv_cache is not None:
            write_cache(kv_cache[0], meta.slot_mapping, c_kv)
            write_cache(kv_cache[1], meta.slot_mapping, k_pe)

        def decode(rows, seqs):
            def absorbed(sel, kv_b_weight, kv_b_scale=None):
                return self._decode(q_nope[rows[sel]], q_pe[rows[sel]], kv_cache, meta.block_tables[seqs[sel]],
                                    meta.context_lens_t[seqs[sel]], kv_b_weight, kv_b_scale)

            if kv_b is None:
                return absorbed(slice(None), *self._kv_b_weight())
            return kv_b.by_slot(rows, self.kv_b_proj.weight, absorbed)

        def chunk(s, rows):
            if kv_cache is None:
                ctx_ckv, ctx_kpe = c_kv[rows], k_pe[rows]
            else:
                # a cache kept in another dtype (kv_cache_dtype) is read back in the activations'
                ctx_ckv = gather_context(kv_cache[0], meta.block_tables[s], meta.context_lens[s]).to(x.dtype)
                ctx_kpe = gather_context(kv_cache[1], meta.block_tables[s], meta.context_lens[s]).to(x.dtype)
            kv = self.kv_b_proj(ctx_ckv)  # [L, H * (nope + v)]
            if kv_b is not None and (slot := kv_b.slot_of(rows.start)) >= 0:
                kv = kv + kv_b.delta(ctx_ckv, slot)
            return self._prefill(q_nope[rows], q_pe[rows], kv, ctx_kpe, meta.positions[rows])

        out = attend_by_sequence(meta, x.new_empty(T, self.num_heads, self.v_dim), cached=kv_cache is not None,
                                 decode=decode, chunk=chunk)
        return self.o_proj(out.flatten(1))

    def _prefill(self, q_nope, q_pe, ctx_kv, ctx_kpe, query_pos) -> torch.Tensor:
        """Expanded form for a chunk of Tq queries against L context tokens, whose latents kv_b_proj expanded
        to ctx_kv [L, H * (nope + v)] -> [Tq, H, v]."""
        L = ctx_kv.shape[0]
        kv = ctx_kv.view(L, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [L, H, nope], [L, H, v]
        k = torch.cat((k_nope, ctx_kpe[:, None, :].expand(L, self.num_heads, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # [Tq, H, nope + rope]
        mask = attention_mask(query_pos, L)  # [Tq, L]
        o = masked_softmax_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, self.scale)
        return o.transpose(0, 1)  # [Tq, H, v]

    def _decode(self, q_nope, q_pe, kv_cache, block_tables, context_lens, kv_b_weight, kv_b_scale) -> torch.Tensor:
        """Absorbed form for B single-token queries, kv_b_weight [H * (nope + v), R] -> [B, H, v]."""
        return kernels.mla_decode_absorbed(
            q_nope, q_pe, kv_b_weight, kv_cache[0], kv_cache[1], block_tables, context_lens, self.scale, kv_b_scale
        )

    def _kv_b_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kv_b_proj as the absorbed kernels read it: (weight, None), or int8 weights and their row scales."""
        proj = self.kv_b_proj
        return (proj.qweight, proj.scale) if isinstance(proj, Int8Linear) else (proj.weight, None)
