"""`RouterCore`: the router's math, with the expert shards in this process. Routing equals the model's gate,
and route -> split over the placement -> shards -> combine equals the full model's local routed experts."""

from __future__ import annotations

import pytest
import torch

from expertmesh.transport.inprocess import InProcessDispatch
from expertmesh.actors.expert_shard import ExpertShard, ShardRequestError
from expertmesh.actors.router import RouterCore
from expertmesh.model import load_model
from expertmesh.model.moe import local_backend, route
from expertmesh.experts import PlacementTable
from tests.hf_models import build_hf_checkpoint

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

TINY_LAYERS, TINY_EXPERTS, TINY_TOP_K, TINY_HIDDEN = [1, 2, 3], 16, 4, 128
NUM_SHARDS = 3


@pytest.fixture(scope="module")
def full_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def balanced():
    return PlacementTable.balanced(TINY_LAYERS, TINY_EXPERTS, NUM_SHARDS)


def build_shards(model_dir, table: PlacementTable) -> dict[int, ExpertShard]:
    return {s: ExpertShard(model_dir, table.shard_experts(s), shard_index=s, placement_version=table.version)
            for s in range(table.num_shards)}


def hidden_states(num_tokens: int, hidden: int = TINY_HIDDEN, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed))


def local_routed(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return local_backend(layer, model.model.layers[layer].mlp, x)


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_route_equals_the_models_gate(tiny_model_dir, full_model, balanced, layer):
    core = RouterCore(tiny_model_dir, balanced)
    gate = full_model.model.layers[layer].mlp.gate
    assert torch.equal(core.gates[layer].correction_bias, gate.e_score_correction_bias)  # DeepSeek-V3's bias
    x = hidden_states(20, seed=layer)
    weights, ids = core.route(layer, x)
    want_weights, want_ids = route(x, gate.weight, gate.e_score_correction_bias, full_model.config.routing)
    assert ids.shape == (20, TINY_TOP_K) and ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    _, ids_without_bias = route(x, gate.weight, None, full_model.config.routing)
    assert not torch.equal(ids, ids_without_bias), "these inputs should show that the bias steers selection"


def test_moe_over_balanced_shards_equals_local(tiny_model_dir, full_model, balanced):
    core = RouterCore(tiny_model_dir, balanced)
    shards = build_shards(tiny_model_dir, balanced)
    assert sorted(e for s in shards.values() for e in s.experts) == sorted(balanced.replicas)  # a partition
    dispatch = InProcessDispatch(shards)
    for step, layer in enumerate(TINY_LAYERS):
        x = hidden_states(23, seed=10 + layer)
        got = core.moe(step, layer, x, dispatch)
        want = local_routed(full_model, layer, x)
        assert got.shape == want.shape and want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_split_gives_each_shard_only_its_experts(tiny_model_dir, balanced):
    core = RouterCore(tiny_model_dir, balanced)
    layer, x = 2, hidden_states(16, seed=3)
    weights, ids = core.route(layer, x)
    works = core.split(layer, x, weights, ids)
    assert [w.shard for w in works] == sorted({w.shard for w in works})
    seen = torch.zeros_like(ids, dtype=torch.int64)
    for w in works:
        mine = w.expert_ids >= 0
        assert mine.any(dim=1).all(), "a work holds only tokens with a pair on its shard"
        held = {e for lay, e in balanced.shard_experts(w.shard) if lay == layer}
        assert set(w.expert_ids[mine].tolist()) <= held
        assert torch.equal(w.hidden_states, x[w.tokens])
        assert torch.equal(w.weights[mine], weights[w.tokens][mine]) and (w.weights[~mine] == 0).all()
        seen[w.tokens] += mine.long()
    assert (seen == 1).all(), "every routed pair goes to exactly one shard"


def test_moe_with_replicas_equals_local_and_deals_hot_experts_to_both(tiny_model_dir, full_model, balanced):
    layer, x = 1, hidden_states(40, seed=5)
    core = RouterCore(tiny_model_dir, balanced)
    _, ids = core.route(layer, x)
    counts = torch.bincount(ids.reshape(-1), minlength=TINY_EXPERTS)
    hot = counts.argsort(descending=True)[:2].tolist()  # the two most-routed experts get a second replica
    table = balanced
    for e in hot:
        (home,) = table.shards_for(layer, e)
        table = table.with_replica(layer, e, (home + 1) % NUM_SHARDS)
    assert table.version == 2 and all(len(table.shards_for(layer, e)) == 2 for e in hot)
    assert all(counts[e] >= 4 for e in hot)

    core.set_placement(table)
    weights, ids = core.route(layer, x)
    works = core.split(layer, x, weights, ids)
    for e in hot:
        per_shard = {w.shard: int((w.expert_ids == e).sum()) for w in works}
        replicas = table.shards_for(layer, e)
        assert {s for s, n in per_shard.items() if n} == set(replicas), f"expert {e}: {per_shard}"
        assert abs(per_shard[replicas[0]] - per_shard[replicas[1]]) <= 1  # dealt in turn
        assert per_shard[replicas[0]] + per_shard[replicas[1]] == counts[e]

    stale = InProcessDispatch(build_shards(tiny_model_dir, balanced))  # shards still on version 0
    with pytest.raises(ShardRequestError, match=r"placement version 0 but the request was routed with version 2"):
        core.moe(0, layer, x, stale)

    shards = build_shards(tiny_model_dir, table)
    for e in hot:
        assert sum((layer, e) in s.experts for s in shards.values()) == 2
    got = core.moe(1, layer, x, InProcessDispatch(shards))
    torch.testing.assert_close(got, local_routed(full_model, layer, x), atol=1e-5, rtol=1e-5)


def test_load_counts_are_the_routed_pairs(tiny_model_dir, balanced):
    core = RouterCore(tiny_model_dir, balanced)
    dispatch = InProcessDispatch(build_shards(tiny_model_dir, balanced))
    assert core.load_counts() == {layer: [0] * TINY_EXPERTS for layer in TINY_LAYERS}
    layer, want = 3, torch.zeros(TINY_EXPERTS, dtype=torch.int64)
    for step, num_tokens in enumerate([9, 1, 14]):
        x = hidden_states(num_tokens, seed=20 + step)
        _, ids = core.route(layer, x)
        want += torch.bincount(ids.reshape(-1), minlength=TINY_EXPERTS)
        before = sum(core.load_counts()[layer])
        core.moe(step, layer, x, dispatch)
        counts = core.load_counts()
        assert sum(counts[layer]) - before == num_tokens * TINY_TOP_K
        assert counts[layer] == want.tolist()
    assert core.load_counts()[1] == [0] * TINY_EXPERTS and core.load_counts()[2] == [0] * TINY_EXPERTS
    assert len(core.round_trips) == 3 and [t for t, _, _ in core.round_trips] == [9, 1, 14]
    assert all(0 < compute <= total for _, total, compute in core.round_trips)  # in-process: the shards' math


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return build_hf_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))  # 2 MoE layers x 7 experts, top-2


