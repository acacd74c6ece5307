"""Pick the Triton kernel or the torch reference for each op.

Triton runs when every input is on CUDA, triton imports, and autograd would not record the
call (the Triton kernels have no backward). CPU inference (nothing for autograd to record) takes the
serving fast paths of ``cpu_*.py``; anything else runs the torch reference. The
``EXPERTMESH_KERNELS`` environment variable overrides this: ``torch`` always takes the
reference, ``triton`` always the kernel (on a CPU, with ``TRITON_INTERPRET=1``).

The ``*_triton`` functions import their kernel module on first call, so this module imports
without triton.
"""

import functools

import torch
import torch.nn.functional as F

from .backend import BACKEND_ENV, kernel_backend
from .cpu_ext import small_m_kernels
from .cpu_fused_moe import SMALL_M_MAX_PAIRS, fused_moe_cpu
from .cpu_lora import fused_moe_lora_cpu, lora_expand_cpu, lora_shrink_cpu
from .cpu_mla_decode import mla_decode_attention_cpu
from .fused_moe import check_fused_moe_args, fused_moe_ref
from .int8_moe import check_int8_args, dequantize_int8, dequantize_used, fused_moe_int8_cpu, fused_moe_int8_ref
from .gating import check_gating_args, topk_gating_ref
from .gqa_decode import check_gqa_decode_args, gqa_decode_ref
from .lora import (check_expand_args, check_fused_moe_lora_args, check_lora_args, fused_moe_lora_ref,
                   lora_expand_ref, lora_shrink_ref)
from .mla_absorbed import mla_decode_absorbed_ref, mla_decode_step_ref
from .mla_decode import check_mla_decode_args, mla_decode_attention_ref
from .rms_norm import rms_norm_ref


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on ``tensors`` (``None`` entries ignored) should run its Triton kernel."""
    backend = kernel_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:  # a loop, not generators: this runs ~150 times a decode step
        if t is not None and (not t.is_cuda or (grad and t.requires_grad)):
            return False
    return triton_available()


# Triton implementations, imported on first use.


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from .triton.rms_norm import rms_norm_triton as impl

    return impl(x, weight, eps)


def topk_gating_triton(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.gating import topk_gating_triton as impl

    return impl(
        router_logits,
        top_k,
        scoring_func=scoring_func,
        correction_bias=correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        renormalize=renormalize,
        scaling_factor=scaling_factor,
    )


def fused_moe_triton(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    from .triton.fused_moe import fused_moe_triton as impl

    return impl(hidden_states, w13, w2, topk_weights, topk_ids)


def mla_decode_attention_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    from .triton.mla_decode import mla_decode_attention_triton as impl

    return impl(q_latent, q_rope, ckv_cache, kpe_cache, block_tables, context_lens, scale)


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    from .triton.lora import lora_shrink_triton as impl

    return impl(x, a, rows)


def lora_expand_triton(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    from .triton.lora import lora_expand_triton as impl

    return impl(y, h, b, rows)


def fused_moe_lora_triton(*args: torch.Tensor) -> torch.Tensor:
    """(hidden_states, w13, w2, topk_weights, topk_ids, lora_rows, a13, b13, a2, b2), as `fused_moe_lora`."""
    from .triton.lora import fused_moe_lora_triton as impl

    return impl(*args)


# Dispatching entry points: the signatures the model code calls.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; see ``rms_norm_ref``."""
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    ext = _fp32_cpu_kernels(x, weight)
    if ext is not None and x.shape[-1] == weight.shape[-1]:
        return ext.rms_norm_f32(x.contiguous(), weight.contiguous(), eps)
    ext = _bf16_cpu_kernels((x, weight), ())
    if ext is not None and weight.dim() == 1 and x.shape[-1] == weight.shape[0]:
        return ext.rms_norm_bf16(x.contiguous(), weight.contiguous(), eps)
    return rms_norm_ref(x, weight, eps)


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, K] fp32, ids [T, K] int64)``; see ``topk_gating_ref``."""
    ext = _fp32_cpu_kernels(router_logits, correction_bias)
    if ext is None and router_logits.dtype == torch.bfloat16 and _cpu_inference(router_logits):
        ext = small_m_kernels()  # the reference scores bf16 logits in float32 too: hand them over in float32
    if ext is not None and not use_triton(router_logits, correction_bias):
        check_gating_args(router_logits, top_k, scoring_func, correction_bias, n_group, topk_group, group_score)
        bias = correction_bias.float().contiguous() if correction_bias is not None else None
        return ext.topk_gating_f32(router_logits.float().contiguous(), top_k, scoring_func == "sigmoid", bias, n_group,
                                   topk_group, group_score == "top2_sum", renormalize, scaling_factor)
    impl = topk_gating_triton if use_triton(router_logits, correction_bias) else topk_gating_ref
    return impl(
        router_logits,
        top_k,
        scoring_func=scoring_func,
        correction_bias=correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        renormalize=renormalize,
        scaling_factor=scaling_factor,
    )


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Weighted routed-expert output ``[T, H]``; see ``fused_moe_ref``."""
    inputs = (hidden_states, w13, w2, topk_weights, topk_ids)
    if use_triton(*inputs):
        return fused_moe_triton(*inputs)
    if _cpu_inference(*inputs):
        check_fused_moe_args(*inputs)
        return fused_moe_cpu(*inputs)
    return fused_moe_ref(*inputs)


