"""The actor graph on a real 3-node Ray cluster (every node at 127.0.0.1), experts spread over the nodes:
greedy outputs token-identical to local mode, for each transport that runs on a CPU, for a DeepSeek-V3- and
a Mixtral-shaped checkpoint written by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import expertmesh.actors
import expertmesh.transport
from expertmesh import LLM
from expertmesh.experts import expert_health
from expertmesh.graph import ActorGraph
from tests.graph.fixtures import GREEDY, cluster_fixtures, local_tokens, node_of, token_ids
from tests.hf_models import build_hf_checkpoint, load_reference, make_prompts, reference_greedy

pytestmark = pytest.mark.timeout(600)

LENGTHS = [3, 17, 9, 30, 1]


cluster, free_cluster = cluster_fixtures(3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(dir, prompts, local-mode greedy tokens) per family; DeepSeek-V3 with 3 layers: 1 dense, 2 MoE."""
    out = {}
    torch.set_num_threads(1)
    for family, overrides in (("deepseek_v3", {"num_hidden_layers": 3}), ("mixtral", {})):
        ckpt = build_hf_checkpoint(family, tmp_path_factory.mktemp(family), **overrides)
        prompts = make_prompts(211, LENGTHS, seed=3)
        out[family] = (ckpt, [{"prompt_token_ids": p} for p in prompts], local_tokens(ckpt, [
            {"prompt_token_ids": p} for p in prompts]))
    return out


def test_local_mode_matches_transformers(checkpoints):
    """The local reference the graph is held to is itself transformers' greedy decoding."""
    for ckpt, prompts, local in checkpoints.values():
        model = load_reference(ckpt)
        want, _ = reference_greedy(model, prompts[1]["prompt_token_ids"], GREEDY.max_tokens)
        assert local[1] == want


@pytest.mark.parametrize("transport", ["grpc", "collective", "inprocess"])
@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_same_tokens_as_local_mode(cluster, checkpoints, family, transport):
    ckpt, prompts, local = checkpoints[family]
    deployment = {"attention_actors": 1, "expert_shards": 3, "transport": transport, "micro_batches": 2}
    if transport == "inprocess":  # two actors: make sure they land on two nodes
        deployment["placement_strategy"] = "STRICT_SPREAD"
    with LLM(str(ckpt), executor=ActorGraph(deployment)) as llm:
        executor = llm.llm_engine.executor
        assert token_ids(llm.generate(prompts, GREEDY)) == local
        nodes = {node_of(a) for a in [*executor.attention, executor.router, *executor.shards]}
        if transport == "inprocess":  # the shards live in the router's process, on another node
            assert executor.shards == [] and len(nodes) == 2
        else:
            assert len({node_of(s) for s in executor.shards}) >= 2  # experts spread over the nodes
            assert len(nodes) == 3  # SPREAD: the graph uses every node
        counts = executor.load_counts()
        assert sorted(counts) == executor.moe_layers and all(sum(c) > 0 for c in counts.values())
        window = executor.load_counts(window=True)  # the router's recent window: every step of this run
        assert window == counts
        health = expert_health(window, llm.llm_engine.model_config.routing.top_k)
        assert [h.layer for h in health] == executor.moe_layers
        assert all(0 < h.entropy <= 1 and 0 < h.busiest_share <= 1 for h in health)


def test_two_attention_actors_and_replicated_experts(cluster, checkpoints):
    """Sequences split over two attention actors (data-parallel attention) and an explicit placement in
    which some experts have two replicas on different shards: still the same tokens."""
    ckpt, prompts, local = checkpoints["mixtral"]
    experts = [(layer, e) for layer in (0, 1) for e in range(7)]
    placement = {0: experts[:7] + [(1, 0), (1, 1)], 1: experts[7:] + [(0, 0), (0, 3)]}
    deployment = {"attention_actors": 2, "expert_shards": 2, "transport": "grpc", "expert_placement": placement}
    with LLM(str(ckpt), executor=ActorGraph(deployment)) as llm:
        executor = llm.llm_engine.executor
        assert executor.placement.shards_for(0, 0) == (0, 1)
        assert token_ids(llm.generate(prompts, GREEDY)) == local
        # micro_batches "auto": ping-pong only where no attention actor shares a node with a shard
        shared = {node_of(a) for a in executor.attention} & {node_of(s) for s in executor.shards}
        assert executor.micro_batches == (1 if shared else 2)
        assert set(executor.homes.ranks().values()) == {0, 1}  # both actors held sequences


def test_chunked_prefill_and_teacher_forcing(cluster, checkpoints):
    """A token budget of 16 splits the long prompts into chunks mixed with other sequences' decode steps;
    teacher-forced logits (every row, incremental decode for the continuation) match local mode's. One
    micro-batch per step here (the other tests run two)."""
    ckpt, prompts, local = checkpoints["deepseek_v3"]
    ids = [p["prompt_token_ids"] for p in prompts]
    conts = [[5, 6, 7], [], [9], [11, 12], [13]]
    want = LLM(str(ckpt), max_num_batched_tokens=16).teacher_forced_logits(ids, conts)
    deployment = {"expert_shards": 2, "transport": "grpc", "micro_batches": 1}
    with LLM(str(ckpt), executor=ActorGraph(deployment), max_num_batched_tokens=16) as llm:
        assert token_ids(llm.generate(prompts, GREEDY)) == local
        got = llm.teacher_forced_logits(ids, conts)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()))


def test_one_ray_call_per_actor_per_step(cluster, checkpoints):
    """Per step the executor calls each actor once (the router, the attention actors with work, and for the
    collective transport each shard); the per-layer traffic never goes through Ray: the data-plane modules
    do not even import it."""
    ckpt, prompts, local = checkpoints["mixtral"]
    for transport, per_step in (("grpc", 2), ("collective", 2 + 3)):
        with LLM(str(ckpt), executor=ActorGraph({"expert_shards": 3, "transport": transport})) as llm:
            assert token_ids(llm.generate(prompts[:2], GREEDY)) == local[:2]
            calls = list(llm.llm_engine.executor.calls_per_step)
        assert len(calls) >= GREEDY.max_tokens and set(calls) == {per_step}
    data_plane = [Path(expertmesh.actors.__file__).parent / f"{m}.py" for m in ("attention", "expert_shard", "router")]
    data_plane += Path(expertmesh.transport.__file__).parent.glob("*.py")
    for path in data_plane:
        assert "import ray" not in path.read_text(), f"{path} imports Ray"


def test_bfloat16_weights_over_the_collective_transport(cluster, tiny_model_dir):
    """bf16 hidden states cross gloo and the shards run bf16 experts: the tokens of local bf16 mode."""
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 11, 7, 20)]
    want = token_ids(LLM(str(tiny_model_dir), dtype="bfloat16").generate(prompts, GREEDY))
    graph = ActorGraph({"expert_shards": 2, "transport": "collective"})
    with LLM(str(tiny_model_dir), dtype="bfloat16", executor=graph) as llm:
        assert token_ids(llm.generate(prompts, GREEDY)) == want
