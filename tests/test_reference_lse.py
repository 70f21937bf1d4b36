"""`reference.lse`: partial outputs over disjoint key sets merged by their LSEs (the ring's merge),
with smooth_k's term, against the float64 formula written here."""

from __future__ import annotations

import math

import pytest
import torch

from sageflash import groups, reference


def random_parts(count, batch=2, q_heads=4, kv_heads=2, seq=40, head_dim=80, *, seed, dtype=torch.float16):
    """``count`` partial outputs with their LSEs (some rows -inf: no key in that part; the last two
    rows in every part), q, and a smooth_k mean per part (``[B, Hk, padded]``, as the quantizer's payload)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen).to(dtype)
    parts = []
    for index in range(count):
        out = torch.randn(batch, q_heads, seq, head_dim, generator=gen).to(dtype)
        lse = torch.randn(batch, q_heads, seq, generator=gen) * 3
        lse[:, :, index::count + 1] = -math.inf  # rows this part does not reach
        lse[:, :, -2:] = -math.inf  # rows no part reaches
        km = torch.nn.functional.pad(torch.randn(batch, kv_heads, head_dim, generator=gen), (0, groups.padded_head_dim(head_dim) - head_dim))
        parts.append((torch.where(torch.isinf(lse)[..., None], 0.0, out.float()).to(dtype), lse, km.to(dtype)))
    return q, parts


def expected_merge(q, parts, softmax_scale):
    """float64: each part's LSE plus softmax_scale·q·km, then Σ exp(lse_i - lse) out_i."""
    group = q.shape[1] // parts[0][2].shape[1]
    lses = [lse.double() + softmax_scale * (q.double() @ km[..., : q.shape[-1]].double()
                                              .repeat_interleave(group, 1)[..., None])[..., 0]
            for _, lse, km in parts]
    total = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(torch.exp(lse - total).nan_to_num(0.0)[..., None] * part.double() for (part, _, _), lse in zip(parts, lses))
    return out, total


def merge_all(module, q, parts, softmax_scale, result, smooth_k=True):
    """The parts through ``module.merge_attention`` as the ring calls it; returns the LSE."""
    acc = torch.empty(*q.shape, dtype=torch.float32, device=q.device) if len(parts) > 1 else None
    acc_lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for index, (out, lse, km) in enumerate(parts):
        module.merge_attention(acc, acc_lse, out, lse, q=q if smooth_k else None, km=km if smooth_k else None,
                               softmax_scale=softmax_scale, first=index == 0,
                               result=result if index == len(parts) - 1 else None)
    return acc_lse


@pytest.mark.parametrize("count", [1, 2, 3])
def test_merge_is_the_lse_weighted_sum(count):
    q, parts = random_parts(count, seed=count)
    result = torch.full_like(q, math.nan)
    lse = merge_all(reference, q, parts, 0.1, result)
    expected, expected_lse = expected_merge(q, parts, 0.1)
    torch.testing.assert_close(result.double(), expected, rtol=2e-3, atol=2e-3)  # fp16 result
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)


def test_rows_no_part_reaches_stay_zero_with_lse_minus_inf():
    q, parts = random_parts(2, seed=5)
    for _, lse, _ in parts:
        lse[:, :, :3] = -math.inf
    result = torch.full_like(q, math.nan)
    lse = merge_all(reference, q, parts, 0.1, result)
    assert (result[:, :, :3] == 0).all() and (lse[:, :, :3] == -math.inf).all()
    assert torch.isfinite(result).all()


def test_a_nan_part_spoils_its_rows():
    q, parts = random_parts(3, seed=6)
    parts[1][0][0, 1, 7, 2] = math.nan
    result = torch.zeros_like(q)
    merge_all(reference, q, parts, 0.1, result)
    spoiled = ~torch.isfinite(result)
    assert spoiled[0, 1, 7, 2] and spoiled.sum() == 1
