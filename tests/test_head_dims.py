"""Head dims up to 256 on the CPU reference: the padding rule, the payloads, exact attention."""

from __future__ import annotations

import pytest
import torch

import sageflash
from conftest import nmse
from helpers import exact_attention, no_env_overrides, random_qkv  # noqa: F401 (fixture)
from sageflash import groups, reference

pytestmark = pytest.mark.usefixtures("no_env_overrides")
EXACT_NMSE = 5e-3  # as in test_reference_attention: 8-bit attention vs exact on uniform inputs


def test_padding_rule():
    """64 and 128 as the official kernel pads (the dumps depend on it), then 256."""
    expected = {1: 64, 40: 64, 64: 64, 65: 128, 96: 128, 128: 128, 129: 256, 160: 256, 192: 256,
                200: 256, 256: 256}
    assert {d: groups.padded_head_dim(d) for d in expected} == expected
    with pytest.raises(ValueError, match=r"^k head dim must be <= 256, got 257$"):
        groups.padded_head_dim(257, "k head dim")


@pytest.mark.parametrize("head_dim", [160, 200])
@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
def test_payloads_are_padded_to_256(head_dim, granularity):
    q, k, v = random_qkv(2, 4, 2, 70, 90, head_dim, seed=head_dim, k_offset=2)
    q8, q_scale, k8, k_scale, km = sageflash.quantize_qk(q, k, granularity=granularity, smooth_k=True,
                                                        backend="reference")
    v8, v_scale, v_mean = sageflash.quantize_v(v, pv_accum="fp32", smooth_v=True, backend="reference")
    per_thread = granularity == "per_thread"
    assert q8.shape == (2, 4, 70, 256) and k8.shape == (2, 2, 90, 256) and km.shape == (2, 2, 256)
    assert q_scale.shape == (2, 4, groups.q_num_groups(70, per_thread))
    assert k_scale.shape == (2, 2, groups.k_num_groups(90, per_thread))
    assert v8.shape == (2, 2, 256, 128) and v_scale.shape == v_mean.shape == (2, 2, 256)
    assert not q8[..., head_dim:].any() and not k8[..., head_dim:].any() and not km[..., head_dim:].any()
    assert not v8[:, :, head_dim:].float().any() and not v_scale[..., head_dim:].any()
    # the real channels are those of the same inputs zero-padded by hand to 256
    padded = [torch.nn.functional.pad(x, (0, 256 - head_dim)) for x in (q, k)]
    by_hand = reference.quantize_qk(*padded, granularity=granularity, smooth_k=True)
    assert torch.equal(q8, by_hand[0]) and torch.equal(k8, by_hand[2])
    assert torch.equal(q_scale, by_hand[1]) and torch.equal(k_scale, by_hand[3])


# (batch, q heads, kv heads, seq_q, seq_k, head dim, knobs): SD/SDXL (160), Gemma (256), odd sizes.
CASES = {
    "d160": (2, 4, 2, 77, 133, 160, {}),
    "d192_causal_per_warp": (1, 4, 1, 100, 100, 192, {"is_causal": True, "granularity": "per_warp"}),
    "d200_fp32_smooth_v": (1, 2, 2, 65, 190, 200, {"pv_accum": "fp32", "smooth_v": True}),
    "d256_causal_sq_lt_sk": (1, 6, 2, 50, 150, 256, {"is_causal": True, "pv_accum": "fp32+fp32"}),
    "d256_bf16": (1, 2, 1, 129, 64, 256, {"dtype": torch.bfloat16, "smooth_k": False}),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_close_to_exact_attention(case, seed):
    batch, hq, hk, sq, sk, d, knobs = CASES[case]
    knobs = dict(knobs)
    dtype = knobs.pop("dtype", torch.float16)
    q, k, v = random_qkv(batch, hq, hk, sq, sk, d, seed=seed, dtype=dtype)
    out = sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference", **knobs)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert nmse(out, exact_attention(q, k, v, is_causal=knobs.get("is_causal", False))) < EXACT_NMSE


def test_default_softmax_scale_uses_original_head_dim():
    q, k, v = random_qkv(1, 2, 1, 40, 40, 160, seed=3)
    default = sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference")
    assert torch.equal(default, sageflash.sage_attn_sm89_fp16(q, k, v, 160 ** -0.5, backend="reference"))
