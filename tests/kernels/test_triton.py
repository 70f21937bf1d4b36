"""The Triton backend against the CPU reference and the official dumps.

Runs on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest sets
it), where shapes stay small. Tests marked ``gpu`` need a CUDA device of capability >= 8.9.
"""

from __future__ import annotations

import sys

import pytest
import torch
import triton
import triton.language as tl

import sageflash
from conftest import HAS_CUDA, nmse
from helpers import make_mask, non_finite_outputs, with_non_finite
from sageflash import dumps, kernels, reference
from sageflash.kernels import quant
from sageflash.params import resolve_params

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fp32", "fp32+fp32", "fp32+fp16")


pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")


def random_qkv(seed, batch, q_heads, kv_heads, seq_q, seq_k, head_dim, dtype, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_heads, seq_q, head_dim), (batch, kv_heads, seq_k, head_dim), (batch, kv_heads, seq_k, head_dim)]
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def assert_int8_close(out, ref):
    diff = (out.cpu().int() - ref.cpu().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-4


def assert_fp8_close(out, ref):
    codes = (out.cpu().view(torch.uint8).int() - ref.cpu().view(torch.uint8).int()).abs()
    assert codes.max() <= 1 and (codes > 0).float().mean() <= 1e-3


def assert_scales_close(out, ref):
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-6, atol=0)


