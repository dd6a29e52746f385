"""Paged KV-cache bookkeeping on the driver: block ids, reference counts, prefix cache.

Nothing here touches device memory. The driver decides which block ids hold which
tokens; the workers' cache engines own the memory and carry out the copy/swap lists
the scheduler emits.

Two pools: the GPU pool (prefix caching optional) and a CPU pool for swapped-out
sequences (no prefix caching). Invariants, checked by `BlockManager.check_invariants`:
  * each block's refcount == number of live block tables that hold it;
  * a block with refcount 0 is in exactly one of: the uncached free list, the
    evictable LRU (it has a hash, its K/V is still valid and can be reused);
  * free + used == total;
  * hash_to_block and the per-block hash agree; only full, computed blocks have a hash,
    and a block with a hash is never written again (positions are append-only).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable, Sequence as Seq

from driver.sequence import Sequence


def hash_block(parent_hash: int | None, token_ids: Iterable[int]) -> int:
    """Chained content hash: a block is identified by its tokens AND everything before
    it, so equal tokens after a different prefix are a different block."""
    return hash((parent_hash, tuple(token_ids)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """Fixed-size blocks with reference counts, a free list and an LRU of cached blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # refcount 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, hashed; oldest first
        self.prefix_cache_queries = 0  # full blocks looked up in the cache
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get: uncached free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def allocate(self) -> int:
        """A block with refcount 1: an uncached free one first, else evict the LRU cached one."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self.hash_to_block[self.block_hashes[block]]
            self.block_hashes[block] = None
        else:
            raise RuntimeError("out of KV cache blocks (call can_* before allocating)")
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            # Only a cached (evictable) block may be revived; an uncached free block has no
            # owner and no content anyone could want.
            if block not in self._evictable:
                raise AssertionError(f"incref of free block {block}")
            del self._evictable[block]
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        """Drop one reference. At 0 a hashed block stays cached (evictable, most recent)."""
        if self.ref_counts[block] <= 0:
            raise AssertionError(f"double free of block {block} (refcount already 0)")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_hashes[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def lookup(self, block_hash: int) -> int | None:
        """Peek: the cached block with this hash, without taking it or counting."""
        if not self.enable_prefix_caching:
            return None
        return self.hash_to_block.get(block_hash)

    def take_cached(self, block_hash: int) -> int | None:
        """Look up one full block (counted); on a hit take a reference to it."""
        if not self.enable_prefix_caching:
            return None
        self.prefix_cache_queries += 1
        block = self.hash_to_block.get(block_hash)
        if block is not None:
            self.prefix_cache_hits += 1
            self.incref(block)
        return block

    def register(self, block: int, block_hash: int) -> bool:
        """Make a full, computed block findable. A hash already owned by another block
        is not registered twice: this block then simply stays uncached."""
        if not self.enable_prefix_caching:
            return False
        current = self.block_hashes[block]
        if current is not None:
            # Shared blocks (fork, prefix hit) hold the same tokens after the same prefix.
            assert current == block_hash, f"block {block} re-registered under another hash"
            return False
        if block_hash in self.hash_to_block:
            return False
        self.block_hashes[block] = block_hash
        self.hash_to_block[block_hash] = block
        return True

    def check(self, expected_refs: dict[int, int]) -> None:
        """Assert the allocator's state against refcounts counted from live block tables."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate block in the free list"
        assert not free & evictable, "block both free and evictable"
        for block in range(self.num_blocks):
            refs, want = self.ref_counts[block], expected_refs.get(block, 0)
            assert refs == want, f"block {block}: refcount {refs}, held by {want} tables"
            in_pool = block in free or block in evictable
            assert in_pool == (refs == 0), f"block {block}: refcount {refs}, in free pool {in_pool}"
            if block in free:
                assert self.block_hashes[block] is None, f"free block {block} still hashed"
            if block in evictable:
                assert self.block_hashes[block] is not None, f"evictable block {block} has no hash"
        for h, block in self.hash_to_block.items():
            assert self.block_hashes[block] == h, f"hash map points at block {block} wrongly"
        assert sum(h is not None for h in self.block_hashes) == len(self.hash_to_block)
        assert self.num_free_blocks + sum(r > 0 for r in self.ref_counts) == self.num_blocks


