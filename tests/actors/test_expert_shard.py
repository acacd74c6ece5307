"""`ExpertShard`: a subset of the routed experts, whose `forward` equals the full model's experts on the slots it
holds, and whose `check` names what does not match in a request."""

from __future__ import annotations

import re

import pytest
import torch

from expertmesh.actors.expert_shard import ExpertShard, ShardRequestError
from expertmesh.kernels import fused_moe_ref
from expertmesh.model import load_model

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

HIDDEN, NUM_EXPERTS, TOP_K = 128, 16, 4  # the tiny preset; its MoE layers are 1, 2 and 3
SUBSET = [(1, 0), (1, 3), (1, 5), (1, 10), (1, 11), (2, 1), (2, 15), (2, 7)]


@pytest.fixture(scope="module")
def full_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def shard(tiny_model_dir):
    return ExpertShard(tiny_model_dir, SUBSET, shard_index=2, placement_version=3)


def random_routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [T, H], distinct expert ids [T, K] over all experts, positive weights [T, K]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:TOP_K] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, TOP_K, generator=gen) + 0.1
    return hidden, ids, weights


def reference(full_model, layer: int, hidden, ids, weights, held: torch.Tensor | None = None) -> torch.Tensor:
    """The full layer's experts over the slots `held` marks (all slots when None): zero weight elsewhere."""
    experts = full_model.model.layers[layer].mlp.experts
    if held is not None:
        weights = torch.where(held, weights, 0.0)
    return fused_moe_ref(hidden, experts.w13, experts.w2, weights, ids)


def restrict(ids, weights, experts: set[int]):
    held = torch.isin(ids, torch.tensor(sorted(experts)))
    return held, torch.where(held, ids, -1), torch.where(held, weights, 0.0)


def test_holds_only_its_experts(shard, full_model):
    assert shard.experts == sorted(SUBSET)
    assert sorted(shard.layers) == [1, 2]
    for layer, held in shard.layers.items():
        experts = full_model.model.layers[layer].mlp.experts
        assert held.w13.shape[0] == len(held.expert_ids)
        assert torch.equal(held.w13, experts.w13[list(held.expert_ids)])
        assert torch.equal(held.w2, experts.w2[list(held.expert_ids)])


@pytest.mark.parametrize("layer", [1, 2])
def test_forward_equals_the_full_layer_on_its_slots(shard, full_model, layer):
    hidden, ids, weights = random_routing(24, seed=layer)
    mine = {e for lay, e in SUBSET if lay == layer}
    held, shard_ids, shard_weights = restrict(ids, weights, mine)
    # a token with no expert here gets a zero row
    shard_ids[0], shard_weights[0], held[0] = -1, 0.0, False
    assert held.any(dim=1).sum() >= 5, "the routing should put several tokens on this shard"

    shard.check(layer, hidden, shard_ids, shard_weights, 3)  # a well-formed request passes
    got = shard.forward(layer, hidden, shard_ids, shard_weights)

    want = reference(full_model, layer, hidden, ids, weights, held)
    assert got.shape == (24, HIDDEN) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], torch.zeros(HIDDEN))
    assert got[held.any(dim=1)].abs().sum(dim=1).min() > 0


def test_forward_with_no_slot_here_is_zero(shard):
    hidden, _, _ = random_routing(5, seed=9)
    ids = torch.full((5, TOP_K), -1)
    out = shard.forward(1, hidden, ids, torch.zeros(5, TOP_K))
    assert torch.equal(out, torch.zeros(5, HIDDEN))


