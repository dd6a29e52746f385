"""The worker's paged KV cache.

Per layer, a key cache and a value cache, each
`[num_blocks, num_kv_heads_per_rank, block_size, head_dim]` on the worker's
device, and the same number of layers of host ("CPU") blocks that swapped-out
sequences live in. Block ids are the driver's; the cache engine only moves bytes.
"""
from __future__ import annotations

import torch

from driver.config import ModelArch

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache)


def kv_block_shape(arch: ModelArch, tp_size: int, block_size: int) -> tuple[int, int, int]:
    return (arch.num_kv_heads // tp_size, block_size, arch.head_dim)


def bytes_per_block(arch: ModelArch, tp_size: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs on one rank, K and V over every layer."""
    kvh, bs, d = kv_block_shape(arch, tp_size, block_size)
    return 2 * arch.num_layers * kvh * bs * d * torch.tensor([], dtype=dtype).element_size()


def num_blocks_for_bytes(nbytes: float, arch: ModelArch, tp_size: int, block_size: int,
                         dtype: torch.dtype) -> int:
    return int(nbytes // bytes_per_block(arch, tp_size, block_size, dtype))


class CacheEngine:
    def __init__(self, arch: ModelArch, tp_size: int, block_size: int, num_gpu_blocks: int,
                 num_cpu_blocks: int, dtype: torch.dtype, device: torch.device):
        shape = kv_block_shape(arch, tp_size, block_size)
        self.device = device
        self.gpu_cache: list[KVCache] = [self._alloc(num_gpu_blocks, shape, dtype, device)
                                         for _ in range(arch.num_layers)]
        pin = device.type == "cuda"
        self.cpu_cache: list[KVCache] = [self._alloc(num_cpu_blocks, shape, dtype, torch.device("cpu"), pin)
                                         for _ in range(arch.num_layers)]

    @staticmethod
    def _alloc(n: int, shape, dtype, device, pin: bool = False) -> KVCache:
        # Zero-filled: padded slots of a partly filled block are read (and masked) by kernels,
        # and NaN garbage times a zero softmax weight would still be NaN.
        return tuple(torch.zeros((n, *shape), dtype=dtype, device=device, pin_memory=pin)
                     for _ in range(2))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src, in every layer."""
        if not pairs:
            return
        src, dst = (torch.tensor(x, device=self.device) for x in zip(*pairs))
        for k, v in self.gpu_cache:
            k[dst] = k[src]
            v[dst] = v[src]

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, host block) pairs."""
        self._swap(self.gpu_cache, self.cpu_cache, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(host block, device block) pairs."""
        self._swap(self.cpu_cache, self.gpu_cache, pairs)

    @staticmethod
    def _swap(src_cache: list[KVCache], dst_cache: list[KVCache], pairs) -> None:
        if not pairs:
            return
        src_ids, dst_ids = (list(x) for x in zip(*pairs))
        for (sk, sv), (dk, dv) in zip(src_cache, dst_cache):
            src_idx = torch.tensor(src_ids, device=sk.device)
            dst_idx = torch.tensor(dst_ids, device=dk.device)
            # Blocking: a non-blocking device->host copy could still be in flight when
            # the host-side index assignment reads it.
            dk[dst_idx] = sk[src_idx].to(dk.device)
            dv[dst_idx] = sv[src_idx].to(dv.device)
