"""Training with the routed experts on expert shards, in one process: the shards are real `ExpertShard`s in
training mode behind their gRPC servers (the data plane the actor graph uses), the worker's model has no
routed experts of its own. Against local mode (the whole model in one process, the same seed and batches):
the losses of every step agree within 1e-5 relative, and so do the final adapters, which proves the
backward through the dispatch (experts' adapters, hidden states, the path through the frozen gate)."""

from __future__ import annotations

import pytest
import torch

from expertmesh.actors.expert_shard import ExpertShard
from expertmesh.actors.shard_trainer import ShardTrainer, split_adapters
from expertmesh.experts import PlacementTable
from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.local_step import LocalTrainer, router_checksums
from expertmesh.jobs.finetune.shard_mode import ShardBackend, ShardSteps, expert_adapters, load_worker_model
from expertmesh.model import load_model
from expertmesh.model.lora import apply_lora
from expertmesh.transport import DataPlaneSettings
from expertmesh.transport.grpc_dispatch import start_shard_server
from expertmesh.transport.grpc_train import GrpcTrainLink

pytestmark = pytest.mark.usefixtures("single_threaded_torch")
SECRET = "test-secret"
TARGETS = ("attention", "shared_experts", "routed_experts")


class InProcessHandles:
    """Rank 0's control of the shards, without Ray: what `ShardHandles` does through actor calls."""

    def __init__(self, trainers: dict[int, ShardTrainer]):
        self.trainers = trainers

    def apply(self, step: int, lr: float) -> None:
        for t in self.trainers.values():
            t.apply(step, lr)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: Adam turns the last-bit differences of a near-zero gradient (the sums run in
    another order on the shards) into visible differences of single elements, so the whole tensor is compared."""
    return float((got.detach() - want.detach()).norm() / want.detach().norm())


def batches(n: int) -> list[list[Example]]:
    gen = torch.Generator().manual_seed(3)
    return [[Example(ids, ids) for ids in (torch.randint(3, 200, (int(torch.randint(8, 20, (), generator=gen)),),
                                                        generator=gen).tolist() for _ in range(3))]
            for _ in range(n)]


@pytest.fixture
def shards(tiny_model_dir):
    """Two shards of the tiny model, balanced, each behind its gRPC server with a training mode to set."""
    moe = load_model(tiny_model_dir).config
    layers = [i for i, is_moe in enumerate(moe.moe_layers) if is_moe]
    table = PlacementTable.balanced(layers, moe.routing.num_experts, 2)
    runtimes, servers, trainers = {}, [], {}
    for s in range(2):
        runtimes[s] = ExpertShard(tiny_model_dir, table.shard_experts(s), shard_index=s)
        server, address = start_shard_server(runtimes[s], "127.0.0.1", secret=SECRET, settings=DataPlaneSettings(),
                                             trainer=lambda s=s: trainers.get(s))
        servers.append((server, address))
    info = {"addresses": {s: a for s, (_, a) in enumerate(servers)}, "secret": SECRET, "placement": table.to_dict(),
            "timeout_s": 30.0, "max_message_mib": 64}
    yield table, runtimes, trainers, info
    for server, _ in servers:
        server.stop(None)


def test_training_on_shards_equals_local_mode(tiny_model_dir, shards):
    table, runtimes, trainers, info = shards
    chosen = {layer: [0, 3, 5] for layer in table.moe_layers}
    steps = batches(4)

    torch.manual_seed(0)
    local_model = load_model(tiny_model_dir)
    local_params = apply_lora(local_model, rank=4, alpha=8, targets=TARGETS, experts=chosen)
    local = LocalTrainer(local_model, local_params, lr=1e-3)
    local_losses = [local.step(batch).loss for batch in steps]

    backend = ShardBackend(tiny_model_dir, info, worker="rank0")
    model = load_worker_model(tiny_model_dir, backend)
    assert not any(p.device.type != "meta" for n, p in model.named_parameters() if ".experts.w" in n)
    before = router_checksums(model)
    torch.manual_seed(0)
    params = apply_lora(model, rank=4, alpha=8, targets=TARGETS, experts=chosen)
    initial = expert_adapters(model)
    for s, runtime in runtimes.items():
        trainers[s] = ShardTrainer(runtime, split_adapters(initial, runtime.experts), rank=4, alpha=8)
    here = {n: p for n, p in params.items() if ".experts.lora_" not in n}
    trainer = LocalTrainer(model, here, lr=1e-3, remote=ShardSteps(backend, InProcessHandles(trainers)))
    results = [trainer.step(batch) for batch in steps]
    losses = [r.loss for r in results]
    backend.close()

    assert losses == pytest.approx(local_losses, rel=1e-5)
    assert len(set(losses)) == len(losses)
    assert router_checksums(model) == before
    trained = {k: v for t in trainers.values() for k, v in t.adapters().items()}
    assert sorted(trained) == sorted((layer, e) for layer in chosen for e in chosen[layer])
    assert all(tensors[1].abs().max() > 0 for tensors in trained.values())  # B starts at zero: it trained
    for (layer, e), tensors in trained.items():
        lora = local_model.model.layers[layer].mlp.experts
        s = lora.chosen.index(e)
        for got, want in zip(tensors, (lora.lora_w13_A, lora.lora_w13_B, lora.lora_w2_A, lora.lora_w2_B)):
            assert relative_error(got, want[s]) < 1e-5
    for name, p in here.items():  # the worker's own adapters: attention and shared experts
        assert relative_error(p, dict(local_model.named_parameters())[name]) < 1e-5
    assert results[0].counts.keys() == set(table.moe_layers)


def test_a_backward_without_its_forward_or_a_step_missing_a_backward_is_refused(tiny_model_dir, shards):
    table, runtimes, trainers, info = shards
    trainers[0] = ShardTrainer(runtimes[0], {}, rank=2, alpha=2)
    link = GrpcTrainLink({0: info["addresses"][0]}, secret=SECRET, settings=DataPlaneSettings(), worker="w")
    layer = table.moe_layers[0]
    expert = runtimes[0].experts[0][1]
    from expertmesh.transport import ShardWork
    work = ShardWork(0, torch.arange(2), torch.randn(2, runtimes[0].hidden_size),
                     torch.tensor([[expert, -1], [expert, -1]]), torch.tensor([[0.5, 0.0], [1.0, 0.0]]))
    out = link.forward(1, 0, layer, table.version, [work], keep=True)
    assert out[0].shape == work.hidden_states.shape
    with pytest.raises(ValueError, match="without their backward"):
        trainers[0].apply(1, 1e-3)
    (grad_x, grad_w), = link.backward(1, 0, layer, [work], [torch.ones_like(work.hidden_states)])
    assert grad_w[:, 1].eq(0).all() and grad_x.abs().sum() > 0
    trainers[0].apply(1, 1e-3)
    from expertmesh.transport import DataPlaneError
    with pytest.raises(DataPlaneError, match="holds no forward 0 of step 1"):
        link.backward(1, 0, layer, [work], [torch.ones_like(work.hidden_states)])
    link.close()
