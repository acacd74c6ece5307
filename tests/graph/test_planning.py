"""Pure step planning, without Ray: sequences spread over attention actors and kept there, two micro-batches of
about equal tokens, a lost cache recomputed from token 0, logits rows back in the batch's order, and the
collective transport's per-shard slots."""

from __future__ import annotations

import numpy as np

from expertmesh.engine.scheduler import ScheduledBatch
from expertmesh.engine.sequence import Sequence, SequenceStatus
from expertmesh.experts import PlacementTable
from expertmesh.graph.planning import Homes, assemble, collective_slots, plan_step, split_two


def seq(num_prompt: int, computed: int = 0, first_id: int = 0) -> Sequence:
    s = Sequence(prompt_token_ids=list(range(first_id, first_id + num_prompt)))
    s.num_computed_tokens = computed
    s.block_table = [first_id // 10, first_id // 10 + 1]
    return s


def fake_results(planned, vocab: int = 4) -> dict:
    """What the attention actors would return: row r of (rank, mb) is [rank, mb, r, ...]."""
    out = {}
    for rank, mbs in planned.inputs.items():
        out[rank] = [None if mb is None else np.array([[rank, i, r, 0] for r in range(len(mb.logits_indices))],
                                                      dtype=np.float32)
                     for i, mb in enumerate(mbs)]
    return out


def test_new_sequences_go_to_the_least_loaded_actor_and_stay_there():
    homes = Homes(2)
    a, b, c = seq(5), seq(3, first_id=10), seq(4, first_id=20)
    assert [homes.rank_of(s) for s in (a, b, c)] == [0, 1, 0]
    assert homes.rank_of(b) == 1 and homes.ranks() == {a.seq_id: 0, b.seq_id: 1, c.seq_id: 0}
    a.status = SequenceStatus.FINISHED
    homes.forget_finished()
    assert a.seq_id not in homes.ranks()
    assert homes.rank_of(seq(2, first_id=30)) == 0  # one sequence on each again: the first actor takes it


def test_one_micro_batch_carries_the_new_tokens_and_samples_the_last_row():
    homes = Homes(1)
    prefill, decode = seq(6), seq(4, computed=3, first_id=10)
    batch = ScheduledBatch([prefill, decode], [6, 1])
    planned = plan_step(batch, homes, micro_batches=1, all_logits=False)
    (mb, none) = planned.inputs[0]
    assert none is None and planned.router_plan == [{0: 7}]
    assert mb.input_ids == [0, 1, 2, 3, 4, 5, 13] and mb.query_lens == [6, 1] and mb.context_lens == [6, 4]
    assert mb.logits_indices == [5, 6]
    assert assemble(fake_results(planned), planned)[:, 2].tolist() == [0, 1]


def test_two_micro_batches_split_tokens_evenly_and_rows_come_back_in_batch_order():
    homes = Homes(2)
    seqs = [seq(8, first_id=0), seq(2, first_id=10), seq(2, first_id=20), seq(8, first_id=30), seq(1, first_id=40)]
    batch = ScheduledBatch(seqs, [len(s.prompt_token_ids) for s in seqs])
    planned = plan_step(batch, homes, micro_batches=2, all_logits=False)
    # rank 0: seqs 0, 2, 4 (8 | 2 + 1 tokens); rank 1: seqs 1, 3 (2 + 8: the first half already holds half)
    assert planned.router_plan == [{0: 8, 1: 10}, {0: 3}]
    assert planned.active_micro_batches == [0, 1]
    logits = assemble(fake_results(planned), planned)
    # each sequence's row, in batch order: (rank, micro-batch) of sequences 0..4
    assert logits[:, :2].tolist() == [[0, 0], [1, 0], [0, 1], [1, 0], [0, 1]]
    assert logits[:, 2].tolist() == [0, 0, 0, 1, 1]  # row within its micro-batch


def test_all_logits_gives_a_row_per_scheduled_token():
    homes = Homes(1)
    batch = ScheduledBatch([seq(3), seq(2, first_id=10)], [3, 2])
    planned = plan_step(batch, homes, micro_batches=1, all_logits=True)
    assert planned.inputs[0][0].logits_indices == [0, 1, 2, 3, 4]
    assert assemble(fake_results(planned), planned).shape == (5, 4)


def test_a_lost_cache_is_recomputed_from_token_zero():
    homes = Homes(2)
    kept, lost = seq(6, computed=5, first_id=0), seq(6, computed=5, first_id=10)
    homes.rank_of(kept)
    homes.rank_of(lost)  # rank 1
    homes.lose(1)
    assert homes.lost == {lost.seq_id}
    planned = plan_step(ScheduledBatch([kept, lost], [1, 1]), homes, micro_batches=1, all_logits=False)
    assert planned.inputs[0][0].input_ids == [5] and planned.inputs[0][0].query_lens == [1]
    mb = planned.inputs[1][0]
    assert mb.input_ids == list(range(10, 16)) and mb.query_lens == [6] and mb.context_lens == [6]
    assert mb.logits_indices == [5]
    homes.recomputed([lost.seq_id])
    assert homes.lost == set()


def test_split_two_keeps_order_and_halves_tokens():
    items = [(i, None, n, True) for i, n in enumerate([4, 1, 1, 4])]
    assert [[i for i, *_ in part] for part in split_two(items)] == [[0, 1], [2, 3]]
    assert split_two(items[:1]) == [items[:1]]


def test_collective_slots_cover_the_layers_a_shard_holds():
    table = PlacementTable.from_assignment([1, 3], 2, {0: [(1, 0), (1, 1), (3, 0)], 1: [(3, 1)]})
    assert collective_slots(table, 0, [0, 1]) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert collective_slots(table, 1, [0]) == [(3, 0)]
    assert collective_slots(table.drained(1), 1, [0, 1]) == []


def test_planning_needs_no_ray():
    """These tests run without a cluster: the planning module does not even import Ray."""
    import subprocess
    import sys

    probe = "import sys, expertmesh.graph.planning; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
