"""Launch choices: TMA loads against pointer loads, `launch_config`'s table, the cached launcher,
CUDA-graph capture.

The TMA comparisons run in the interpreter (CI) and on the GPU; the cached launcher's fast path
runs on the GPU, and on the CPU with Triton's driver and kernel faked; graphs need the GPU.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from conftest import HAS_CUDA, nmse
import sageflash
from sageflash import kernels, reference
from sageflash.kernels.attention import (_HOPPER, LaunchConfig, _tma_addressable,
                                        attention_from_payloads, launch_config)
from sageflash.kernels.launch import device_capability, launch_key
from sageflash.params import PVAccum, resolve_params

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_cuda_allocator")

TMA_SHAPES = [  # batch, q heads, kv heads, seq, head dim, causal: tails that read the next head
    (2, 2, 1, 200, 64, True),
    (2, 2, 2, 130, 128, False),
    (1, 4, 2, 256, 128, True),
]


def output_and_reference(q, k, v, params, launch: LaunchConfig):
    """``launch`` run over the Triton payloads of q, k and v (on their device) into a NaN-poisoned
    output, and the CPU reference's attention over the same payloads."""
    q8, qs, k8, ks, _, v8, vs, vm = kernels.quantize_qkv(q, k, v, granularity=params.granularity,
                                                         smooth_k=params.smooth_k, pv_accum=params.pv_accum)
    seq_q, seq_k, head_dim = q.shape[2], k.shape[2], q.shape[-1]
    out = torch.full_like(q, float("nan"))
    attention_from_payloads(q8, qs, k8, ks, v8, vs, vm, params=params, seq_q=seq_q, seq_k=seq_k,
                            head_dim=head_dim, out_dtype=q.dtype, out=out, launch=launch)
    ref = reference.attention_from_payloads(*(None if x is None else x.cpu() for x in (q8, qs, k8, ks, v8, vs, vm)),
                                            params=params, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                                            out_dtype=q.dtype)
    return out, ref


@pytest.mark.parametrize("pv_accum", ["fp32+fp32", "fp32+fp16"])
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_loads_match_pointer_loads(shape, pv_accum):
    """The same launch with pointer and TMA loads (the quantizer is deterministic, so both run on
    the same payloads): equal outputs, and the reference's."""
    if HAS_CUDA and device_capability(torch.device("cuda")) < 90:
        pytest.skip("TMA descriptors need Hopper")
    batch, hq, hk, seq, d, causal = shape
    gen = torch.Generator().manual_seed(seq * d + hq)
    q = torch.randn(batch, hq, seq, d, generator=gen).half().to(DEVICE)
    k, v = (torch.randn(batch, hk, seq, d, generator=gen).half().to(DEVICE) for _ in range(2))
    params = resolve_params(None, causal, True, False, pv_accum, "per_thread", head_dim=d)
    (pointer_out, _), (tma_out, ref) = (output_and_reference(q, k, v, params, LaunchConfig(64, 128, 4, 3, tma=tma))
                                        for tma in (False, True))
    assert torch.isfinite(pointer_out).all() and torch.isfinite(tma_out).all()
    if HAS_CUDA:  # ptxas may schedule the two kernels' float operations differently
        assert nmse(tma_out, pointer_out) <= 1e-7
    else:
        assert torch.equal(tma_out, pointer_out)
    assert nmse(tma_out.cpu(), ref) <= 1e-5


@pytest.mark.parametrize("pv_accum", ["fp32+fp16", "fp32+fp32", "fp32"])
def test_hopper_head_dim_256_launch_matches_the_reference(pv_accum):
    """Hopper's D=256 launch (128 rows on two warpgroups, K and V through TMA) on a ragged causal
    GQA call with rows past the last tile: the reference's output (the interpreter on CPU)."""
    if HAS_CUDA and device_capability(torch.device("cuda")) < 90:
        pytest.skip("TMA descriptors need Hopper")
    batch, hq, hk, seq, d = 1, 4, 2, 200, 256
    gen = torch.Generator().manual_seed(256)
    q = torch.randn(batch, hq, seq, d, generator=gen).half().to(DEVICE)
    k, v = (torch.randn(batch, hk, seq, d, generator=gen).half().to(DEVICE) for _ in range(2))
    params = resolve_params(None, True, True, False, pv_accum, "per_thread", head_dim=d)
    out, ref = output_and_reference(q, k, v, params, launch_config(d, 90, params.pv_accum.code, True, seq))
    assert torch.isfinite(out).all()
    assert nmse(out.cpu(), ref) <= 1e-5


