import random

import pytest

from expertmesh.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from expertmesh.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=16) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
        )
    )


def add(sched: Scheduler, prompt_len: int, max_new_tokens: int = 8) -> Sequence:
    seq = Sequence(list(range(1, prompt_len + 1)))
    sched.add(seq, max_new_tokens)
    return seq


def step(sched: Scheduler, sampled_token: int = 7) -> ScheduledBatch:
    """One engine step with a constant fake model: compute, then append a token where sampled."""
    batch = sched.schedule()
    assert batch is not None
    sched.postprocess(batch)
    for seq, sample in zip(batch.seqs, batch.sample_mask):
        if sample:
            seq.append_token(sampled_token)
    return batch


def plan(batch: ScheduledBatch) -> dict[int, int]:
    return {s.seq_id: n for s, n in zip(batch.seqs, batch.num_new_tokens)}


# --- config and admission checks -------------------------------------------------------------


FIELDS = ["num_blocks", "block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"]


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_config_rejects_non_positive_ints_naming_the_field(name, bad):
    kwargs = dict(num_blocks=8, block_size=4, max_model_len=32)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=name):
        SchedulerConfig(**kwargs)


def test_config_defaults_and_block_size_need_not_be_power_of_two():
    cfg = SchedulerConfig(num_blocks=8, block_size=3, max_model_len=32)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (256, 2048)


def test_request_longer_than_max_model_len_rejected():
    sched = make(max_model_len=20)
    with pytest.raises(ValueError, match=r"12.*\b9\b.*21.*20"):
        add(sched, 12, max_new_tokens=9)
    add(sched, 12, max_new_tokens=8)  # exactly max_model_len fits


def test_request_needing_more_blocks_than_the_cache_rejected():
    sched = make(num_blocks=4, block_size=4, max_model_len=1000)
    with pytest.raises(ValueError, match=r"17 tokens need 5 KV blocks"):
        add(sched, 10, max_new_tokens=7)
    add(sched, 10, max_new_tokens=6)
    assert sched.num_waiting == 1


def test_empty_prompt_and_bad_max_new_tokens_rejected():
    sched = make()
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence([]), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.add(Sequence([1]), 0)
    assert not sched.has_unfinished()


# --- batching policy -------------------------------------------------------------------------


def test_chunked_prefill_splits_long_prompt_under_token_budget():
    sched = make(max_num_batched_tokens=4)
    seq = add(sched, 10)
    chunks, masks = [], []
    while seq.num_output_tokens == 0:
        batch = step(sched)
        chunks += batch.num_new_tokens
        masks += batch.sample_mask
    assert chunks == [4, 4, 2] and masks == [False, False, True]
    assert seq.num_computed_tokens == 10 and seq.num_uncomputed_tokens == 1
    batch = step(sched)
    assert batch.num_new_tokens == [1] and batch.sample_mask == [True]


def test_decodes_and_prefill_chunk_share_a_step_with_decodes_first():
    sched = make(max_num_batched_tokens=4)
    a = add(sched, 3)
    step(sched)  # a prefilled, now decoding
    b = add(sched, 10)
    batch = step(sched)
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 3]
    assert batch.sample_mask == [True, False]
    assert batch.num_batched_tokens == 4


def test_new_requests_join_running_ones_between_steps():
    sched = make(max_num_batched_tokens=16)
    a = add(sched, 5)
    step(sched)
    step(sched)
    b = add(sched, 6)
    batch = step(sched)
    assert plan(batch) == {a.seq_id: 1, b.seq_id: 6}
    assert sched.num_running == 2 and sched.num_waiting == 0


