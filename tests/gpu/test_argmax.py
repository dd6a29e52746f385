"""The greedy-sampling argmax kernel (ops/argmax.cu) against torch.argmax, index for
index: vocabulary widths with and without float4 rows, ties, NaN, -inf rows, strided rows.

Run on a GPU machine: python3 -m pytest -m gpu tests/gpu/test_argmax.py
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


@pytest.mark.parametrize("width", [1, 7, 1000, 32000, 128256, 151936, 152063])
@pytest.mark.parametrize("rows", [1, 3, 64, 257])
def test_argmax_random(rows, width):
    torch.manual_seed(rows * 1000003 + width)
    logits = torch.randn(rows, width, device="cuda") * 4
    assert torch.equal(K.argmax(logits), ref.argmax(logits))


@pytest.mark.parametrize("width", [128256, 1001])
def test_argmax_ties_nan_inf(width):
    torch.manual_seed(width)
    logits = torch.randn(6, width, device="cuda")
    top = logits.max() + 1
    logits[0, [5, width - 3, 17]] = top  # ties: the first index wins
    logits[1, [width - 1, 2]] = float("nan")  # NaN is the maximum, the first NaN wins
    logits[2] = float("-inf")  # nothing but -inf: index 0
    logits[3, :] = 0.25  # all equal
    logits[4, width - 1] = float("inf")
    logits[5, [3, 9]] = float("inf")
    got, want = K.argmax(logits), ref.argmax(logits)
    assert torch.equal(got, want), (got.tolist(), want.tolist())


def test_argmax_strided_rows_and_fallbacks():
    torch.manual_seed(1)
    wide = torch.randn(5, 3000, device="cuda")
    for view in (wide[:, :2999], wide[:, 4:2004], wide[:, 1:]):  # row strides, unaligned starts
        assert torch.equal(K.argmax(view), ref.argmax(view))
    half = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)  # not the kernel's: torch's
    assert torch.equal(K.argmax(half), ref.argmax(half))
    assert K.argmax(torch.randn(0, 10, device="cuda")).shape == (0,)
