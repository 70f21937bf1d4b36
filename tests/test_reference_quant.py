"""The CPU reference quantizers (SPEC §3–4): official payloads, group rules, smoothing, V scales."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sageflash
from sageflash import debug, dumps, groups
from conftest import HAS_CUDA
from helpers import (assert_fp8_match, assert_int8_match, assert_scales_match, exact_attention, fp8_ordinal,
                     load_refdump, random_qkv)

BACKEND = "reference"


def test_quantizers_match_official_payloads(refdump_prefix):
    meta = sageflash.dumps.read_meta(refdump_prefix)
    optional = ["k_mean"] * meta.smooth_k + ["v_mean"] * meta.smooth_v
    _, ref = load_refdump(refdump_prefix, "q", "k", "v", "q_int8", "q_scale", "k_int8", "k_scale",
                          "v_fp8", "v_scale", *optional)
    km = ref["k_mean"].to(ref["k"].dtype) if meta.smooth_k else None
    q_int8, q_scale, k_int8, k_scale, _ = sageflash.quantize_qk(
        ref["q"], ref["k"], granularity=meta.granularity, smooth_k=meta.smooth_k, km=km, backend=BACKEND)
    v_fp8, v_scale, v_mean = sageflash.quantize_v(
        ref["v"], pv_accum=meta.pv_accum, smooth_v=meta.smooth_v, backend=BACKEND)

    assert_int8_match(q_int8, ref["q_int8"], "q_int8")
    assert_int8_match(k_int8, ref["k_int8"], "k_int8")
    assert_scales_match(q_scale, ref["q_scale"], "q_scale")
    assert_scales_match(k_scale, ref["k_scale"], "k_scale")
    assert_fp8_match(v_fp8, ref["v_fp8"], "v_fp8")
    assert_scales_match(v_scale, ref["v_scale"], "v_scale")
    if meta.smooth_v:
        assert_scales_match(v_mean, ref["v_mean"], "v_mean", atol=1e-7)  # a mean may be near 0
    else:
        assert v_mean is None


def test_key_mean_matches_official(refdump_prefix):
    """Without a given km the computed mean is the official one (input dtype, widened); a dump
    made without smoothing has none, and the op returns none."""
    meta, ref = load_refdump(refdump_prefix)
    if not meta.smooth_k:
        assert not dumps.has_tag(refdump_prefix, "k_mean")
        assert sageflash.quantize_qk(ref["q"], ref["k"], granularity=meta.granularity, smooth_k=False,
                                     backend=BACKEND)[4] is None
        return
    _, official = load_refdump(refdump_prefix, "k_mean", "k_int8")
    *_, k_int8, _, km = sageflash.quantize_qk(ref["q"], ref["k"], granularity=meta.granularity,
                                              smooth_k=True, backend=BACKEND)
    assert km.dtype == ref["k"].dtype
    torch.testing.assert_close(km.float(), official["k_mean"], rtol=0, atol=0)
    assert_int8_match(k_int8, official["k_int8"], "k_int8")


# Group membership written from SPEC §3's description (not from its formulas): a per_warp Q
# group is a warp's 32 rows, a per_thread one the 4 rows t, t+8, t+16, t+24 of one thread; a
# per_warp K group is a 64-key block, a per_thread one the 16 keys 8c + 2p + {0, 1} (c < 8) of
# thread p in that block.
def q_group_members(g: int, per_thread: bool) -> list[int]:
    if not per_thread:
        return list(range(32 * g, 32 * g + 32))
    warp, lane_row = divmod(g, 8)
    return [32 * warp + lane_row + 8 * i for i in range(4)]


def k_group_members(g: int, per_thread: bool) -> list[int]:
    if not per_thread:
        return list(range(64 * g, 64 * g + 64))
    block, pair = divmod(g, 4)
    return [64 * block + 8 * c + 2 * pair + e for c in range(8) for e in range(2)]


@pytest.mark.parametrize("per_thread", [False, True])
def test_a_quantization_tile_is_a_view_of_whole_groups(per_thread):
    """The Triton quantizer finds a 64-token tile's group maxima over `groups.group_shape`'s
    ``[G1, R1, G2, R2]`` view: in every tile, the tokens at each (g1, g2) must be exactly the
    members of group rule(first token) + g1·G2 + g2."""
    tile = 64
    for rule, members in ((groups.q_group, q_group_members), (groups.k_group, k_group_members)):
        n_g1, n_r1, n_g2, n_r2 = groups.group_shape(rule, tile, per_thread)
        assert n_g1 * n_r1 * n_g2 * n_r2 == tile
        for start in range(0, 4 * tile, tile):
            first = rule(start, per_thread)
            for g1, g2 in itertools.product(range(n_g1), range(n_g2)):
                tokens = [start + ((g1 * n_r1 + r1) * n_g2 + g2) * n_r2 + r2
                          for r1, r2 in itertools.product(range(n_r1), range(n_r2))]
                assert sorted(tokens) == members(first + g1 * n_g2 + g2, per_thread)


def test_v_kernel_token_is_the_official_order_within_each_16_tokens():
    """The attention kernel's V order: position 4t + 2b + e of each 16 holds token 8b + 2t + e
    (what SageAttention's kernel stores, README), as ints and as a torch index, a permutation of
    every 16 tokens."""
    official = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]  # the token at each position
    for base in (0, 16, 4096):
        assert [groups.v_kernel_token(base + position) - base for position in range(16)] == official
    positions = torch.arange(192)
    tokens = groups.v_kernel_token(positions)
    assert torch.equal(tokens.sort().values, positions)
    assert torch.equal(tokens // 16, positions // 16)


def expected_int8(x: torch.Tensor, members, num_groups: int, per_thread: bool):
    """SPEC §3 quantization of float32 ``x [B,H,S,D]``: (values, scales), scales only for groups
    holding at least one real token (the others are irrelevant)."""
    values = torch.empty_like(x)
    scales = torch.full((*x.shape[:2], num_groups), math.nan)
    for g in range(num_groups):
        rows = [t for t in members(g, per_thread) if t < x.shape[2]]
        if not rows:
            continue
        part = x[:, :, rows]
        amax = part.abs().amax(dim=(2, 3))
        if per_thread:
            scale = amax / 127 + 1e-7
            ratio = part / scale[..., None, None]
            values[:, :, rows] = torch.trunc(ratio + 0.5 * torch.sign(ratio))
        else:
            amax = amax.clamp_min(1e-7)
            scale = amax / 127
            values[:, :, rows] = torch.round(part * (127 / amax)[..., None, None])
        scales[..., g] = scale
    return values.clamp(-128, 127).to(torch.int8), scales


def assert_groups_match(actual_int8, actual_scale, x, members, per_thread, name):
    padded = actual_int8.shape[-1]
    x = torch.nn.functional.pad(x, (0, padded - x.shape[-1]))
    values, scales = expected_int8(x, members, actual_scale.shape[-1], per_thread)
    real = ~scales.isnan()
    assert_scales_match(actual_scale[real], scales[real], f"{name}_scale")
    assert_int8_match(actual_int8, values, f"{name}_int8", max_fraction=0)


@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
@pytest.mark.parametrize("head_dim,dtype", [(40, torch.float16), (96, torch.bfloat16), (128, torch.float16)])
def test_qk_groups_scales_and_values(granularity, head_dim, dtype):
    """Scale groups, group counts, rounding rules and head-dim padding of SPEC §3 (no smoothing).

    Tokens get very different magnitudes so that a token in the wrong group changes a scale.
    """
    q, k, _ = random_qkv(2, 4, 2, 200, 150, head_dim, seed=head_dim, dtype=dtype, dist="normal")
    gen = torch.Generator().manual_seed(7)
    q = (q.float() * torch.exp(2 * torch.randn(200, 1, generator=gen))).to(dtype)
    k = (k.float() * torch.exp(2 * torch.randn(150, 1, generator=gen))).to(dtype)
    per_thread = granularity == "per_thread"
    q_int8, q_scale, k_int8, k_scale, km = sageflash.quantize_qk(
        q, k, granularity=granularity, smooth_k=False, backend=BACKEND)

    padded = 64 if head_dim <= 64 else 128
    assert q_int8.shape == (2, 4, 200, padded) and k_int8.shape == (2, 2, 150, padded)
    assert q_scale.shape == (2, 4, math.ceil(200 / 128) * (32 if per_thread else 4))
    assert k_scale.shape == (2, 2, math.ceil(150 / 64) * (4 if per_thread else 1))
    assert km is None
    assert not q_int8[..., head_dim:].any() and not k_int8[..., head_dim:].any()
    assert_groups_match(q_int8, q_scale, q.float(), q_group_members, per_thread, "q")
    assert_groups_match(k_int8, k_scale, k.float(), k_group_members, per_thread, "k")


def test_per_warp_rounds_half_to_even():
    """per_warp uses round-half-to-even: with amax = 127 the ratio is x itself."""
    ties = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5])
    q = torch.zeros(1, 1, 1, 64, dtype=torch.float16)
    q[..., : ties.numel()] = ties.half()
    q_int8, *_ = sageflash.quantize_qk(q, q, granularity="per_warp", smooth_k=False, backend=BACKEND)
    assert q_int8[0, 0, 0, : ties.numel()].tolist() == [127, 2, 4, -2, -4, 0, 0, 2]


@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
def test_smooth_k_default_mean(granularity):
    """km = mean over all keys in float32, rounded to the input dtype, zero-padded to D."""
    q, k, _ = random_qkv(1, 2, 2, 50, 77, 80, seed=3, dtype=torch.bfloat16, k_offset=4)
    *_, km = sageflash.quantize_qk(q, k, granularity=granularity, smooth_k=True, backend=BACKEND)
    assert km.shape == (1, 2, 128) and km.dtype == torch.bfloat16
    expected = k.double().mean(dim=2).to(torch.bfloat16)
    assert torch.equal(km[..., :80], expected)
    assert not km[..., 80:].any()


@pytest.mark.parametrize("km_dim", [64, 48])
def test_per_thread_smoothing_uses_given_mean_in_input_dtype(km_dim):
    """per_thread encodes k − km computed in the input dtype; a given km ([B,Hk,D] or
    [B,Hk,D0]) replaces the computed mean."""
    q, k, _ = random_qkv(1, 2, 1, 40, 90, 48, seed=11, k_offset=6)
    km = random_qkv(1, 1, 1, 1, 1, km_dim, seed=12)[0][:, :, 0] * 3
    smoothed = sageflash.quantize_qk(q, k, granularity="per_thread", smooth_k=True, km=km, backend=BACKEND)
    shifted = sageflash.quantize_qk(q, k - km[:, :, None, :48], granularity="per_thread", smooth_k=False,
                                    backend=BACKEND)
    for name, a, b in zip(["q_int8", "q_scale", "k_int8", "k_scale"], smoothed, shifted):
        assert torch.equal(a, b), name
    assert torch.equal(smoothed[4][..., :48], km[..., :48])


def test_per_warp_smoothing_uses_given_mean():
    q, k, _ = random_qkv(1, 2, 2, 40, 130, 64, seed=13, k_offset=6)
    km = k.float().mean(dim=2).half() + 0.25
    smoothed = sageflash.quantize_qk(q, k, granularity="per_warp", smooth_k=True, km=km, backend=BACKEND)
    values, scales = expected_int8(k.float() - km.float()[:, :, None], k_group_members, 3, False)
    assert_scales_match(smoothed[3], scales, "k_scale")
    assert_int8_match(smoothed[2], values, "k_int8", max_fraction=0)


def expected_v(v: torch.Tensor, scale_max: float, smooth_v: bool):
    """SPEC §4 from the text: statistics over the zero-padded window of ceil16(Sk) tokens."""
    seq_k = v.shape[2]
    window = torch.nn.functional.pad(v.float(), (0, 0, 0, -seq_k % 16))
    mean = window.sum(dim=2) / window.shape[2] if smooth_v else torch.zeros(window.shape[:2] + window.shape[3:])
    amax = torch.maximum((window.amax(dim=2) - mean).abs(), (window.amin(dim=2) - mean).abs())
    inv_scale = (scale_max / amax).nan_to_num(0.0, posinf=0.0)  # multiply by the reciprocal, like the kernels
    payload = (v.float() - mean[:, :, None]) * inv_scale[:, :, None]
    return payload.clamp(-448, 448).to(torch.float8_e4m3fn), amax / scale_max, mean


@pytest.mark.parametrize("pv_accum,scale_max", [("fp32", 448.0), ("fp32+fp32", 448.0), ("fp32+fp16", 2.25)])
@pytest.mark.parametrize("smooth_v", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_v(pv_accum, scale_max, smooth_v, dtype):
    """Per-channel scale amax/scale_max over the window (mean divided by ceil16(Sk), not Sk),
    natural token order, zero padding in tokens and channels; smooth_v only with fp32 (the op's
    contract: forced off otherwise)."""
    _, _, v = random_qkv(2, 2, 2, 1, 37, 40, seed=21, dtype=dtype, v_offset=2)
    v_fp8, v_scale, v_mean = sageflash.quantize_v(v, pv_accum=pv_accum, smooth_v=smooth_v, backend=BACKEND)
    smooth_v = smooth_v and pv_accum == "fp32"
    payload, scale, mean = expected_v(v, scale_max, smooth_v)

    assert v_fp8.dtype == torch.float8_e4m3fn and v_fp8.shape == (2, 2, 64, 64)
    assert v_scale.dtype == torch.float32 and v_scale.shape == (2, 2, 64)
    assert_scales_match(v_scale[..., :40], scale[..., :40], "v_scale")
    assert_fp8_match(v_fp8[:, :, :40, :37], payload.transpose(2, 3)[:, :, :40], "v_fp8")
    assert not fp8_ordinal(v_fp8[..., 37:]).any() and not fp8_ordinal(v_fp8[:, :, 40:]).any()
    assert not v_scale[..., 40:].any()
    top = v_fp8[:, :, :40].float().abs().amax(dim=-1)
    assert (top <= scale_max).all()
    if not smooth_v:  # each channel's largest |v| lands on the top of the chosen range
        assert torch.equal(top, torch.full_like(top, scale_max))
    if smooth_v:
        assert v_mean.dtype == torch.float32 and v_mean.shape == (2, 2, 64)
        assert_scales_match(v_mean[..., :40], mean[..., :40], "v_mean", atol=1e-7)
    else:
        assert v_mean is None


@pytest.mark.parametrize("smooth_v,pv_accum", [(False, "fp32+fp16"), (True, "fp32")])
def test_zero_v_channel_gives_zero_scale_and_payload(smooth_v, pv_accum):
    """Deliberate deviation from the official code (SPEC §4): no NaN for an all-zero channel."""
    _, _, v = random_qkv(1, 2, 2, 1, 70, 64, seed=31)
    v[:, 1, :, 5] = 0
    v_fp8, v_scale, v_mean = sageflash.quantize_v(v, pv_accum=pv_accum, smooth_v=smooth_v, backend=BACKEND)
    assert v_scale[0, 1, 5] == 0 and torch.isfinite(v_scale).all()
    assert not fp8_ordinal(v_fp8[0, 1, 5]).any()
    assert fp8_ordinal(v_fp8[0, 0, 5]).any()  # the same channel of the other head is untouched
    if smooth_v:
        assert v_mean[0, 1, 5] == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("smooth_v,pv_accum", [(False, "fp32+fp16"), (False, "fp32"), (True, "fp32")])
def test_tiny_bf16_v_channel_is_quantized_without_overflow(backend, smooth_v, pv_accum):
    """A bf16 channel whose amax is so small that scale_max / amax overflows float32 (below
    ~1e-36; bf16 has float32's exponent range) gets the payload SPEC's formula gives without the
    overflow, where inf times its zeros was NaN; other channels keep their payloads bit for bit."""
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"  # else Triton's interpreter
    q, k, v = random_qkv(1, 2, 2, 1, 70, 64, seed=37, dtype=torch.bfloat16)
    normal = sageflash.quantize_v(v.to(device), pv_accum=pv_accum, smooth_v=smooth_v, backend=backend)
    tiny = v[0, 1, :, 5].float() * 2.0 ** -130  # |v| <= 2**-130: subnormal, like 7e-40
    tiny[::3] = 0
    v[0, 1, :, 5] = tiny.to(torch.bfloat16)
    v_fp8, v_scale, v_mean = sageflash.quantize_v(v.to(device), pv_accum=pv_accum, smooth_v=smooth_v,
                                                  backend=backend)
    v_fp8, v_scale = v_fp8.cpu(), v_scale.cpu()
    scale_max = sageflash.PVAccum.parse(pv_accum, "pv_accum").v_scale_max
    x = v[0, 1, :, 5].double()
    mean = x.sum() / groups.ceil_to(70, groups.V_WINDOW) if smooth_v else 0.0
    want = ((x - mean) * scale_max / (x - mean).abs().max()).float()  # no overflow in float64
    got = v_fp8[0, 1, 5, :70].float()
    assert torch.isfinite(got).all() and torch.isfinite(v_scale).all()
    assert torch.equal(got, want.clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert got.abs().max() == scale_max
    channel_untouched = torch.ones(2, 64, dtype=torch.bool)
    channel_untouched[1, 5] = False
    assert torch.equal(fp8_ordinal(v_fp8[0][channel_untouched]), fp8_ordinal(normal[0].cpu()[0][channel_untouched]))
    out = sageflash.sage_attn_sm89_fp16(q.to(device), k.to(device), v.to(device), pv_accum=pv_accum,
                                        smooth_v=smooth_v, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered in cast:RuntimeWarning")  # the interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_thread_keys_centred_past_fp16s_range_stay_finite(backend):
    """An fp16 K channel spread past 65504 (finite values near ±40000): per_thread's k − km in fp16
    would be ±inf there, its group scale inf and the whole KV head NaN (the official code). Those
    differences keep their float32 value, every other element is rounded to fp16 as SPEC §3 says,
    and the output is finite."""
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"  # else Triton's interpreter
    q, k, v = random_qkv(1, 2, 1, 40, 130, 64, seed=38)
    k, q = k * 300, q / 300  # |k| up to 300 against a mean near 0: k − km then rounds in fp16
    k[0, 0, :, 3] = 40000.0
    k[0, 0, 70, 3] = -40000.0  # k − km ≈ −79400 for this key, in key group 1
    q[..., 3] *= 1e-4  # keeps the channel's logits in range
    _, _, k_int8, k_scale, km = (
        x.cpu() for x in sageflash.quantize_qk(q.to(device), k.to(device), granularity="per_thread", smooth_k=True,
                                               backend=backend))
    exact = k.float() - km[..., :64].float()[:, :, None]
    assert exact.abs().max() > 65504 and torch.isinf(exact.half()).any()
    centred = torch.where(exact.half().isinf(), exact, exact.half().float())  # SPEC §3, but for the overflow
    key_groups = groups.k_group(torch.arange(130), True)
    amax = torch.zeros(k_scale.shape[-1]).scatter_reduce(0, key_groups, centred[0, 0].abs().amax(-1), "amax")
    used = torch.unique(key_groups)
    assert_scales_match(k_scale[0, 0, used], (amax / 127 + 1e-7)[used], "k_scale")  # per_thread's rule
    ratio = centred[0, 0] / k_scale[0, 0, key_groups][:, None]
    assert torch.equal(k_int8[0, 0, :, :64].float(), torch.trunc(ratio + 0.5 * torch.sign(ratio)))
    assert not torch.equal(centred, exact)  # the rounding matters elsewhere in these keys
    if backend == "reference":  # debug's simple quantizer (GGML_SAGE_FORCE_SIMPLE_QK) centres alike
        simple = debug.simple_quantize_qk(q, k, granularity="per_thread", smooth_k=True)
        assert torch.equal(simple[2], k_int8) and torch.equal(simple[3], k_scale)
    out = sageflash.sage_attn_sm89_fp16(q.to(device), k.to(device), v.to(device), backend=backend).cpu()
    assert torch.isfinite(out).all()
    if backend == "triton":
        assert torch.allclose(out, sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference"), atol=2e-3, rtol=0)
    # Finite, not exact: the outlier key's group scale (~79400 / 127) zeroes its other keys' codes.
    assert (out.double() - exact_attention(q, k, v)).abs().max() < 0.15


def test_quantizers_leave_inputs_unchanged():
    q, k, v = random_qkv(1, 4, 2, 65, 66, 80, seed=41)
    km = k.mean(dim=2)
    before = [x.clone() for x in (q, k, v, km)]
    sageflash.quantize_qk(q, k, granularity="per_thread", smooth_k=True, km=km, backend=BACKEND)
    sageflash.quantize_qk(q, k, granularity="per_warp", smooth_k=True, backend=BACKEND)
    sageflash.quantize_v(v, pv_accum="fp32", smooth_v=True, backend=BACKEND)
    for original, now in zip(before, (q, k, v, km)):
        assert torch.equal(original, now)
