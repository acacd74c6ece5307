"""The model runs forward and backward without a cache, as fine-tuning will, with the serving logits."""

import torch

from expertmesh import LLM
from expertmesh.model import AttentionMetadata, load_model


def test_cacheless_forward_matches_serving_and_backpropagates_into_experts_and_attention(tiny_model_dir):
    prompts = [[5, 9, 200, 17, 3, 44, 90], [7, 8, 9, 10]]
    served = LLM(str(tiny_model_dir), num_kv_blocks=16, block_size=4).teacher_forced_logits(prompts)

    model = load_model(tiny_model_dir)
    layer = model.model.layers[1]  # an MoE layer of the DeepSeek-V3-shaped tiny preset
    trainable = [layer.mlp.experts.w13, layer.mlp.experts.w2, layer.self_attn.kv_b_proj.weight]
    for p in trainable:
        p.requires_grad_(True)
    routed = []
    layer.mlp.gate.register_forward_hook(lambda mod, args, out: routed.append(out[1]))
    meta = AttentionMetadata.without_cache([7, 4])
    logits = model(torch.tensor(prompts[0] + prompts[1]), meta, kv_caches=None)  # [11, V]

    torch.testing.assert_close(logits[:7], served[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[7:], served[1], rtol=1e-4, atol=1e-4)
    targets = torch.tensor(prompts[0][1:] + [0] + prompts[1][1:] + [0])
    torch.nn.functional.cross_entropy(logits, targets).backward()
    for p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # Exactly the experts some token was routed to receive gradient.
    touched = (layer.mlp.experts.w13.grad.flatten(1).abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == sorted(set(routed[0].flatten().tolist()))
