"""Next-token sampling: greedy, or temperature -> top-k -> top-p -> multinomial, per row.

Filtering is vectorised over the rows that sample; only seeded rows draw one at a time, each from
its own generator, so a seeded request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # Both None unless some row asked for logprobs; then per row (None where that row did not ask):
    # the sampled token's log-prob and the top-N (token_id, logprob) pairs, best first, all of the
    # model's raw distribution (log_softmax of the unmodified logits).
    sampled_logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax [S] int64: the first of equal maxima, a NaN counting as the largest (torch's rule).
    On the CPU through numpy, whose argmax of a 32000-entry row takes 2 us against torch's ~40."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0:
        return torch.from_numpy(logits.contiguous().numpy().argmax(-1).astype("int64", copy=False))
    return logits.argmax(dim=-1)


def filtered_probs(
    logits: torch.Tensor,  # [R, V]
    temperature: torch.Tensor,  # [R]
    top_k: torch.Tensor,  # [R] int64, <= 0 disables
    top_p: torch.Tensor,  # [R]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k and top-p, in descending-logit order.

    Returns (probs_sorted [R, V], token_ids_sorted [R, V]). The sort is stable so that, among equal
    logits, the lowest token id ranks first, as with torch.argmax.
    """
    vocab = logits.shape[-1]
    logits_sorted, ids_sorted = torch.sort(logits, dim=-1, descending=True, stable=True)  # [R, V]
    logits_sorted = logits_sorted / temperature.unsqueeze(-1)
    rank = torch.arange(vocab, device=logits.device)  # [V]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)  # [R]
    logits_sorted = logits_sorted.masked_fill(rank >= k.unsqueeze(-1), float("-inf"))
    probs_sorted = torch.softmax(logits_sorted, dim=-1)  # [R, V]
    # Keep a token while the mass ranked above it is still short of top_p: the smallest prefix whose
    # mass reaches top_p. The top token has zero mass above it and is always kept.
    mass_above = torch.cumsum(probs_sorted, dim=-1) - probs_sorted  # [R, V]
    # the top token always stays, even for a top_p that rounds to 0 in float32
    probs_sorted = probs_sorted.masked_fill((mass_above >= top_p.unsqueeze(-1)) & (rank > 0), 0.0)
    return probs_sorted, ids_sorted


def sample(
    logits: torch.Tensor,  # [S, V]
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> SampleResult:
    num_rows = logits.shape[0]
    if not (len(params) == len(generators) == num_rows):
        raise ValueError(f"{num_rows} logit rows but {len(params)} params and {len(generators)} generators")
    logits = logits.float()
    token_ids = greedy_tokens(logits)  # [S]; final for greedy rows

    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        device = logits.device
        rows_t = torch.tensor(rows, device=device)
        probs_sorted, ids_sorted = filtered_probs(
            logits[rows_t],
            torch.tensor([params[i].temperature for i in rows], dtype=torch.float32, device=device),
            torch.tensor([min(params[i].top_k, logits.shape[-1]) for i in rows], dtype=torch.int64, device=device),
            torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=device),
        )
        picks = torch.empty(len(rows), dtype=torch.int64, device=device)  # rank within the sorted row
        unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=device)
            picks[idx] = torch.multinomial(probs_sorted[idx], 1).squeeze(-1)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                picks[j] = torch.multinomial(probs_sorted[j], 1, generator=generators[i]).squeeze(-1)
        token_ids[rows_t] = ids_sorted.gather(-1, picks.unsqueeze(-1)).squeeze(-1)

    result = SampleResult(token_ids=token_ids.tolist())
    if any(p.logprobs is not None for p in params):
        _add_logprobs(result, logits, token_ids, params)
    return result


def _add_logprobs(
    result: SampleResult, logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> None:
    logprobs = torch.log_softmax(logits, dim=-1)  # [S, V]
    sampled = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).tolist()  # [S]
    max_n = max(p.logprobs or 0 for p in params)
    top_values, top_ids = logprobs.topk(max_n, dim=-1)  # [S, max_n]
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    result.sampled_logprobs = []
    result.top_logprobs = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            result.sampled_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.sampled_logprobs.append(sampled[i])
            result.top_logprobs.append(list(zip(top_ids[i][: p.logprobs], top_values[i][: p.logprobs])))

