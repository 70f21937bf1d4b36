"""`sage_attn_varlen` on the Triton backend: its packed launches give each sequence, bit for bit,
what the op's launches give it alone, and agree with the CPU reference.

On the GPU when there is one, else under TRITON_INTERPRET=1 with small shapes; ``gpu`` tests need
a CUDA device of capability >= 8.9.
"""

from __future__ import annotations

import sys

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


@pytest.mark.parametrize("case", CASES, ids=["fp16", "bf16-causal-D40", "D128-fp32-smooth_v", "bf16-D96-one-key"])
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


def test_grids_are_the_sequences_tiles_only(monkeypatch):
    """Each launch's grid holds each sequence's own tiles, not the sequences times the longest one's
    (a 100k sequence beside 10,000 of 1k would make hundreds of millions of idle programs), and no
    axis holds the sequences: more of them than CUDA's 65535 (the limit lowered to 2 here) run as
    well."""
    launch_config = sys.modules["sageflash.kernels.attention"].launch_config
    case = ([4, 9, 300, 5, 128], [0, 0, 70, 2, 200], 2, 1, 64, torch.float16, dict(is_causal=True))
    _, want_out, want_lse = run_case(case)
    grids = {}
    launch_as_before = launch.Launcher.__call__
    monkeypatch.setattr(launch.Launcher, "__call__", lambda self, grid, *args, **meta: grids.setdefault(
        self.kernel.fn.__name__, grid) and launch_as_before(self, grid, *args, **meta))
    monkeypatch.setattr(launch, "MAX_GRID_BATCH", 2)
    _, out, lse = run_case(case)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    block_m = launch_config(64, launch.device_capability(out.device), 2, True, 200).block_m
    assert grids == {  # (tiles, heads, 1); the reduction: one program per (sequence, KV head)
        "_stats_kernel": (1 + 1 + 2, 2, 1), "_reduce_kernel": (5, 1, 1),
        "_quantize_kernel": (2 + 2 + 6 + 2 + 4, 2 + 1 + 1, 1),
        "_attention_kernel": (sum(-(-n // block_m) for n in (4, 9, 300, 5, 128)), 2, 1),
        "_add_smooth_k_kernel": (1 + 1 + 10 + 1 + 4, 2, 1)}
    assert (out[:13] == 0).all() and torch.isneginf(lse[:, :13]).all()  # the sequences without keys


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
    ok = PackedBatch.build([3, 0, 129], [64, 1, 0], torch.device("cpu"))
    # the padded starts: queries to whole 128-row blocks, keys to whole 128-key steps
    assert ok.table.tolist() == [[0, 3, 0, 64, 0, 0], [3, 0, 64, 1, 128, 128], [3, 129, 65, 0, 256, 128]]
    assert (ok.max_q, ok.max_k, ok.q_padded, ok.k_padded) == (129, 64, 384, 256)
    with pytest.raises(ValueError, match="past the 2147483647 tokens the sequence table holds"):
        PackedBatch.build([1, 1], [2 ** 31 - 100, 1], torch.device("cpu"))  # V's payload: 2**31 + 128 columns
    with pytest.raises(ValueError, match="past the 2147483647 tokens"):
        PackedBatch.build([2 ** 30, 1, 2 ** 30 - 200], [1, 1, 1], torch.device("cpu"))  # Q padded: 2**31 + 128


def test_scales_and_payloads_are_packed_not_sized_by_the_longest():
    """Many short sequences beside a long one: the scales and V's payload hold each sequence padded
    to whole blocks, not the longest times their number (10,000 short sequences beside a 100k one
    would have taken gigabytes)."""
    from sageflash import kernels
    from sageflash.groups import k_num_groups, q_num_groups
    from sageflash.kernels.sequences import PackedBatch
    q_lens, k_lens = [300] + [1] * 20, [5] * 20 + [300]
    q, k, v = (x.transpose(0, 1)[None] for x in packed_qkv(q_lens, k_lens, 2, 1, 64, seed=9, device=DEVICE))
    packed = PackedBatch.build(q_lens, k_lens, q.device)
    q8, q_scale, k8, k_scale, km, v8, v_scale, _ = kernels.quantize_qkv(
        q, k, v, granularity="per_thread", smooth_k=True, pv_accum="fp32+fp16", v_kernel_order=True, packed=packed)
    assert q_scale.shape == (2, q_num_groups(384 + 20 * 128, True))  # 21 x 32 groups, not 21 x 3 x 32
    assert k_scale.shape == (1, k_num_groups(20 * 128 + 384, True)) and v8.shape == (1, 1, 64, 20 * 128 + 384)
    assert q8.shape == (1, 2, 320, 64) and k8.shape == (1, 1, 400, 64) and km.shape == v_scale.shape == (21, 1, 64)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the NaN sequence's own arithmetic
@pytest.mark.parametrize("tma", [False, True])
def test_a_nan_stays_in_its_sequence(monkeypatch, tma):
    """A NaN in one sequence's V reaches that sequence's rows only, through Hopper's launch (TMA
    loads, 128-key steps; forced here) too: its second 64-key block of a masked step reads columns
    of the next sequence's V payload, which P's zeros would turn into NaN unless zeroed."""
    attention = sys.modules["sageflash.kernels.attention"]  # the module (the package's `attention` is a function)
    hopper = attention.LaunchConfig(64, 128, 4, 3, tma=tma)
    monkeypatch.setattr(attention, "launch_config", lambda *args, **kwargs: hopper)
    case = ([16, 16, 5], [50, 64, 70], 1, 1, 64, torch.float16, dict())
    q_lens, k_lens, *_ = case
    q, k, v = packed_qkv(q_lens, k_lens, 1, 1, 64, seed=12, device=DEVICE)
    v[60, 0, 3] = float("nan")  # token 10 of the second sequence
    out = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), backend="triton")
    want, _ = per_sequence(q, k, v, q_lens, k_lens, backend="triton")
    assert not out[:16].isnan().any() and out[16:32].isnan().any() and not out[32:].isnan().any()
    assert torch.equal(out.nan_to_num(), want.nan_to_num()) and torch.equal(out.isnan(), want.isnan())


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_sequence_without_keys_keeps_lse_minus_inf(bad):
    """A sequence without keys gives zeros and LSE -inf on both backends, whatever its queries hold
    (smooth_k's term q·km, with no K mean to undo, made inf·0 = NaN of a non-finite q)."""
    q_lens, k_lens = [3, 4], [0, 10]
    q, k, v = packed_qkv(q_lens, k_lens, 2, 1, 64, seed=13, device=DEVICE)
    q[1, 0, 5] = bad
    for backend, device in (("triton", DEVICE), ("reference", "cpu")):
        out, lse = sageflash.sage_attn_varlen(*(x.to(device) for x in (q, k, v)), cu_seqlens(q_lens),
                                              cu_seqlens(k_lens), return_lse=True, backend=backend)
        assert (out[:3] == 0).all() and torch.isneginf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all(), backend


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_is_refused():
    """Its tables are built on the host per call: a captured replay would read stale ones."""
    q, k, v = packed_qkv([64], [64], seed=14, device="cuda")
    cu = cu_seqlens([64])
    sageflash.sage_attn_varlen(q, k, v, cu, cu)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            sageflash.sage_attn_varlen(q, k, v, cu, cu)


@pytest.fixture
def poisoned_cpu_empty(monkeypatch):
    """torch.empty filled with 0xFF bytes (NaN in every float type, fp8's too) on the CPU, as
    `poisoned_cuda_allocator` does on a GPU: what a kernel leaves unwritten shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if tensor.device.type == "cpu":
            tensor.view(torch.uint8).fill_(0xFF)  # a new tensor: contiguous, its bytes a view
        return tensor
    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_hoppers_launch_on_a_poisoned_packed_batch(monkeypatch, poisoned_cpu_empty):
    """Hopper's launch (TMA, 128-key steps; forced here) over several KV heads, with every new
    buffer poisoned: each sequence is still the op's alone, so every padding column the TMA loads
    read (V's, to whole 128-key steps) was written, and each head's K rows are found."""
    attention = sys.modules["sageflash.kernels.attention"]
    hopper = attention.LaunchConfig(64, 128, 4, 3, tma=True)
    monkeypatch.setattr(attention, "launch_config", lambda *args, **kwargs: hopper)
    q_lens, k_lens = [16, 40, 5], [50, 130, 64]
    q, k, v = packed_qkv(q_lens, k_lens, 4, 2, 64, seed=15, device=DEVICE)
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), return_lse=True,
                                          backend="triton")
    want_out, want_lse = per_sequence(q, k, v, q_lens, k_lens, backend="triton")
    assert torch.isfinite(out).all() and torch.equal(out, want_out) and torch.equal(lse.cpu(), want_lse)


def test_smooth_v_windows_of_each_sequence():
    """smooth_v's V statistics per sequence: channels of one sign, lengths not multiples of 16, so
    that the zero tokens of each sequence's ceil_16 window move its max or min."""
    q_lens, k_lens = [20, 9], [70, 5]
    q, k, v = packed_qkv(q_lens, k_lens, 2, 1, 64, seed=16, device=DEVICE)
    v += torch.tensor([1.5, -1.5], device=v.device, dtype=v.dtype).repeat(32)  # channels of one sign each
    knobs = dict(smooth_v=True, pv_accum="fp32")
    out = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), backend="triton", **knobs)
    assert torch.equal(out, per_sequence(q, k, v, q_lens, k_lens, backend="triton", **knobs)[0])


