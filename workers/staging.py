"""One host-to-device copy per step: the step's integer inputs packed into a pinned buffer.

The model runner builds its inputs as numpy arrays; `StagingBuffer.to_device` packs
them back to back (each 16-byte aligned) into one pinned host buffer, issues a
single non-blocking copy into a device buffer of the same layout, and returns
device views of each array: no per-array copies, no per-array launches.
`copy_into` is the same copy for a caller with a fixed layout of its own (the decode
CUDA graphs read their inputs in place: workers/cuda_graphs.py).

Two host buffers alternate: the runner prepares step N+1 while step N (and so its copy)
may still be queued on the device. One device buffer is enough: copies and the kernels
reading it are ordered on one stream.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

_ALIGN = 16


def to_device_async(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A device copy of a small array outside the step's one staged copy (inputs only some steps
    need), queued without syncing: a copy from pageable memory would wait for the stream."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # (the host allocator keeps it until copied)


def aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class StagingBuffer:
    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = device
        self.pinned = device.type == "cuda"
        self._copied: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each
        self._turn = 0  # which host buffer this step fills
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        for event in self._copied:
            if event is not None:
                event.synchronize()  # never free a host buffer a copy still reads
        capacity = aligned(capacity)  # every dtype view below spans it exactly
        # (copy_into copies bytes a step may not have written; the device never reads those.)
        self.hosts = [torch.zeros(capacity, dtype=torch.uint8, pin_memory=self.pinned) for _ in (0, 1)]
        self.host_nps = [h.numpy() for h in self.hosts]  # (numpy views, made once)
        self.dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self.dev_views = _dtype_views(self.dev)

    def _next_host(self, nbytes: int) -> int:
        """The host buffer this step fills, free to overwrite and at least nbytes long."""
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            # The copy two steps back may still read this host buffer: never overwrite it early.
            self._copied[turn].synchronize()
        if nbytes > self.hosts[turn].numel():
            self._alloc(max(nbytes, 2 * self.hosts[turn].numel()))
        return turn

    def _copy(self, turn: int, dst: torch.Tensor, nbytes: int) -> None:
        dst[:nbytes].copy_(self.hosts[turn][:nbytes], non_blocking=self.pinned)
        if self.pinned:
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()

    def copy_into(self, dst: torch.Tensor, fill: Callable[[np.ndarray], int], capacity: int) -> None:
        """fill(host) writes a step's bytes into a host buffer of at least `capacity` bytes
        and returns how many of them to copy; they land in dst (uint8, on the device)."""
        turn = self._next_host(capacity)
        self._copy(turn, dst, fill(self.host_nps[turn]))

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors equal to `arrays` (dtypes kept), via one copy."""
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            end += aligned(a.nbytes)
        turn = self._next_host(end)
        host, host_np = self.hosts[turn], self.host_nps[turn]
        for a, off in zip(arrays, offsets):
            host_np[off:off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        if self.device.type == "cpu":
            views = _dtype_views(host[:end].clone())  # CPU workers: just a private copy
        else:
            self._copy(turn, self.dev, end)
            views = self.dev_views
        out = []
        for a, off in zip(arrays, offsets):  # one slice per array (offsets are aligned)
            t = views[a.dtype][off // a.itemsize:off // a.itemsize + a.size]
            out.append(t if a.ndim == 1 else t.view(a.shape))
        return out


def _dtype_views(buf: torch.Tensor) -> dict[np.dtype, torch.Tensor]:
    """buf (uint8, a multiple of 16 bytes) as each dtype the runner stages."""
    return {np.dtype(np.int64): buf.view(torch.int64), np.dtype(np.int32): buf.view(torch.int32)}


__all__ = ["StagingBuffer", "aligned"]