def test_max_num_seqs_respected():
    sched = make(max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = add(sched, 3), add(sched, 3), add(sched, 3)
    batch = step(sched)
    assert batch.seqs == [a, b] and sched.num_waiting == 1
    assert step(sched).seqs == [a, b]
    sched.finish(a, "stop")
    batch = step(sched)
    assert batch.seqs == [b, c] and plan(batch)[c.seq_id] == 3


def test_budget_exhausted_by_running_seqs_leaves_waiting_unadmitted():
    sched = make(max_num_batched_tokens=4)
    a = add(sched, 9)
    b = add(sched, 2)
    assert step(sched).seqs == [a]
    assert sched.num_waiting == 1 and b.status is SequenceStatus.WAITING


def test_schedule_returns_none_when_idle():
    assert make().schedule() is None


# --- preemption ------------------------------------------------------------------------------


def test_preempts_most_recent_seq_when_blocks_run_out_and_it_resumes_by_recompute():
    sched = make(num_blocks=3, block_size=4, max_num_batched_tokens=64)
    a = add(sched, 4, max_new_tokens=6)
    b = add(sched, 8, max_new_tokens=4)
    step(sched, sampled_token=50)  # a: 1 block, b: 2 blocks, cache full
    assert sched.block_manager.num_free_blocks == 0
    b_history = list(b.token_ids)

    c = add(sched, 1, max_new_tokens=2)  # must not be admitted in the step that preempts
    batch = step(sched, sampled_token=51)  # a's token 4 needs a second block: b goes
    assert batch.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert b.token_ids == b_history  # the generated token is kept
    assert list(sched.waiting) == [b, c]  # back at the front of the queue

    sched.finish(a, "length")
    batch = step(sched)
    assert batch.seqs == [b] and list(sched.waiting) == [c]  # b's 9 tokens fill the 3 blocks
    assert batch.num_new_tokens == [9]  # 8 prompt tokens + 1 generated, all recomputed
    assert batch.sample_mask == [True]
    assert b.num_computed_tokens == 9 and b.num_output_tokens == 2


def test_seq_that_cannot_grow_preempts_itself_when_it_is_the_latest():
    sched = make(num_blocks=2, block_size=4, max_num_batched_tokens=64)
    a = add(sched, 4, max_new_tokens=4)
    b = add(sched, 4, max_new_tokens=4)
    step(sched)  # both hold one full block and each needs a second for its decode
    batch = sched.schedule()
    assert batch.seqs == [a] and b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert a.num_preemptions == 0 and len(a.block_table) == 2


def test_no_admission_in_a_step_that_preempted_even_if_the_victim_would_fit():
    sched = make(num_blocks=3, block_size=4, max_num_batched_tokens=5)
    a = add(sched, 4, max_new_tokens=4)
    b = add(sched, 8, max_new_tokens=4)
    step(sched)  # a: 4 tokens, b: a 1-token chunk; one block each, one free
    batch = step(sched)  # a's decode takes the free block; b's next chunk cannot grow
    assert batch.seqs == [a] and b.num_preemptions == 1 and sched.block_manager.num_free_blocks == 1
    batch = step(sched)  # b returns with a chunk that fits the freed block
    assert plan(batch) == {a.seq_id: 1, b.seq_id: 4} and b.num_computed_tokens == 4


def test_preemption_reclaims_several_victims_in_admission_order():
    sched = make(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    a, b, c, d = (add(sched, 2, max_new_tokens=2) for _ in range(4))  # 1 block each
    step(sched)  # 4 blocks used; every decode needs a fresh block
    batch = sched.schedule()
    # a takes the block freed by d, b the one freed by c: both fit, c and d wait in order.
    assert batch.seqs == [a, b]
    assert list(sched.waiting) == [c, d]


# --- finish / abort --------------------------------------------------------------------------


def test_finish_and_abort_free_blocks_and_leave_queues():
    sched = make(num_blocks=8, max_num_seqs=1)
    a, b = add(sched, 5), add(sched, 5)
    step(sched)
    assert sched.block_manager.num_free_blocks == 6
    sched.finish(a, "stop")
    assert a.is_finished and a.finish_reason == "stop" and a.block_table == []
    assert sched.block_manager.num_free_blocks == 8 and sched.num_running == 0
    assert sched.abort(b.seq_id) is b and b.finish_reason == "abort"
    assert sched.abort(b.seq_id) is None
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    assert sched.schedule() is None


# --- whole engine loop with a fake model -----------------------------------------------------

VOCAB = 101


def next_token(history: list[int]) -> int:
    """Fake model: the next token depends on the whole history, so a wrong recompute shows."""
    return sum((i + 1) * t for i, t in enumerate(history)) % VOCAB


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def test_engine_loop_finishes_all_requests_correctly_under_heavy_preemption():
    rng = random.Random(0)
    cfg = SchedulerConfig(num_blocks=12, block_size=4, max_model_len=48, max_num_seqs=6, max_num_batched_tokens=10)
    sched = Scheduler(cfg)
    requests = [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 24))], rng.randint(1, 20)) for _ in range(24)]
    arrivals = {i: (0 if i < 8 else rng.randrange(60)) for i in range(len(requests))}
    seqs: dict[int, Sequence] = {}
    max_tokens: dict[int, int] = {}
    kv: dict[int, list[int]] = {}  # seq_id -> tokens whose KV the fake cache holds

    for t in range(2000):
        for i, (prompt, mt) in enumerate(requests):
            if arrivals[i] == t:
                seq = Sequence(prompt, arrival=t)
                sched.add(seq, mt)
                seqs[i], max_tokens[seq.seq_id] = seq, mt
        if len(seqs) == len(requests) and not sched.has_unfinished():
            break
        batch = sched.schedule()
        if batch is None:
            assert not sched.has_unfinished()
            continue
        assert batch.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(batch.seqs) <= cfg.max_num_seqs and all(n > 0 for n in batch.num_new_tokens)
        owned = [b for s in sched.running for b in s.block_table]
        assert len(owned) == len(set(owned)) and len(owned) + sched.block_manager.num_free_blocks == cfg.num_blocks

        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            cache = kv.setdefault(seq.seq_id, [])
            if seq.num_computed_tokens == 0:
                cache.clear()  # freed by a preemption
            assert len(cache) == seq.num_computed_tokens
            assert len(seq.block_table) * cfg.block_size >= seq.num_computed_tokens + n
            cache.extend(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n])
        sched.postprocess(batch)
        for seq, sample in zip(batch.seqs, batch.sample_mask):
            if sample:
                seq.append_token(next_token(kv[seq.seq_id]))
                if seq.num_output_tokens == max_tokens[seq.seq_id]:
                    sched.finish(seq, "length")
    else:
        pytest.fail("engine loop did not drain")

    assert sum(s.num_preemptions for s in seqs.values()) >= 5
    for i, (prompt, mt) in enumerate(requests):
        seq = seqs[i]
        assert seq.is_finished and seq.finish_reason == "length"
        assert seq.output_token_ids == expected_output(prompt, mt)
    assert sched.block_manager.num_free_blocks == cfg.num_blocks
