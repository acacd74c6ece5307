"""Training with the routed experts on the actor graph's `ExpertShardActor`s (`deployment:` in the config).

The driver starts the shards as serving does (the same class, `GraphBuilder`, placement and gRPC data plane)
and hands each Ray Train worker their addresses. A worker loads the model without its routed experts, keeps
the (frozen) gates, and gives every MoE block a backend that routes locally and sends each shard its tokens
over the `Train` stream. The forward is an autograd function: its backward sends each shard the gradient of
its output and brings back the gradients of the hidden states and the routing weights, which autograd then
carries through the frozen gate into the hidden states. Each shard holds its experts' adapters and AdamW
state; after every worker's backward of a step, rank 0 has them step. The worker keeps a copy of the expert
adapters' shapes (on a meta-device base), so that initialisation draws exactly what local mode draws, and
checkpoints and the saved adapter are local mode's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.actors.router import RouterCore
from expertmesh.actors.shard_trainer import split_adapters
from expertmesh.experts import PlacementTable
from expertmesh.graph.deployment import DeploymentConfig
from expertmesh.jobs.finetune.local_step import barrier
from expertmesh.model import MoECausalLM, load_gates, load_model
from expertmesh.model.config import ModelConfig
from expertmesh.model.lora import ExpertLora
from expertmesh.model.moe import MoEBlock, Router, RoutedExperts
from expertmesh.transport.grpc_train import GrpcTrainLink

SHARD_DTYPE = "float32"


def check_deployment(spec, model_dir: str) -> tuple[DeploymentConfig, PlacementTable]:
    """The deployment a job trains on and its placement, refused (ValueError naming why) before Ray starts."""
    try:
        deployment = DeploymentConfig.load(spec)
    except ValueError as e:
        raise ValueError(f"deployment: {e}") from None
    if deployment.transport != "grpc":
        raise ValueError(f"deployment.transport must be 'grpc' to train with the experts on shard actors (their "
                         f"data plane carries the backward), got {deployment.transport!r}")
    table = deployment.placement_for(ModelConfig.from_pretrained(model_dir))
    for layer in table.moe_layers:
        for expert in range(table.num_experts):
            if len(table.shards_for(layer, expert)) > 1:
                raise ValueError(f"deployment.expert_placement gives expert {expert} of layer {layer} several "
                                 "replicas; training keeps one copy of each expert's adapter: one replica each")
    return deployment, table


@dataclass
class TrainingShards:
    """The shard actors of one job, as the driver started them."""

    builder: object
    members: list
    placement: PlacementTable
    secret: str
    deployment: DeploymentConfig

    def for_workers(self) -> dict:
        """What the workers need to reach the shards (travels inside Ray, with the train loop's config)."""
        import ray

        addresses = ray.get([m.handle.serve_grpc.remote() for m in self.members])
        return {"addresses": {m.index: a for m, a in zip(self.members, addresses)},
                "names": {m.index: m.name for m in self.members}, "secret": self.secret,
                "placement": self.placement.to_dict(), "timeout_s": self.deployment.data_plane_timeout_s,
                "max_message_mib": self.deployment.max_message_mib}

    def stop(self) -> None:
        for m in self.members:
            self.builder.stop(m)


def start_shards(spec, model_dir: str) -> TrainingShards:
    """Starts the deployment's expert shards (each in its own placement group) and waits until they answer."""
    from expertmesh.graph.builder import GraphBuilder
    from expertmesh.transport.auth import new_secret

    deployment, table = check_deployment(spec, model_dir)
    secret = new_secret()
    builder = GraphBuilder(model_dir, deployment, dtype=SHARD_DTYPE, num_blocks=1, block_size=1, secret=secret)
    members: list = []
    shards = TrainingShards(builder, members, table, secret, deployment)
    try:
        for index in range(table.num_shards):
            members.append(builder.start_shard(index, table, members))
        builder.wait_ready(members, deployment.placement_timeout_s, "the fine-tuning job's expert shards")
    except BaseException:
        shards.stop()
        raise
    return shards


class _RemoteRouted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weights, anchor, ids, link, layer):  # noqa: ARG004 - anchor: see ShardBackend
        call = link.calls
        link.calls += 1
        works = link.core.split(layer, hidden.detach(), weights.detach(), ids)
        outputs = link.client.forward(link.step, call, layer, link.core.placement.version, works, keep=link.keep)
        ctx.link, ctx.layer, ctx.call, ctx.step, ctx.works = link, layer, call, link.step, works
        ctx.shapes = (hidden.shape, hidden.dtype, weights.shape)
        return link.core.combine(hidden, works, outputs)

    @staticmethod
    def backward(ctx, grad_output):
        (hidden_shape, hidden_dtype, weights_shape), works = ctx.shapes, ctx.works
        grads = [grad_output[w.tokens].to(hidden_dtype).contiguous() for w in works]
        answers = ctx.link.client.backward(ctx.step, ctx.call, ctx.layer, works, grads)
        grad_hidden = torch.zeros(hidden_shape, dtype=torch.float32)
        grad_weights = torch.zeros(weights_shape, dtype=torch.float32)
        for w, (gh, gw) in zip(works, answers):
            grad_hidden.index_add_(0, w.tokens, gh.float())
            grad_weights.index_add_(0, w.tokens, gw.float())
        return grad_hidden.to(hidden_dtype), grad_weights, None, None, None, None


