"""BlockAllocator / BlockManager: refcounts, prefix cache, copy-on-write, swapping."""
import pytest

from driver.block_manager import BlockAllocator, BlockManager, hash_block
from driver.sequence import Sequence

BS = 4


def make_seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, seq_index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens))


def compute(bm: BlockManager, seq: Sequence, n: int) -> list:
    """One step for seq: slots for n tokens, then mark them computed."""
    copies = bm.append_slots(seq, n)
    assert copies is not None
    seq.num_computed_tokens += n
    bm.mark_computed(seq)
    return copies


# ---- BlockAllocator ---------------------------------------------------------------------

def test_allocator_refcounts_and_free():
    a = BlockAllocator(4, BS)
    b0, b1 = a.allocate(), a.allocate()
    assert (b0, b1) == (0, 1) and a.num_free_blocks == 2
    a.incref(b0)
    assert a.ref_counts[b0] == 2
    a.free(b0)
    assert a.ref_counts[b0] == 1 and a.num_free_blocks == 2
    a.free(b0)
    a.free(b1)
    assert a.num_free_blocks == 4
    a.check({})


def test_allocator_double_free_raises():
    a = BlockAllocator(2, BS)
    b = a.allocate()
    a.free(b)
    with pytest.raises(AssertionError, match="double free"):
        a.free(b)
    with pytest.raises(AssertionError):
        a.incref(b)  # an uncached free block cannot be revived


def test_allocator_out_of_blocks_raises():
    a = BlockAllocator(1, BS)
    a.allocate()
    with pytest.raises(RuntimeError):
        a.allocate()


def test_hash_chains_on_parent():
    tokens = [1, 2, 3, 4]
    assert hash_block(None, tokens) == hash_block(None, tuple(tokens))
    assert hash_block(None, tokens) != hash_block(hash_block(None, [9, 9, 9, 9]), tokens)
    assert hash_block(7, tokens) != hash_block(8, tokens)


def test_cached_block_is_evictable_in_lru_order():
    a = BlockAllocator(3, BS)
    blocks = [a.allocate() for _ in range(3)]
    for i, b in enumerate(blocks):
        assert a.register(b, 100 + i)
    for b in (blocks[1], blocks[0], blocks[2]):  # freed in this order: LRU is 1, then 0, then 2
        a.free(b)
    assert a.num_free_blocks == 3 and a.num_evictable_blocks == 3
    assert a.allocate() == blocks[1]
    assert a.lookup(101) is None and a.block_hashes[blocks[1]] is None
    assert a.allocate() == blocks[0]
    assert a.lookup(102) == blocks[2]


def test_uncached_free_block_is_taken_before_evicting():
    a = BlockAllocator(2, BS)
    b0, b1 = a.allocate(), a.allocate()
    a.register(b0, 5)
    a.free(b0)  # cached, evictable
    a.free(b1)  # uncached
    assert a.allocate() == b1
    assert a.lookup(5) == b0


def test_hit_on_evictable_block_revives_it_and_counts():
    a = BlockAllocator(2, BS)
    b = a.allocate()
    a.register(b, 42)
    a.free(b)
    assert a.take_cached(42) == b
    assert a.ref_counts[b] == 1 and a.num_evictable_blocks == 0
    assert a.take_cached(42) == b and a.ref_counts[b] == 2  # a hit on a block in use
    assert a.take_cached(43) is None
    assert (a.prefix_cache_queries, a.prefix_cache_hits) == (3, 2)


def test_register_does_not_double_register_a_hash():
    a = BlockAllocator(2, BS)
    b0, b1 = a.allocate(), a.allocate()
    assert a.register(b0, 9)
    assert not a.register(b1, 9)
    assert a.block_hashes[b1] is None and a.lookup(9) == b0
    a.free(b1)
    assert a.num_evictable_blocks == 0  # b1 stayed uncached


