"""RoPE's cos/sin: the table a decode step reads rows from gives, bit for bit, what the formula gives for the
positions alone (default, linear and YaRN scaling, float32 and bf16), however the table grows; and both agree
with transformers' rotary embedding."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from expertmesh.model.config import RopeConfig
from expertmesh.model.rope import RotaryEmbedding

ROPES = {
    "default": RopeConfig(dim=32),
    "linear": RopeConfig(dim=32, rope_type="linear", factor=4.0),
    "yarn": RopeConfig(dim=64, theta=10000.0, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                       mscale=1.0, mscale_all_dim=1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(ROPES))
def test_the_table_gives_the_formulas_bits_as_it_grows(kind, dtype):
    rotary = RotaryEmbedding(ROPES[kind])
    g = torch.Generator().manual_seed(0)
    asks = [torch.tensor([0]), torch.arange(37), torch.tensor([1023]), torch.tensor([1024]),  # the first growth
            torch.randint(0, 5000, (1,), generator=g), torch.randint(0, 3000, (17,), generator=g),
            torch.tensor([70000, 3, 70001]), torch.tensor([], dtype=torch.int64)]
    for positions in asks:
        cos, sin = rotary.cos_sin(positions, dtype)
        ref_cos, ref_sin = rotary._cos_sin(positions, dtype)
        assert cos.dtype == dtype and cos.shape == (positions.numel(), rotary.inv_freq.numel())
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), positions
    with torch.inference_mode():  # a table built in inference mode serves outside it, and the other way round
        fresh = RotaryEmbedding(ROPES[kind])
        fresh.cos_sin(torch.tensor([5]), dtype)
    cos, _ = fresh.cos_sin(torch.tensor([6]), dtype)
    assert torch.equal(cos, fresh._cos_sin(torch.tensor([6]), dtype)[0])


def test_the_table_matches_transformers_rotary_embedding():
    config = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_theta=10000.0,
                              rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    theirs = DeepseekV3RotaryEmbedding(config)
    ours = RotaryEmbedding(ROPES["yarn"])
    positions = torch.tensor([0, 1, 7, 4095, 4096, 100000])
    x = torch.zeros(1, len(positions), 64)
    their_cos, their_sin = theirs(x, positions[None])
    cos, sin = ours.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos, their_cos[0, :, :32], rtol=0, atol=2e-6)
    torch.testing.assert_close(sin, their_sin[0, :, :32], rtol=0, atol=2e-6)
