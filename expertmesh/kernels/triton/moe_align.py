"""``moe_align_block_size`` in one Triton launch, for the few pairs of a decode step.

The torch version (``..fused_moe.moe_align_block_size``, the reference) is ~15 small ops. On a GPU at a
handful of tokens their host-side launch cost, not the GPU, set the fused MoE's time (an H200 measured
~300 µs of enqueueing for the alignment alone, against ~140 µs of expert kernels: bench/RESULTS.md).
Here one program does all of it with [pairs, experts] and [pairs, pairs] comparisons, which is cheap
only while both are small: ``fits`` says when.
"""

import torch
import triton
import triton.language as tl

MAX_PAIRS = 128
MAX_EXPERTS = 256


def fits(num_pairs: int, num_experts: int) -> bool:
    return 0 < num_pairs <= MAX_PAIRS and 0 < num_experts <= MAX_EXPERTS


@triton.jit(do_not_specialize=["num_pairs", "num_experts", "num_slots", "num_blocks"])
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_experts, num_slots, num_blocks,
    BLOCK_SIZE: tl.constexpr, P: tl.constexpr, E: tl.constexpr, NB: tl.constexpr, S: tl.constexpr,
):
    pairs = tl.arange(0, P)
    real = pairs < num_pairs
    experts = tl.arange(0, E)
    ids = tl.load(ids_ptr + pairs, mask=real, other=-1).to(tl.int32)  # padding lanes match no expert
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [P, E]
    counts = tl.sum(onehot, axis=0)  # [E]
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    padded_end = tl.cumsum(padded, axis=0)  # [E]
    padded_start = padded_end - padded
    # each pair's slot: its expert's first padded slot plus how many earlier pairs chose that expert
    # (the stable order of the reference's argsort)
    earlier_same = (ids[:, None] == ids[None, :]) & (pairs[None, :] < pairs[:, None])  # [P, P]
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    slot = tl.sum(onehot * padded_start[None, :], axis=1) + rank  # [P]

    slots = tl.arange(0, S)
    tl.store(sorted_ptr + slots, tl.zeros([S], dtype=tl.int32) + num_pairs, mask=slots < num_slots)
    tl.debug_barrier()  # every padding slot is written before the pairs land in theirs
    tl.store(sorted_ptr + slot, pairs.to(tl.int32), mask=real)

    blocks = tl.arange(0, NB)
    real_expert = experts < num_experts
    done = (padded_end[None, :] <= (blocks * BLOCK_SIZE)[:, None]) & real_expert[None, :]  # [NB, E]
    block_expert = tl.sum(done.to(tl.int32), axis=1)
    block_expert = tl.where(block_expert < num_experts, block_expert, -1)
    tl.store(block_expert_ptr + blocks, block_expert, mask=blocks < num_blocks)
    total = tl.sum(tl.where(real_expert, padded, 0), axis=0)
    tl.store(num_padded_ptr, total)


def moe_align_block_size_triton(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same results as the reference ``moe_align_block_size`` (same sizes, same order), one launch.
    Only for ``fits(topk_ids.numel(), num_experts)``."""
    num_pairs = topk_ids.numel()
    if not fits(num_pairs, num_experts):
        raise ValueError(f"moe_align_block_size_triton takes 1..{MAX_PAIRS} pairs and 1..{MAX_EXPERTS} "
                         f"experts, got {num_pairs} and {num_experts}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    max_slots = num_pairs + min(num_pairs, num_experts) * (block_size - 1)  # as the reference sizes them
    num_blocks = -(-max_slots // block_size)
    num_slots = num_blocks * block_size
    device = topk_ids.device
    sorted_pair_ids = torch.empty(num_slots, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    _align_kernel[(1,)](
        topk_ids.reshape(-1).contiguous(), sorted_pair_ids, block_expert_ids, num_padded,
        num_pairs, num_experts, num_slots, num_blocks,
        BLOCK_SIZE=block_size, P=triton.next_power_of_2(num_pairs), E=triton.next_power_of_2(num_experts),
        NB=triton.next_power_of_2(num_blocks), S=triton.next_power_of_2(num_slots), num_warps=4,
    )  # fmt: skip
    return sorted_pair_ids, block_expert_ids, num_padded
