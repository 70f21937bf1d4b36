"""Head dims up to 256 on the Triton backend, against the CPU reference and exact attention.

On the GPU when there is one, else under TRITON_INTERPRET=1 with tiny shapes; ``gpu`` tests need
a CUDA device of capability >= 8.9.
"""

from __future__ import annotations

import pytest
import torch

import sageflash
from conftest import HAS_CUDA, nmse
from helpers import assert_fp8_match, assert_int8_match, assert_scales_match, exact_attention, random_qkv
from sageflash import reference

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")


@pytest.mark.parametrize("granularity,smooth_k", [("per_warp", True), ("per_thread", False)])
@pytest.mark.parametrize("head_dim", [200, 256])
def test_payloads_match_reference(head_dim, granularity, smooth_k):
    q, k, v = random_qkv(1, 2, 1, 40, 70, head_dim, seed=head_dim, device=DEVICE, k_offset=2)
    got = sageflash.quantize_qk(q, k, granularity=granularity, smooth_k=smooth_k, backend="triton")
    want = reference.quantize_qk(q.cpu(), k.cpu(), granularity=granularity, smooth_k=smooth_k,
                                 km=None if got[4] is None else got[4].cpu())
    assert got[0].shape == (1, 2, 40, 256) and got[2].shape == (1, 1, 70, 256)
    for index, name in [(0, "q_int8"), (2, "k_int8")]:
        assert_int8_match(got[index], want[index], name)
    for index, name in [(1, "q_scale"), (3, "k_scale")]:
        assert_scales_match(got[index], want[index], name)
    v8, v_scale, _ = sageflash.quantize_v(v, pv_accum="fp32+fp16", smooth_v=False, backend="triton")
    want_v8, want_scale, _ = reference.quantize_v(v.cpu(), pv_accum="fp32+fp16", smooth_v=False)
    assert v8.shape == (1, 1, 256, 128)
    assert_fp8_match(v8, want_v8, "v_fp8")
    assert_scales_match(v_scale, want_scale, "v_scale")


# batch, q heads, kv heads, seq_q, seq_k, head dim, causal, pv_accum
SHAPES = [
    (1, 2, 1, 64, 100, 256, True, "fp32+fp16"),
    (1, 2, 2, 40, 70, 160, False, "fp32"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(shape):
    batch, hq, hk, sq, sk, d, causal, pv_accum = shape
    q, k, v = random_qkv(batch, hq, hk, sq, sk, d, seed=d, device=DEVICE)
    knobs = dict(is_causal=causal, pv_accum=pv_accum, smooth_v=pv_accum == "fp32")
    out = sageflash.sage_attn_sm89_fp16(q, k, v, backend="triton", **knobs)
    ref = sageflash.sage_attn_sm89_fp16(q.cpu(), k.cpu(), v.cpu(), backend="reference", **knobs)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert nmse(out, ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [160, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_large_head_dims_on_gpu(head_dim, causal, dtype):
    q, k, v = random_qkv(2, 8, 4, 1500, 2100, head_dim, seed=head_dim + causal, dtype=dtype, device="cuda")
    out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal)
    ref = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal, backend="reference")
    assert torch.isfinite(out).all()
    assert nmse(out, ref) <= (3e-5 if dtype == torch.bfloat16 else 1e-5)
    assert nmse(out, exact_attention(q, k, v, is_causal=causal)) <= 5e-3
