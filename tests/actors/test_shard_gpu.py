"""An expert shard on a GPU runs its experts with the Triton fused-MoE kernel and answers like one on the CPU."""

import pytest
import torch

from expertmesh.actors.expert_shard import ExpertShard

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_shard_matches_cpu_shard(tiny_model_dir):
    experts = [(1, e) for e in range(0, 16, 2)]
    cpu = ExpertShard(tiny_model_dir, experts)
    gpu = ExpertShard(tiny_model_dir, experts, device="cuda")
    assert gpu.layers[1].w13.is_cuda
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, cpu.hidden_size, generator=gen)
    ids = torch.tensor(experts)[:, 1][torch.randint(0, len(experts), (37, 3), generator=gen)]
    ids[::4, 1] = -1  # slots routed to other shards
    weights = torch.rand(37, 3, generator=gen)
    want = cpu.forward(1, hidden, ids, weights)
    got = gpu.forward(1, hidden, ids, weights)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # TF32 may be on for the GPU's matmuls