def test_shards_partitioning_a_layer_sum_to_the_full_layer(tiny_model_dir, full_model):
    layer = 3
    parts = [{e for e in range(NUM_EXPERTS) if e % 3 == s} for s in range(3)]
    shards = [ExpertShard(tiny_model_dir, [(layer, e) for e in sorted(p)], shard_index=s) for s, p in enumerate(parts)]
    hidden, ids, weights = random_routing(32, seed=7)
    total = torch.zeros(32, HIDDEN)
    for shard, part in zip(shards, parts):
        _, shard_ids, shard_weights = restrict(ids, weights, part)
        shard.check(layer, hidden, shard_ids, shard_weights, 0)
        total += shard.forward(layer, hidden, shard_ids, shard_weights)
    torch.testing.assert_close(total, reference(full_model, layer, hidden, ids, weights), atol=1e-5, rtol=1e-5)


def _good_request():
    """A request shard `shard` accepts: layer 1, version 3, experts 0, 3 and -1 slots."""
    hidden = torch.randn(6, HIDDEN)
    ids = torch.tensor([[0, 3, -1, -1]] * 6)
    weights = torch.full((6, TOP_K), 0.25)
    return {"layer": 1, "hidden": hidden, "expert_ids": ids, "weights": weights, "version": 3}


@pytest.mark.parametrize("change,patterns", [
    ({"version": 4}, [r"placement version 3", r"version 4"]),
    ({"version": 0}, [r"placement version 3", r"version 0"]),
    ({"layer": 3}, [r"expert shard 2 holds no experts of layer 3", r"\[1, 2\]"]),
    ({"hidden": torch.randn(6, 64)}, [r"hidden_states must be \[T, 128\]", r"got \[6, 64\]"]),
    ({"hidden": torch.randn(6, 2, 64)}, [r"hidden_states must be \[T, 128\]", r"got \[6, 2, 64\]"]),
    ({"hidden": torch.randn(6, HIDDEN, dtype=torch.bfloat16)}, [r"must be torch.float32", r"got torch.bfloat16"]),
    ({"expert_ids": torch.tensor([[0, 7, -1, -1]] * 6)}, [r"expert shard 2 does not hold experts \[7\] of layer 1"]),
    ({"expert_ids": torch.tensor([[0, 16, -1, -1]] * 6)}, [r"expert_ids \[16\] are not experts", r"0\.\.15"]),
    ({"expert_ids": torch.tensor([[0, -2, -1, -1]] * 6)}, [r"expert_ids \[-2\] are not experts"]),
    ({"expert_ids": torch.tensor([[0, 3, -1, -1]] * 6, dtype=torch.int32)}, [r"expert_ids must be int64"]),
    ({"expert_ids": torch.tensor([[0, 3, -1, -1]] * 5)}, [r"expert_ids must be int64 \[6, K\]", r"\[5, 4\]"]),
    ({"weights": torch.full((6, 3), 0.25)}, [r"weights must be float32 \[6, 4\]", r"got torch.float32 \[6, 3\]"]),
    ({"weights": torch.full((6, TOP_K), 0.25, dtype=torch.float64)}, [r"weights must be float32", r"float64"]),
], ids=["version-newer", "version-older", "layer-not-held", "hidden-size", "hidden-rank", "dtype",
        "expert-not-held", "expert-out-of-range", "expert-below-minus-one", "ids-dtype", "ids-tokens",
        "ids-weights-shape", "weights-dtype"])
def test_check_names_the_problem(shard, change, patterns):
    request = {**_good_request(), **change}
    with pytest.raises(ShardRequestError) as info:
        shard.check(request["layer"], request["hidden"], request["expert_ids"], request["weights"], request["version"])
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_check_names_every_missing_expert(shard):
    request = _good_request()
    ids = torch.tensor([[0, 7, 9, -1]] * 6)
    with pytest.raises(ShardRequestError, match=r"does not hold experts \[7, 9\] of layer 1"):
        shard.check(1, request["hidden"], ids, request["weights"], 3)
    # an expert this shard holds in another layer is still missing in this one
    with pytest.raises(ShardRequestError, match=r"does not hold experts \[1\] of layer 1"):
        shard.check(1, request["hidden"], torch.tensor([[0, 1, -1, -1]] * 6), request["weights"], 3)


