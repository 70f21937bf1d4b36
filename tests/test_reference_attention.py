"""The CPU reference op (SPEC §5–7): official output, exact attention, GQA, causal, padding, knobs."""

from __future__ import annotations

import math

import pytest
import torch

import sageflash
from conftest import nmse
from helpers import (EXACT_NMSE, exact_attention, load_refdump, no_env_overrides, non_finite_outputs, random_qkv,  # noqa: F401
                     with_non_finite)
from sageflash import dumps, reference

pytestmark = pytest.mark.usefixtures("no_env_overrides")
BACKEND = "reference"


def sage(q, k, v, **knobs):
    return sageflash.sage_attn_sm89_fp16(q, k, v, backend=BACKEND, **knobs)


def dump_knobs(meta: dumps.DumpMeta) -> dict:
    return {name: getattr(meta, name) for name in
            ("softmax_scale", "is_causal", "smooth_k", "smooth_v", "pv_accum", "granularity")}


def test_op_matches_official_output(refdump_prefix):
    meta, ref = load_refdump(refdump_prefix)
    out = sage(ref["q"], ref["k"], ref["v"], **dump_knobs(meta))
    assert out.shape == ref["q"].shape and out.dtype == ref["q"].dtype
    assert nmse(out, dumps.read_output(refdump_prefix, meta)) <= 1e-5


def test_lse_matches_official(refdump_prefix):
    """The natural-log LSE, with the smooth_k correction softmax_scale·(q·km)."""
    meta, ref = load_refdump(refdump_prefix, "q", "k", "v", "lse")
    _, lse = reference.attention(ref["q"], ref["k"], ref["v"], meta.params, return_lse=True)
    torch.testing.assert_close(lse, ref["lse"], rtol=0, atol=1e-4)