def test_prefix_caching_disabled_never_hits():
    a = BlockAllocator(2, BS, enable_prefix_caching=False)
    b = a.allocate()
    assert not a.register(b, 1)
    assert a.take_cached(1) is None and a.prefix_cache_queries == 0


# ---- BlockManager -----------------------------------------------------------------------

def test_append_slots_grows_table_and_all_or_nothing():
    bm = BlockManager(BS, num_gpu_blocks=3, num_cpu_blocks=0)
    s = make_seq("a", range(10))
    assert bm.append_slots(s, 10) == [] and len(s.block_table) == 3
    t = make_seq("b", range(3))
    assert not bm.can_append(t, 3)
    assert bm.append_slots(t, 3) is None and t.block_table == []
    bm.check_invariants([s, t])
    bm.free(s)
    assert bm.num_free_gpu_blocks == 3


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    bm = BlockManager(BS, num_gpu_blocks=10, num_cpu_blocks=0)
    prompt = list(range(12))  # exactly 3 full blocks
    a = make_seq("a", prompt)
    compute(bm, a, 12)
    b = make_seq("b", prompt)
    assert bm.num_cached_prefix_tokens(b) == 8
    assert bm.allocate_prefix(b) == 8  # the last full block is dropped: 1+ token to compute
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.gpu.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert (bm.gpu.prefix_cache_queries, bm.gpu.prefix_cache_hits) == (2, 2)
    compute(bm, b, 4)
    assert b.block_table[2] != a.block_table[2]  # recomputed into its own block
    bm.check_invariants([a, b])
    c = make_seq("c", prompt[:5] + [99] * 8)  # first block hits, second misses
    assert bm.allocate_prefix(c) == 4
    assert (bm.gpu.prefix_cache_queries, bm.gpu.prefix_cache_hits) == (4, 3)
    assert bm.prefix_cache_hit_rate == 0.75


def test_prefix_hit_survives_free_then_evicted_by_pressure():
    bm = BlockManager(BS, num_gpu_blocks=3, num_cpu_blocks=0)
    a = make_seq("a", range(9))
    compute(bm, a, 9)
    bm.free(a)
    assert bm.num_free_gpu_blocks == 3 and bm.gpu.num_evictable_blocks == 2
    b = make_seq("b", range(9))
    assert bm.can_allocate(b, 1)
    assert bm.allocate_prefix(b) == 8
    bm.free(b)
    c = make_seq("c", [50] * 12)
    compute(bm, c, 12)  # needs every block: evicts the cached ones
    d = make_seq("d", range(9))
    assert bm.num_cached_prefix_tokens(d) == 0
    bm.check_invariants([c])


def test_can_allocate_counts_revived_evictable_hits():
    bm = BlockManager(BS, num_gpu_blocks=3, num_cpu_blocks=0)
    a = make_seq("a", range(8))
    compute(bm, a, 8)
    bm.free(a)  # 2 evictable cached blocks + 1 free
    b = make_seq("b", list(range(8)) + [7, 7, 7, 7, 7])  # hits 2 blocks, needs 2 more
    assert bm.num_cached_prefix_tokens(b) == 8
    assert not bm.can_allocate(b, 5)
    assert bm.can_allocate(b, 4)


def test_copy_on_write_after_fork_of_partial_block():
    bm = BlockManager(BS, num_gpu_blocks=6, num_cpu_blocks=0)
    parent = make_seq("p", range(6))
    compute(bm, parent, 5)  # blocks: [full, partial(1 token)]
    child = make_seq("c", range(6))
    child.num_computed_tokens = 5
    bm.fork(parent, child)
    shared = parent.block_table[1]
    assert bm.gpu.ref_counts[shared] == 2
    assert bm.can_append(parent, 1)
    copies = bm.append_slots(parent, 1)
    assert copies == [(shared, parent.block_table[1])] and parent.block_table[1] != shared
    assert bm.gpu.ref_counts[shared] == 1
    assert bm.append_slots(child, 1) == []  # now the sole owner: writes in place
    assert child.block_table[1] == shared
    assert bm.gpu.ref_counts[parent.block_table[0]] == 2
    bm.check_invariants([parent, child])


