"""Launch choices: TMA loads against pointer loads, `launch_config`'s table, the cached launcher.

The TMA comparisons run in the interpreter (CI) and on the GPU; the cached launcher's fast path
exists on the GPU only.
"""

from __future__ import annotations

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from conftest import HAS_CUDA, nmse
from sageflash import kernels, reference
from sageflash.kernels.attention import LaunchConfig, _tma_addressable, attention_from_payloads, launch_config
from sageflash.kernels.launch import _specialisation
from sageflash.params import PVAccum, resolve_params

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")

TMA_SHAPES = [  # batch, q heads, kv heads, seq, head dim, causal: tails that read the next head
    (2, 2, 1, 200, 64, True),
    (2, 2, 2, 130, 128, False),
    (1, 4, 2, 256, 128, True),
]


@pytest.mark.parametrize("pv_accum", ["fp32+fp32", "fp32+fp16"])
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_loads_match_pointer_loads(shape, pv_accum):
    batch, hq, hk, seq, d, causal = shape
    gen = torch.Generator().manual_seed(seq * d + hq)
    q = torch.randn(batch, hq, seq, d, generator=gen).half().to(DEVICE)
    k, v = (torch.randn(batch, hk, seq, d, generator=gen).half().to(DEVICE) for _ in range(2))
    params = resolve_params(None, causal, True, False, pv_accum, "per_thread", head_dim=d)
    payloads = kernels.quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=True,
                                    pv_accum=params.pv_accum)
    q8, qs, k8, ks, _, v8, vs, vm = payloads
    outs = []
    for tma in (False, True):
        out = torch.full_like(q, float("nan"))
        attention_from_payloads(q8, qs, k8, ks, v8, vs, vm, params=params, seq_q=seq, seq_k=seq, head_dim=d,
                                out_dtype=q.dtype, out=out, launch=LaunchConfig(64, 128, 4, 3, tma=tma))
        assert torch.isfinite(out).all()
        outs.append(out)
    if HAS_CUDA:  # ptxas may schedule the two kernels' float operations differently
        assert nmse(outs[1], outs[0]) <= 1e-7
    else:
        assert torch.equal(outs[1], outs[0])
    ref = reference.attention_from_payloads(*(x.cpu() if x is not None else None for x in (q8, qs, k8, ks, v8, vs, vm)),
                                            params=params, seq_q=seq, seq_k=seq, head_dim=d, out_dtype=q.dtype)
    assert nmse(outs[1], ref) <= 1e-5


def test_launch_table():
    fp32_fp32, fp32_fp16 = PVAccum.FP32_FP32.code, PVAccum.FP32_FP16.code
    assert launch_config(128, 90, fp32_fp32, False, 4096).tma
    assert launch_config(64, 90, fp32_fp16, True, 4096).tma
    assert not launch_config(128, 90, fp32_fp16, False, 4096).tma
    assert not launch_config(64, 90, fp32_fp16, False, 4096).tma
    assert not launch_config(128, 90, fp32_fp32, False, 1024).tma  # host-bound: no descriptors
    assert not launch_config(128, 89, fp32_fp32, False, 4096).tma  # Ada has no TMA
    assert not launch_config(256, 90, fp32_fp32, False, 4096).tma


def test_tma_needs_contiguous_payloads():
    k8 = torch.zeros(1, 2, 128, 64, dtype=torch.int8)
    v8 = torch.zeros(1, 2, 64, 128, dtype=torch.int8)
    assert _tma_addressable(k8, v8)
    assert not _tma_addressable(k8.transpose(1, 2), v8)


def test_specialisation_key_is_finer_than_tritons():
    """Two arguments Triton may compile differently never share a key."""
    t = torch.empty(64, dtype=torch.float16)
    assert _specialisation(t) != _specialisation(t[1:])  # 16-byte aligned or not
    assert _specialisation(t) != _specialisation(t.view(torch.int16))
    assert len({_specialisation(n) for n in (1, 16, 17, 2 ** 31, 2 ** 31 + 1)}) == 5
    assert _specialisation(True) != _specialisation(1) and _specialisation(None) != _specialisation(0.5)
    desc = TensorDescriptor.from_tensor(torch.empty(128, 64, dtype=torch.int8), [64, 64])
    assert _specialisation(desc) != _specialisation(TensorDescriptor.from_tensor(desc.base, [32, 64]))
    with pytest.raises(TypeError):
        _specialisation("x")


@pytest.mark.gpu
def test_cached_launches_follow_alignment():
    """A misaligned view after aligned calls gets its own kernel (a reused aligned one would read
    it wrongly): the quantizer's payloads still match the reference."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 2, 129 * 64 + 1, generator=gen).half().cuda()
    aligned = base[..., : 129 * 64].view(1, 2, 129, 64)
    shifted = base[..., 1:].view(1, 2, 129, 64)  # a 2-byte offset
    for x in (aligned, aligned, shifted, shifted):
        got = kernels.quantize_qkv(x, x, x, granularity="per_thread", smooth_k=False, pv_accum="fp32+fp32")
        want_q = reference.quantize_qk(x.cpu(), x.cpu(), granularity="per_thread", smooth_k=False)
        assert (got[0].cpu().int() - want_q[0].int()).abs().max() <= 1
        want_v = reference.quantize_v(x.cpu(), pv_accum="fp32+fp32", smooth_v=False)
        torch.testing.assert_close(got[6].cpu(), want_v[1], rtol=1e-6, atol=0)
