"""Tensors on a CUDA device that is not the current one run on their own device."""

from __future__ import annotations

import pytest
import torch

import sageflash
from sageflash import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_cuda_allocator")]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("causal", [False, True])
def test_tensors_on_another_device_than_the_current_one(causal):
    """With cuda:0 current, a call on cuda:1 tensors (eager, then recorded, then replayed) gives the
    bits the same call gives with cuda:1 current, and leaves cuda:0 current."""
    gen = torch.Generator(device="cuda:1").manual_seed(11 + causal)
    q, k, v = (torch.randn(2, 4, 1000, 128, generator=gen, device="cuda:1", dtype=torch.float16)
               for _ in range(3))
    with torch.cuda.device(1):
        expected = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal)
    with torch.cuda.device(0):
        for _ in range(3):  # the replays' three states
            out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal)
            torch.cuda.synchronize(1)
            assert torch.cuda.current_device() == 0
            assert out.device == q.device
            assert torch.equal(out, expected)
        q8, *_ = sageflash.quantize_qk(q, k, granularity="per_thread", smooth_k=True)
        v8 = kernels.quantize_qkv(None, None, v, granularity="per_thread", smooth_k=False,
                                  pv_accum="fp32+fp16")[5]
        assert q8.device == v8.device == q.device