class ShardBackend:
    """A worker's routed-experts backend with the experts on shards: the gate here, the experts there."""

    def __init__(self, model_dir: str, shards: dict, worker: str):
        from expertmesh.transport.settings import MIB, DataPlaneSettings

        self.core = RouterCore(model_dir, PlacementTable.from_dict(shards["placement"]), dtype=SHARD_DTYPE)
        settings = DataPlaneSettings(timeout_s=shards["timeout_s"], max_message_bytes=shards["max_message_mib"] * MIB)
        self.client = GrpcTrainLink({int(k): v for k, v in shards["addresses"].items()}, secret=shards["secret"],
                                    settings=settings, worker=worker)
        self.step, self.calls, self.keep = 0, 0, False
        # an input that always asks for a gradient, so the backward reaches the shards even where nothing
        # upstream of a layer is trained (routed experts alone): their adapters need it
        self._anchor = torch.zeros((), requires_grad=True)

    def begin_step(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, layer_idx: int, block: MoEBlock, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = block.gate(hidden)
        self.keep = torch.is_grad_enabled()
        return _RemoteRouted.apply(hidden, weights, self._anchor if self.keep else self._anchor.detach(), ids, self,
                                   layer_idx)

    def close(self) -> None:
        self.client.close()


def load_worker_model(model_dir: str, backend: ShardBackend, device: str = "cpu") -> MoECausalLM:
    """The model without its routed experts: the gates loaded (frozen, for the routing and its gradient), the
    experts a meta-device stand-in that has their shapes (for the adapters' initialisation), `backend` in
    every MoE block."""
    model = load_model(model_dir, device=device, routed_experts=False)
    config, gates = load_gates(model_dir)
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        if not isinstance(block, MoEBlock):
            continue
        gate = Router(config.hidden_size, config.routing)
        gate.weight = nn.Parameter(gates[i].weight.to(device), requires_grad=False)
        if gates[i].correction_bias is not None:
            gate.e_score_correction_bias = gates[i].correction_bias.to(device)
        block.gate = gate
        with torch.device("meta"):
            block.experts = RoutedExperts(config.routing.num_experts, config.hidden_size, config.moe_intermediate_size)
        block.backend = backend
    return model


def _expert_loras(model: MoECausalLM) -> dict[int, ExpertLora]:
    return {i: layer.mlp.experts for i, layer in enumerate(model.model.layers)
            if isinstance(getattr(layer.mlp, "experts", None), ExpertLora)}


def expert_adapters(model: MoECausalLM) -> dict[tuple[int, int], tuple]:
    """{(layer, expert): (w13 A, w13 B, w2 A, w2 B)} of the model's expert adapters."""
    out = {}
    for layer, lora in _expert_loras(model).items():
        for s, e in enumerate(lora.chosen):
            out[layer, e] = tuple(p[s].detach().clone() for p in (lora.lora_w13_A, lora.lora_w13_B, lora.lora_w2_A,
                                                                    lora.lora_w2_B))
    return out


class ShardHandles:
    """Rank 0's control of the shards, once a step: enter training mode, step, collect, checkpoint."""

    def __init__(self, shards: dict):
        import ray

        from expertmesh.graph.runtime import ACTOR_NAMESPACE

        self.placement = PlacementTable.from_dict(shards["placement"])
        self.handles = {int(i): ray.get_actor(name, namespace=ACTOR_NAMESPACE) for i, name in shards["names"].items()}

    def _all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(h, method).remote(*args) for h in self.handles.values()])

    def start(self, adapters: dict, rank: int, alpha: float, weight_decay: float) -> None:
        import ray

        ray.get([h.start_training.remote(split_adapters(adapters, self.placement.shard_experts(i)), rank, alpha,
                                         weight_decay) for i, h in self.handles.items()])

    def apply(self, step: int, lr: float) -> None:
        self._all("apply_step", step, lr)

    def pull(self, model: MoECausalLM) -> None:
        """Copies the shards' current expert adapters into the model's (for checkpoints and the adapter)."""
        loras = _expert_loras(model)
        with torch.no_grad():
            for held in self._all("trained_adapters"):
                for (layer, e), tensors in held.items():
                    lora = loras[layer]
                    s = lora.chosen.index(e)
                    for p, t in zip((lora.lora_w13_A, lora.lora_w13_B, lora.lora_w2_A, lora.lora_w2_B), tensors):
                        p[s].copy_(t)

    def state(self) -> dict[int, dict]:
        return dict(zip(self.handles, self._all("train_state")))

    def load_state(self, states: dict[int, dict]) -> None:
        import ray

        ray.get([h.load_train_state.remote(states[i]) for i, h in self.handles.items()])


class ShardSteps:
    """The shards' part of each training step, for `LocalTrainer`: the backend tagged with the step before the
    forward; after the backward, once every worker's is in, rank 0 (`handles`) has the shards take their
    optimizer step, and no worker goes on before that."""

    def __init__(self, backend: ShardBackend, handles: ShardHandles | None):
        self.backend, self.handles = backend, handles

    def begin(self, step: int) -> None:
        self.backend.begin_step(step)

    def finish(self, step: int, lr: float) -> None:
        barrier()
        if self.handles is not None:
            self.handles.apply(step, lr)
        barrier()
