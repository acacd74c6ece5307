"""A decode step of an MoE model in one C++ call (`kernels/csrc/decode_stack.cpp`).

At batch 1 on the `small` preset a step makes ~150 kernel calls through nn.Module calls, the kernel registry
and argument checks: ~2 ms of Python against ~2.5 ms of kernels in int8. The stack runs the same kernels on
the same tensors in the same order, so its hidden states are the modules' bit for bit
(tests/model/test_fused_decode.py), with the Python gone.

It applies to CPU inference (no autograd) under the `auto` kernel backend, on decode-only steps of up to 64
tokens and 384 routed (token, expert) pairs, where the float32 linears and the routed experts take the streaming
kernels (a bf16 linear past 8 rows takes `at::linear`, as `cpu_linear.linear` does); where every attention is
MLA (DeepSeek) or grouped-query attention (Mixtral, Qwen-MoE, OLMoE: q/k norms, clipping, sliding windows and
gated shared experts included), every MoE block runs on the local backend, no LoRA adapter is attached and every
weight is in the model's dtype (or int8, as `quantize_model` makes it). A model whose activations are wider than
its weights (float32 over bf16, `activation_dtype`) runs each matmul as its modules do: the input rounded to
bf16, float32 out. Anything else runs the modules. The stack holds the modules' own tensors, so in-place updates
show at once; a module, parameter, buffer or adapter that is replaced or attached is noticed before the next step
(`_Watch`) and the stack is built again, or given up.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
from torch import nn

from expertmesh.kernels.backend import kernel_backend
from expertmesh.kernels.cpu_ext import small_m_kernels
from expertmesh.kernels.cpu_fused_moe import SMALL_M_MAX_PAIRS
from expertmesh.kernels.cpu_linear import STREAMING_MAX_ROWS, STREAMING_MAX_ROWS_BF16, STREAMING_MIN_WEIGHT_ELEMENTS
from expertmesh.model.attention_metadata import AttentionMetadata
from expertmesh.model.gqa import GQAttention
from expertmesh.model.int8_layers import Int8Linear, Int8RoutedExperts
from expertmesh.model.layers import MLP, Linear, RMSNorm
from expertmesh.model.mla import MLAttention
from expertmesh.model.moe import MoEBlock, RoutedExperts, local_backend

KVCache = tuple[torch.Tensor, torch.Tensor]


class _Unfusable(Exception):
    """The model, as it is now, is not one the stack runs (the message says why)."""


class _Watch:
    """The objects the stack was built from, each where the model holds it: (dict, key, object) triples over
    modules' `_modules`, `_parameters`, `_buffers` and `__dict__`. Still valid while every one is in place
    (~30 us for `small`'s ~500)."""

    def __init__(self) -> None:
        self.entries: list[tuple[dict, str, Any]] = []
        self._columns: tuple[tuple, ...] | None = None  # the entries as three columns, once built

    def module(self, parent: nn.Module, name: str) -> Any:
        child = parent._modules.get(name)
        self.entries.append((parent._modules, name, child))
        return child

    def tensor(self, module: nn.Module, name: str) -> torch.Tensor | None:
        store = module._parameters if name in module._parameters else module._buffers
        t = store.get(name)
        self.entries.append((store, name, t))
        return t

    def attribute(self, module: nn.Module, name: str) -> Any:
        value = module.__dict__.get(name)
        self.entries.append((module.__dict__, name, value))
        return value

    def valid(self) -> bool:
        if self._columns is None:
            self._columns = tuple(zip(*self.entries)) or ((), (), ())
        stores, keys, values = self._columns
        return all(map(operator.is_, map(dict.get, stores, keys), values))  # no Python frame per entry


class FusedDecoder:
    """The C++ stack of one model, with what it was built from; `None` stack: the model does not fit."""

    def __init__(self, model: nn.Module):
        self.watch = _Watch()
        self.reason = ""
        self.stack = None
        try:
            self.stack = self._build(model)
        except _Unfusable as e:
            self.reason = str(e)

    def applies(self, x: torch.Tensor, kv_caches: list[KVCache]) -> bool:
        """This step (x [T, hidden], the embedded tokens) runs on the stack."""
        cache = kv_caches[0][0]
        return (
            self.stack is not None
            and x.is_cpu
            and x.dtype == self.dtype
            and x.shape[0] <= self.max_rows
            and x.shape[0] * self.top_k <= SMALL_M_MAX_PAIRS
            and (cache.dtype == self.dtype or cache.dtype == torch.bfloat16)  # a float32 model's bf16 cache too
            and cache.is_contiguous()
            and not torch.is_grad_enabled()
            and kernel_backend() == "auto"
        )

    def __call__(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        """The final-normed hidden states [T, hidden]; each MoE block's routing observer hears its decisions."""
        cos, sin = cos_sin
        hidden, routed = self.stack.forward(x, cos, sin, kv_caches, meta.slot_mapping, meta.block_tables,
                                            meta.context_lens_t)
        for block, ids in zip(self.moe_blocks, routed):
            if block.routing_observer is not None:
                block.routing_observer(block.layer_idx, ids)
        return hidden

    # Building, with every object read recorded in the watch.

    def _build(self, model: nn.Module):
        w = self.watch
        config = model.config
        kernels = small_m_kernels()
        if kernels is None:
            raise _Unfusable("the C++ CPU kernels are not built")
        decoder = w.module(model, "model")
        self.weight_dtype = w.tensor(w.module(decoder, "embed_tokens"), "weight").dtype
        self.dtype = w.attribute(model, "activation_dtype") or self.weight_dtype  # the residual stream's
        if self.weight_dtype not in (torch.float32, torch.bfloat16):
            raise _Unfusable(f"the stack runs float32 and bfloat16 models, not {self.weight_dtype}")
        self.max_rows = STREAMING_MAX_ROWS  # past it float32 linears leave the streaming kernel
        self.top_k = config.routing.top_k
        self.moe_blocks: list[MoEBlock] = []
        stack = kernels.DecodeStack(self.dtype == torch.bfloat16, self._norm(w.module(decoder, "norm"), "norm"),
                                    STREAMING_MAX_ROWS_BF16)
        layers = w.module(decoder, "layers")
        for i in range(len(layers)):
            stack.add_layer(self._layer(w.module(layers, str(i))))
        return stack

    def _layer(self, layer: nn.Module) -> dict:
        w = self.watch
        spec = {**self._norm(w.module(layer, "input_layernorm"), "input_norm"),
                **self._norm(w.module(layer, "post_attention_layernorm"), "post_norm"),
                "attn": self._attention(w.module(layer, "self_attn")), "moe": None, "mlp": None}
        block = w.module(layer, "mlp")
        if isinstance(block, MoEBlock):
            spec["moe"] = self._moe(block)
        elif isinstance(block, MLP):
            spec["mlp"] = self._mlp(block)
        else:
            raise _Unfusable(f"a feed-forward block of type {type(block).__name__}")
        return spec

    def _attention(self, attn: nn.Module) -> dict:
        w = self.watch
        if isinstance(attn, GQAttention):
            return self._gqa(attn)
        if not isinstance(attn, MLAttention):
            raise _Unfusable(f"an attention of type {type(attn).__name__}")
        if w.attribute(attn, "kv_b_adapters") is not None:
            raise _Unfusable("LoRA adapters on kv_b_proj")
        kv_b = self._linear(w.module(attn, "kv_b_proj"))  # read whole by the MLA kernel: float, or int8 and scales
        spec = {"kv_a": self._linear(w.module(attn, "kv_a_proj_with_mqa")), "o": self._linear(w.module(attn, "o_proj")),
                **self._norm(w.module(attn, "kv_a_layernorm"), "kv_a_norm"), "kv_b": self._contiguous(kv_b["weight"]),
                "kv_b_scale": kv_b.get("scale"),
                "heads": attn.num_heads, "scale": attn.scale, "interleave": attn.rotary.interleave}
        if "q_proj" in attn._modules:
            spec["q"] = self._linear(w.module(attn, "q_proj"))
        else:
            spec["q_a"] = self._linear(w.module(attn, "q_a_proj"))
            spec["q_b"] = self._linear(w.module(attn, "q_b_proj"))
            spec.update(self._norm(w.module(attn, "q_a_layernorm"), "q_a_norm"))
        return {"kind": "mla", **spec}

    def _gqa(self, attn: GQAttention) -> dict:
        w = self.watch
        spec = {"kind": "gqa", **{n: self._linear(w.module(attn, f"{n}_proj")) for n in ("q", "k", "v", "o")},
                "heads": attn.num_heads, "kv_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
                "window": w.attribute(attn, "window") or 0, "scale": attn.scale,
                "clip": w.attribute(attn, "clip_qkv"), "interleave": w.module(attn, "rotary").interleave}
        qk_norm = w.attribute(attn, "qk_norm")  # "head" (Qwen3), "full" (OLMoE) or None
        if qk_norm:
            spec.update(self._norm(w.module(attn, "q_norm"), "q_norm"))
            spec.update(self._norm(w.module(attn, "k_norm"), "k_norm"), head_norm=qk_norm == "head")
        return spec

    def _moe(self, block: MoEBlock) -> dict:
        w = self.watch
        if w.attribute(block, "backend") is not local_backend:
            raise _Unfusable("an MoE block whose experts run elsewhere")
        gate, experts = w.module(block, "gate"), w.module(block, "experts")
        routing = gate.routing
        router = w.tensor(gate, "weight")
        if router.dtype != torch.float32 or not router.is_cpu:  # load_model keeps gates in float32
            raise _Unfusable(f"a {router.dtype} gate on {router.device} (routing scores in float32)")
        spec = {"router": router, "bias": w.tensor(gate, "e_score_correction_bias"),
                "top_k": routing.top_k, "n_group": routing.n_group, "topk_group": routing.topk_group,
                "sigmoid": routing.scoring_func == "sigmoid", "top2_sum": routing.group_score == "top2_sum",
                "renormalize": routing.renormalize, "scaling": routing.scaling_factor, "shared": None}
        if w.attribute(experts, "adapters") is not None:
            raise _Unfusable("LoRA adapters on the routed experts")
        if isinstance(experts, Int8RoutedExperts):
            for name in ("w13", "w13_scale", "w2", "w2_scale"):
                spec[name] = self._contiguous(w.tensor(experts, name))
            spec["quantize_activations"] = w.attribute(experts, "quantize_activations")
        elif isinstance(experts, RoutedExperts):
            spec["w13"], spec["w2"] = (self._contiguous(self._float(w.tensor(experts, n))) for n in ("w13", "w2"))
        else:
            raise _Unfusable(f"routed experts of type {type(experts).__name__}")
        shared = w.module(block, "shared_experts")
        if shared is not None:
            spec["shared"] = self._mlp(shared)
        shared_gate = w.module(block, "shared_expert_gate")
        if shared_gate is not None:
            spec["shared_gate"] = self._linear(shared_gate)
        self.moe_blocks.append(block)
        return spec

    def _mlp(self, mlp: nn.Module) -> dict:
        return {name: self._linear(self.watch.module(mlp, f"{name}_proj")) for name in ("gate", "up", "down")}

    def _linear(self, linear: nn.Module) -> dict:
        w = self.watch
        if w.attribute(linear, "adapters") is not None:
            raise _Unfusable("LoRA adapters on a linear layer")
        if isinstance(linear, Int8Linear):
            return {"weight": self._contiguous(w.tensor(linear, "qweight")), "scale": w.tensor(linear, "scale"),
                    "bias": w.tensor(linear, "bias"), "stream": False,
                    "quantize_activations": w.attribute(linear, "quantize_activations")}
        if not isinstance(linear, Linear):
            raise _Unfusable(f"a linear layer of type {type(linear).__name__}")
        weight, bias = self._float(w.tensor(linear, "weight")), w.tensor(linear, "bias")
        if bias is not None:
            self._float(bias)
        # cpu_linear.linear's choice at these row counts: the streaming kernel, or F.linear
        stream = weight.is_contiguous() and (weight.dtype == torch.bfloat16
                                             or weight.numel() >= STREAMING_MIN_WEIGHT_ELEMENTS)
        return {"weight": weight, "bias": bias, "stream": stream}

    def _norm(self, norm: nn.Module, key: str) -> dict:
        if not isinstance(norm, RMSNorm):
            raise _Unfusable(f"a norm of type {type(norm).__name__}")
        weight = self._float(self.watch.tensor(norm, "weight"), self.dtype)  # scales the residual stream's rows
        return {key: self._contiguous(weight), f"{key}_eps": norm.eps}

    def _float(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`t`, which must be a CPU tensor in `dtype` (default: the weights')."""
        dtype = dtype or self.weight_dtype
        if t.dtype != dtype or not t.is_cpu:
            raise _Unfusable(f"a {t.dtype} tensor on {t.device} where the stack runs {dtype} on the CPU")
        return t

    @staticmethod
    def _contiguous(t: torch.Tensor) -> torch.Tensor:
        if not t.is_contiguous():
            raise _Unfusable("a weight that is not contiguous")
        return t


_DECODERS: weakref.WeakKeyDictionary[nn.Module, FusedDecoder] = weakref.WeakKeyDictionary()


def fused_decoder(model: nn.Module) -> FusedDecoder:
    """`model`'s stack, built again when what it was built from has changed."""
    decoder = _DECODERS.get(model)
    if decoder is None or not decoder.watch.valid():
        decoder = _DECODERS[model] = FusedDecoder(model)
    return decoder