def test_stage_then_commit_changes_what_it_holds_and_its_version(tiny_model_dir, full_model):
    """New replicas are loaded by name beside the ones in use (serving on the old version meanwhile), then
    one commit swaps to the new holding and version and drops what is no longer held."""
    shard = ExpertShard(tiny_model_dir, [(1, 0), (1, 3), (2, 1)], shard_index=0, placement_version=4)
    hidden, ids, weights = random_routing(16, seed=11)
    _, old_ids, old_weights = restrict(ids, weights, {0, 3})
    before = shard.serve(1, hidden, old_ids, old_weights, 4)

    assert shard.stage([(1, 3), (1, 9), (3, 2)]) == [(1, 9), (3, 2)]  # (1, 3) is held already
    assert torch.equal(shard.serve(1, hidden, old_ids, old_weights, 4), before)  # staged, not in use
    with pytest.raises(ShardRequestError, match=r"does not hold experts \[9\]"):
        shard.check(1, hidden, *restrict(ids, weights, {9})[1:], 4)

    shard.commit(5, [(1, 3), (1, 9), (3, 2)])  # keeps (1, 3), takes the staged two, drops (1, 0) and (2, 1)
    assert shard.experts == [(1, 3), (1, 9), (3, 2)] and shard.placement_version == 5
    assert sorted(shard.layers) == [1, 3]
    held, new_ids, new_weights = restrict(ids, weights, {3, 9})
    got = shard.serve(1, hidden, new_ids, new_weights, 5)
    torch.testing.assert_close(got, reference(full_model, 1, hidden, ids, weights, held), atol=1e-5, rtol=1e-5)
    with pytest.raises(ShardRequestError, match="placement version 5 but the request was routed with version 4"):
        shard.serve(1, hidden, new_ids, new_weights, 4)


def test_commit_of_an_expert_neither_held_nor_staged_changes_nothing(tiny_model_dir):
    shard = ExpertShard(tiny_model_dir, [(1, 0)], shard_index=1, placement_version=2)
    with pytest.raises(ValueError, match=r"expert shard 1 cannot hold \[\(2, 5\)\]: neither held nor staged"):
        shard.commit(3, [(1, 0), (2, 5)])
    assert shard.experts == [(1, 0)] and shard.placement_version == 2
    shard.commit(3, [])  # drained: holds nothing, refuses every layer
    assert shard.experts == [] and shard.layers == {}


def test_a_holding_staged_whole_is_stacked_before_the_commit(tiny_model_dir, full_model):
    """Told its next holding, `stage` stacks the new layers while serving goes on; `commit` of that holding
    then installs those very tensors (no copy between two steps), and layers that do not change keep theirs."""
    shard = ExpertShard(tiny_model_dir, [(1, 0), (1, 3), (2, 1)], shard_index=0, placement_version=0)
    unchanged = shard.layers[2].w13
    holding = [(1, 3), (1, 9), (2, 1)]
    assert shard.stage([(1, 9)], holding) == [(1, 9)]
    assert shard.experts == [(1, 0), (1, 3), (2, 1)]  # still serving the old holding
    prepared = shard._prepared[1][1].w13
    shard.commit(1, holding)
    assert shard.layers[1].w13 is prepared and shard.layers[2].w13 is unchanged
    hidden, ids, weights = random_routing(16, seed=5)
    held, new_ids, new_weights = restrict(ids, weights, {3, 9})
    torch.testing.assert_close(shard.serve(1, hidden, new_ids, new_weights, 1),
                               reference(full_model, 1, hidden, ids, weights, held), atol=1e-5, rtol=1e-5)
    # a commit of another holding than the one stacked still works (stacked then, under the lock)
    shard.stage([(1, 0)], [(1, 0), (1, 3)])
    shard.commit(2, [(1, 0), (1, 3), (1, 9)])
    assert shard.experts == [(1, 0), (1, 3), (1, 9)] and 2 not in shard.layers
