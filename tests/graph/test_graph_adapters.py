"""LoRA adapters in the actor graph, on a two-node cluster: attention (and shared-expert) LoRA on the attention
actor, each routed expert's LoRA on the shards that hold that expert, and each token's adapter slot carried
from the step plan through the router's dispatch to the shards. Greedy tokens of a batch that mixes two
adapters and the base model equal local mode's (`LLM(enable_lora=True)`, itself checked against transformers
+ peft in tests/engine/test_offline_lora.py): on gRPC and in-process shards, across a rebalance that moves
replicas (with their adapters) between shards, and after a shard is killed mid-generation (its replacement
loads the graph's adapters as it starts). A bad adapter is refused with its reason and the graph goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh import LLM, LoRARequest, SamplingParams
from expertmesh.graph import ActorGraph
from expertmesh.platform.elastic import ElasticExperts
from tests.graph.fixtures import cluster_fixtures, generate_with, ray, token_ids
from tests.lora_adapters import make_peft_adapter, write_adapter

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(600)

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(7 + i, 7 + i + n))} for i, n in enumerate([4, 19, 8, 2, 11, 6])]

cluster, free_cluster = cluster_fixtures(2)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, LoRARequest]:
    """One adapter made by peft (attention, shared and every routed expert of every layer: work on every shard)
    and one by our writer (attention and two experts of the first MoE layer)."""
    root = tmp_path_factory.mktemp("graph-lora")
    peft_dir = make_peft_adapter(Path(tiny_model_dir), "deepseek_v3", root / "peft", rank=8, seed=1)
    ours_dir = write_adapter(tiny_model_dir, root / "ours", rank=4)
    return {"peft": LoRARequest("peft", 1, str(peft_dir)), "ours": LoRARequest("ours", 2, str(ours_dir))}


def mixed(adapters) -> list[LoRARequest | None]:
    return [adapters["peft"], adapters["ours"], None, adapters["peft"], None, adapters["ours"]]


@pytest.fixture(scope="module")
def local(tiny_model_dir, adapters) -> list[list[int]]:
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2)
    want = token_ids(llm.generate(PROMPTS, PARAMS, lora_request=mixed(adapters)))
    base = token_ids(llm.generate(PROMPTS, PARAMS))
    assert all(want[i] != base[i] for i in (0, 1, 3, 5))  # each adapter changes its prompts' tokens
    return want


def test_mixed_adapters_across_a_rebalance_and_a_killed_shard(tiny_model_dir, adapters, local):
    deployment = {"expert_shards": 2, "transport": "grpc", "expert_slots_per_shard": 10}  # 16 experts: 4 spare
    with LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, executor=ActorGraph(deployment)) as llm:
        executor = llm.llm_engine.executor
        seen = {}

        def before_step(i: int) -> None:
            if i == 3:  # replicas of hot experts load on other shards, with their adapters' updates
                seen["decision"] = ElasticExperts(executor).rebalance(force=True)
            if i == 7:
                seen["version"] = executor.placement.version
                ray.kill(executor.shards[1], no_restart=True)

        assert generate_with(llm, PROMPTS, PARAMS, before_step, mixed(adapters)) == local
        assert seen["decision"]["replicas_loaded"] > 0 and seen["version"] == 1
        assert [s["outcome"] for s in executor.placement_swaps()] == ["swapped"]
        assert any("shard 1" in r for r in executor.recoveries)
        # and again, on the replacement shard
        assert token_ids(llm.generate(PROMPTS, PARAMS, lora_request=mixed(adapters))) == local


def test_in_process_shards_and_bad_adapters(tiny_model_dir, adapters, local, tmp_path):
    deployment = {"expert_shards": 2, "transport": "inprocess"}
    with LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=8,
             executor=ActorGraph(deployment)) as llm:
        big = LoRARequest("big", 3, str(write_adapter(tiny_model_dir, tmp_path / "big", rank=16)))
        with pytest.raises(ValueError, match="rank 16 exceeds max_lora_rank=8"):
            llm.generate(PROMPTS[:1], PARAMS, lora_request=big)
        assert token_ids(llm.generate(PROMPTS, PARAMS, lora_request=mixed(adapters))) == local


def test_the_collective_transport_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="need transport grpc or inprocess"):
        LLM(str(tiny_model_dir), enable_lora=True, executor=ActorGraph({"expert_shards": 2,
                                                                        "transport": "collective"}))
