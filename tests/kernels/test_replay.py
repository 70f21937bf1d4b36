"""Replayed calls (`sageflash.kernels.replay`): what a plan re-issues, and, on the GPU, that a
replayed call gives the ordinary path's output bit for bit.

On the CPU the recording is fed by hand with fake compiled kernels whose launcher logs its
arguments, so the address arithmetic is checked without a GPU.
"""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from helpers import random_qkv
from sageflash import kernels, sage_attn_sm89_fp16
from sageflash.kernels import replay

pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")


class _FakeCompiled:
    """A CompiledKernel's launch surface: ``run(gx, gy, gz, stream, function, metadata, ...)``."""

    def __init__(self, log, name):
        self.function, self.packed_metadata = name, (name, "metadata")
        self.run = lambda *launch: log.append(launch)


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=gen).half() for _ in range(3))
    return q, k, v, torch.empty_like(q), None


def _record_call(inputs, log):
    """What `_quantize_and_attend` does, in small: two launches over the inputs and two scratch
    buffers, one read through a view at an offset and one through a TMA descriptor."""
    q, k, v, out, _ = inputs
    payload = torch.empty(2, 64, 64, dtype=torch.int8)
    scales = torch.empty(300, dtype=torch.float32)
    replay.record(_FakeCompiled(log, "quantize"), (4, 2), (q, k, payload, scales[44:], 64, 0.5, True))
    desc = TensorDescriptor.from_tensor(payload.view(-1, 64), [64, 64])
    replay.record(_FakeCompiled(log, "attend"), (1, 2, 1), (q, desc, scales, v, out, k, 7))


def test_a_plan_reissues_the_launches_at_the_new_addresses():
    log = []
    first = _inputs(0)
    replays = replay.Replays()
    key = replay.pattern(first, "knobs")
    replays(key, first, functools.partial(_record_call, first, log), stream=99)
    assert replays.plans[key] == "seen once"  # a pattern seen once is not worth a plan
    replays(key, first, functools.partial(_record_call, first, log), stream=99)
    plan = replays.plans[key]
    assert isinstance(plan, replay.CallPlan) and log == []
    assert plan.workspace_bytes == 2 * 64 * 64 + 1280  # two buffers, each rounded up to 256 bytes
    recorded_q = weakref.ref(first[0])
    del first
    gc.collect()
    assert recorded_q() is None  # the plan holds no tensor of the recorded call

    second = _inputs(1)
    assert replay.pattern(second, "knobs") == key
    replays(key, second, lambda: pytest.fail("a plan's pattern must not run the call again"), stream=99)
    (q, k, v, out, _), (quantize, attend) = second, log
    assert quantize[:7] == (4, 2, 1, 99, "quantize", ("quantize", "metadata"), None)
    payload, scales = quantize[9 + 2], quantize[9 + 3]
    assert quantize[9:] == (q.data_ptr(), k.data_ptr(), payload, scales, 64, 0.5, True)
    assert attend[:5] == (1, 2, 1, 99, "attend")
    a_q, desc, a_scales, a_v, a_out, a_k, seven = attend[9:]
    assert (a_q, a_v, a_out, a_k, seven) == (q.data_ptr(), v.data_ptr(), out.data_ptr(), k.data_ptr(), 7)
    # The scratch buffers: disjoint, at their recorded offsets from each other.
    assert desc.base.data_ptr() == payload and desc.base.dtype == torch.int8
    assert (list(desc.shape), list(desc.strides), list(desc.block_shape)) == ([128, 64], [64, 1], [64, 64])
    assert a_scales == scales - 44 * 4 and a_scales == payload + 2 * 64 * 64


def test_patterns_that_cannot_be_replayed_keep_the_ordinary_path():
    first = _inputs(2)
    q = first[0]
    replays = replay.Replays()
    calls = []

    def offset_view():  # an input read at an address that is not its own
        calls.append(1)
        replay.record(_FakeCompiled([], "k"), (1,), (q[:, 1:],))

    key = replay.pattern(first, "offset")
    for _ in range(3):
        replays(key, first, offset_view, stream=0)
    assert len(calls) == 3 and replays.plans[key] == "unplannable"
    key = replay.pattern(first, "no launches")
    for _ in range(3):
        replays(key, first, lambda: calls.append(1), stream=0)
    assert len(calls) == 6


