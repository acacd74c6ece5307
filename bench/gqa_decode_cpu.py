"""Grouped-query decode attention on the CPU, one layer, against the torch path it replaced, in the same run.

Times `kernels.gqa_decode` (the compiled kernel, reading the paged cache in place) and `kernels.gqa_decode_ref` (the
model's torch path before it: every context gathered into a padded batch, then batched matmuls) for attention shapes
of the GQA families, batches and context lengths, medians of 30 calls, each context in blocks of 16 scattered over
the cache as a serving step finds them. `GB/s` is the cache bytes a call must read over the kernel's time.

    python bench/gqa_decode_cpu.py [--batches 1 8 32] [--lens 512 2048] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from mla_decode_cpu import median_ms

BLOCK = 16
SHAPES = {  # heads, KV heads, head size (the published models' attention)
    "Mixtral-8x7B": (32, 8, 128),
    "Qwen1.5-MoE-A2.7B / OLMoE-1B-7B": (16, 16, 128),
}


def inputs(batch: int, length: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple:
    per = -(-length // BLOCK)
    blocks = batch * per + 4
    tables = torch.randperm(blocks)[: batch * per].view(batch, per).to(torch.int32)
    cache = lambda: torch.randn(blocks, BLOCK, kv_heads, head_dim).to(dtype)  # noqa: E731
    return (torch.randn(batch, heads, head_dim).to(dtype), cache(), cache(), tables,
            torch.full((batch,), length, dtype=torch.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    from expertmesh.kernels import gqa_decode, gqa_decode_ref

    torch.manual_seed(0)
    print("| model shape | dtype | batch | context | kernel ms | GB/s | torch path ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for name, (heads, kv_heads, head_dim) in SHAPES.items():
            for dtype in (getattr(torch, d) for d in args.dtypes):
                for batch in args.batches:
                    for length in args.lens:
                        x = inputs(batch, length, heads, kv_heads, head_dim, dtype)
                        scale = head_dim**-0.5
                        ours = median_ms(lambda: gqa_decode(*x, scale))  # noqa: B023
                        ref = median_ms(lambda: gqa_decode_ref(*x, scale), calls=5)  # noqa: B023
                        diff = (gqa_decode(*x, scale).float() - gqa_decode_ref(*x, scale).float()).abs().max().item()
                        gbs = 2 * batch * length * kv_heads * head_dim * x[1].element_size() / (ours * 1e-3) / 1e9
                        print(f"| {name} | {str(dtype)[6:]} | {batch} | {length} | {ours:.3f} | {gbs:.1f} | {ref:.3f} "
                              f"| {ref / ours:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
