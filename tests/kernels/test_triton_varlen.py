"""`sage_attn_varlen` on the Triton backend: its packed launches give each sequence, bit for bit,
what the op's launches give it alone, and agree with the CPU reference.

On the GPU when there is one, else under TRITON_INTERPRET=1 with small shapes; ``gpu`` tests need
a CUDA device of capability >= 8.9.
"""

from __future__ import annotations

import pytest
import torch

import sageflash
from conftest import HAS_CUDA, nmse
from helpers import no_env_overrides  # noqa: F401 (fixture)
from sageflash.kernels import launch
from test_varlen import cu_seqlens, packed_qkv, per_sequence

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("no_env_overrides", "poisoned_cuda_allocator")

# (q lengths, k lengths, q heads, kv heads, head dim, dtype, knobs)
CASES = [
    ([5, 130, 64], [7, 200, 64], 4, 2, 64, torch.float16, dict()),
    ([3, 0, 70, 12], [9, 5, 0, 130], 2, 1, 40, torch.bfloat16, dict(is_causal=True)),
    ([100, 17], [70, 300], 2, 2, 128, torch.float16,
     dict(granularity="per_warp", pv_accum="fp32", smooth_v=True, is_causal=True)),
    ([33, 64], [129, 1], 4, 1, 96, torch.bfloat16, dict(smooth_k=False, pv_accum="fp32+fp32")),
]


def run_case(case, **extra):
    q_lens, k_lens, hq, hk, d, dtype, knobs = case
    q, k, v = packed_qkv(q_lens, k_lens, hq, hk, d, seed=sum(q_lens), dtype=dtype, device=DEVICE)
    inputs = [x.clone() for x in (q, k, v)]
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens).to(DEVICE),
                                          return_lse=True, backend="triton", **knobs, **extra)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), inputs))
    return (q, k, v), out, lse


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-D{c[4]}-{','.join(c[6]) or 'defaults'}")
def test_packed_launches_are_the_op_per_sequence(case):
    q_lens, k_lens, *_, knobs = case
    (q, k, v), out, lse = run_case(case)
    want_out, want_lse = per_sequence(q, k, v, q_lens, k_lens, backend="triton", **knobs)
    assert torch.equal(out, want_out)
    assert torch.equal(lse.cpu(), want_lse)


@pytest.mark.parametrize("case", CASES[:2], ids=["fp16", "bf16-causal"])
def test_triton_agrees_with_reference(case):
    q_lens, k_lens, *_, knobs = case
    (q, k, v), out, lse = run_case(case)
    ref_out, ref_lse = sageflash.sage_attn_varlen(q.cpu(), k.cpu(), v.cpu(), cu_seqlens(q_lens), cu_seqlens(k_lens),
                                                  return_lse=True, backend="reference", **knobs)
    assert nmse(out, ref_out) < 1e-5 and torch.isfinite(out).all()
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=1e-4, equal_nan=False)


def test_more_sequences_than_a_grid_holds(monkeypatch):
    """Past `launch.MAX_GRID_BATCH` sequences the launches take slices of them (here 2 per slice,
    one slice holding only sequences without keys), with the same result."""
    case = ([4, 9, 3, 5, 7], [0, 0, 70, 2, 65], 2, 1, 64, torch.float16, dict(is_causal=True))
    _, want_out, want_lse = run_case(case)
    monkeypatch.setattr(launch, "MAX_GRID_BATCH", 2)
    _, out, lse = run_case(case)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert (out[:13] == 0).all() and torch.isneginf(lse[:, :13]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_packed_batch_of_long_sequences(dtype, is_causal):
    """A video-like packed batch (long sequences of different lengths, GQA) on the GPU's own
    launches (TMA from 2k keys on Hopper): the op per sequence, bit for bit."""
    q_lens, k_lens = [4096, 1000, 2500, 77], [4096, 3000, 2500, 4500]
    q, k, v = packed_qkv(q_lens, k_lens, 8, 2, 128, seed=5, dtype=dtype, device="cuda")
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), is_causal=is_causal,
                                          return_lse=True)
    want_out, want_lse = per_sequence(q, k, v, q_lens, k_lens, is_causal=is_causal)
    assert torch.equal(out, want_out) and torch.equal(lse.cpu(), want_lse)


@pytest.mark.gpu
def test_gpu_offsets_past_32_bits():
    """A packed batch of 2.2M tokens (4.5e9 elements in q): the later sequences' offsets pass 2**31
    elements; the last ones match the op on them alone."""
    lengths = [4096] * 540
    q, k, v = (torch.randn(sum(lengths), 16, 128, dtype=torch.float16, device="cuda") for _ in range(3))
    out = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), is_causal=True)
    last = slice(sum(lengths) - 2 * 4096, None)
    for rows in (slice(last.start, last.start + 4096), slice(last.start + 4096, None)):
        want = sageflash.sage_attn_sm89_fp16(q[None, rows], k[None, rows], v[None, rows], is_causal=True,
                                             tensor_layout="NHD")
        assert torch.equal(out[rows], want[0])


def test_table_refuses_what_int32_cannot_hold():
    from sageflash.kernels.sequences import PackedBatch
    ok = PackedBatch.build([3, 0], [64, 1], torch.device("cpu"))
    assert ok.table.tolist() == [[0, 3, 0, 64, 0], [3, 0, 64, 1, 64]] and (ok.max_q, ok.max_k, ok.v_columns) == (
        3, 64, 128)
    with pytest.raises(ValueError, match="past the 2147483647 tokens the sequence table holds"):
        PackedBatch.build([1, 1], [2 ** 31 - 64, 1], torch.device("cpu"))  # V's payload: 2**31 + 64 columns
