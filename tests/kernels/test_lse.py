"""The Triton LSE kernels (`kernels.lse`) against `reference.lse`.

Runs on the GPU when there is one, else under TRITON_INTERPRET=1 (conftest sets it).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import HAS_CUDA
from sageflash import kernels, reference
from sageflash.kernels import lse as lse_kernels
from sageflash.reference.lse import smooth_k_term
from test_reference_lse import merge_all, random_parts

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("count,smooth_k", [(1, True), (2, False), (3, True)])
def test_merge_matches_reference(count, smooth_k, head_dim, dtype):
    """Into an NHD-strided result (the ring writes the caller's layout); rows some parts do not
    reach (LSE -inf), and rows none reaches (0, LSE -inf); a NaN in one part stays in its element."""
    q, parts = random_parts(count, head_dim=head_dim, seed=10 * count + head_dim, dtype=dtype)
    parts[-1][0][1, 2, 9, 3] = math.nan
    results = []
    for module, device in ((kernels, DEVICE), (reference, "cpu")):
        result = torch.full((q.shape[0], q.shape[2], q.shape[1], head_dim), math.nan, dtype=dtype,
                            device=device).transpose(1, 2)
        moved = [tuple(t.to(device) for t in part) for part in parts]
        lse = merge_all(module, q.to(device), moved, 0.09, result, smooth_k=smooth_k)
        results.append((result.cpu(), lse.cpu()))
    (out, lse), (expected, expected_lse) = results
    assert (out[:, :, -2:] == 0).all() and (lse[:, :, -2:] == -math.inf).all()  # rows no part reaches
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out).sum() == 1
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # relative: one rounding of the float32 result apart
    torch.testing.assert_close(out, expected, rtol=ulp, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_smooth_k_term_matches_reference(head_dim):
    """In place on a contiguous LSE, from an NHD-strided q with GQA; rows at -inf stay there."""
    q, parts = random_parts(1, head_dim=head_dim, seed=head_dim)
    _, lse, km = parts[0]
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, S, D] view of [B, S, Hq, D]
    expected = (lse.double() + smooth_k_term(q, km, 0.11)).float()
    got = lse.to(DEVICE)
    lse_kernels.add_smooth_k_term(got, q.to(DEVICE), km.to(DEVICE), 0.11)
    assert torch.equal(torch.isinf(got.cpu()), torch.isinf(lse)) and torch.isinf(lse).any()
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)


def test_lse_arguments_must_be_contiguous_float32():
    """The kernels address LSEs as contiguous ``[B, Hq, S]``: a strided view is refused, not misread."""
    q, parts = random_parts(1, seed=3)
    out, lse, km = (t.to(DEVICE) for t in parts[0])
    strided = torch.zeros(*lse.shape[:2], 2 * lse.shape[2], device=DEVICE)[..., ::2]
    with pytest.raises(ValueError, match="acc_lse must be a contiguous float32 tensor"):
        kernels.merge_attention(None, strided, out, lse, first=True, result=torch.empty_like(out))
    with pytest.raises(ValueError, match="lse must be a contiguous float32 tensor"):
        lse_kernels.add_smooth_k_term(strided, q.to(DEVICE), km, 0.1)
