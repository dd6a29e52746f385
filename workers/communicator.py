"""Custom all-reduce for tensor parallelism on one node: torch symmetric memory.

A decode step all-reduces two small hidden-state tensors per layer (Llama-3-8B at
batch 64: 512 KiB each, 64 per step), where NCCL's fixed latency dominates. Here each
rank keeps one buffer that every peer can load from over NVLink
(torch.distributed._symmetric_memory), and one kernel does the whole all-reduce:

- one-shot (up to ONE_SHOT_MAX_BYTES): copy the input into the own buffer, barrier,
  every rank loads all peers' buffers and sums; one pass, latency-bound sizes;
- two-shot (up to max_bytes): reduce-scatter then all-gather through the buffers;
  each rank reads 1/world of every peer's data, better once bandwidth matters.

Larger all-reduces (long prefill chunks) stay on NCCL. Both kernels end in a barrier,
so the next all-reduce may overwrite the buffer at once; they run on the current
stream and are captured by CUDA graphs like any kernel (the buffer never moves).
Peer access needs every rank's GPU visible in every worker (Worker.init_device).
"""
from __future__ import annotations

import importlib.util

import torch

# Measured on 2x H200 (benchmarks/allreduce_latency.py, 2026-11-23), bf16: one-shot
# 6.4 / 10.8 / 14.8 us at 8 KiB / 512 KiB / 1 MiB, two-shot 19.1 us at 2 MiB where
# one-shot takes 21.4; NCCL 11.6 / 15.6 / 21.3 / 34.5 us.
ONE_SHOT_MAX_BYTES = 1 << 20
MAX_BYTES = 8 << 20
ALIGN = 16  # bytes: the kernels move 16-byte vectors


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this process cannot use the custom all-reduce, or None."""
    if device.type != "cuda":
        return "not on CUDA"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"the symmetric-memory kernels do not reduce {dtype}"
    if torch.cuda.device_count() < 2:
        return "only this rank's GPU is visible (peer access needs the others)"
    peers = [d for d in range(torch.cuda.device_count()) if d != device.index]
    if not all(torch.cuda.can_device_access_peer(device.index, d) for d in peers):
        return "no peer-to-peer access between the GPUs"
    if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
        return "this torch has no symmetric memory"
    return None


class SymmMemAllReduce:
    """Sums tensors of one dtype over the default process group, out of place."""

    def __init__(self, group_name: str, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name = group_name
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, group_name)  # collective: maps the peers' buffers
        self._fused_copy = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.dtype == self.dtype and x.is_cuda and x.is_contiguous() and 0 < nbytes <= self.max_bytes
                and nbytes % ALIGN == 0 and x.data_ptr() % ALIGN == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of x (which fits()); x is left unchanged."""
        flat = x.view(-1)
        buf = self.buffer[:flat.numel()]
        out = torch.empty_like(x)
        ops = torch.ops.symm_mem
        if flat.numel() * x.element_size() <= ONE_SHOT_MAX_BYTES:
            if self._fused_copy:  # the kernel copies x into the buffer itself
                ops.one_shot_all_reduce_copy_out(buf, flat, "sum", self.group_name, out.view(-1))
            else:
                buf.copy_(flat)
                ops.one_shot_all_reduce_out(buf, "sum", self.group_name, out.view(-1))
        else:
            buf.copy_(flat)
            ops.two_shot_all_reduce_out(buf, "sum", self.group_name, out.view(-1))
        return out


__all__ = ["SymmMemAllReduce", "unavailable_reason", "ONE_SHOT_MAX_BYTES", "MAX_BYTES"]
