"""Kernels: plain-torch references (any device) and CuPy raw kernels (CUDA)."""
