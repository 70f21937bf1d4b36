"""`sageflash.compat`: SageAttention 2.x's `sageattn` / `sageattn_qk_int8_pv_fp8_cuda` call sites."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

import sageflash
from conftest import HAS_CUDA
from helpers import no_env_overrides, random_qkv  # noqa: F401 (fixture)
from sageflash import compat, params

pytestmark = pytest.mark.usefixtures("no_env_overrides")
FUNCTIONS = {"sageattn": sageflash.sageattn, "sageattn_qk_int8_pv_fp8_cuda": sageflash.sageattn_qk_int8_pv_fp8_cuda}


def nhd_inputs(seed=0, **kw):
    """Contiguous [B, S, H, D] inputs (B=1, Hq=4, Hk=2, Sq=40, Sk=70, D=64): what diffusers passes."""
    return tuple(x.transpose(1, 2).contiguous() for x in random_qkv(1, 4, 2, 40, 70, 64, seed=seed, **kw))


def test_signatures_are_the_official_ones():
    """SageAttention 2.2.0's parameter names, order and defaults (sageattention/core.py)."""
    assert str(inspect.signature(sageflash.sageattn)) == (
        "(q, k, v, tensor_layout='HND', is_causal=False, sm_scale=None, return_lse=False, **kwargs)")
    assert str(inspect.signature(sageflash.sageattn_qk_int8_pv_fp8_cuda)) == (
        "(q, k, v, tensor_layout='HND', is_causal=False, qk_quant_gran='per_thread', sm_scale=None, "
        "pv_accum_dtype='fp32+fp16', smooth_k=True, smooth_v=False, return_lse=False, **kwargs)")
    assert sageflash.sageattn is compat.sageattn


def test_positional_call_maps_every_knob():
    q, k, v = nhd_inputs()
    got = sageflash.sageattn_qk_int8_pv_fp8_cuda(q, k, v, "NHD", True, "per_warp", 0.1, "fp32", False, True, True)
    want = sageflash.sage_attn_sm89_fp16(q, k, v, 0.1, True, False, True, "fp32", "per_warp",
                                         tensor_layout="NHD", return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", FUNCTIONS)
def test_defaults_are_the_sm89_path(name):
    """Both entry points default to the op's defaults: per_thread, fp32+fp16, smooth_k, HND."""
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=1)
    assert torch.equal(FUNCTIONS[name](q, k, v), sageflash.sage_attn_sm89_fp16(q, k, v))


CALL_SITES = {  # how downstream code calls SageAttention
    "diffusers": lambda q, k, v: sageflash.sageattn(q=q, k=k, v=v, tensor_layout="NHD", is_causal=True,
                                                    sm_scale=0.125, return_lse=True),
    "comfyui": lambda q, k, v: sageflash.sageattn(q, k, v, attn_mask=None, is_causal=True, tensor_layout="NHD",
                                                  sm_scale=0.125, return_lse=True),
    "sdpa_style": lambda q, k, v: sageflash.sageattn(q, k, v, tensor_layout="NHD", attn_mask=None, dropout_p=0.0,
                                                     is_causal=True, sm_scale=0.125, return_lse=True),
    "xdit": lambda q, k, v: sageflash.sageattn_qk_int8_pv_fp8_cuda(
        q, k, v, tensor_layout="NHD", is_causal=True, sm_scale=0.125, return_lse=True, pv_accum_dtype="fp32+fp16"),
    "flash_attn_names": lambda q, k, v: sageflash.sageattn(q, k, v, tensor_layout="NHD", causal=True,
                                                           softmax_scale=0.125, return_lse=True),
}


@pytest.mark.parametrize("site", CALL_SITES)
def test_call_sites_work_unchanged(site):
    q, k, v = nhd_inputs(seed=2)
    out, lse = CALL_SITES[site](q, k, v)
    want, want_lse = sageflash.sage_attn_sm89_fp16(q, k, v, 0.125, True, tensor_layout="NHD", return_lse=True)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (1, 4, 40)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_attn_mask_passes_through():
    q, k, v = nhd_inputs(seed=7)
    mask = torch.rand(1, 1, 40, 70, generator=torch.Generator().manual_seed(7)) > 0.3
    got = sageflash.sageattn(q, k, v, tensor_layout="NHD", attn_mask=mask, dropout_p=0.0)
    assert torch.equal(got, sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout="NHD", attn_mask=mask))
    assert not torch.equal(got, sageflash.sageattn(q, k, v, tensor_layout="NHD"))


