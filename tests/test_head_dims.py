"""Head dims up to 256 on the CPU reference: the padding rule and the payloads (exact attention at
D > 128: test_reference_attention's EXACT_CASES)."""

from __future__ import annotations

import pytest
import torch

import sageflash
from helpers import no_env_overrides, random_qkv  # noqa: F401 (fixture)
from sageflash import groups, reference

pytestmark = pytest.mark.usefixtures("no_env_overrides")


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


def test_default_softmax_scale_uses_original_head_dim():
    q, k, v = random_qkv(1, 2, 1, 40, 40, 160, seed=3)
    default = sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference")
    assert torch.equal(default, sageflash.sage_attn_sm89_fp16(q, k, v, 160 ** -0.5, backend="reference"))