def test_launch_table():
    fp32_fp32, fp32_fp16 = PVAccum.FP32_FP32.code, PVAccum.FP32_FP16.code
    for causal in (False, True):  # D=128 from 1k keys
        for keys in (1024, 4096):
            assert launch_config(128, 90, fp32_fp16, causal, keys) == LaunchConfig(64, 128, 4, 2, True, 168)
            assert launch_config(128, 90, fp32_fp32, causal, keys) == LaunchConfig(64, 64, 4, 3, True, 168)
        assert launch_config(128, 90, fp32_fp16, causal, 512) == LaunchConfig(64, 128, 4, 3)
        assert launch_config(128, 90, fp32_fp32, causal, 512) == LaunchConfig(64, 128, 4, 3)
    for keys in (1024, 4096):  # D=64 under 128 registers from 1k keys: 4 programs per SM
        assert launch_config(64, 90, fp32_fp16, False, keys) == LaunchConfig(64, 128, 4, 3, True, 128)
        assert launch_config(64, 90, fp32_fp16, True, keys) == LaunchConfig(64, 128, 4, 2, True, 128)
        for causal in (False, True):
            assert launch_config(64, 90, fp32_fp32, causal, keys) == LaunchConfig(64, 128, 4, 3, True, 128)
    fp32_rows = {64: (LaunchConfig(64, 128, 4, 2, True, 168), LaunchConfig(64, 128, 4, 4)),
                 128: (LaunchConfig(64, 64, 4, 3, True, 168), LaunchConfig(64, 128, 4, 3))}
    for head_dim, (tuned, default) in fp32_rows.items():
        for causal in (False, True):  # pv_accum fp32: from 1k keys
            assert launch_config(head_dim, 90, PVAccum.FP32.code, causal, 1024) == tuned
            assert launch_config(head_dim, 90, PVAccum.FP32.code, causal, 512) == default
    for pv_mode, causal, keys in itertools.product(PVAccum, (False, True), (512, 1024, 4096)):
        # Ada: tiles whose rows stay in one warp (`test_compile`), no TMA, no register cap
        assert launch_config(64, 89, pv_mode.code, causal, keys) == LaunchConfig(64, 64, 4, 3)
        assert launch_config(128, 89, pv_mode.code, causal, keys) == LaunchConfig(128, 64, 8, 3)
        assert launch_config(256, 89, pv_mode.code, causal, keys) == LaunchConfig(64, 64, 8, 2)
        assert launch_config(256, 90, pv_mode.code, causal, keys) == LaunchConfig(128, 64, 8, 3, tma=True)
    for pv_mode in (fp32_fp32, fp32_fp16):  # a 168-register cap below the rows' 1k keys (D=64, Hopper)
        assert launch_config(64, 90, pv_mode, True, 512) == LaunchConfig(64, 128, 4, 4, max_registers=168)
    for capability, head_dim in itertools.product((89, 120), (64, 128, 256)):
        # consumer Blackwell takes Ada's tiles; a float32 mask takes D=128's 128 rows to 2 stages
        ada = launch_config(head_dim, 89, fp32_fp16, False, 4096)
        assert launch_config(head_dim, capability, fp32_fp16, False, 4096, mask_itemsize=2) == ada
        stages = 2 if head_dim == 128 else ada.num_stages
        assert launch_config(head_dim, capability, fp32_fp16, False, 4096, mask_itemsize=4) == \
            ada._replace(num_stages=stages)
    for head_dim in (64, 128, 256):  # Hopper's tables have the shared memory for a float32 mask's stages
        assert launch_config(head_dim, 90, fp32_fp16, False, 4096, mask_itemsize=4) == \
            launch_config(head_dim, 90, fp32_fp16, False, 4096)


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2), (torch.bool, 1), (None, 0)])
def test_the_launch_is_chosen_for_the_masks_element_size(monkeypatch, dtype, itemsize):
    """`attention_from_payloads` tells `launch_config` the mask's element size (a float32 mask takes
    Ada's D=128 tile to 2 stages)."""
    attention = importlib.import_module("sageflash.kernels.attention")  # (kernels.attention is the function)
    seen = []
    choose_as_before = attention.launch_config
    monkeypatch.setattr(attention, "launch_config", lambda *args: seen.append(args[5:]) or choose_as_before(*args))
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 70, 128, generator=gen).half().to(DEVICE) for _ in range(3))
    mask = None if dtype is None else (torch.randn(70, 70, generator=gen) > -1).to(dtype).to(DEVICE)
    sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="triton")
    assert seen == [(itemsize,)]