def test_no_copy_when_fork_point_is_block_aligned():
    bm = BlockManager(BS, num_gpu_blocks=6, num_cpu_blocks=0)
    parent = make_seq("p", range(9))
    compute(bm, parent, 8)
    child = make_seq("c", range(9))
    child.num_computed_tokens = 8
    bm.fork(parent, child)
    assert bm.append_slots(parent, 1) == [] and bm.append_slots(child, 1) == []
    assert parent.block_table[2] != child.block_table[2]
    bm.check_invariants([parent, child])


def test_can_append_counts_the_copy_on_write_block():
    bm = BlockManager(BS, num_gpu_blocks=2, num_cpu_blocks=0)
    parent = make_seq("p", range(3))
    compute(bm, parent, 2)
    child = make_seq("c", range(3))
    child.num_computed_tokens = 2
    bm.fork(parent, child)  # 1 block used, shared, partial
    assert bm.can_append(parent, 1)  # 1 copy block
    assert not bm.can_append(parent, 3)  # copy + one more block: 2 > 1 free
    assert bm.append_slots(parent, 3) is None
    bm.check_invariants([parent, child])


def test_swap_round_trip_preserves_capacity_and_refcounts():
    bm = BlockManager(BS, num_gpu_blocks=6, num_cpu_blocks=6)
    parent = make_seq("p", range(7))
    compute(bm, parent, 6)
    child = make_seq("c", range(7))
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    gpu_before = list(parent.block_table)
    assert bm.can_swap_out(parent)
    out = bm.swap_out(parent)
    assert [g for g, _ in out] == gpu_before
    assert parent.block_table == [c for _, c in out] and bm.is_swapped_out(parent)
    assert all(bm.gpu.ref_counts[g] == 1 for g in gpu_before)  # child still holds them
    bm.check_invariants([parent, child])
    assert bm.can_swap_in(parent, 1)
    back = bm.swap_in(parent)
    assert [c for c, _ in back] == [c for _, c in out]
    assert len(parent.block_table) == 2 and not bm.is_swapped_out(parent)
    assert bm.num_free_cpu_blocks == 6
    assert bm.append_slots(parent, 1) == []  # private blocks now: no copy
    bm.check_invariants([parent, child])
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_gpu_blocks == 6
    bm.check_invariants([])


def test_swap_out_needs_cpu_blocks_and_free_of_swapped_seq():
    bm = BlockManager(BS, num_gpu_blocks=4, num_cpu_blocks=1)
    s = make_seq("s", range(8))
    compute(bm, s, 8)
    assert not bm.can_swap_out(s)
    with pytest.raises(RuntimeError):
        bm.swap_out(s)
    bm2 = BlockManager(BS, num_gpu_blocks=4, num_cpu_blocks=2)
    t = make_seq("t", range(8))
    compute(bm2, t, 8)
    bm2.swap_out(t)
    assert bm2.num_free_gpu_blocks == 4 and bm2.num_free_cpu_blocks == 0
    bm2.free(t)
    assert bm2.num_free_cpu_blocks == 2
    bm2.check_invariants([])


def test_check_invariants_detects_leak():
    bm = BlockManager(BS, num_gpu_blocks=4, num_cpu_blocks=0)
    s = make_seq("s", range(4))
    compute(bm, s, 4)
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # s's block is held but s is not listed


def test_gpu_usage_counts_cached_free_blocks_as_free():
    bm = BlockManager(BS, num_gpu_blocks=4, num_cpu_blocks=0)
    s = make_seq("s", range(8))
    compute(bm, s, 8)
    assert bm.gpu_usage == 0.5
    bm.free(s)
    assert bm.gpu_usage == 0.0 and bm.gpu.num_evictable_blocks == 2
