"""Serving without the compiled CPU kernels (no compiler, or EXPERTMESH_CPU_EXT=0) gives the same model."""

import json
import os
import subprocess
import sys

import torch

from expertmesh import LLM

PROMPTS = [[5, 9, 200, 17, 3, 44, 90, 12], [7, 8]]
CONTINUATIONS = [[11, 12, 13], [1000, 3, 4, 5]]

_SCRIPT = """
import json, sys
from expertmesh import LLM
from expertmesh.kernels.cpu_ext import small_m_kernels
assert small_m_kernels() is None, "EXPERTMESH_CPU_EXT=0 must disable the compiled kernels"
prompts, conts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
logits = LLM(sys.argv[1], num_kv_blocks=32, block_size=4).teacher_forced_logits(prompts, conts)
print(json.dumps([t.tolist() for t in logits]))
"""


def test_torch_fallback_matches_the_compiled_kernels(tiny_model_dir):
    env = {**os.environ, "EXPERTMESH_CPU_EXT": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_model_dir), json.dumps(PROMPTS), json.dumps(CONTINUATIONS)],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    fallback = [torch.tensor(rows) for rows in json.loads(out.stdout.strip().splitlines()[-1])]
    compiled = LLM(str(tiny_model_dir), num_kv_blocks=32, block_size=4).teacher_forced_logits(PROMPTS, CONTINUATIONS)
    for a, b in zip(fallback, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
