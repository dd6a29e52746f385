"""ops/lora.cu (cupy_ops.lora_apply for decode-sized batches) against ops/reference.py's
lora_apply in float32 on the upcast inputs: rows with and without a slot, every slot used,
widths of one to three stacked parts, K and N of the model's linears, bf16 and fp16; rows
without a slot must come back bit for bit. Above LORA_KERNEL_MAX_ROWS the op is the reference.

Run on a GPU machine: python3 -m pytest -m gpu tests/gpu/test_lora_kernel.py
"""
from __future__ import annotations

import pytest
import torch

cp = pytest.importorskip("cupy")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from ops import reference as ref  # noqa: E402

if torch.cuda.is_available():
    from ops import cupy_ops as K  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
NUM_SLOTS = 4


def _case(rows: int, k: int, n: int, width: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, generator=g, device="cuda").to(dtype)
    a = (torch.randn(NUM_SLOTS * width, k, generator=g, device="cuda") * 0.05).to(dtype)
    bt = (torch.randn(NUM_SLOTS * width, n, generator=g, device="cuda") * 0.05).to(dtype)
    out = torch.randn(rows, n, generator=g, device="cuda").to(dtype)
    slots = torch.randint(-1, NUM_SLOTS, (rows,), generator=g, device="cuda")
    slots[0] = -1 if rows > 1 else 1  # a base row beside adapter rows, and (rows >= 5) every slot
    slots[1:NUM_SLOTS + 1] = torch.arange(min(NUM_SLOTS, rows - 1), device="cuda")
    return x, a, bt, out, slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("k, n, width", [(4096, 6144, 48), (4096, 4096, 16), (14336, 4096, 16),
                                         (4096, 28672, 32), (64, 96, 8), (136, 200, 24)])
def test_lora_kernel_equals_reference(dtype, rows, k, n, width):
    x, a, bt, out, slots = _case(rows, k, n, width, dtype, seed=rows * 7 + width)
    onehot = (slots[:, None] == torch.arange(NUM_SLOTS, device="cuda")).to(dtype)
    want = ref.lora_apply(out.float().clone(), x.float(), a.float(), bt.float(), slots, onehot.float(), width)
    got = K.lora_apply(out.clone(), x, a, bt, slots, onehot, width)
    base = slots < 0
    assert torch.equal(got[base], out[base])  # rows without an adapter are untouched
    err = (got.float() - want).norm() / want.norm()  # (the output's own rounding included)
    assert err < TOL[dtype], float(err)


def test_past_the_row_limit_it_is_the_reference():
    rows = K.LORA_KERNEL_MAX_ROWS + 1
    x, a, bt, out, slots = _case(rows, 256, 128, 16, torch.bfloat16, seed=1)
    onehot = (slots[:, None] == torch.arange(NUM_SLOTS, device="cuda")).to(torch.bfloat16)
    got = K.lora_apply(out.clone(), x, a, bt, slots, onehot, 16)
    assert torch.equal(got, ref.lora_apply(out.clone(), x, a, bt, slots, onehot, 16))
