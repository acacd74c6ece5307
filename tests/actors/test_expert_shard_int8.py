"""An expert shard holding its experts as int8 (under "experts_int8", "int8" and "w8a8" alike; "w8a8" quantises
their activations too): the same per-row quantisation as local mode's `Int8RoutedExperts`, so shards partitioning
a layer sum to the local quantised layer, and the math equals torch over the dequantised weights; scales travel
with their rows when replicas move; what it cannot serve is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from expertmesh.actors.expert_shard import ExpertShard
from expertmesh.kernels import dequantize_int8, fused_moe_ref, quantize_int8
from expertmesh.model import load_model
from expertmesh.model.quantize import quantize_model
from tests.actors.test_expert_shard import HIDDEN, NUM_EXPERTS, SUBSET, random_routing, restrict

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def full_model(tiny_model_dir):
    return load_model(tiny_model_dir)


def dequantized_reference(full_model, layer: int, hidden, ids, weights, held=None) -> torch.Tensor:
    """torch's fused-MoE reference over the full layer's experts, each weight row quantised and dequantised."""
    experts = full_model.model.layers[layer].mlp.experts
    w13, w2 = dequantize_int8(*quantize_int8(experts.w13)), dequantize_int8(*quantize_int8(experts.w2))
    if held is not None:
        weights = torch.where(held, weights, 0.0)
    return fused_moe_ref(hidden, w13, w2, weights, ids)


def test_holds_int8_rows_and_scales_and_computes_the_dequantized_math(tiny_model_dir, full_model):
    shard = ExpertShard(tiny_model_dir, SUBSET, shard_index=0, quantization="experts_int8")
    for layer, held in shard.layers.items():
        q13, s13 = quantize_int8(full_model.model.layers[layer].mlp.experts.w13)
        rows = list(held.expert_ids)
        assert held.w13.dtype == torch.int8 and held.w2.dtype == torch.int8
        assert torch.equal(held.w13, q13[rows]) and torch.equal(held.w13_scale, s13[rows])
    for layer in (1, 2):
        hidden, ids, weights = random_routing(24, seed=layer)
        held, shard_ids, shard_weights = restrict(ids, weights, {e for lay, e in SUBSET if lay == layer})
        shard.check(layer, hidden, shard_ids, shard_weights, 0)
        got = shard.forward(layer, hidden, shard_ids, shard_weights)
        want = dequantized_reference(full_model, layer, hidden, ids, weights, held)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got[held.any(dim=1)].abs().sum(dim=1).min() > 0


@pytest.mark.parametrize("quantization", ["experts_int8", "int8", "w8a8"])
def test_shards_partitioning_a_layer_sum_to_local_modes_quantized_layer(tiny_model_dir, quantization):
    local = load_model(tiny_model_dir)
    quantize_model(local, quantization)
    layer = 3
    parts = [{e for e in range(NUM_EXPERTS) if e % 3 == s} for s in range(3)]
    shards = [ExpertShard(tiny_model_dir, [(layer, e) for e in sorted(p)], shard_index=s,
                          quantization=quantization) for s, p in enumerate(parts)]
    assert all(shard.quantize_activations == (quantization == "w8a8") for shard in shards)
    hidden, ids, weights = random_routing(32, seed=7)
    total = torch.zeros(32, HIDDEN)
    for shard, part in zip(shards, parts):
        _, shard_ids, shard_weights = restrict(ids, weights, part)
        total += shard.forward(layer, hidden, shard_ids, shard_weights)
    with torch.inference_mode():
        want = local.model.layers[layer].mlp.experts(hidden, weights, ids)
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)


def test_replicas_move_with_their_scales(tiny_model_dir, full_model):
    shard = ExpertShard(tiny_model_dir, [(1, 0), (1, 3), (2, 1)], shard_index=0, quantization="experts_int8")
    holding = [(1, 3), (1, 9), (2, 1)]
    shard.stage([(1, 9)], holding)
    shard.commit(1, holding)
    hidden, ids, weights = random_routing(16, seed=5)
    held, new_ids, new_weights = restrict(ids, weights, {3, 9})
    torch.testing.assert_close(shard.serve(1, hidden, new_ids, new_weights, 1),
                               dequantized_reference(full_model, 1, hidden, ids, weights, held), atol=1e-5, rtol=1e-5)
    shard.stage([(1, 0)])  # staged alone, then stacked under the lock at the commit
    shard.commit(2, [(1, 0), (1, 9)])
    held, new_ids, new_weights = restrict(ids, weights, {0, 9})
    torch.testing.assert_close(shard.serve(1, hidden, new_ids, new_weights, 2),
                               dequantized_reference(full_model, 1, hidden, ids, weights, held), atol=1e-5, rtol=1e-5)


def test_what_a_shard_cannot_hold_as_int8_is_refused_by_name(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"quantization must be one of \['int8', 'w8a8', 'experts_int8'\] or None, "
                                         r"got 'fp8'"):
        ExpertShard(tiny_model_dir, SUBSET, quantization="fp8")
    with pytest.raises(ValueError, match="max_loras with quantization='experts_int8' is not served"):
        ExpertShard(tiny_model_dir, SUBSET, quantization="experts_int8", max_loras=2)
    quantized = shutil.copytree(tiny_model_dir, tmp_path / "already_quantized")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match=r"quantization='experts_int8': the checkpoint .* is already quantised "
                                         r"\(quantization_config: fp8\)"):
        ExpertShard(quantized, SUBSET, quantization="experts_int8")
