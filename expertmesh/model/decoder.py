"""The decoder-only causal LM shared by every family: embeddings, layers, final norm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.kernels.backend import pinned_backend
from expertmesh.model.attention_metadata import AttentionMetadata
from expertmesh.model.config import ModelConfig
from expertmesh.model.fused_decode import fused_decoder
from expertmesh.model.gqa import GQAttention
from expertmesh.model.layers import Linear, MLP, RMSNorm
from expertmesh.model.mla import MLAttention
from expertmesh.model.moe import MoEBlock
from expertmesh.model.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        if config.is_mla:
            self.self_attn: nn.Module = MLAttention(config, rotary)
        else:
            self.self_attn = GQAttention(config, rotary, config.sliding_windows[layer_idx])
        if config.moe_layers[layer_idx]:
            self.mlp: nn.Module = MoEBlock(config, layer_idx)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, kv_cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary = RotaryEmbedding(config.rope)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.rotary) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoECausalLM(nn.Module):
    """Flat-batch forward: T tokens of S sequences described by AttentionMetadata."""

    # Decode steps it fits run as one C++ call (model/fused_decode.py); False: always through the modules.
    fused_decode = True
    # The residual stream's dtype when it differs from the weights' (None: the weights'): float32 over bf16
    # weights is how llama.cpp runs a bf16 model: each matmul reads its input rounded to bf16 (layers.Linear).
    activation_dtype: torch.dtype | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[tuple[int, ...], ...]]:
        return [layer.self_attn.cache_shapes(num_blocks, block_size) for layer in self.model.layers]

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        embedding = self.model.embed_tokens.weight  # the model's dtype and device, whatever quantisation did
        dtype = dtype or embedding.dtype
        device = embedding.device
        return [
            tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)
            for shapes in self.cache_shapes(num_blocks, block_size)
        ]

    def hidden_states(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[KVCache] | None
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, H]
        if self.activation_dtype is not None:
            x = x.to(self.activation_dtype)
        cos_sin = self.model.rotary.cos_sin(meta.positions, x.dtype)
        if kv_caches is not None and meta.is_decode_only and self.fused_decode:
            fused = fused_decoder(self)
            if fused.applies(x, kv_caches):
                return fused(x, cos_sin, kv_caches, meta)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos_sin, kv_caches[i] if kv_caches is not None else None, meta)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None,
        logits_indices: torch.Tensor | None = None,  # rows whose logits are wanted; None: all
    ) -> torch.Tensor:
        with pinned_backend():  # the kernel backend read once for the ~150 kernel calls of a pass
            x = self.hidden_states(input_ids, meta, kv_caches)
            if logits_indices is not None:
                x = x[logits_indices]
            return self.lm_head(x).float()  # [N, V]
