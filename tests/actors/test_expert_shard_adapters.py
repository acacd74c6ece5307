"""An expert shard's LoRA adapters: the experts it holds, each with the update of the adapter in the token's
slot, equal the experts with that adapter merged into their weights (W + scaling * B A, from the peft file's
tensors as peft lays them out); replicas a new holding adds take their adapter's update at the commit; bad
slots and bad adapters are refused, naming what was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from expertmesh.actors.expert_shard import ExpertShard, ShardRequestError
from expertmesh.kernels import fused_moe_ref
from expertmesh.model import load_model
from tests.lora_adapters import make_peft_adapter, write_adapter

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_threaded_torch")

LAYER, NUM_EXPERTS, TOP_K, HIDDEN = 1, 16, 4, 128  # the tiny preset
LOW, HIGH = [(LAYER, e) for e in range(8)], [(LAYER, e) for e in range(8, 16)]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(Path(tiny_model_dir), "deepseek_v3", tmp_path_factory.mktemp("shard-lora") / "a",
                             rank=8, seed=1)


@pytest.fixture(scope="module")
def weights(tiny_model_dir, adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The layer's (w13, w2): as in the checkpoint ("base"), and with the adapter merged ("merged")."""
    experts = load_model(tiny_model_dir).model.layers[LAYER].mlp.experts
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, scaling = config["r"], config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = f"base_model.model.model.layers.{LAYER}.mlp.experts"

    def delta(prefix: str) -> torch.Tensor:  # peft: A [E * r, in] expert-major rows, B [out, r * E] expert-minor
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        a = a.reshape(NUM_EXPERTS, rank, a.shape[1])
        b = b.reshape(b.shape[0], rank, NUM_EXPERTS).permute(2, 0, 1)
        return scaling * b @ a  # [E, out, in]

    return {"base": (experts.w13, experts.w2),
            "merged": (experts.w13 + delta(f"{key}.base_layer"), experts.w2 + delta(key))}


def routing(num_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:TOP_K] for _ in range(num_tokens)])
    return hidden, ids, torch.rand(num_tokens, TOP_K, generator=gen) + 0.1


def expected(weights, hidden, ids, w, slots) -> torch.Tensor:
    """Tokens of slot 1 through the merged experts, the others through the base ones."""
    base, merged = (fused_moe_ref(hidden, *weights[k], w, ids) for k in ("base", "merged"))
    return torch.where((slots == 1).unsqueeze(1), merged, base)


def on(shard: ExpertShard, hidden, ids, w, slots) -> torch.Tensor:
    """The shard's output for the slots of `ids` it holds (the router sends -1 for the others)."""
    held = torch.isin(ids, torch.tensor([e for _, e in shard.experts]))
    return shard.serve(LAYER, hidden, torch.where(held, ids, -1), torch.where(held, w, 0.0), shard.placement_version,
                       slots)


def test_shards_with_an_adapter_equal_its_merged_weights(tiny_model_dir, adapter, weights):
    low = ExpertShard(tiny_model_dir, LOW, max_loras=2, max_lora_rank=8)
    high = ExpertShard(tiny_model_dir, HIGH, max_loras=2, max_lora_rank=8, adapters={1: str(adapter)})  # at start
    assert low.load_adapter(1, str(adapter)) == 8  # peft adapts every expert: all 8 held here
    for num_tokens, seed in [(1, 0), (5, 1), (40, 2)]:  # decode sizes (the C++ path) and prefill sizes
        hidden, ids, w = routing(num_tokens, seed)
        slots = torch.tensor([1, -1, 1, 1, -1] * 8)[:num_tokens]
        got = on(low, hidden, ids, w, slots) + on(high, hidden, ids, w, slots)
        torch.testing.assert_close(got, expected(weights, hidden, ids, w, slots), rtol=1e-4, atol=1e-4)
        base = on(low, hidden, ids, w, None) + on(high, hidden, ids, w, None)  # no slots: the base experts
        torch.testing.assert_close(base, fused_moe_ref(hidden, *weights["base"], w, ids), rtol=1e-4, atol=1e-4)


def test_replicas_a_new_holding_adds_take_their_adapter(tiny_model_dir, adapter, weights):
    shard = ExpertShard(tiny_model_dir, LOW, max_loras=2, max_lora_rank=8)
    shard.load_adapter(1, str(adapter))
    shard.stage(HIGH, LOW + HIGH)  # prepared with the adapter loaded now
    shard.commit(1, LOW + HIGH)
    hidden, ids, w = routing(12, 3)
    slots = torch.tensor([1, -1] * 6)
    torch.testing.assert_close(on(shard, hidden, ids, w, slots), expected(weights, hidden, ids, w, slots),
                               rtol=1e-4, atol=1e-4)
    # an adapter loaded between stage and commit reaches the staged replicas too
    other = ExpertShard(tiny_model_dir, LOW, max_loras=2, max_lora_rank=8)
    other.stage(HIGH, LOW + HIGH)
    other.load_adapter(1, str(adapter))
    other.commit(1, LOW + HIGH)
    torch.testing.assert_close(on(other, hidden, ids, w, slots), expected(weights, hidden, ids, w, slots),
                               rtol=1e-4, atol=1e-4)
    other.clear_adapter(1)  # cleared: the base experts again, and slot 1 is refused
    with pytest.raises(ShardRequestError, match=r"has no adapter in slots \[1\]"):
        on(other, hidden, ids, w, slots)


def test_bad_slots_and_adapters_are_refused(tiny_model_dir, adapter, tmp_path):
    shard = ExpertShard(tiny_model_dir, LOW, shard_index=4, max_loras=2, max_lora_rank=8)
    hidden, ids, w = routing(3, 4)
    with pytest.raises(ShardRequestError, match=r"expert shard 4 has no adapter in slots \[0\]"):
        on(shard, hidden, ids, w, torch.tensor([0, -1, -1]))
    with pytest.raises(ShardRequestError, match=r"adapter_slots must be int64 \[3\], got torch.int64 \[2\]"):
        on(shard, hidden, ids, w, torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match=r"adapter slot 2 is outside \[0, 2\): max_loras=2"):
        shard.load_adapter(2, str(adapter))
    big = write_adapter(tiny_model_dir, tmp_path / "big", rank=16)
    with pytest.raises(ValueError, match="rank 16 exceeds max_lora_rank=8"):
        shard.load_adapter(0, str(big))
    assert shard.lora.paths == {}  # the slot is left as it was
    plain = ExpertShard(tiny_model_dir, LOW, shard_index=5)
    with pytest.raises(ShardRequestError, match=r"expert shard 5 serves no LoRA adapters.*slots \[1\]"):
        on(plain, hidden, ids, w, torch.tensor([1, 1, -1]))
    with pytest.raises(ValueError, match="serves no LoRA adapters: the graph was started without enable_lora"):
        plain.load_adapter(0, str(adapter))
