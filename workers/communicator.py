"""Custom all-reduce for tensor parallelism on one node: torch symmetric memory.

A decode step all-reduces two small hidden-state tensors per layer (Llama-3-8B at
batch 64: 512 KiB each, 64 per step), where NCCL's fixed latency dominates. Here each
rank keeps one buffer that every peer can load from over NVLink
(torch.distributed._symmetric_memory), and one kernel does the whole all-reduce:

- one-shot (up to ONE_SHOT_MAX_BYTES): copy the input into the own buffer, barrier,
  every rank loads all peers' buffers and sums; one pass, latency-bound sizes;
- two-shot (up to max_bytes): reduce-scatter then all-gather through the buffers;
  each rank reads 1/world of every peer's data, better once bandwidth matters.

After o_proj and down_proj the all-reduce is fused with the residual add and RMSNorm
that follow it (FusedAllReduceRMSNorm, a CuPy kernel in ops/all_reduce.cu on the same
kind of buffers): one kernel instead of an all-reduce and a norm.

Larger all-reduces (long prefill chunks) stay on NCCL. torch's one-/two-shot kernels
end in a barrier and the fused kernel alternates between two buffer halves, so the
next all-reduce may overwrite a buffer at once; all run on the current stream and
are captured by CUDA graphs like any kernel (the buffers never move).
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


def unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why this process cannot use symmetric memory (for `dtype`: torch's
    all-reduce kernels, which take bf16 and fp32), or None."""
    if device.type != "cuda":
        return "not on CUDA"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float32):
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
        # Every rank must decide alike (a rank on NCCL while a peer waits in the kernel
        # would hang): the ranks see the same shapes and dtypes, and torch allocations
        # are 512-byte aligned, so the alignment test never differs between them.
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


class FusedAllReduceRMSNorm:
    """(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual) in one kernel, for
    bf16/fp16 inputs of at most max_bytes (ops/cupy_all_reduce.py)."""

    def __init__(self, group_name: str, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = MAX_BYTES):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        from ops import cupy_all_reduce
        self._kernel = cupy_all_reduce
        self.dtype, self.max_bytes = dtype, max_bytes
        self.half_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(2 * self.half_numel, dtype=dtype, device=device)  # two halves
        self.flags = symm_mem.empty(cupy_all_reduce.FLAG_WORDS, dtype=torch.int64, device=device)
        self.flags.zero_()
        buffers = symm_mem.rendezvous(self.buffer, group_name)  # collective
        flags = symm_mem.rendezvous(self.flags, group_name)
        self.rank, self.world = buffers.rank, buffers.world_size
        self.buffer_ptrs = torch.tensor(buffers.buffer_ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(flags.buffer_ptrs, dtype=torch.int64, device=device)
        self.epochs = torch.zeros(cupy_all_reduce.MAX_CTAS, dtype=torch.int64, device=device)
        self.max_ctas = torch.cuda.get_device_properties(device).multi_processor_count
        torch.cuda.synchronize(device)
        dist.barrier()  # every rank's flags are zero before any peer's first signal

    def fits(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.dtype == self.dtype and 0 < x.numel() * x.element_size() <= self.max_bytes
                and self._kernel.unsupported_reason(x, residual, weight) is None)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        return self._kernel.all_reduce_rms_norm(x, residual, weight, eps, self.buffer_ptrs, self.flag_ptrs,
                                                self.epochs, self.half_numel, self.rank, self.world,
                                                self.max_ctas)


__all__ = ["SymmMemAllReduce", "FusedAllReduceRMSNorm", "unavailable_reason", "ONE_SHOT_MAX_BYTES",
           "MAX_BYTES"]
