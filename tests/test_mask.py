"""``attn_mask`` on the CPU reference: semantics against float64 attention, and bad masks."""

from __future__ import annotations

import math

import pytest
import torch

import sageflash
from conftest import nmse
from helpers import EXACT_NMSE, MASK_KINDS, exact_attention, make_mask, no_env_overrides, random_qkv  # noqa: F401
from sageflash import reference

pytestmark = pytest.mark.usefixtures("no_env_overrides")
B, HQ, HK, SQ, SK, D = 2, 4, 2, 70, 150, 64


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_close_to_exact_attention(kind, is_causal):
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, seed=len(kind) + is_causal)
    mask = make_mask(kind, B, HQ, SQ, SK, seed=3)
    out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=is_causal, attn_mask=mask, backend="reference")
    exact = exact_attention(q, k, v, is_causal=is_causal, attn_mask=mask)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert nmse(out, exact) < EXACT_NMSE
    assert nmse(out, exact_attention(q, k, v, is_causal=is_causal)) > 4 * EXACT_NMSE  # the mask acts


def test_all_true_and_zero_masks_change_nothing():
    q, k, v = random_qkv(1, 2, 1, 40, 90, 80, seed=4)
    plain = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, backend="reference")
    for mask in (torch.ones(40, 90, dtype=torch.bool), torch.zeros(1, 1, 1, 90)):
        out = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, attn_mask=mask, backend="reference")
        assert torch.equal(out, plain)


def test_fully_masked_rows_are_zero_and_lse_minus_inf():
    """Rows whose keys are all hidden, by the mask alone or by the mask and causality together."""
    q, k, v = random_qkv(1, 2, 1, 64, 64, 64, seed=5)
    mask = torch.ones(64, 64, dtype=torch.bool)
    mask[10] = False  # no key at all
    mask[20, :21] = False  # causal hides keys 21.., the mask the rest
    additive = torch.zeros(64, 64).masked_fill(~mask, -math.inf)
    params = sageflash.resolve_params(head_dim=64, is_causal=True)
    for m in (mask, additive):
        out, lse = reference.attention(q, k, v, params, return_lse=True, attn_mask=m)
        assert not out[:, :, [10, 20]].any() and (lse[:, :, [10, 20]] == -math.inf).all()
        assert out[:, :, 21:].abs().amax(dim=-1).gt(0).all()
        assert nmse(out, exact_attention(q, k, v, is_causal=True, attn_mask=m)) < EXACT_NMSE


def test_lse_includes_the_mask():
    q, k, v = random_qkv(1, 4, 2, 50, 100, 64, seed=6)
    # A seeded generator, not the global RNG (whose state depends on the tests run before): the worst
    # row's error is 2.4e-3 in the median and 4.2e-3 at most over 40 seeds, near the bound below.
    mask = torch.randn(50, 100, generator=torch.Generator().manual_seed(6)) * 2
    params = sageflash.resolve_params(head_dim=64)
    _, lse = reference.attention(q, k, v, params, return_lse=True, attn_mask=mask)
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 64 ** -0.5
    exact = torch.logsumexp(scores + mask.double(), dim=-1)  # the mask moves it by O(1)
    torch.testing.assert_close(lse.double(), exact, rtol=0, atol=5e-3)


def test_mask_follows_the_query_layout():
    """[B, Hq, Sq, Sk] whatever tensor_layout, as torch SDPA's."""
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, seed=7)
    mask = make_mask("bool_per_head", B, HQ, SQ, SK, seed=8)
    hnd = sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="reference")
    nhd = sageflash.sage_attn_sm89_fp16(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask,
                                        tensor_layout="NHD", backend="reference")
    assert torch.equal(nhd.transpose(1, 2), hnd)


def test_debug_path_applies_the_mask(monkeypatch):
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, seed=11)
    mask = make_mask("key_padding", B, HQ, SQ, SK, seed=11)
    plain = sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="reference")
    monkeypatch.setenv("GGML_SAGE_Q_SERIAL", "1")  # the debug path, same payloads
    assert torch.equal(sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="reference"), plain)


def test_inputs_and_mask_unchanged():
    q, k, v = random_qkv(1, 2, 1, 30, 40, 64, seed=9)
    mask = make_mask("additive_fp32_row", 1, 2, 30, 40, seed=9)
    before = [x.clone() for x in (q, k, v, mask)]
    sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, mask)))


# name: (mask, exception, words the message must hold)
BAD_MASKS = {
    "int32": (torch.ones(SQ, SK, dtype=torch.int32), TypeError, ["attn_mask", "bool", "torch.int32"]),
    "float64": (torch.zeros(SQ, SK, dtype=torch.float64), TypeError, ["attn_mask", "float32"]),
    "list": ([[True] * SK] * SQ, TypeError, ["attn_mask", "Tensor"]),
    "wrong_sk": (torch.ones(SQ, SK + 1, dtype=torch.bool), ValueError,
                 ["attn_mask", "[B, Hq, Sq, Sk]", f"[{B}, {HQ}, {SQ}, {SK}]", f"[{SQ}, {SK + 1}]"]),
    "kv_heads": (torch.ones(1, HK, SQ, SK, dtype=torch.bool), ValueError, ["attn_mask", "broadcastable"]),
    "rank5": (torch.ones(1, B, HQ, SQ, SK, dtype=torch.bool), ValueError, ["attn_mask", "broadcastable"]),
    "device": (torch.ones(SQ, SK, dtype=torch.bool, device="meta"), ValueError, ["attn_mask", "device", "cpu"]),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_bad_masks_are_rejected(case):
    mask, error, words = BAD_MASKS[case]
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, seed=10)
    with pytest.raises(error) as err:
        sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="reference")
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"
    assert not sageflash.is_supported(q, k, v, attn_mask=mask)
