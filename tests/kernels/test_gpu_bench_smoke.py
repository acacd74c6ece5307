"""The GPU benchmarks (bench/kernels_gpu.py, bench/gpu/fused_moe_sweep.py) keep working where CI has no GPU:
their interpreter smoke mode runs one tiny shape per kernel through Triton's interpreter and checks it
against the torch reference; without CUDA and without that flag they refuse with a clear message."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "bench" / "kernels_gpu.py", ROOT / "bench" / "gpu" / "fused_moe_sweep.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_interpreter_smoke(script, needs_triton):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script), "--interpret-smoke"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout or "match the reference" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_refuses_without_cuda(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert done.returncode == 2
    assert "CUDA" in done.stdout + done.stderr
