"""How closely two models of the same vocabulary predict the next token, teacher-forced on the same
sequences: the share of positions whose top-1 token agrees, and the mean KL divergence KL(reference || other)
of the next-token distributions (nats). The figures llama.cpp's `llama-perplexity --kl-divergence` reports for
a quantised model against its base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertmesh.model import AttentionMetadata, MoECausalLM


@dataclass(frozen=True)
class Agreement:
    positions: int
    top1: float  # share of positions whose argmax agrees
    mean_kl: float  # nats, KL(reference || other) averaged over positions
    max_kl: float


@torch.inference_mode()
def next_token_agreement(reference: MoECausalLM, other: MoECausalLM, sequences: Sequence[Sequence[int]],
                         batch: int = 8, skip: int = 0) -> Agreement:
    """Both models over every position of `sequences` (no KV cache), `batch` sequences per forward; the first
    `skip` positions of each sequence are run but not scored (llama-perplexity scores the second half of each
    context only)."""
    agree, kls = 0, []
    for start in range(0, len(sequences), batch):
        chunk = [list(s) for s in sequences[start : start + batch]]
        ids = torch.tensor([t for s in chunk for t in s])
        meta = AttentionMetadata.without_cache([len(s) for s in chunk])
        scored = torch.tensor([i >= skip for s in chunk for i in range(len(s))])
        ref = F.log_softmax(reference(ids, meta, None).float()[scored], dim=-1)  # [T, V]
        got = F.log_softmax(other(ids, meta, None).float()[scored], dim=-1)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        kls.append((ref.exp() * (ref - got)).sum(-1))
    kl = torch.cat(kls)
    return Agreement(positions=kl.numel(), top1=agree / kl.numel(), mean_kl=float(kl.mean()), max_kl=float(kl.max()))
