"""GPU-only behaviour at scale: 32k tokens against exact attention, >2**31-element offsets, peak
memory of a call large enough to run in KV-head chunks."""

from __future__ import annotations

import pytest
import torch

import sageflash
from conftest import nmse
from sageflash import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_cuda_allocator")]


def exact_attention_rows(q, k, v, rows, scale, causal):
    """float64 softmax(q kᵀ) v for the query ``rows`` of every head (GQA expanded), on q's device."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = q[:, :, rows].double() @ k.transpose(-1, -2) * scale
    if causal:
        keys = torch.arange(k.shape[2], device=q.device)
        offset = k.shape[2] - q.shape[2]
        scores = scores.masked_fill(keys[None, :] > rows[:, None] + offset, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_32k_tokens_against_exact(causal):
    """fp32+fp32 / fp32+fp16 follow the exact-sum reference at 32k; fp32 (one tensor-core
    accumulator, ~22 significant bits per SPEC §6, which the reference does not model) may drift,
    but never beats fp32+fp32 against float64 attention."""
    gen = torch.Generator(device="cuda").manual_seed(32768 + causal)
    shape = (1, 4, 32768, 128)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16) for _ in range(3))
    v = v + 0.5  # a common offset: the regime where accumulation precision shows
    rows = torch.randint(0, shape[2], (512,), generator=gen, device="cuda")
    exact = exact_attention_rows(q, k, v, rows, 128 ** -0.5, causal)
    errors, vs_reference = {}, {}
    for mode in ("fp32", "fp32+fp32", "fp32+fp16"):
        out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal, pv_accum=mode)
        ref = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal, pv_accum=mode, backend="reference")
        assert torch.isfinite(out).all(), mode
        errors[mode] = nmse(out[:, :, rows], exact)
        vs_reference[mode] = nmse(out, ref)
    print(f"32k causal={causal} NMSE vs exact: {errors}; vs reference: {vs_reference}")
    for mode in ("fp32+fp32", "fp32+fp16"):
        assert vs_reference[mode] <= 1e-5, vs_reference
        assert errors[mode] <= 5e-3, errors
    assert errors["fp32+fp32"] <= errors["fp32"], errors


def test_long_noncontiguous_past_2_31_elements():
    """q/k/v as [B,S,H,D] views (NHD storage): element offsets pass 2**31 within one tensor."""
    batch, seq, heads, dim = 1, 110_000, 160, 128
    assert batch * seq * heads * dim > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(110_000)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=gen, device="cuda", dtype=torch.float16)
               .transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True)
    last = slice(heads - 2, heads)  # the heads whose elements lie past 2**31
    alone = sageflash.sage_attn_sm89_fp16(q[:, last].contiguous(), k[:, last].contiguous(),
                                          v[:, last].contiguous(), is_causal=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, last], alone)
    rows = torch.arange(seq - 256, seq, device="cuda")
    exact = exact_attention_rows(q[:, last], k[:, last], v[:, last], rows, dim ** -0.5, True)
    assert nmse(out[:, last][:, :, rows], exact) <= 5e-3


def peak_extra_memory(call, inputs_bytes: int):
    """``call()``'s output and the peak memory it allocates beyond what was allocated before, as a
    fraction of ``inputs_bytes``; from a second call (the first compiles and warms the allocator)."""
    call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / inputs_bytes


@pytest.mark.parametrize("head_dim", [64, 128])
def test_small_calls_keep_q_payload_in_the_output(head_dim):
    """A call in one piece adds the output, K and V's payloads and their statistics, Q's payload
    living in the output's bytes: about 0.69x the bytes of q+k+v (0.86x with a buffer of its own)."""
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    q, k, v = (torch.randn(2, 8, 2048, head_dim, generator=gen, device="cuda", dtype=torch.float16)
               for _ in range(3))
    assert kernels.kv_head_chunks(q, k, v) == 1 and kernels.q_payload_in_output(head_dim)
    want = sageflash.sage_attn_sm89_fp16(q.cpu(), k.cpu(), v.cpu(), backend="reference")
    out, extra = peak_extra_memory(lambda: sageflash.sage_attn_sm89_fp16(q, k, v),
                                   3 * q.numel() * q.element_size())
    assert extra <= 0.72, f"peak extra memory {extra:.3f}x q+k+v"
    assert nmse(out.cpu(), want) <= 1e-5


def test_large_calls_stay_under_0_6x_extra_memory(monkeypatch):
    """Peak memory a large call adds (output included) is <= 0.6x the bytes of q+k+v, and the
    chunked result equals the one-piece one."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    shape = (2, 16, 16384, 128)  # 402 MB of q, k and v: chunked
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16) for _ in range(3))
    assert kernels.kv_head_chunks(q, k, v) > 1
    out, extra = peak_extra_memory(lambda: sageflash.sage_attn_sm89_fp16(q, k, v),
                                   3 * q.numel() * q.element_size())
    assert extra <= 0.6, f"peak extra memory {extra:.3f}x q+k+v"
    monkeypatch.setattr(kernels, "CHUNKED_FROM_BYTES", 1 << 62)
    one_piece = sageflash.sage_attn_sm89_fp16(q, k, v)
    assert not torch.equal(out, torch.zeros_like(out)) and torch.equal(out, one_piece)


def test_a_batch_past_the_grid_limit():
    """65536 batch entries (temporal attention over a 256x256 latent), one more than CUDA's grid
    axis z holds: split into slices, each entry as when it runs alone."""
    from sageflash.kernels import launch
    gen = torch.Generator(device="cuda").manual_seed(65536)
    q, k, v = (torch.randn(launch.MAX_GRID_BATCH + 1, 1, 16, 64, generator=gen, device="cuda", dtype=torch.float16)
               for _ in range(3))
    out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True)
    for b in (0, launch.MAX_GRID_BATCH - 1, launch.MAX_GRID_BATCH):  # the first, the last of a slice, the next
        alone = sageflash.sage_attn_sm89_fp16(q[b:b + 1], k[b:b + 1], v[b:b + 1], is_causal=True)
        assert torch.equal(out[b:b + 1], alone)