def test_sageattn_forwards_the_sm89_knobs():
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=3)
    got = sageflash.sageattn(q, k, v, qk_quant_gran="per_warp", pv_accum_dtype="fp32", smooth_k=False, smooth_v=True)
    assert torch.equal(got, sageflash.sage_attn_sm89_fp16(q, k, v, None, False, False, True, "fp32", "per_warp"))


def test_flash_attn_spellings_warn_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(params, "_said_once", set())
    q, k, v = random_qkv(seed=4)
    with caplog.at_level(logging.WARNING, logger="sageflash"):
        for _ in range(2):
            sageflash.sageattn(q, k, v, causal=True)
            sageflash.sageattn_qk_int8_pv_fp8_cuda(q, k, v, softmax_scale=0.1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "'causal'" in messages[0] and "'is_causal'" in messages[0] and "tensor_layout='HND'" in messages[0]
    assert "'softmax_scale'" in messages[1] and "'sm_scale'" in messages[1]


BAD_CALLS = {  # (function, keywords, exception, words the message must hold)
    "unknown_keyword": ("sageattn", {"window_size": (-1, -1)}, TypeError, ["sageattn()", "'window_size'"]),
    "unknown_keyword_fp8": ("sageattn_qk_int8_pv_fp8_cuda", {"qk_quant_dtype": "int8"}, TypeError,
                            ["sageattn_qk_int8_pv_fp8_cuda()", "'qk_quant_dtype'"]),
    "both_causal_spellings": ("sageattn", {"is_causal": True, "causal": True}, TypeError, ["is_causal", "causal"]),
    "both_scale_spellings": ("sageattn_qk_int8_pv_fp8_cuda", {"sm_scale": 0.1, "softmax_scale": 0.1}, TypeError,
                             ["sm_scale", "softmax_scale"]),
    "attn_mask": ("sageattn", {"attn_mask": torch.ones(1, 1, 37, 36, dtype=torch.bool)}, ValueError, ["attn_mask"]),
    "dropout": ("sageattn", {"dropout_p": 0.1}, ValueError, ["dropout_p", "0.1"]),
    "pv_accum_dtype": ("sageattn_qk_int8_pv_fp8_cuda", {"pv_accum_dtype": "fp16+fp32"}, ValueError,
                       ["pv_accum_dtype", "'fp32+fp16'"]),
    "qk_quant_gran": ("sageattn", {"qk_quant_gran": "per_block"}, ValueError, ["qk_quant_gran", "'per_warp'"]),
    "sm_scale": ("sageattn", {"sm_scale": -1.0}, ValueError, ["sm_scale", "positive"]),
    # a value under flash-attn's spelling is named as the caller spelled it
    "softmax_scale": ("sageattn", {"softmax_scale": -1.0}, ValueError, ["softmax_scale must be", "positive"]),
    "causal": ("sageattn", {"causal": "yes"}, TypeError, ["causal must be a bool"]),
    "layout": ("sageattn", {"tensor_layout": "BSHD"}, ValueError, ["tensor_layout", "'NHD'"]),
    "backend": ("sageattn", {"backend": "cuda"}, ValueError, ["backend", "reference"]),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_name_the_argument(case):
    function, keywords, error, words = BAD_CALLS[case]
    q, k, v = random_qkv(seed=5)
    with pytest.raises(error) as err:
        FUNCTIONS[function](q, k, v, **keywords)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_triton_backend_through_compat():
    """``backend`` passes through: the Triton kernels (interpreter on CPU) on NHD input, with the LSE."""
    device = "cuda" if HAS_CUDA else "cpu"
    q, k, v = (x.to(device) for x in nhd_inputs(seed=6))
    out, lse = sageflash.sageattn(q, k, v, tensor_layout="NHD", return_lse=True, backend="triton")
    want, want_lse = sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout="NHD", return_lse=True, backend="triton")
    assert out.is_contiguous() and torch.equal(out, want) and torch.equal(lse, want_lse)
