"""MLA decode's attention on the CPU, one layer of `small` (12 heads, latent 256, RoPE 32, blocks of 16), against
the torch reference of the same math in the same run.

Times `kernels.mla_decode_absorbed` (the compiled kernel: the W_UK absorption, the context pass, W_UV) and
`kernels.mla_decode_absorbed_ref` (torch ops) for batches and context lengths, medians of 30 calls, each context
in blocks scattered over the cache as a serving step finds them. For A/B between commits, run it on each.

    python bench/mla_decode_cpu.py [--batches 1 32] [--lens 96 290 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HEADS, NOPE, ROPE, RANK, V, BLOCK = 12, 64, 32, 256, 64, 16


def inputs(batch: int, length: int) -> tuple:
    per = -(-length // BLOCK)
    blocks = batch * per + 4
    tables = torch.randperm(blocks)[: batch * per].view(batch, per).to(torch.int32)
    return (torch.randn(batch, HEADS, NOPE), torch.randn(batch, HEADS, ROPE), torch.randn(HEADS * (NOPE + V), RANK) / 16,
            torch.randn(blocks, BLOCK, RANK), torch.randn(blocks, BLOCK, ROPE), tables,
            torch.full((batch,), length, dtype=torch.int32))


def median_ms(fn, calls: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--lens", type=int, nargs="+", default=[96, 290, 1024])
    args = parser.parse_args()
    from expertmesh.kernels import mla_decode_absorbed, mla_decode_absorbed_ref

    torch.manual_seed(0)
    print("| batch | context | kernel ms | torch reference ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for batch in args.batches:
            for length in args.lens:
                x = inputs(batch, length)
                ours = median_ms(lambda: mla_decode_absorbed(*x, 0.1))  # noqa: B023
                ref = median_ms(lambda: mla_decode_absorbed_ref(*x, 0.1))  # noqa: B023
                diff = (mla_decode_absorbed(*x, 0.1) - mla_decode_absorbed_ref(*x, 0.1)).abs().max().item()
                print(f"| {batch} | {length} | {ours:.3f} | {ref:.3f} | {ref / ours:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