class BlockManager:
    """Block tables of `Sequence`s over a GPU pool (with prefix caching) and a CPU pool.

    A sequence's block table covers positions [0, num_computed_tokens + scheduled);
    block i holds positions [i * block_size, (i + 1) * block_size).
    """

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.gpu = BlockAllocator(num_gpu_blocks, block_size, enable_prefix_caching)
        self.cpu = BlockAllocator(num_cpu_blocks, block_size, enable_prefix_caching=False)
        # seq_id -> chained hashes of the sequence's leading full token blocks, computed
        # lazily and kept: tokens of a full block never change, so neither does its hash.
        self._hashes: dict[str, list[int]] = {}
        # seq_id -> leading table entries already registered in (or served by) the cache.
        self._num_registered: dict[str, int] = {}
        self._on_cpu: set[str] = set()  # sequences whose table holds CPU block ids
        self.num_cow_copies = 0  # blocks copied on write since start (n > 1 sharing)

    # ---- prefix cache -------------------------------------------------------------
    def _block_hash(self, seq: Sequence, index: int) -> int:
        hashes = self._hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            root = hash(("lora", seq.lora_id)) if seq.lora_id else None
            hashes.append(hash_block(hashes[-1] if hashes else root, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[index]

    def _num_prefix_candidates(self, seq: Sequence) -> int:
        # Full blocks within the first num_tokens - 1 tokens: at least one token always
        # stays uncomputed so the model still produces logits for the next token.
        if not (self.enable_prefix_caching and seq.reads_prefix_cache):
            return 0
        return (seq.num_tokens - 1) // self.block_size

    def _peek_prefix_hits(self, seq: Sequence) -> list[int]:
        hits = []
        for i in range(self._num_prefix_candidates(seq)):
            block = self.gpu.lookup(self._block_hash(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """What allocate_prefix would return now (no side effects, not counted)."""
        return len(self._peek_prefix_hits(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether allocate_prefix(seq) followed by append_slots(seq, num_new_tokens) fits."""
        hits = self._peek_prefix_hits(seq)
        total = len(hits) * self.block_size + num_new_tokens
        new_blocks = max(0, _cdiv(total, self.block_size) - len(hits))
        # A hit on an evictable block takes it out of the free pool as well.
        revived = sum(1 for b in hits if self.gpu.ref_counts[b] == 0)
        return new_blocks + revived <= self.gpu.num_free_blocks

    def allocate_prefix(self, seq: Sequence) -> int:
        """At admission (empty table): take the cached leading full blocks, stopping at
        the first miss. Sets num_computed_tokens and num_cached_tokens; returns the count."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "allocate_prefix needs a fresh seq"
        for i in range(self._num_prefix_candidates(seq)):
            block = self.gpu.take_cached(self._block_hash(seq, i))
            if block is None:
                break
            seq.block_table.append(block)
        num_cached = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        self._num_registered[seq.seq_id] = len(seq.block_table)
        return num_cached

    def mark_computed(self, seq: Sequence) -> None:
        """After a step: register blocks that became full and computed. Only known tokens
        count: with async scheduling, computed may run one pending token ahead."""
        if not self.enable_prefix_caching or seq.seq_id in self._on_cpu:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        start = self._num_registered.get(seq.seq_id, 0)
        if num_full <= start:  # most decode steps: no block became full
            return
        for i in range(start, num_full):
            self.gpu.register(seq.block_table[i], self._block_hash(seq, i))
        self._num_registered[seq.seq_id] = max(start, num_full)

    # ---- growth and copy-on-write ---------------------------------------------------
    def _cow_index(self, seq: Sequence) -> int | None:
        """Table index of the block the next token lands in, if it must be copied first:
        it is already in the table (partly filled) and shared with another table."""
        index = seq.num_computed_tokens // self.block_size
        if index < len(seq.block_table) and self.gpu.ref_counts[seq.block_table[index]] > 1:
            return index
        return None

    def _num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        if num_new_tokens <= 0:
            return 0
        total = seq.num_computed_tokens + num_new_tokens
        grow = max(0, _cdiv(total, self.block_size) - len(seq.block_table))
        return grow + (self._cow_index(seq) is not None)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_blocks_needed(seq, num_new_tokens) <= self.gpu.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Grow the table to cover num_computed_tokens + num_new_tokens positions.
        Returns the (src, dst) copy-on-write copies, or None (and allocates nothing)
        when the free pool is too small."""
        assert seq.seq_id not in self._on_cpu, "append_slots on a swapped-out sequence"
        if num_new_tokens <= 0:
            return []
        table, bs = seq.block_table, self.block_size
        total = seq.num_computed_tokens + num_new_tokens
        index = seq.num_computed_tokens // bs
        if index < len(table) and total <= len(table) * bs and self.gpu.ref_counts[table[index]] == 1:
            return []  # the common decode: room left in a block of its own
        if not self.can_append(seq, num_new_tokens):
            return None
        copies: list[tuple[int, int]] = []
        index = self._cow_index(seq)
        if index is not None:
            old, new = seq.block_table[index], self.gpu.allocate()
            copies.append((old, new))
            self.num_cow_copies += 1
            self.gpu.free(old)  # refcount was > 1: the other holders keep it
            seq.block_table[index] = new
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < _cdiv(total, self.block_size):
            seq.block_table.append(self.gpu.allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        assert parent.seq_id not in self._on_cpu, "fork of a swapped-out sequence"
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.gpu.incref(block)
        if parent.seq_id in self._hashes:
            self._hashes[child.seq_id] = list(self._hashes[parent.seq_id])
        self._num_registered[child.seq_id] = self._num_registered.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (GPU or CPU, wherever it is) and its table."""
        pool = self.cpu if seq.seq_id in self._on_cpu else self.gpu
        for block in seq.block_table:
            pool.free(block)
        seq.block_table = []
        self._on_cpu.discard(seq.seq_id)
        self._hashes.pop(seq.seq_id, None)
        self._num_registered.pop(seq.seq_id, None)

    # ---- swapping ----------------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return len(seq.block_table) <= self.cpu.num_free_blocks

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move the table to CPU blocks; returns (gpu, cpu) copies. Shared GPU blocks get a
        private CPU copy per sequence (sharing is lost; refcounts stay exact)."""
        if not self.can_swap_out(seq):
            raise RuntimeError(f"not enough CPU blocks to swap out {seq.seq_id}")
        mapping = []
        for i, gpu_block in enumerate(seq.block_table):
            cpu_block = self.cpu.allocate()
            mapping.append((gpu_block, cpu_block))
            self.gpu.free(gpu_block)  # a hashed block stays cached (evictable)
            seq.block_table[i] = cpu_block
        self._on_cpu.add(seq.seq_id)
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool:
        """Whether the table fits back on the GPU, grown for num_new_tokens more."""
        need = max(len(seq.block_table),
                   _cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size))
        return need <= self.gpu.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move the table back to fresh GPU blocks; returns (cpu, gpu) copies."""
        assert seq.seq_id in self._on_cpu, f"{seq.seq_id} is not swapped out"
        if len(seq.block_table) > self.gpu.num_free_blocks:
            raise RuntimeError(f"not enough GPU blocks to swap in {seq.seq_id}")
        mapping = []
        for i, cpu_block in enumerate(seq.block_table):
            gpu_block = self.gpu.allocate()
            mapping.append((cpu_block, gpu_block))
            self.cpu.free(cpu_block)
            seq.block_table[i] = gpu_block
        self._on_cpu.discard(seq.seq_id)
        self._num_registered[seq.seq_id] = 0  # fresh blocks: register them again
        return mapping

    # ---- stats and checks ------------------------------------------------------------
    @property
    def num_free_gpu_blocks(self) -> int:
        return self.gpu.num_free_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.cpu.num_free_blocks

    @property
    def gpu_usage(self) -> float:
        """Fraction of GPU blocks referenced by live sequences (cached-free ones are free)."""
        return self.gpu.num_used_blocks / self.gpu.num_blocks if self.gpu.num_blocks else 0.0

    @property
    def cpu_usage(self) -> float:
        return self.cpu.num_used_blocks / self.cpu.num_blocks if self.cpu.num_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits over lookups of full blocks (a miss ends a lookup, and counts as one)."""
        q = self.gpu.prefix_cache_queries
        return self.gpu.prefix_cache_hits / q if q else 0.0

    def is_swapped_out(self, seq: Sequence) -> bool:
        return seq.seq_id in self._on_cpu

    def check_invariants(self, seqs: Seq[Sequence]) -> None:
        """Assert refcounts == table membership over `seqs` (all live sequences)."""
        gpu_refs: dict[int, int] = {}
        cpu_refs: dict[int, int] = {}
        ids = set()
        for seq in seqs:
            assert seq.seq_id not in ids, f"sequence {seq.seq_id} listed twice"
            ids.add(seq.seq_id)
            refs = cpu_refs if seq.seq_id in self._on_cpu else gpu_refs
            for block in seq.block_table:
                refs[block] = refs.get(block, 0) + 1
        assert self._on_cpu <= ids, f"swapped-out sequences not live: {self._on_cpu - ids}"
        self.gpu.check(gpu_refs)
        self.cpu.check(cpu_refs)


__all__ = ["BlockAllocator", "BlockManager", "hash_block"]
