"""An expert shard loads just its (layer, expert) pairs, equal to the full model's, from either expert format."""

import pytest
import torch

from expertmesh.model import load_experts, load_model

from tests.hf_models import build_hf_checkpoint, to_fused_experts


def _check_subset(ckpt, wanted):
    full = load_model(ckpt)
    got = load_experts(ckpt, wanted)
    for layer, part in got.items():
        experts = full.model.layers[layer].mlp.experts
        idx = list(part.expert_ids)
        assert idx == sorted({e for lay, e in wanted if lay == layer})
        assert torch.equal(part.w13, experts.w13[idx]) and torch.equal(part.w2, experts.w2[idx])
    assert sorted(got) == sorted({lay for lay, _ in wanted})


def test_subset_of_a_per_expert_checkpoint(tiny_model_dir):
    _check_subset(tiny_model_dir, [(1, 3), (1, 0), (3, 15), (2, 7), (1, 3)])


def test_subset_of_a_fused_checkpoint(tmp_path):
    ckpt = build_hf_checkpoint("qwen3_moe", tmp_path / "per_expert")
    fused = to_fused_experts(ckpt, tmp_path / "fused")
    _check_subset(fused, [(0, 11), (1, 2), (1, 5)])
    # bf16 on request, from the same fused rows
    part = load_experts(fused, [(1, 5)], dtype="bfloat16")[1]
    assert part.w13.dtype == torch.bfloat16


@pytest.mark.parametrize("pair,needle", [
    ((0, 1), "layer 0 has no routed experts"),
    ((1, 16), "expert 16 is out of range"),
])
def test_pairs_the_model_does_not_have_are_refused(tiny_model_dir, pair, needle):
    with pytest.raises(ValueError, match=needle):
        load_experts(tiny_model_dir, [pair])