def test_the_launch_arch_follows_tritons_override(monkeypatch):
    """Under ``TRITON_OVERRIDE_ARCH`` Triton compiles that arch's code path (assembled for the GPU
    present), so the launch table must pick that arch's launches too."""
    monkeypatch.setenv("TRITON_OVERRIDE_ARCH", "sm89")
    assert device_capability(torch.device("cuda")) == 89
    assert device_capability(torch.device("cpu")) == 0  # the interpreter


def test_tma_needs_contiguous_aligned_payloads():
    """Anything else takes pointer loads (a descriptor of a misaligned base was an AssertionError)."""
    k8 = torch.zeros(1, 2, 128, 64, dtype=torch.int8)
    v8 = torch.zeros(1, 2, 64, 128, dtype=torch.int8)
    assert _tma_addressable(k8, v8)
    assert not _tma_addressable(k8.transpose(1, 2), v8)
    packed = torch.zeros(k8.numel() + 16, dtype=torch.int8)
    offset = (16 - packed.data_ptr() % 16) % 16
    assert _tma_addressable(packed[offset:offset + k8.numel()].view(k8.shape), v8)
    for misaligned in (1, 8):
        assert not _tma_addressable(packed[offset + misaligned:offset + misaligned + k8.numel()].view(k8.shape), v8)


def test_the_launch_choices_follow_triton_interpret_as_it_was_at_import(monkeypatch):
    """The kernels were decorated (compiled or interpreted) when TRITON_INTERPRET was read at
    import; changing it later must not switch off Hopper's dependent launches or Ada's e4m3 cast
    (both read it at every call before)."""
    from sageflash.kernels import launch

    cuda = torch.device("cuda", 0)

    def choices():
        monkeypatch.setattr(launch, "device_capability", lambda device: 90)
        pdl = launch.dependent_launch(cuda)
        monkeypatch.setattr(launch, "device_capability", lambda device: 89)
        return pdl, launch.e4m3_cast_in_ptx(cuda)
    assert choices() == (not launch.INTERPRETED, not launch.INTERPRETED)
    if launch.INTERPRETED:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choices() == (not launch.INTERPRETED, not launch.INTERPRETED)


def test_launch_key_is_finer_than_tritons_specialisation():
    """Two argument lists Triton may compile differently never share a key; equal ones do."""
    t = torch.empty(64, dtype=torch.float16)
    key = lambda *args: launch_key(args)  # noqa: E731
    assert key(t) != key(t[1:])  # 16-byte aligned or not
    assert key(t) != key(t.view(torch.int16))
    assert len({key(n) for n in (1, 16, 17, 2 ** 31, 2 ** 31 + 1)}) == 5
    assert key(True) != key(1) and key(1.0) != key(1) and key(None) != key(0.5)
    base = torch.empty(128, 64, dtype=torch.int8)
    desc = lambda block: TensorDescriptor.from_tensor(base, block)  # noqa: E731
    assert key(desc([64, 64])) == key(desc([64, 64])) and key(desc([64, 64])) != key(desc([32, 64]))
    assert key(t, 5, desc([64, 64])) == key(t, 5, desc([64, 64]))
    hash(key(t, 5, 0.5, None, True, desc([64, 64])))


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*args, stream=...)`` is logged."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, stream: self.log.append(("fast", grid, args, stream))


class _FakeKernel:
    """Stands in for a JITFunction: ``kernel[grid](*args, **meta)`` is logged and returns the
    compiled kernel."""

    arg_names = ["X", "n", "D", "FLAG"]

    def __init__(self):
        self.log = []
        self.compiled = _FakeCompiled(self.log)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("slow", grid, args, meta))
            return self.compiled
        return launch


def test_launcher_reuses_the_compiled_kernel_per_pattern(monkeypatch):
    """The cached path (GPU only) on the CPU, with Triton's driver and kernel faked: a repeated
    pattern launches the compiled kernel with the constexprs appended in signature order; a new
    pattern goes through Triton; past MAX_PATTERNS the cache starts again."""
    from sageflash.kernels import launch

    class Active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)

    monkeypatch.setattr(launch, "driver", type("Driver", (), {"active": Active}))
    kernel = _FakeKernel()
    run = launch.Launcher(kernel)
    run.interpreted = False  # the GPU path, whatever this process runs
    x = torch.empty(8)
    run((1, 1, 1), x, 16, FLAG=True, D=64, num_warps=4)
    run((2, 1, 1), x, 16, FLAG=True, D=64, num_warps=4)
    run((2, 1, 1), x, 17, FLAG=True, D=64, num_warps=4)
    assert [entry[0] for entry in kernel.log] == ["slow", "fast", "slow"]
    assert kernel.log[0] == ("slow", (1, 1, 1), (x, 16), dict(FLAG=True, D=64, num_warps=4))
    assert kernel.log[1] == ("fast", (2, 1, 1), (x, 16, 64, True), 1234)
    monkeypatch.setattr(launch, "MAX_PATTERNS", 2)
    run((1, 1, 1), x, 18, FLAG=True, D=64, num_warps=4)  # a third pattern: the cache restarts
    assert len(run.compiled) == 1
    run((1, 1, 1), x, 16, FLAG=True, D=64, num_warps=4)
    assert kernel.log[-1][0] == "slow"


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