@triton.jit
def _per_thread_code_misses(AMAX, X, MISSES, n_x, BLOCK: tl.constexpr):
    """Per amax: how many x with |x| <= amax get another per_thread code from `quant._per_thread_codes`
    than from an IEEE division, and how many x were checked."""
    amax = tl.load(AMAX + tl.program_id(0))
    scale = tl.zeros([1], tl.float32) + quant._per_thread_scale(amax)
    misses = tl.zeros([1, BLOCK], tl.int32)
    checked = tl.zeros([1, BLOCK], tl.int32)
    for start in range(0, n_x, BLOCK):
        offsets = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(X + offsets, mask=offsets < n_x, other=0.0)
        valid = (offsets < n_x) & (tl.abs(x) <= amax)
        codes = quant._per_thread_codes(x, scale, tl.div_rn(1.0, scale))
        exact = quant._round_half_away(tl.div_rn(x, scale[:, None]))
        misses += (valid & (codes != exact)).to(tl.int32)
        checked += valid.to(tl.int32)
    first = tl.zeros([1], tl.int32)
    tl.atomic_add(MISSES + first, tl.sum(misses, axis=1).to(tl.int64))
    tl.atomic_add(MISSES + first + 1, tl.sum(checked, axis=1).to(tl.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_thread_codes_are_those_of_an_ieee_division_for_every_16_bit_input(dtype):
    """`quant._per_thread_codes` divides with one Markstein correction, not two: its codes must be
    those of x / scale correctly rounded for every x the quantizer can see (every finite fp16 or
    bf16 value, per_thread K centred in the input dtype) and every group amax >= |x| (a 16-bit
    value too). On a GPU all of them (~1e9 pairs per dtype); in the interpreter every 1000th amax."""
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(DTYPES[dtype]).float()
    values = every[torch.isfinite(every)]
    amaxes = values[values > 0].unique()
    if not HAS_CUDA:
        amaxes = amaxes[::1000].contiguous()
    misses = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _per_thread_code_misses[(amaxes.numel(),)](amaxes.to(DEVICE), values.to(DEVICE), misses, values.numel(),
                                               BLOCK=1024, enable_fp_fusion=False)
    missed, checked = misses.tolist()
    assert missed == 0
    assert checked == sum(int((values.abs() <= a).sum()) for a in amaxes) if not HAS_CUDA else checked > 10 ** 9


@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
@pytest.mark.parametrize("smooth_k", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_q,seq_k,head_dim", [(77, 131, 40), (128, 64, 64), (33, 200, 96)])
def test_quantize_qk_matches_reference(granularity, smooth_k, dtype, seq_q, seq_k, head_dim):
    q, k, _ = random_qkv(seq_q * seq_k, 2, 4, 2, seq_q, seq_k, head_dim, DTYPES[dtype])
    k = k + 3 * torch.randn(head_dim, device=k.device).to(k.dtype)  # a channel offset to smooth away
    got = sageflash.quantize_qk(q, k, granularity=granularity, smooth_k=smooth_k, backend="triton")
    want = reference.quantize_qk(q.cpu(), k.cpu(), granularity=granularity, smooth_k=smooth_k,
                                 km=None if got[4] is None else got[4].cpu())
    assert got[0].shape == want[0].shape and got[2].shape == want[2].shape
    assert_int8_close(got[0], want[0])
    assert_scales_close(got[1], want[1])
    assert_int8_close(got[2], want[2])
    assert_scales_close(got[3], want[3])
    if smooth_k:
        km_cpu = reference.key_mean(k.cpu())
        torch.testing.assert_close(got[4][..., :head_dim].cpu().float(), km_cpu.float(), rtol=1e-3, atol=1e-3)
    else:
        assert got[4] is None


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_per_warp_groups_of_tiny_values_keep_their_own_scale(backend):
    """SPEC §3's per_warp floor (amax >= 1e-7) binds only below it: bf16 values of ~1e-5 get scales
    amax / 127 (≈1e-7) and codes up to ±127, not a floor-sized scale and codes near 0."""
    q, k, _ = random_qkv(11, 1, 2, 2, 100, 100, 64, torch.bfloat16)
    q, k = q * 1e-5, k * 1e-5
    q8, qs, k8, ks, _ = sageflash.quantize_qk(q, k, granularity="per_warp", smooth_k=False, backend=backend)
    for payload, scales in ((q8, qs), (k8, ks)):
        assert payload.abs().max() == 127 and scales.max() < 1e-6
        assert (scales.cpu() > 0).all()


def values_at_rounding_ties(dtype, heads, seq, head_dim):
    """``[1, heads, seq, head_dim]`` inputs whose per_thread codes depend on the last bit of x / scale.

    Searches every ``dtype`` amax for values x next to a tie (k + 0.5) * scale where x times the
    reciprocal scale rounds to another code than the IEEE x / scale; each head gets one such amax
    (in every row, so every group's scale is amax / 127 + 1e-7) and its tie values.
    """
    amax = torch.arange(2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    amax = amax[torch.isfinite(amax) & (amax > 1e-4) & (amax < 6e4)]
    scale = amax / 127 + 1e-7
    ties = (scale.double()[:, None] * (torch.arange(-127, 127) + 0.5)).to(dtype).float()
    by_division, by_reciprocal = ties / scale[:, None], ties * (1 / scale)[:, None]
    codes = lambda q: torch.trunc(q + 0.5 * torch.sign(q))  # noqa: E731
    hard = (codes(by_division) != codes(by_reciprocal)) & (ties.abs() <= amax[:, None])
    rows = hard.any(dim=1).nonzero().flatten()
    rows = rows[torch.linspace(0, len(rows) - 1, heads).long()]
    x = torch.empty(1, heads, seq, head_dim)
    gen = torch.Generator().manual_seed(heads * seq)
    for head, row in enumerate(rows.tolist()):
        values = ties[row][hard[row]]
        x[0, head] = values[torch.randint(0, len(values), (seq, head_dim), generator=gen)]
        x[0, head, :, 0] = amax[row]
    return x.to(dtype)


@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_qk_is_exact_at_rounding_ties(granularity, dtype):
    """Bit-equal payloads where rounding is decided by the last bit of x / scale."""
    q = values_at_rounding_ties(DTYPES[dtype], 8, 200, 64).to(DEVICE)
    k = values_at_rounding_ties(DTYPES[dtype], 8, 130, 64).to(DEVICE)
    got = sageflash.quantize_qk(q, k, granularity=granularity, smooth_k=False, backend="triton")
    want = reference.quantize_qk(q.cpu(), k.cpu(), granularity=granularity, smooth_k=False)
    for name, g, w in zip(("q_int8", "q_scale", "k_int8", "k_scale"), got, want):
        assert torch.equal(g.cpu(), w), name


@pytest.mark.parametrize("pv_accum,smooth_v", [("fp32", True), ("fp32", False), ("fp32+fp16", False)])
@pytest.mark.parametrize("dtype", DTYPES)
# (96, 40): no zero tokens in V's window, so padded channels had max -inf and min +inf (scale inf)
@pytest.mark.parametrize("seq_k,head_dim", [(131, 40), (64, 128), (250, 80), (96, 40)])
def test_quantize_v_matches_reference(pv_accum, smooth_v, dtype, seq_k, head_dim):
    _, _, v = random_qkv(seq_k + head_dim, 2, 2, 3, 1, seq_k, head_dim, DTYPES[dtype])
    v[:, :, :, 1] = 0  # an all-zero channel: scale 0, payload 0
    got = sageflash.quantize_v(v, pv_accum=pv_accum, smooth_v=smooth_v, backend="triton")
    want = reference.quantize_v(v.cpu(), pv_accum=pv_accum, smooth_v=smooth_v)
    assert got[0].dtype == torch.float8_e4m3fn and got[0].shape == want[0].shape
    assert_fp8_close(got[0], want[0])
    assert_scales_close(got[1], want[1])
    assert (got[1][:, :, 1] == 0).all() and (got[0][:, :, 1].float() == 0).all()
    assert (got[0][..., seq_k:].float() == 0).all()
    assert (got[1][:, :, head_dim:] == 0).all()  # padded channels: scale 0 (they were inf)
    if smooth_v:
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-5, atol=1e-6)
    else:
        assert got[2] is None


@pytest.mark.parametrize("smooth_v", [False, True])
@pytest.mark.parametrize("seq_k", [131, 256])
def test_v_payload_in_kernel_order(smooth_v, seq_k):
    """What the attention path quantizes (`quantize_qkv(v_kernel_order=True)`) is the natural
    payload with its tokens moved by `v_in_kernel_order`, byte for byte, padding included."""
    q, k, v = random_qkv(seq_k + 3, 2, 2, 2, 64, seq_k, 80, torch.float16)
    knobs = dict(granularity="per_thread", smooth_k=True, pv_accum="fp32", smooth_v=smooth_v)
    natural = kernels.quantize_qkv(q, k, v, **knobs)
    ordered = kernels.quantize_qkv(q, k, v, v_kernel_order=True, **knobs)
    assert not torch.equal(ordered[5].view(torch.uint8), natural[5].view(torch.uint8))
    assert torch.equal(ordered[5].view(torch.uint8), kernels.v_in_kernel_order(natural[5]).view(torch.uint8))
    for got, want in zip(ordered[:5] + ordered[6:], natural[:5] + natural[6:]):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("smooth_v", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_k", [16, 144])  # multiples of 16: no zero tokens in V's window
def test_quantize_v_scales_of_one_signed_channels(smooth_v, dtype, seq_k):
    """V's channel max and min (fp16 reduced in fp16, rows past the sequence read as its last
    token) where the signs make them hard: channels all negative or all positive whose outlier is
    the max or the min (smooth_v's scale takes the one farther from the mean), ±0 beside a tiny
    negative, the outlier at the last token (in the statistics' short last chunk) or the first."""
    _, _, v = random_qkv(seq_k, 1, 1, 2, 1, seq_k, 64, DTYPES[dtype], device="cpu")
    spread = v.abs() * 0.1
    outliers = {0: (-1.0, -0.01), 1: (-0.01, -5.0), 2: (1.0, 0.01), 3: (0.01, 7.0), 4: (-2.0 ** -20, -0.0)}
    for channel, (bulk, outlier) in outliers.items():
        v[..., channel] = bulk + spread[..., channel] * (1 if bulk > 0 else -1)
        v[:, 0, -1, channel] = outlier  # the last token of head 0, the first of head 1
        v[:, 1, 0, channel] = outlier
    v[..., 4][..., ::2] = 0.0  # +0 and -0 (the outlier) around tiny negatives
    v = v.to(DEVICE)
    got = sageflash.quantize_v(v, pv_accum="fp32", smooth_v=smooth_v, backend="triton")
    want = reference.quantize_v(v.cpu(), pv_accum="fp32", smooth_v=smooth_v)
    assert_scales_close(got[1], want[1])
    assert_fp8_close(got[0], want[0])
    if smooth_v:
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-5, atol=1e-6)


def test_kv_head_chunks_policy():
    """One piece below kernels.CHUNKED_FROM_BYTES; above, enough chunks that the payloads (one byte
    per padded element; Q's lives in the output where it fits) stay within PAYLOAD_FRACTION of the
    input bytes, at most one per KV head."""
    meta = lambda *shape: torch.empty(shape, dtype=torch.float16, device="meta")  # noqa: E731
    small = [meta(4, 32, 1024, 128), meta(4, 32, 1024, 128), meta(4, 32, 1024, 128)]
    assert kernels.kv_head_chunks(*small) == 1
    large = [meta(4, 32, 4096, 128), meta(4, 16, 4096, 128), meta(4, 16, 4096, 128)]  # 268 MB
    assert kernels.kv_head_chunks(*large) == 2  # K and V's payloads are a quarter of the fp16 bytes
    padded = [meta(1, 40, 16384, 80), meta(1, 40, 16384, 80), meta(1, 40, 16384, 80)]
    assert kernels.kv_head_chunks(*padded) == 3  # 80 -> 128 channels: 0.53x the fp16 bytes
    narrow = [meta(5, 64, 16384, 16)] * 3  # 16 -> 64 channels: Q's payload does not fit the output
    assert not kernels.q_payload_in_output(16) and kernels.q_payload_in_output(32)
    assert kernels.kv_head_chunks(*narrow) == 10  # all three payloads, 2x the fp16 bytes
    mqa = [meta(8, 32, 4096, 128), meta(8, 1, 4096, 128), meta(8, 1, 4096, 128)]
    assert kernels.kv_head_chunks(*mqa) == 1  # one KV head cannot be split


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("case", [
    dict(shape=(2, 6, 3, 70, 100, 40), is_causal=True, return_lse=True),  # 3 chunks of one KV head
    dict(shape=(1, 4, 4, 64, 130, 64), pv_accum="fp32+fp32", mask=True),  # 2 chunks, a bool mask
    dict(shape=(2, 2, 2, 90, 90, 128), pv_accum="fp32", smooth_v=True, return_lse=True),
    dict(shape=(1, 4, 2, 64, 130, 64), mask="bool_per_head"),  # a chunk's query heads pick their mask rows
], ids=["gqa-causal-lse", "mask", "fp32-smooth_v", "gqa-mask-per-head"])
def test_chunked_attention_is_the_one_piece_result(monkeypatch, case, layout):
    """Attention in KV-head chunks (what large calls do) gives the one-piece output and LSE bit
    for bit: quantization statistics never cross a (batch, KV head)."""
    case = dict(case)
    batch, hq, hk, sq, sk, d = case.pop("shape")
    q, k, v = random_qkv(sq * d + hq, batch, hq, hk, sq, sk, d, torch.float16)
    mask = case.pop("mask", False)
    if mask is True:
        gen = torch.Generator().manual_seed(9)
        case["attn_mask"] = (torch.rand(batch, 1, sq, sk, generator=gen) > 0.2).to(q.device)
    elif mask:
        case["attn_mask"] = make_mask(mask, batch, hq, sq, sk, seed=9, device=q.device)
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    call = lambda: sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout=layout, backend="triton", **case)  # noqa: E731
    one_piece = call()
    monkeypatch.setattr(kernels, "CHUNKED_FROM_BYTES", 0)
    assert kernels.kv_head_chunks(*(x if layout == "HND" else x.transpose(1, 2) for x in (q, k, v))) > 1
    chunked = call()
    for got, want in zip(*((r,) if torch.is_tensor(r) else r for r in (chunked, one_piece))):
        assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # rows the mask empties: LSE -inf
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_heads_past_the_grid_limit_run_in_kv_head_chunks(monkeypatch, layout):
    """More heads than a launch's grid axis y holds (the quantizer's grid has Q's, K's and V's
    heads on it: 21845 MHA heads) run in KV-head chunks with the one-piece result bit for bit (the
    limit lowered to 10 here: 6 KV heads with 2 query heads each take 2 per launch, 3 chunks); a
    KV head's query heads alone past the limit are refused by name."""
    from sageflash.kernels import launch
    q, k, v = random_qkv(11, 2, 12, 6, 40, 70, 64, torch.float16)
    mask = make_mask("bool_per_head", 2, 12, 40, 70, seed=11, device=q.device)
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    call = lambda: sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, return_lse=True, attn_mask=mask,  # noqa: E731
                                                 tensor_layout=layout, backend="triton")
    one_piece = call()
    monkeypatch.setattr(launch, "MAX_GRID_HEADS", 10)
    hnd = [x if layout == "HND" else x.transpose(1, 2) for x in (q, k, v)]
    assert kernels.kv_head_chunks(*hnd) == 3
    grids = []
    launch_as_before = launch.Launcher.__call__
    monkeypatch.setattr(launch.Launcher, "__call__",
                        lambda self, grid, *args, **meta: grids.append(grid) or launch_as_before(self, grid, *args, **meta))
    for got, want in zip(call(), one_piece):
        assert torch.equal(got, want)
    assert len(grids) >= 3 * 4 and max(grid[1] for grid in grids) <= 10  # 3 chunks of 4 launches, none past
    monkeypatch.setattr(kernels, "CHUNKED_FROM_BYTES", 0)  # the memory rule too: the more chunks of the two
    monkeypatch.setattr(kernels, "PAYLOAD_FRACTION", 1e-3)
    assert kernels.kv_head_chunks(*hnd) == 6
    monkeypatch.setattr(kernels, "PAYLOAD_FRACTION", 10.0)
    assert kernels.kv_head_chunks(*hnd) == 3
    monkeypatch.setattr(launch, "MAX_GRID_HEADS", 3)
    with pytest.raises(ValueError, match="2 query heads per KV head is above 1"):
        call()


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # masked padding rows' LSE, not stored
@pytest.mark.parametrize("mask_batch", [5, 1])
def test_batches_past_the_grid_limit_run_in_slices(monkeypatch, mask_batch):
    """A batch above launch.MAX_GRID_BATCH (CUDA's 65535 on grid axis z) runs in slices with the
    one-launch result bit for bit (here with the limit lowered to 2: 5 -> 2 + 2 + 1), a per-batch
    mask sliced with it, a broadcast one not; the low-level calls refuse such a batch by name."""
    from sageflash.kernels import launch
    q, k, v = random_qkv(7, 5, 4, 2, 40, 70, 64, torch.float16)
    gen = torch.Generator().manual_seed(10)
    mask = (torch.rand(mask_batch, 1, 40, 70, generator=gen) > 0.3).to(q.device)
    call = lambda: sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, return_lse=True, attn_mask=mask,  # noqa: E731
                                                 backend="triton")
    whole = call()
    monkeypatch.setattr(launch, "MAX_GRID_BATCH", 2)
    sliced = call()
    for got, want in zip(sliced, whole):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="batch size 5 is above 2"):
        sageflash.quantize_qk(q, k, granularity="per_thread", smooth_k=True, backend="triton")