def test_attention_from_official_payloads(refdump_prefix):
    """The attention half alone, fed the official int8/fp8 payloads."""
    meta = dumps.read_meta(refdump_prefix)
    tags = ["q_int8", "q_scale", "k_int8", "k_scale", "v_fp8", "v_scale"]
    _, p = load_refdump(refdump_prefix, *tags, *(["v_mean"] * meta.smooth_v))
    out = reference.attention_from_payloads(
        *(p[t] for t in tags), p.get("v_mean"), params=meta.params, seq_q=meta.seq_q,
        seq_k=meta.seq_k, head_dim=meta.head_dim, out_dtype=torch.float16)
    assert nmse(out, dumps.read_output(refdump_prefix, meta)) <= 1e-5


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, knobs): odd lengths, Sq != Sk both ways,
# GQA, every padded head dim (160 as in SD/SDXL, 256 as in Gemma), every knob value, bf16.
EXACT_CASES = {
    "one_token": (1, 2, 2, 1, 1, 64, {}),
    "d40_causal_square": (2, 4, 2, 37, 37, 40, {"is_causal": True}),
    "d80_causal_sq_lt_sk": (1, 6, 2, 77, 133, 80, {"is_causal": True, "granularity": "per_warp"}),
    "d96_causal_sq_gt_sk": (1, 4, 1, 150, 61, 96, {"is_causal": True, "pv_accum": "fp32"}),
    "d128_decode_causal": (1, 2, 1, 1, 300, 128, {"is_causal": True}),
    "d128_long_q": (1, 3, 3, 129, 65, 128, {"pv_accum": "fp32+fp32", "smooth_k": False}),
    "d64_smooth_v": (1, 4, 2, 100, 190, 64, {"pv_accum": "fp32", "smooth_v": True}),
    "d8_scale": (1, 2, 1, 45, 45, 8, {"softmax_scale": 0.3, "granularity": 2, "pv_accum": 1}),
    "bf16_d80": (1, 4, 2, 70, 90, 80, {"is_causal": True, "dtype": torch.bfloat16}),
    "bf16_d128_per_warp": (2, 2, 1, 64, 257, 128, {"granularity": "per_warp", "dtype": torch.bfloat16}),
    "d160": (2, 4, 2, 77, 133, 160, {}),
    "d192_causal_per_warp": (1, 4, 1, 100, 100, 192, {"is_causal": True, "granularity": "per_warp"}),
    "d200_fp32_smooth_v": (1, 2, 2, 65, 190, 200, {"pv_accum": "fp32", "smooth_v": True}),
    "d256_causal_sq_lt_sk": (1, 6, 2, 50, 150, 256, {"is_causal": True, "pv_accum": "fp32+fp32"}),
    "d256_bf16": (1, 2, 1, 129, 64, 256, {"dtype": torch.bfloat16, "smooth_k": False}),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_close_to_exact_attention(case, seed):
    batch, hq, hk, sq, sk, d, knobs = EXACT_CASES[case]
    knobs = dict(knobs)
    dtype = knobs.pop("dtype", torch.float16)
    q, k, v = random_qkv(batch, hq, hk, sq, sk, d, seed=seed, dtype=dtype)
    out = sage(q, k, v, **knobs)
    ref = exact_attention(q, k, v, knobs.get("softmax_scale"), knobs.get("is_causal", False))
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert nmse(out, ref) < EXACT_NMSE


def test_causal_square_is_top_left_and_bottom_right_otherwise():
    """Sq == Sk: key j visible iff j <= t. Sq != Sk: iff j <= t + Sk − Sq (not top-left)."""
    q, k, v = random_qkv(1, 2, 1, 90, 90, 64, seed=5)
    assert nmse(sage(q, k, v, is_causal=True), exact_attention(q, k, v, is_causal=True)) < EXACT_NMSE

    q, k, v = random_qkv(1, 2, 1, 60, 150, 64, seed=6)
    out = sage(q, k, v, is_causal=True)
    top_left = exact_attention(q, k[:, :, :60], v[:, :, :60], is_causal=True)
    assert nmse(out, exact_attention(q, k, v, is_causal=True)) < EXACT_NMSE
    assert nmse(out, top_left) > 10 * EXACT_NMSE


def test_causal_rows_without_keys_are_zero():
    q, k, v = random_qkv(1, 2, 2, 100, 30, 64, seed=7)
    out = sage(q, k, v, is_causal=True)
    assert not out[:, :, :70].any()
    assert out[:, :, 70:].abs().amax(dim=-1).gt(0).all()
    assert nmse(out, exact_attention(q, k, v, is_causal=True)) < EXACT_NMSE


def test_keys_past_the_sequence_have_zero_weight():
    """Garbage in V's padded tokens (Sk..ceil64(Sk)) must not change the output at all."""
    q, k, v = random_qkv(1, 2, 1, 33, 70, 64, seed=8)
    params = sageflash.resolve_params(head_dim=64)
    q_int8, q_scale, k_int8, k_scale, _ = reference.quantize_qk(q, k, granularity=params.granularity,
                                                               smooth_k=params.smooth_k)
    v_fp8, v_scale, v_mean = reference.quantize_v(v, pv_accum=params.pv_accum, smooth_v=False)
    noisy = v_fp8.clone()
    gen = torch.Generator().manual_seed(9)
    noisy[..., 70:] = (torch.rand(noisy[..., 70:].shape, generator=gen) * 4 - 2).to(noisy.dtype)

    def run(payload):
        return reference.attention_from_payloads(
            q_int8, q_scale, k_int8, k_scale, payload, v_scale, v_mean, params=params,
            seq_q=33, seq_k=70, head_dim=64, out_dtype=q.dtype)

    assert torch.equal(run(v_fp8), run(noisy))


def test_gqa_query_head_reads_kv_head_h_div_group():
    """Query head h reads KV head h // (Hq/Hk): same as repeating each KV head Hq/Hk times."""
    q, k, v = random_qkv(2, 6, 3, 50, 80, 64, seed=10)
    grouped = sage(q, k, v, is_causal=True)
    repeated = sage(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True)
    assert torch.equal(grouped, repeated)


def test_default_softmax_scale_uses_original_head_dim():
    q, k, v = random_qkv(1, 2, 1, 40, 40, 80, seed=11)
    default = sage(q, k, v)
    assert torch.equal(default, sage(q, k, v, softmax_scale=80 ** -0.5))
    assert nmse(default, sage(q, k, v, softmax_scale=128 ** -0.5)) > 1e-3


@pytest.mark.parametrize("smooth_v,pv_accum", [(False, "fp32+fp16"), (True, "fp32")])
def test_zero_v_channel_gives_finite_output(smooth_v, pv_accum):
    q, k, v = random_qkv(1, 4, 2, 60, 60, 64, seed=12)
    v[:, 0, :, 3] = 0
    out = sage(q, k, v, smooth_v=smooth_v, pv_accum=pv_accum)
    assert torch.isfinite(out).all()
    assert not out[:, :2, :, 3].any()  # query heads 0 and 1 read KV head 0
    assert nmse(out, exact_attention(q, k, v)) < EXACT_NMSE


@pytest.mark.parametrize("granularity", ["per_thread", "per_warp"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("tensor,knobs", [("q", {}), ("k", {"smooth_k": False}), ("k", {}),
                                          ("v", {}), ("v", {"smooth_v": True, "pv_accum": "fp32"}),
                                          ("v", {"is_causal": True})])
def test_non_finite_input_reaches_the_outputs_it_feeds(tensor, knobs, value, granularity):
    """A NaN or inf in q, k or v (an fp16 overflow upstream) spoils the outputs that read it, as
    in torch SDPA, rather than being dropped or zeroing rows: a superset of SDPA's non-finite
    outputs, bounded by the quantization groups it lands in (`non_finite_outputs`)."""
    q, k, v = random_qkv(2, 4, 2, 70, 70, 64, seed=13, dist="normal")
    q, k, v, position = with_non_finite(q, k, v, tensor, value, seed=len(knobs) + 7 * "qkv".index(tensor),
                                        last_token=knobs.get("is_causal", False))
    out = sage(q, k, v, granularity=granularity, **knobs)
    spoiled = non_finite_outputs(out.shape, k.shape[1], tensor, position, granularity)
    assert torch.equal(~torch.isfinite(out), spoiled)
    causal = knobs.get("is_causal", False)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                                            v.float().repeat_interleave(2, 1), is_causal=causal)
    assert not (~torch.isfinite(sdpa) & ~spoiled).any() and (~torch.isfinite(sdpa)).any()
    finite = ~spoiled
    assert nmse(out[finite], exact_attention(q, k, v, is_causal=causal)[finite]) < EXACT_NMSE


def errors_vs_exact(inputs, **knobs) -> float:
    """NMSE of the op against exact attention, summed over several input sets."""
    return sum(nmse(sage(q, k, v, **knobs), exact_attention(q, k, v)) for q, k, v in inputs)


def test_per_thread_beats_per_warp_on_uneven_token_magnitudes():
    """Per-thread groups (4 query rows, 16 keys) adapt to tokens of very different sizes."""
    inputs = []
    for seed in (13, 14):
        q, k, v = random_qkv(1, 2, 1, 160, 200, 64, seed=seed, dist="normal")
        gen = torch.Generator().manual_seed(seed)
        q = (q.float() * torch.exp(torch.randn(160, 1, generator=gen))).half()
        k = (k.float() * torch.exp(torch.randn(200, 1, generator=gen))).half()
        inputs.append((q, k, v))
    per_thread = errors_vs_exact(inputs, granularity="per_thread", smooth_k=False)
    per_warp = errors_vs_exact(inputs, granularity="per_warp", smooth_k=False)
    assert per_thread < 0.5 * per_warp


def test_smooth_k_helps_when_keys_share_a_large_offset():
    inputs = [random_qkv(1, 2, 1, 100, 150, 64, seed=s, dist="normal", k_offset=8) for s in (15, 16)]
    assert errors_vs_exact(inputs, smooth_k=True) < 0.6 * errors_vs_exact(inputs, smooth_k=False)


def test_smooth_v_helps_when_values_share_a_large_offset():
    inputs = [random_qkv(1, 2, 1, 100, 150, 64, seed=s, dist="normal", v_offset=8) for s in (17, 18)]
    smoothed = errors_vs_exact(inputs, smooth_v=True, pv_accum="fp32")
    assert smoothed < 0.2 * errors_vs_exact(inputs, smooth_v=False, pv_accum="fp32")


def test_lse_close_to_exact_with_smoothing_and_causal():
    """The LSE adds back softmax_scale·(q·km), so smoothing does not show in it."""
    q, k, v = random_qkv(1, 4, 2, 100, 150, 64, seed=19, k_offset=3)
    params = sageflash.resolve_params(head_dim=64, is_causal=True, smooth_k=True)
    _, lse = reference.attention(q, k, v, params, return_lse=True)
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 64 ** -0.5
    hidden = torch.arange(150)[None, :] > torch.arange(100)[:, None] + 50
    exact = torch.logsumexp(scores.masked_fill(hidden, -math.inf), dim=-1)
    torch.testing.assert_close(lse.double(), exact, rtol=0, atol=3e-3)


def test_inputs_unchanged_and_output_contiguous_like_q():
    q, k, v = random_qkv(2, 4, 2, 50, 70, 96, seed=20, dtype=torch.bfloat16)
    before = [x.clone() for x in (q, k, v)]
    out = sage(q, k, v, is_causal=True, smooth_v=True, pv_accum="fp32")
    for original, now in zip(before, (q, k, v)):
        assert torch.equal(original, now)
    assert out.is_contiguous() and out.shape == q.shape
    assert out.dtype == q.dtype and out.device == q.device


def test_non_contiguous_inputs_with_unit_last_stride():
    """A transposed ``[B, S, H, D]`` view gives the same result as its contiguous copy."""
    q, k, v = random_qkv(2, 4, 2, 45, 66, 64, seed=21)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not views[0].is_contiguous() and views[0].stride(-1) == 1
    out = sage(*views, is_causal=True)
    assert out.is_contiguous()
    assert torch.equal(out, sage(q, k, v, is_causal=True))
