"""One host-to-device copy per step: the step's integer inputs packed into a pinned buffer.

The model runner builds its inputs as numpy arrays; `StagingBuffer.to_device` packs
them back to back (each 16-byte aligned) into one pinned host buffer, issues a
single non-blocking copy into a device buffer of the same layout, and returns
device views of each array: no per-array copies, no per-array launches.
"""
from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16


class StagingBuffer:
    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = device
        self.pinned = device.type == "cuda"
        self._alloc(capacity)
        self._copied: torch.cuda.Event | None = None  # the last copy out of the host buffer

    def _alloc(self, capacity: int) -> None:
        self.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned)
        self.dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors equal to `arrays` (dtypes kept), via one copy."""
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            end += -(-a.nbytes // _ALIGN) * _ALIGN
        if self._copied is not None:
            # The previous step's copy may still read the host buffer: never overwrite it early.
            self._copied.synchronize()
        if end > self.host.numel():
            self._alloc(max(end, 2 * self.host.numel()))
        host_np = self.host.numpy()
        for a, off in zip(arrays, offsets):
            host_np[off:off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        if self.device.type == "cpu":
            dev = self.host[:end].clone()  # CPU workers: just a private copy
        else:
            self.dev[:end].copy_(self.host[:end], non_blocking=True)
            dev = self.dev
            self._copied = torch.cuda.Event()
            self._copied.record()
        return [dev[off:off + a.nbytes].view(_TORCH_DTYPES[a.dtype.str[1:]]).view(a.shape)
                for a, off in zip(arrays, offsets)]


_TORCH_DTYPES = {"i8": torch.int64, "i4": torch.int32}

__all__ = ["StagingBuffer"]