def test_tensors_passed_by_keyword():
    """The backend's functions find their device from keyword tensors too (they raised StopIteration)."""
    q, k, v = random_qkv(3, 1, 2, 2, 64, 64, 64, torch.float16)
    by_keyword = kernels.quantize_v(v=v, pv_accum="fp32", smooth_v=False)
    by_position = kernels.quantize_v(v, pv_accum="fp32", smooth_v=False)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn
               else torch.equal(a, b) for a, b in zip(by_keyword[:2], by_position[:2]))
    assert torch.equal(kernels.quantize_qk(q=q, k=k, granularity="per_thread", smooth_k=True)[0],
                       kernels.quantize_qk(q, k, granularity="per_thread", smooth_k=True)[0])


ATTENTION_SHAPES = [  # batch, q heads, kv heads, seq_q, seq_k, head dim, causal
    (1, 2, 1, 64, 64, 64, True),
    (2, 4, 2, 77, 131, 40, False),
    (1, 3, 3, 130, 70, 96, True),   # Sq > Sk, causal: bottom-right, first rows see nothing
    (1, 2, 1, 50, 190, 128, True),  # Sq < Sk, causal: bottom-right
    # Lengths of 1, which Triton compiles as constants (an int argument equal to 1 is specialised):
    (2, 4, 1, 1, 300, 128, True),   # decoding: one query, GQA
    (1, 4, 1, 64, 1, 128, False),   # one key
    (1, 2, 2, 1, 1, 64, True),      # one query, one key
]