# Weights narrower than the activations (bf16 weights under float32 activations, `activation_dtype`), run as
# llama.cpp runs a bf16 GGUF: each matmul reads its input rounded to the weights' dtype, sums in float32 and keeps
# its output in float32. (Rounding the outputs too, as a bf16 model does, cost a point of top-1 agreement with
# float32 on the trained `small` checkpoint: 98.6% against 99.6%.) At decode sizes on the CPU the streaming
# kernels read the bf16 weights as stored; past them (prefill), and off the CPU kernels, the weights in play are
# widened to the activations' dtype for one float32 GEMM.
MIXED_KERNEL_MAX_ROWS = 64


def linear_mixed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float32) @ weight [N, K]^T (+ bias) with narrower weights -> [..., N] in x's dtype."""
    rounded = x.to(weight.dtype)
    rows = rounded.reshape(-1, x.shape[-1])
    if (weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and 0 < rows.shape[0] <= MIXED_KERNEL_MAX_ROWS
            and weight.is_contiguous() and _cpu_inference(x, weight)):
        kernels = small_m_kernels()
        if kernels is not None:  # bf16 against bf16, float32 sums and output
            out = kernels.linear_small_m(rows.contiguous(), weight, bias)
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(rounded.to(x.dtype), weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def fused_moe_mixed(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """`fused_moe` of float32 hidden states over narrower experts: the input rounded to the experts' dtype, the
    experts' math and the output in float32."""
    rounded = hidden_states.to(w13.dtype)
    x = rounded.to(hidden_states.dtype)
    if (w13.dtype == torch.bfloat16 and x.dtype == torch.float32
            and topk_ids.numel() <= SMALL_M_MAX_PAIRS and w13.is_contiguous() and w2.is_contiguous()
            and _cpu_inference(x, w13, w2, topk_weights, topk_ids)):
        kernels = small_m_kernels()
        if kernels is not None:
            check_fused_moe_args(rounded, w13, w2, topk_weights, topk_ids)
            return kernels.moe_small_m(x.contiguous(), w13, w2, topk_weights.float(), topk_ids)
    used, inverse = torch.unique(topk_ids, return_inverse=True)  # only the experts that received tokens, widened
    return fused_moe(x, w13[used].to(x.dtype), w2[used].to(x.dtype), topk_weights, inverse.view_as(topk_ids))


def fused_moe_int8(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    quantize_activations: bool = False,
) -> torch.Tensor:
    """Weighted routed-expert output ``[T, H]`` of int8 experts; see ``fused_moe_int8_ref``. Off the CPU, the
    experts that received tokens are dequantised and run by ``fused_moe`` on float activations."""
    inputs = (hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    if _cpu_inference(*inputs):
        check_int8_args(*inputs, quantize_activations)
        return fused_moe_int8_cpu(*inputs, quantize_activations)
    if use_triton(hidden_states, topk_weights):
        check_int8_args(*inputs)
        w13_f, w2_f, ids = dequantize_used(w13, w13_scale, w2, w2_scale, topk_ids, hidden_states.dtype)
        return fused_moe(hidden_states, w13_f, w2_f, topk_weights, ids)
    return fused_moe_int8_ref(*inputs, quantize_activations)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [T, r] = A[rows[t]] x[t], zero where rows[t] = -1; see `lora_shrink_ref`."""
    if use_triton(x, a, rows):
        return lora_shrink_triton(x, a, rows)
    if _cpu_inference(x, a, rows):
        check_lora_args(x, a, rows, side="a")
        return lora_shrink_cpu(x, a, rows)
    return lora_shrink_ref(x, a, rows)


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """y[t] += B[rows[t]] h[t] in place where rows[t] >= 0, returns y; see `lora_expand_ref`."""
    if use_triton(y, h, b, rows):
        return lora_expand_triton(y, h, b, rows)
    if _cpu_inference(y, h, b, rows):
        check_expand_args(y, h, b, rows)
        return lora_expand_cpu(y, h, b, rows)
    return lora_expand_ref(y, h, b, rows)


def fused_moe_lora(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora_rows: torch.Tensor,
    a13: torch.Tensor,
    b13: torch.Tensor,
    a2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """`fused_moe` plus LoRA on the (token, expert) pairs whose `lora_rows` entry is >= 0; see
    `fused_moe_lora_ref`."""
    inputs = (hidden_states, w13, w2, topk_weights, topk_ids, lora_rows, a13, b13, a2, b2)
    if use_triton(*inputs):
        return fused_moe_lora_triton(*inputs)
    if _cpu_inference(*inputs):
        check_fused_moe_lora_args(*inputs)
        return fused_moe_lora_cpu(*inputs)
    return fused_moe_lora_ref(*inputs)


def mla_decode_absorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_b_weight: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_b_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA decode from per-head queries to per-head values ``[B, H, v]``; see ``mla_decode_absorbed_ref``. An int8
    `kv_b_weight` comes with its row scales `kv_b_scale` [H * (nope + v)]."""
    ext = _mla_cpu_kernels(kv_b_weight, kv_b_scale, ckv_cache, kpe_cache, (block_tables, context_lens), (q_nope, q_pe))
    if ext is not None:
        return ext.mla_decode_absorbed_f32(_f32(q_nope), _f32(q_pe), kv_b_weight.contiguous(), ckv_cache, kpe_cache,
                                           block_tables, context_lens, scale, kv_b_scale).to(q_nope.dtype)
    return mla_decode_absorbed_ref(q_nope, q_pe, _float_kv_b(kv_b_weight, kv_b_scale, q_nope.dtype), ckv_cache,
                                   kpe_cache, block_tables, context_lens, scale)


def mla_decode_step(
    q: torch.Tensor,
    kv_a: torch.Tensor,
    kv_norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    kv_b_weight: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_b_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One MLA decode step after the projections, ``[B, H, v]``; see ``mla_decode_step_ref``. `kv_b_scale`: an
    int8 `kv_b_weight`'s row scales, else None."""
    ext = _mla_cpu_kernels(kv_b_weight, kv_b_scale, ckv_cache, kpe_cache, (slot_mapping, block_tables, context_lens),
                           (q, kv_a, kv_norm_weight, cos, sin))
    if ext is not None:
        return ext.mla_decode_step_f32(_f32(q), _f32(kv_a), _f32(kv_norm_weight), eps, _f32(cos), _f32(sin), interleave,
                                       kv_b_weight.contiguous(), ckv_cache, kpe_cache, slot_mapping, block_tables,
                                       context_lens, scale, kv_b_scale).to(q.dtype)
    return mla_decode_step_ref(q, kv_a, kv_norm_weight, eps, cos, sin, interleave,
                               _float_kv_b(kv_b_weight, kv_b_scale, q.dtype), ckv_cache, kpe_cache, slot_mapping,
                               block_tables, context_lens, scale)


def gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Grouped-query decode attention over the paged cache, ``[B, H, Dv]``; see ``gqa_decode_ref``. CPU inference
    over float32 or bf16 caches (both alike, contiguous) runs the compiled kernel, which reads the cache in place
    and sums in float32; the result comes back in q's dtype."""
    if (k_cache.dtype == v_cache.dtype and k_cache.dtype in _FLOAT_KINDS and q.dtype in _FLOAT_KINDS
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and _cpu_inference(q, k_cache, v_cache, block_tables, context_lens)):
        ext = small_m_kernels()
        if ext is not None:
            check_gqa_decode_args(q, k_cache, v_cache, block_tables, context_lens, window)
            return ext.gqa_decode_f32(_f32(q), k_cache, v_cache, block_tables, context_lens, scale,
                                      window or 0).to(q.dtype)
    return gqa_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale, window)


def _mla_cpu_kernels(kv_b_weight: torch.Tensor, kv_b_scale: torch.Tensor | None, ckv_cache: torch.Tensor,
                     kpe_cache: torch.Tensor, indices: tuple[torch.Tensor, ...], activations: tuple[torch.Tensor, ...]):
    """The compiled MLA kernels for CPU inference, which read what is stored as it is stored: both caches float32 or
    both bf16 (contiguous, written in place), kv_b float32, bf16, or int8 with its row scales. The few activations,
    float32 or bf16, go to them in float32 (`_f32`) and the result comes back in the activations' dtype."""
    if ckv_cache.dtype != kpe_cache.dtype or ckv_cache.dtype not in _FLOAT_KINDS:
        return None
    if not (ckv_cache.is_contiguous() and kpe_cache.is_contiguous()):
        return None
    if kv_b_scale is None and kv_b_weight.dtype not in _FLOAT_KINDS:
        return None
    if kv_b_scale is not None and (kv_b_weight.dtype != torch.int8 or kv_b_scale.dtype != torch.float32):
        return None
    for t in activations:
        if t.dtype not in _FLOAT_KINDS:
            return None
    scales = () if kv_b_scale is None else (kv_b_scale,)
    if not _cpu_inference(kv_b_weight, *scales, ckv_cache, kpe_cache, *indices, *activations):
        return None
    return small_m_kernels()


_FLOAT_KINDS = (torch.float32, torch.bfloat16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous float32 tensor: itself when it is one."""
    return t.float().contiguous()


def _float_kv_b(kv_b_weight: torch.Tensor, kv_b_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """kv_b as the references take it, in the activations' dtype: an int8 one dequantised, a bf16 one under
    float32 activations (activation_dtype) widened."""
    return kv_b_weight.to(dtype) if kv_b_scale is None else dequantize_int8(kv_b_weight, kv_b_scale, dtype)


def _fp32_cpu_kernels(*tensors: torch.Tensor | None):
    """The compiled CPU kernels (cpu_ext) when they apply: CPU inference on float32 (integer tensors pass)."""
    present = [t for t in tensors if t is not None]
    if not _cpu_inference(*present):
        return None
    for t in present:
        if t.dtype != torch.float32 and t.is_floating_point():
            return None
    return small_m_kernels()


def _bf16_cpu_kernels(stored: tuple[torch.Tensor, ...], activations: tuple[torch.Tensor, ...]):
    """The compiled CPU kernels for CPU inference whose `stored` tensors (weights, caches) are all bf16: the
    kernels read them as they are, and the caller hands them the few `activations` in float32."""
    if not _cpu_inference(*stored, *activations) or any(t.dtype != torch.bfloat16 for t in stored):
        return None
    return small_m_kernels()


def _cpu_inference(*tensors: torch.Tensor) -> bool:
    """CPU tensors with nothing for autograd to record, under the `auto` backend: the serving fast paths
    (cpu_*.py) apply. `EXPERTMESH_KERNELS=torch` keeps the plain references."""
    if kernel_backend() != "auto":
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a loop, not generators: this runs ~150 times a decode step
        if not t.is_cpu or (grad and t.requires_grad):
            return False
    return True


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """MLA decode over the paged latent cache, output ``[B, Hq, R]``; see ``mla_decode_attention_ref``."""
    tensors = (q_latent, q_rope, ckv_cache, kpe_cache, block_tables, context_lens)
    if use_triton(*tensors):
        return mla_decode_attention_triton(*tensors, scale)
    if _cpu_inference(*tensors):
        check_mla_decode_args(*tensors)
        return mla_decode_attention_cpu(*tensors, scale)
    return mla_decode_attention_ref(*tensors, scale)
