"""Plumbing shared by the CuPy launchers (ops/cupy_ops.py, ops/cupy_attention.py,
ops/cupy_all_reduce.py): NVRTC compilation of ops/*.cu, each behind ops/dtypes.cu, through
cupy.RawModule (one module per template instance and device, cached here and in CuPy's
on-disk cache), launches on torch's current stream with raw device pointers, and the
small checks every launcher makes."""
from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import cupy as cp
import numpy as np
import torch

_DIR = Path(__file__).resolve().parent
_OPTIONS = ("-std=c++17",)
_CTYPE = {torch.bfloat16: "bf16_t", torch.float16: "fp16_t"}
_HALF = (torch.bfloat16, torch.float16)

_lock = threading.Lock()
_sources: dict[str, str] = {}  # "a.cu+b.cu": the files, concatenated
_kernels: dict[tuple, object] = {}
_sm_counts: dict[int, int] = {}
_capabilities: dict[int, tuple[int, int]] = {}


def _kernel(fname: str, expr: str, dev: int, smem: int = 0):
    """The compiled kernel `expr` (a template instance) of ops/<fname>, loaded on
    device dev and allowed at least `smem` bytes of dynamic shared memory, as a
    cupy.cuda.Function (launched directly: see _launch)."""
    key = (dev, fname, expr)
    hit = _kernels.get(key)
    if hit is not None and hit[2] >= smem:
        return hit[1]
    with _lock:
        hit = _kernels.get(key)
        with cp.cuda.Device(dev):
            if hit is None:
                src = _sources.get(fname)
                if src is None:  # "a.cu+b.cu": b.cu uses what a.cu defines; all use dtypes.cu
                    src = _sources[fname] = "\n".join((_DIR / f).read_text()
                                                      for f in ("dtypes.cu", *fname.split("+")))
                mod = cp.RawModule(code=src, options=_OPTIONS, name_expressions=(expr,))
                raw = mod.get_function(expr)
                hit = (raw, raw.kernel, 48 * 1024)  # .kernel compiles and loads it on dev
            raw, fn, allowed = hit
            if smem > allowed:
                raw.max_dynamic_shared_size_bytes = smem
                allowed = smem
        _kernels[key] = (raw, fn, allowed)
    return fn


class _StreamRef:
    """What cupy.cuda.Function takes as a stream: anything with the handle in .ptr."""
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(dev: int) -> _StreamRef:
    """torch's current stream on dev (the capture stream inside torch.cuda.graph)."""
    if _raw_stream is not None:
        return _StreamRef(_raw_stream(dev))
    return _StreamRef(torch.cuda.current_stream(dev).cuda_stream)


def _launch(fn, dev: int, grid: tuple, block: tuple, args: tuple, smem: int = 0, pdl: bool = False) -> None:
    """Launch on torch's current stream: one cuLaunchKernel, nothing else on the GPU.
    pdl (sm_90): a programmatic dependent launch; see _launch_dependent."""
    stream = _current_stream(dev)
    if pdl and _capability(dev) >= (9, 0):
        _launch_dependent(fn, dev, grid, block, args, smem, stream.ptr)
    else:
        _on_device(dev, lambda: fn(grid, block, args, smem, stream))


def _on_device(dev: int, call):
    """call() with dev as the current device (switching only when it is not)."""
    if torch.cuda.current_device() == dev:
        return call()
    with cp.cuda.Device(dev):
        return call()


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_C_ARG = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
          np.float32: ctypes.c_float}


@functools.cache
def _cu_launch_kernel_ex():
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    fn.argtypes = (ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    return fn


def _launch_dependent(fn, dev: int, grid: tuple, block: tuple, args: tuple, smem: int, stream: int) -> None:
    """cuLaunchKernelEx with programmatic stream serialization: the kernel may start as soon
    as every CTA of the kernel before it on the stream has passed pdl_trigger() (or exited),
    and must pdl_wait() before it reads what that kernel writes (ops/dtypes.cu). CuPy has
    no launch with attributes, hence the driver call through ctypes."""
    values = [_C_ARG[type(a)](a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    pad = lambda t: (ctypes.c_uint * 3)(*t, *(1,) * (3 - len(t)))
    config = _LaunchConfig(pad(grid), pad(block), smem, stream, ctypes.pointer(attr), 1)
    rc = _on_device(dev, lambda: _cu_launch_kernel_ex()(ctypes.byref(config), fn.ptr, params, None))
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {rc}")


def _p(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _i64(x: int) -> np.int64:
    return np.int64(x)


def _dev(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _sm_count(dev: int) -> int:
    n = _sm_counts.get(dev)
    if n is None:
        n = _sm_counts[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return n


def _capability(dev: int) -> tuple[int, int]:
    """dev's compute capability, asked once (launchers check it on every call)."""
    cap = _capabilities.get(dev)
    if cap is None:
        cap = _capabilities[dev] = torch.cuda.get_device_capability(dev)
    return cap


def _capability_ok(dev: int) -> bool:
    return _capability(dev) >= (8, 0)


def _round32(n: int, cap: int) -> int:
    """Threads for n work items: a multiple of 32 in [32, cap]."""
    return min(cap, max(32, -(-n // 32) * 32))


def _aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [..., H] as [N, H] with unit last stride; returns (view or copy, row stride)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h) if x.dim() != 2 else x
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < h):
        x2 = x2.contiguous()
    return x2, (x2.stride(0) if x2.shape[0] > 1 else h)


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    for t in ts:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")

