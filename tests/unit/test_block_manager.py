import pytest

from ferry.services.worker.engine.block_manager import BlockManager, OutOfBlocks


def test_paired_verbs_keep_the_invariant():
    bm = BlockManager(10, 4)
    table: list[int] = []
    assert bm.append_slot(table, 9) and len(table) == 3
    assert bm.append_slot(table, 12) and len(table) == 3
    assert bm.append_slot(table, 13) and len(table) == 4
    bm.check()
    assert bm.num_used == 4 and bm.num_free == 6
    bm.free(table)
    bm.check()
    assert bm.num_free == 10


def test_append_slot_leaves_table_unchanged_when_full():
    bm = BlockManager(3, 4)
    table = bm.allocate(2)
    assert not bm.append_slot(table, 16)
    assert len(table) == 2
    bm.check()


def test_allocate_too_many_raises_and_double_free_detected():
    bm = BlockManager(2, 4)
    with pytest.raises(OutOfBlocks):
        bm.allocate(3)
    blocks = bm.allocate(1)
    bm.free(blocks)
    with pytest.raises(ValueError, match="double free"):
        bm.free(blocks)


def test_ref_counts_pin_blocks_until_last_free():
    bm = BlockManager(4, 4)
    blocks = bm.allocate(2)
    bm.incref(blocks)
    bm.free(blocks)
    assert bm.num_used == 2 and bm.num_free == 2
    bm.free(blocks)
    assert bm.num_used == 0 and bm.num_free == 4
    bm.check()
    with pytest.raises(ValueError):
        bm.incref(blocks)


def test_reservations_move_between_pools():
    bm = BlockManager(10, 4)
    assert bm.reserve("m1", 3)
    assert bm.reserve("m1", 2)
    assert not bm.reserve("m2", 6)
    assert bm.num_reserved == 5 and bm.num_free == 5
    bm.check()
    taken = bm.take_reserved("m1", 4)
    assert len(taken) == 4 and bm.num_used == 4 and bm.num_reserved == 0 and bm.num_free == 6
    bm.check()
    assert bm.reserve("m3", 2)
    bm.release_reservation("m3")
    bm.release_reservation("m3")  # idempotent
    bm.check()
    assert bm.num_free == 6


def test_take_more_than_reserved_keeps_reservation():
    bm = BlockManager(10, 4)
    bm.reserve("m", 2)
    with pytest.raises(OutOfBlocks):
        bm.take_reserved("m", 3)
    assert bm.num_reserved == 2
    bm.check()