@pytest.mark.parametrize("return_lse", [False, True])  # two builds of the kernel (WRITE_LSE)
@pytest.mark.parametrize("pv_accum", MODES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(pv_accum, shape, return_lse):
    batch, hq, hk, sq, sk, d, causal = shape
    q, k, v = random_qkv(sum(shape), batch, hq, hk, sq, sk, d, torch.float16)
    knobs = dict(is_causal=causal, pv_accum=pv_accum, granularity="per_thread",
                 smooth_v=pv_accum == "fp32", return_lse=return_lse)
    out = sageflash.sage_attn_sm89_fp16(q, k, v, backend="triton", **knobs)
    ref = sageflash.sage_attn_sm89_fp16(q.cpu(), k.cpu(), v.cpu(), backend="reference", **knobs)
    if return_lse:  # -inf where a causal row sees no key; a NaN anywhere fails
        (out, lse), (ref, ref_lse) = out, ref
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=1e-4)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert nmse(out, ref) <= 1e-5


def test_one_key_takes_the_build_with_seq_k_at_run_time(monkeypatch):
    """A single key launches `attention._launch_attention_one_key`, the kernel built with seq_k a
    runtime value (Triton's build with the constant 1 gave NaN rows on an H200); any other length
    the build the launch table was measured with."""
    attention = sys.modules["sageflash.kernels.attention"]
    if not kernels.INTERPRETED:  # the interpreter's kernels keep no specialisation settings
        assert "seq_k" in attention._launch_attention_one_key.kernel.do_not_specialize
    monkeypatch.setattr(kernels, "_REPLAYS", kernels.replay.Replays())  # no replay skips the launchers
    launched = []

    def recording(name):
        launcher = getattr(attention, name)

        def launch(*args, **meta):
            launched.append(name)
            launcher(*args, **meta)
        return launch

    for name in ("_launch_attention", "_launch_attention_one_key"):
        monkeypatch.setattr(attention, name, recording(name))
    for seq_k in (1, 2):
        q, k, v = random_qkv(seq_k, 1, 2, 1, 17, seq_k, 64, torch.float16)
        out = sageflash.sage_attn_sm89_fp16(q, k, v, backend="triton")
        ref = sageflash.sage_attn_sm89_fp16(q.cpu(), k.cpu(), v.cpu(), backend="reference")
        assert nmse(out, ref) <= 1e-5
    assert launched == ["_launch_attention_one_key", "_launch_attention"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, under the interpreter: the NaNs are the point
@pytest.mark.parametrize("granularity", ["per_thread", "per_warp"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor,knobs", [("q", {}), ("k", {"smooth_k": False}), ("k", {}),
                                          ("v", {"pv_accum": "fp32+fp32"}), ("v", {"smooth_v": True, "pv_accum": "fp32"}),
                                          ("v", {"is_causal": True})])
def test_non_finite_input_spoils_what_the_reference_spoils(tensor, knobs, value, granularity):
    """A NaN or inf in q, k or v spoils the same outputs as in the reference (`non_finite_outputs`):
    the quantizer's group maxima and V's statistics keep NaN (`quant._max_keeping_nan`), and the
    kernel zeroes only rows whose sum is 0, not NaN. The outputs left finite match the reference's.
    A causal v value is its last token's, which only the last query tile reads."""
    q, k, v = random_qkv(31, 2, 4, 2, 70, 70, 64, torch.float16)
    q, k, v, position = with_non_finite(q, k, v, tensor, value, seed=len(knobs) + 7 * "qkv".index(tensor),
                                        last_token=knobs.get("is_causal", False))
    knobs = dict(granularity=granularity, **knobs)
    out = sageflash.sage_attn_sm89_fp16(q, k, v, backend="triton", **knobs).cpu()
    ref = sageflash.sage_attn_sm89_fp16(q.cpu(), k.cpu(), v.cpu(), backend="reference", **knobs)
    spoiled = non_finite_outputs(out.shape, k.shape[1], tensor, position, granularity)
    assert torch.equal(~torch.isfinite(out), spoiled) and torch.equal(~torch.isfinite(ref), spoiled)
    assert nmse(out[~spoiled], ref[~spoiled]) <= 1e-5


@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
def test_attention_bf16_and_lse(granularity):
    q, k, v = random_qkv(7, 1, 4, 2, 100, 100, 64, torch.bfloat16)
    params = resolve_params(granularity=granularity, is_causal=True, head_dim=64)
    from sageflash import kernels
    out, lse = kernels.attention(q, k, v, params, return_lse=True)
    ref, ref_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), params, return_lse=True)
    assert out.dtype == torch.bfloat16 and nmse(out, ref) <= 3e-5
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=1e-4)


def test_refdump_output(refdump_prefix):
    meta = dumps.read_meta(refdump_prefix)
    q, k, v = (dumps.read_tensor(refdump_prefix, meta, t).to(DEVICE) for t in "qkv")
    p = meta.params
    out = sageflash.sage_attn_sm89_fp16(q, k, v, p.softmax_scale, p.is_causal, p.smooth_k, p.smooth_v,
                                        p.pv_accum, p.granularity, backend="triton")
    assert nmse(out, dumps.read_tensor(refdump_prefix, meta, "sage_quant")) <= 1e-5
