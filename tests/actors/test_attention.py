"""An attention worker on its device (the GPU Ray gives its actor) keeps its model and cache there and gives
local mode's logits: the data plane carries host tensors, the routed outputs come back to the device."""

import pytest
import torch

from expertmesh.actors.attention import AttentionWorker
from expertmesh.actors.step import MicroBatch
from expertmesh.experts import PlacementTable
from expertmesh.model import AttentionMetadata, load_model
from expertmesh.transport.inprocess import InProcessDispatch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


class _InlineLink:
    """The router and its shards in this process: each layer's routed output computed at submit."""

    def __init__(self, router, dispatch):
        self.router, self.dispatch = router, dispatch

    def submit(self, step, micro_batch, layer, hidden):
        assert hidden.device.type == "cpu"  # the data plane's tensors are host tensors
        out = self.router.moe(step, layer, hidden, self.dispatch)
        return type("Done", (), {"wait": lambda self: out})()

    def start_step(self, step):
        pass

    def fail(self, step, reason):
        pass


@pytest.mark.parametrize("device", DEVICES)
def test_attention_on_its_device_matches_local_mode(tiny_model_dir, device):
    from expertmesh.actors.expert_shard import ExpertShard
    from expertmesh.actors.router import RouterCore

    model = load_model(tiny_model_dir)
    table = PlacementTable.balanced([1, 2, 3], model.config.routing.num_experts, 1)
    router = RouterCore(tiny_model_dir, table)
    worker = AttentionWorker(tiny_model_dir, num_blocks=8, block_size=16, device=device)
    assert next(worker.model.parameters()).device.type == device
    worker.link = _InlineLink(router, InProcessDispatch({0: ExpertShard(tiny_model_dir, table.shard_experts(0))}))
    ids = list(range(5, 17))
    (logits, _) = worker.execute(1, [MicroBatch(ids, [12], [12], [[0]], [11]), None])
    assert logits.device.type == "cpu"
    cache = model.allocate_kv_cache(8, 16)
    meta = AttentionMetadata.build(query_lens=[12], context_lens=[12], block_tables=[[0]], block_size=16)
    want = model(torch.tensor(ids), meta, cache, torch.tensor([11]))
    torch.testing.assert_close(logits, want, rtol=1e-3, atol=1e-3)
