"""The warp-specialised Gluon kernel (`kernels/attention_ws.py`): what it refuses (anywhere), what
ptxas makes of it (offline, CI), and its numbers against the Triton kernel and the reference (GPU,
sm_90: Gluon has no interpreter)."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, nmse
from sageflash import kernels, reference
from sageflash.kernels.attention import LaunchConfig, attention_from_payloads
from sageflash.params import resolve_params

DEVICE = "cuda" if HAS_CUDA else "cpu"
WS = LaunchConfig(128, 128, 4, 3, warp_specialized=True)
pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")

CASES = [  # batch, q heads, kv heads, seq_q, seq_k, head dim, causal, pv_accum, granularity, smooth_v
    (2, 4, 2, 200, 200, 128, False, "fp32+fp32", "per_thread", False),  # a tail, GQA
    (1, 2, 1, 256, 256, 64, True, "fp32+fp16", "per_thread", False),  # causal diagonal blocks
    (1, 2, 2, 130, 300, 128, True, "fp32", "per_warp", False),  # Sq < Sk: bottom-right causal
    (1, 2, 2, 300, 100, 64, True, "fp32+fp32", "per_warp", True),  # Sq > Sk: rows with no key
    (2, 2, 1, 1024, 1024, 128, False, "fp32+fp16", "per_warp", True),  # a ring wrapping many times
    (1, 3, 3, 777, 1500, 64, False, "fp32+fp16", "per_thread", False),  # ragged lengths
]


def ws_payloads(case):
    batch, hq, hk, sq, sk, d, causal, pv_accum, granularity, smooth_v = case
    gen = torch.Generator().manual_seed(sq * d + sk)
    q = torch.randn(batch, hq, sq, d, generator=gen).half().to(DEVICE)
    k, v = (torch.randn(batch, hk, sk, d, generator=gen).half().to(DEVICE) for _ in range(2))
    v = v + 3.0 * torch.rand(d, generator=gen).half().to(DEVICE)  # channel offsets for smooth_v to remove
    params = resolve_params(None, causal, True, smooth_v, pv_accum, granularity, head_dim=d)
    payloads = kernels.quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=True,
                                    pv_accum=params.pv_accum, smooth_v=params.smooth_v)
    return q, params, payloads


def test_refuses_what_it_cannot_run():
    """Chosen by the launch table or asked for: a call it cannot take is a ValueError, not a fallback."""
    q, params, payloads = ws_payloads((1, 2, 2, 70, 70, 64, False, "fp32+fp32", "per_thread", False))
    q8, qs, k8, ks, _, v8, vs, vm = payloads
    call = dict(params=params, seq_q=70, seq_k=70, head_dim=64, out_dtype=q.dtype, launch=WS)
    mask = torch.ones(70, 70, dtype=torch.bool, device=q.device)
    with pytest.raises(ValueError, match="attn_mask"):
        attention_from_payloads(q8, qs, k8, ks, v8, vs, vm, attn_mask=mask, **call)
    if not HAS_CUDA or torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(ValueError, match="sm_90"):
            attention_from_payloads(q8, qs, k8, ks, v8, vs, vm, **call)
    else:  # TMA needs contiguous payloads
        with pytest.raises(ValueError, match="contiguous"):
            attention_from_payloads(q8.transpose(1, 2).contiguous().transpose(1, 2), qs, k8, ks, v8, vs, vm, **call)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_the_triton_kernel(case):
    """Output and LSE against the Triton kernel on the same payloads, and against the reference;
    rows with no visible key give 0 and -inf."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialised kernel is sm_90 only")
    q, params, payloads = ws_payloads(case)
    q8, qs, k8, ks, km, v8, vs, vm = payloads
    sq, sk, d = case[3], case[4], case[5]
    call = dict(params=params, seq_q=sq, seq_k=sk, head_dim=d, out_dtype=q.dtype, q=q, km=km, return_lse=True)
    outs = []
    for launch in (WS, None):
        out = torch.full_like(q, float("nan"))
        outs.append(attention_from_payloads(q8, qs, k8, ks, v8, vs, vm, out=out, launch=launch, **call))
    (got, got_lse), (want, want_lse) = outs
    assert torch.isfinite(got).all() and not torch.equal(got, torch.zeros_like(got))
    assert nmse(got, want) <= 1e-6
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)  # both -inf where no key is visible
    cpu = [x.cpu() if x is not None else None for x in (q8, qs, k8, ks, v8, vs, vm)]
    ref = reference.attention_from_payloads(*cpu, params=params, seq_q=sq, seq_k=sk, head_dim=d, out_dtype=q.dtype)
    assert nmse(got, ref) <= 1e-5