def test_the_pattern_sees_layout_alignment_and_aliasing():
    q, k, v, out, _ = _inputs(3)
    base = replay.pattern((q, k, v, out, None), 1)
    assert replay.pattern((q, k, v, out, None), 2) != base
    assert replay.pattern((q, q, v, out, None), 1) != base  # q is k: k's reads go to q's address
    assert replay.pattern((q.transpose(2, 3).contiguous().transpose(2, 3), k, v, out, None), 1) != base
    flat = torch.empty(q.numel() + 1, dtype=q.dtype)
    shifted = flat[1:].view(q.shape)  # 2 bytes off 16-byte alignment
    assert replay.pattern((shifted, k, v, out, None), 1) != base
    assert replay.pattern(_inputs(4), 1) == base


def test_launch_hooks_turn_replays_off(monkeypatch):
    from triton import knobs

    first = _inputs(5)
    replays = replay.Replays()
    key = replay.pattern(first, "hooks")
    log, calls = [], []
    record = lambda: (calls.append(1), _record_call(first, log))  # noqa: E731
    for _ in range(2):
        replays(key, first, record, stream=0)
    assert isinstance(replays.plans[key], replay.CallPlan)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
    replays(key, first, record, stream=0)
    assert len(calls) == 3 and log == []


# On the GPU: the op itself, replayed against the ordinary path.
GPU_CASES = [  # batch, q heads, kv heads, seq, head dim, causal, pv_accum, granularity, layout, mask
    (2, 4, 2, 1000, 64, True, "fp32+fp16", "per_thread", "HND", None),
    (1, 2, 2, 300, 128, False, "fp32+fp32", "per_warp", "NHD", None),
    (1, 2, 1, 257, 72, False, "fp32", "per_thread", "HND", "bool"),
    (2, 2, 2, 2048, 128, True, "fp32+fp32", "per_thread", "HND", None),  # TMA descriptors on sm_90
    (1, 4, 4, 512, 64, False, "fp32+fp16", "per_warp", "HND", "additive"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_replayed_calls_match_the_ordinary_path(case):
    batch, hq, hk, seq, d, causal, pv_accum, granularity, layout, mask = case
    knobs = dict(is_causal=causal, pv_accum=pv_accum, granularity=granularity, tensor_layout=layout)
    kernels._REPLAYS.plans.clear()
    outs = []
    for seed in range(4):  # the ordinary path, recorded, then replayed twice with new data
        q, k, v = random_qkv(batch, hq, hk, seq, head_dim=d, seed=seed + seq, device="cuda", k_offset=2.0)
        if layout == "NHD":
            q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        attn_mask = None
        if mask == "bool":
            attn_mask = torch.rand(seq, seq, device="cuda") > 0.3
        elif mask == "additive":
            attn_mask = torch.randn(1, hq, seq, seq, device="cuda").half()
        got = sage_attn_sm89_fp16(q, k, v, attn_mask=attn_mask, **knobs)
        want = sage_attn_sm89_fp16(q, k, v, attn_mask=attn_mask, return_lse=True, **knobs)[0]  # never replayed
        assert torch.isfinite(got).all()
        assert torch.equal(got, want)
        outs.append(got)
    assert not torch.equal(outs[2], outs[3])
    plans = list(kernels._REPLAYS.plans.values())
    assert len(plans) == 1 and isinstance(plans[0], replay.CallPlan)


@pytest.mark.gpu
def test_replays_follow_aliased_inputs():
    """q is k is v in one call, three tensors in the next: two patterns, each right."""
    kernels._REPLAYS.plans.clear()
    x, k, v = random_qkv(1, 2, 2, 400, head_dim=64, seed=11, device="cuda")
    for _ in range(3):  # each pattern: the ordinary path, recorded, replayed
        for args in ((x, x, x), (x, k, v)):
            got = sage_attn_sm89_fp16(*args)
            assert torch.equal(got, sage_attn_sm89_fp16(*args, return_lse=True)[0])
    plans = list(kernels._REPLAYS.plans.values())
    assert len(plans) == 2 and all(isinstance(plan, replay.CallPlan) for plan in plans)