@pytest.mark.gpu
@pytest.mark.parametrize("seq,head_dim,pv_accum,causal", [
    (300, 64, "fp32+fp16", True),
    (2048, 128, "fp32+fp32", False),  # TMA descriptors on sm_90
])
def test_cuda_graph_replays_the_op(seq, head_dim, pv_accum, causal):
    """The op captured in a CUDA graph (as `sageflash bench --modes graph` times it) gives the eager
    output, and recomputes it from new data copied into the captured inputs."""
    from sageflash import sage_attn_sm89_fp16
    from sageflash.bench import captured

    gen = torch.Generator().manual_seed(seq)
    draw = lambda: [torch.randn(2, 4, seq, head_dim, generator=gen).half().cuda() for _ in range(3)]  # noqa: E731
    q, k, v = draw()
    call = lambda: sage_attn_sm89_fp16(q, k, v, is_causal=causal, pv_accum=pv_accum)  # noqa: E731
    replay = captured(call, q.device)
    for _ in range(2):
        out = replay().clone()
        assert torch.equal(out, call())
        for static, new in zip((q, k, v), draw()):
            static.copy_(new)
    assert not torch.equal(replay(), out)


@pytest.mark.gpu
@pytest.mark.parametrize("row", sorted(_HOPPER), ids=lambda r: "d{}-pv{}-causal{}".format(*r))
def test_every_hopper_launch_row_matches_the_reference(row):
    """Each row of the Hopper launch table, from its first key count and at a ragged length past
    it, gives the reference's output."""
    if device_capability(torch.device("cuda")) < 90:
        pytest.skip("Hopper launches (TMA)")
    head_dim, pv_mode, causal = row
    pv_accum = PVAccum.parse(pv_mode, "pv_accum")
    min_keys = _HOPPER[row][0]
    for seq in (min_keys, min_keys + 37):
        gen = torch.Generator().manual_seed(seq + head_dim)
        q, k, v = (torch.randn(1, 2, seq, head_dim, generator=gen).half() for _ in range(3))
        params = resolve_params(None, causal, True, False, pv_accum, "per_thread", head_dim=head_dim)
        out, ref = output_and_reference(q.cuda(), k.cuda(), v.cuda(), params,
                                        launch_config(head_dim, 90, pv_mode, causal, seq))
        assert torch.isfinite(out).all()
        assert nmse(out.cpu(), ref) <= 1e-5, (row, seq)


@pytest.mark.gpu
def test_dependent_launches_chain_a_call_and_change_no_bit(monkeypatch):
    """On Hopper every launch of a call but its first is a dependent launch (PDL), a later KV-head
    chunk's statistics included (they start in the previous chunk's attention tail); the outputs
    and LSEs are bitwise those of plain launches, eager, recorded and replayed."""
    if device_capability(torch.device("cuda")) < 90:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    from sageflash import sage_attn_sm89_fp16
    from sageflash.kernels import launch, replay

    monkeypatch.setattr(kernels, "CHUNKED_FROM_BYTES", 0)  # chunked from any size
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, 4, 1000, 128, generator=gen, device="cuda", dtype=torch.float16) for _ in range(3))
    params = resolve_params(None, True, True, False, "fp32+fp16", "per_thread", head_dim=128)
    recorded = replay.launches_of(lambda: kernels.attention(q, k, v, params))
    pdl = [r.compiled.metadata.launch_pdl for r in recorded]
    assert len(pdl) >= 8 and len(pdl) % 4 == 0, pdl  # statistics, reduction, quantization, attention per chunk
    assert pdl == [False] + [True] * (len(pdl) - 1)

    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(launch, "PDL", enabled)
        monkeypatch.setattr(kernels, "_REPLAYS", replay.Replays())
        results[enabled] = [sage_attn_sm89_fp16(q, k, v, is_causal=True) for _ in range(4)]  # the last two replayed
        results[enabled].append(sage_attn_sm89_fp16(q, k, v, is_causal=True, return_lse=True))
    for with_pdl, plain in zip(results[True][:4], results[False][:4]):
        assert torch.isfinite(with_pdl).all() and torch.equal(with_pdl, plain)
    assert all(torch.equal(a, b) for a, b in zip(results[True][4], results[False][4]))