def test_mixtral_checkpoint_matches_local(mixtral_dir):
    model = load_model(mixtral_dir)
    routing = model.config.routing
    assert routing.scoring_func == "softmax" and not routing.correction_bias
    layers, num_experts = [0, 1], routing.num_experts
    table = PlacementTable.balanced(layers, num_experts, 2)
    core = RouterCore(mixtral_dir, table)
    assert core.moe_layers == layers and all(core.gates[layer].correction_bias is None for layer in layers)
    dispatch = InProcessDispatch(build_shards(mixtral_dir, table))
    hidden = model.config.hidden_size
    for layer in layers:
        x = hidden_states(19, hidden=hidden, seed=30 + layer)
        gate = model.model.layers[layer].mlp.gate
        weights, ids = core.route(layer, x)
        want_weights, want_ids = route(x, gate.weight, None, routing)
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
        got = core.moe(layer, layer, x, dispatch)
        torch.testing.assert_close(got, local_routed(model, layer, x), atol=1e-5, rtol=1e-5)
    assert sum(core.load_counts()[0]) == 19 * routing.top_k


@pytest.mark.parametrize("table,needle", [
    (PlacementTable.balanced([1, 2], TINY_EXPERTS, NUM_SHARDS),
     r"placement table is for MoE layers \[1, 2\] x 16 experts; this model has \[1, 2, 3\] x 16"),
    (PlacementTable.balanced([1, 2, 3], 8, NUM_SHARDS),
     r"placement table is for MoE layers \[1, 2, 3\] x 8 experts; this model has \[1, 2, 3\] x 16"),
    (PlacementTable.balanced([0, 1, 2], TINY_EXPERTS, NUM_SHARDS), r"MoE layers \[0, 1, 2\] x 16 experts"),
], ids=["fewer-layers", "fewer-experts", "other-layers"])
def test_set_placement_refuses_a_table_for_another_model(tiny_model_dir, balanced, table, needle):
    core = RouterCore(tiny_model_dir, balanced)
    with pytest.raises(ValueError, match=needle):
        core.set_placement(table)
    assert core.placement is balanced  # the old table stays
    with pytest.raises(ValueError, match=needle):
        RouterCore(tiny_model_dir, table)


def test_window_counts_cover_the_last_steps_only(tiny_model_dir, balanced):
    core = RouterCore(tiny_model_dir, balanced, window_steps=2)
    dispatch = InProcessDispatch(build_shards(tiny_model_dir, balanced))
    per_step = []
    for step, num_tokens in enumerate([5, 3, 7]):
        x = hidden_states(num_tokens, seed=40 + step)
        _, ids = core.route(2, x)
        per_step.append(torch.bincount(ids.reshape(-1), minlength=TINY_EXPERTS))
        core.moe(step, 2, x, dispatch)
        core.finish_step()
    assert core.load_counts(window=True)[2] == (per_step[1] + per_step[2]).tolist()  # step 0 left the window
    assert core.load_counts()[2] == sum(per_step).tolist()
    assert core.load_counts(window=True)[1] == [0] * TINY_EXPERTS