def test_heads_past_a_packed_launch_are_refused(monkeypatch):
    q, k, v = packed_qkv([4], [4], 4, 2, 64, seed=17, device=DEVICE)
    cu = cu_seqlens([4])
    monkeypatch.setattr(launch, "MAX_GRID_HEADS", 8)  # q heads + 2 * kv heads = 8: holds
    sageflash.sage_attn_varlen(q, k, v, cu, cu, backend="triton")
    monkeypatch.setattr(launch, "MAX_GRID_HEADS", 7)
    with pytest.raises(ValueError, match=r"4 query and 2 KV heads are more than a packed batch's launch holds"):
        sageflash.sage_attn_varlen(q, k, v, cu, cu, backend="triton")


def test_payload_attention_of_a_packed_batch_takes_no_mask():
    from sageflash.kernels.sequences import PackedBatch
    from sageflash.params import resolve_params
    attention = sys.modules["sageflash.kernels.attention"]
    payload = torch.zeros(1, 1, 4, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask: a packed batch takes none"):
        attention.attention_from_payloads(
            payload, None, payload, None, None, None, None, params=resolve_params(head_dim=64), seq_q=4, seq_k=4,
            head_dim=64, out_dtype=torch.float16, attn_mask=torch.ones(4, 4, dtype=torch.bool, device=DEVICE),
            packed=PackedBatch.build([4], [4], payload.device))


@pytest.mark.gpu
def test_gpu_the_op_with_one_key_is_finite():
    """The op alone with a single key (Sk=1), fp16, D=128, no smooth_k: NaN rows on an H200 until a
    single key took a build with seq_k a runtime value (`attention._launch_attention_one_key`)."""
    for _ in range(3):  # a different set of rows at each call
        torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(0xFF)
        q, k, v = packed_qkv([64], [1], 4, 1, 128, seed=18, device="cuda")
        out = sageflash.sage_attn_sm89_fp16(q[None], k[None], v[None], smooth_k=False, tensor_layout="NHD")
        assert torch.isfinite(out).all()
