import pytest

from expertmesh.engine.block_manager import BlockManager
from expertmesh.engine.sequence import Sequence


def test_blocks_for_rounds_up():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_grow_covers_computed_plus_new_tokens_and_reuses_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence([1] * 6)
    bm.grow(seq, 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    seq.num_computed_tokens = 6
    bm.grow(seq, 2)  # tokens 6, 7 still fit in the second block
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    bm.grow(seq, 1)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5


def test_ids_are_unique_in_range_and_free_returns_them():
    bm = BlockManager(num_blocks=5, block_size=2)
    a, b = Sequence([1] * 4), Sequence([1] * 6)
    bm.grow(a, 4)
    bm.grow(b, 6)
    ids = a.block_table + b.block_table
    assert sorted(ids) == list(range(5)) and bm.num_free_blocks == 0
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_can_grow_refuses_beyond_free_blocks_and_grow_asserts():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence([1] * 9)
    assert bm.can_grow(seq, 8) and not bm.can_grow(seq, 9)
    with pytest.raises(AssertionError):
        bm.grow(seq, 9)
    assert bm.num_free_blocks == 2


def test_invalid_sizes_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
