"""``attn_mask`` on the Triton backend, against the CPU reference and exact attention.

On the GPU when there is one, else under TRITON_INTERPRET=1 with tiny shapes; ``gpu`` tests need
a CUDA device of capability >= 8.9.
"""

from __future__ import annotations

import math

import pytest
import torch

import sageflash
from conftest import HAS_CUDA, nmse
from helpers import MASK_KINDS, exact_attention, make_mask, random_qkv
from sageflash import kernels, reference

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")
B, HQ, HK, SQ, SK, D = 2, 2, 1, 70, 100, 64  # two query tiles, a partial key block


def assert_same_numbers(out, want):
    """Bit-equal in the interpreter; on a GPU, equal up to where ptxas fuses a multiply and an add
    into an FMA, which differs between kernels compiled for different mask types and strides."""
    if HAS_CUDA:
        assert nmse(out, want) <= 1e-7, nmse(out, want)
    else:
        assert torch.equal(out, want)


def both_backends(q, k, v, mask, **knobs):
    out = sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="triton", **knobs)
    ref = sageflash.sage_attn_sm89_fp16(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu(),
                                        backend="reference", **knobs)
    return out, ref


@pytest.mark.parametrize("kind,is_causal", [(kind, False) for kind in MASK_KINDS]
                         + [("key_padding", True), ("additive_bf16", True)])
def test_matches_reference_and_exact(kind, is_causal):
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, seed=len(kind), device=DEVICE)
    mask = make_mask(kind, B, HQ, SQ, SK, seed=1, device=DEVICE)
    out, ref = both_backends(q, k, v, mask, is_causal=is_causal)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert nmse(out, ref) <= 1e-5
    assert nmse(out, exact_attention(q, k, v, is_causal=is_causal, attn_mask=mask)) < 5e-3


def test_strided_and_expanded_masks_read_in_place():
    """A transposed mask and a user-expanded one (stride 0) give the contiguous mask's output."""
    q, k, v = random_qkv(1, HQ, HK, SQ, SK, D, seed=2, device=DEVICE)
    mask = torch.randn(SK, SQ, generator=torch.Generator().manual_seed(3)).half().to(DEVICE).T
    assert not mask.is_contiguous()
    want = sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask.contiguous(), backend="triton")
    for view in (mask, mask.expand(1, HQ, SQ, SK)):
        assert_same_numbers(sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=view, backend="triton"), want)


def test_neutral_masks_change_nothing():
    """All-True and all-zero masks leave every logit as it is: the unmasked output."""
    q, k, v = random_qkv(1, HQ, HK, SQ, SK, D, seed=4, device=DEVICE)
    plain = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, backend="triton")
    for mask in (torch.ones(SQ, SK, dtype=torch.bool), torch.zeros(SK, dtype=torch.bfloat16)):
        out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, attn_mask=mask.to(DEVICE), backend="triton")
        assert_same_numbers(out, plain)


@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
@pytest.mark.parametrize("kind", ["bool_per_head", "alibi_fp16", "additive_bf16"])
def test_masks_in_128_key_steps(kind, granularity):
    """Hopper's default launch takes 128 keys per loop step as two 64-key softmax blocks, each with
    its own K scales and mask columns: run here (pointer loads, so also on Ada and the interpreter)
    over the same payloads as the reference."""
    from sageflash.kernels.attention import LaunchConfig
    q, k, v = random_qkv(B, 4, 2, SQ, 200, D, seed=7, device=DEVICE)
    mask = make_mask(kind, B, 4, SQ, 200, seed=8, device=DEVICE)
    params = sageflash.resolve_params(head_dim=D, is_causal=True, granularity=granularity)
    q8, qs, k8, ks, _, v8, vs, vm = kernels.quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=True,
                                                         pv_accum=params.pv_accum)
    payloads = dict(params=params, seq_q=SQ, seq_k=200, head_dim=D, out_dtype=q.dtype, attn_mask=mask)
    out = kernels.attention_from_payloads(q8, qs, k8, ks, v8, vs, vm, out=torch.full_like(q, math.nan),
                                          launch=LaunchConfig(64, 128, 4, 3), **payloads)
    ref = reference.attention_from_payloads(*(x.cpu() for x in (q8, qs, k8, ks, v8, vs)), None,
                                            **{**payloads, "attn_mask": mask.cpu()})
    assert torch.isfinite(out).all() and nmse(out.cpu(), ref) <= 1e-5


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # the interpreter's log2(0) = -inf
def test_fully_masked_rows_give_zeros_and_lse_minus_inf():
    q, k, v = random_qkv(1, HQ, HK, 64, 64, D, seed=5, device=DEVICE)
    mask = torch.ones(64, 64, dtype=torch.bool, device=DEVICE)
    mask[3] = False  # no key at all
    mask[40, :41] = False  # causal hides keys 41.., the mask the rest
    params = sageflash.resolve_params(head_dim=D, is_causal=True)
    for m in (mask, torch.zeros(64, 64, device=DEVICE).masked_fill(~mask, -math.inf)):
        out, lse = kernels.attention(q, k, v, params, return_lse=True, attn_mask=m)
        ref, ref_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), params, return_lse=True, attn_mask=m.cpu())
        assert not out[:, :, [3, 40]].any() and (lse[:, :, [3, 40]] == -math.inf).all()
        assert nmse(out, ref) <= 1e-5
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("head_dim,is_causal", [(64, False), (128, True), (256, True)])
def test_masks_on_gpu(kind, head_dim, is_causal):
    batch, hq, hk, sq, sk = 2, 4, 2, 1000, 1300
    q, k, v = random_qkv(batch, hq, hk, sq, sk, head_dim, seed=head_dim, device="cuda")
    mask = make_mask(kind, batch, hq, sq, sk, seed=6, device="cuda")
    out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=is_causal, attn_mask=mask)
    ref = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=is_causal, attn_mask=mask, backend="reference")
    assert torch.isfinite(out).all()
    assert nmse(out, ref) <= 1e-5
    assert nmse(out, exact_attention(q, k, v, is_causal=is_causal, attn_mask=mask)) < 5e-3
