import pytest
import torch

from expertmesh.engine.sampler import filtered_probs, make_generator, sample
from expertmesh.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def rand_logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_first_max_on_ties():
    logits = rand_logits(6)
    logits[0, 3] = logits[0, 17] = logits[0].max() + 1  # tie: argmax takes 3
    out = sample(logits, [GREEDY] * 6, [None] * 6)
    assert out.token_ids == logits.argmax(-1).tolist() and out.token_ids[0] == 3
    assert out.sampled_logprobs is None and out.top_logprobs is None


def test_top_k_1_equals_greedy_even_on_ties():
    logits = rand_logits(8)
    logits[1, 5] = logits[1, 2] = logits[1].max() + 1
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    gens = [make_generator(i) if i % 2 else None for i in range(8)]
    assert sample(logits, params, gens).token_ids == logits.argmax(-1).tolist()


def test_top_k_only_draws_the_k_most_likely():
    torch.manual_seed(0)
    logits = rand_logits(1).expand(2000, -1).contiguous()
    allowed = set(logits[0].topk(3).indices.tolist())
    tokens = sample(logits, [SamplingParams(top_k=3)] * 2000, [None] * 2000).token_ids
    assert set(tokens) == allowed


def test_top_p_keeps_smallest_prefix_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    ones = torch.ones(1)
    no_k = torch.zeros(1, dtype=torch.int64)
    for top_p, expected in [(0.4, {1}), (0.41, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        kept_sorted, ids_sorted = filtered_probs(logits, ones, no_k, torch.tensor([top_p]))
        kept = {int(t) for t, p in zip(ids_sorted[0], kept_sorted[0]) if p > 0}
        assert kept == expected, top_p
        assert probs[0, sorted(kept)].sum() >= top_p - 1e-6
    # a vanishing top_p still keeps the top token
    kept_sorted, ids_sorted = filtered_probs(logits, ones, no_k, torch.tensor([1e-9]))
    assert int(ids_sorted[0, 0]) == 1 and (kept_sorted[0] > 0).sum() == 1


def test_top_p_draws_stay_in_the_nucleus_and_filters_are_per_row():
    torch.manual_seed(1)
    logits = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]).log().expand(1000, -1).contiguous()
    params = [SamplingParams(top_p=0.6), SamplingParams(top_k=2, top_p=1.0)] * 500
    tokens = sample(logits, params, [None] * 1000).token_ids
    assert set(tokens[0::2]) == {1, 3} and set(tokens[1::2]) == {1, 3}
    params = [SamplingParams(top_p=0.6), SamplingParams()] * 500
    tokens = sample(logits, params, [None] * 1000).token_ids
    assert set(tokens[0::2]) == {1, 3} and set(tokens[1::2]) == {0, 1, 2, 3, 4}


def test_seeded_rows_are_independent_of_batch_composition():
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=30, seed=1234)
    logits = rand_logits(5, seed=7)

    def run(row: int, others: list[SamplingParams]) -> list[int]:
        params = list(others)
        params.insert(row, seeded)
        gens = [make_generator(p.seed) for p in params]
        batch_logits = rand_logits(len(params), seed=99)
        draws = []
        for step in range(5):
            batch_logits[row] = logits[step]
            draws.append(sample(batch_logits, params, gens).token_ids[row])
        return draws

    alone = run(0, [])
    mixed = [SamplingParams(), GREEDY, SamplingParams(seed=5, top_k=3)]
    assert run(0, mixed) == alone
    assert run(2, mixed) == alone
    assert run(3, mixed[::-1]) == alone
    assert len(set(alone)) > 1  # it really samples


def test_empirical_distribution_matches_softmax():
    torch.manual_seed(2)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    for temperature in (1.0, 0.5):
        params = [SamplingParams(temperature=temperature)] * n
        tokens = torch.tensor(sample(base.expand(n, -1).contiguous(), params, [None] * n).token_ids)
        freq = torch.bincount(tokens, minlength=6).float() / n
        assert torch.allclose(freq, torch.softmax(base / temperature, -1), atol=0.015), temperature


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = rand_logits(4)
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(),
        SamplingParams(top_p=0.5, logprobs=20),
    ]
    out = sample(logits, params, [make_generator(0), None, None, make_generator(1)])
    ref = torch.log_softmax(logits, -1)
    assert out.top_logprobs[2] is None and out.sampled_logprobs[2] is None
    assert out.top_logprobs[1] == []
    for row in (0, 1, 3):
        assert out.sampled_logprobs[row] == pytest.approx(ref[row, out.token_ids[row]].item(), abs=1e-6)
        n = params[row].logprobs
        top = ref[row].topk(n)
        assert [t for t, _ in out.top_logprobs[row]] == top.indices.tolist()
        assert [lp for _, lp in out.top_logprobs[row]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_row_count_mismatch_is_rejected():
    logits = rand_logits(2)
    with pytest.raises(ValueError, match="2 logit rows"):
        sample(logits, [GREEDY], [None])


def test_greedy_tokens_follow_torch_argmax_on_ties_infinities_and_nans():
    from expertmesh.engine.sampler import greedy_tokens

    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (6, 50), generator=gen).float()  # many equal maxima in every row
    logits[1, :] = float("-inf")
    logits[2, 7] = float("inf")
    logits[3, 30] = float("nan")
    logits[4, [3, 9]] = float("nan")  # the first NaN wins
    with torch.inference_mode():  # the engine's logits are inference tensors
        got = greedy_tokens(logits.clone())
    want = logits.argmax(-1)
    assert got.dtype == torch.int64 and torch.equal(got, want), (got, want)
    assert greedy_tokens(logits.bfloat16()).tolist() == logits.bfloat16().argmax(-1).tolist()  # torch's own path
