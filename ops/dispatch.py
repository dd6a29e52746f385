"""Which implementation of the ops API (see ops/reference.py) runs on a tensor.

The model calls `ops_for(x).rms_norm(...)` etc. and never names an
implementation, so that the CPU engine and the GPU engine share all model code.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from ops import reference


@functools.cache
def _cuda_ops() -> ModuleType | None:
    """The CuPy kernels' module (same names and signatures as ops.reference), or
    None without a GPU or CuPy. Plug them in here and nowhere else."""
    # None (plain-torch reference everywhere) without CUDA or CuPy: the CPU engine
    # never imports CuPy.
    if not torch.cuda.is_available():
        return None
    try:
        import cupy  # noqa: F401
        from ops import cupy_ops
    except Exception:  # ImportError, or a CuPy that cannot load its CUDA libraries
        return None
    return cupy_ops


def ops_for(tensor: torch.Tensor) -> ModuleType:
    """The ops module for `tensor`'s device: CuPy kernels on CUDA when available,
    else the plain-torch reference (which runs on any device)."""
    if tensor.is_cuda:
        cuda_ops = _cuda_ops()
        if cuda_ops is not None:
            return cuda_ops
    return reference


__all__ = ["ops_for"]
