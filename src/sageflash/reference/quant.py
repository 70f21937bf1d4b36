"""CPU reference quantizers (SPEC §3–4): exact, vectorised torch, any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import groups
from ..params import PVAccum, QKGranularity


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(x, (0, size - x.shape[-1]))


def _group_amax(x: torch.Tensor, token_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """max |x| over the channels and tokens of each group: ``[B, H, S, D] -> [B, H, num_groups]``."""
    token_amax = x.abs().amax(dim=-1)
    index = token_groups.expand_as(token_amax)
    out = torch.zeros(*token_amax.shape[:2], num_groups, dtype=x.dtype, device=x.device)
    return out.scatter_reduce_(2, index, token_amax, reduce="amax")


def quantize_int8_groups(x: torch.Tensor, token_groups: torch.Tensor, num_groups: int,
                         per_thread: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 ``x [B,H,S,D]`` to int8 with one scale per token group (SPEC §3 rules).

    Inverse scales are reciprocal-then-multiply, which reproduces the official payloads bit for bit.
    """
    amax = _group_amax(x, token_groups, num_groups)
    if per_thread:
        scale = amax / groups.INT8_MAX + groups.PER_THREAD_SCALE_EPS
        ratio = x / scale[:, :, token_groups, None]
        values = torch.trunc(ratio + 0.5 * torch.sign(ratio))
    else:
        amax = amax.clamp_min(groups.PER_WARP_AMAX_FLOOR)
        scale = amax / groups.INT8_MAX
        values = torch.round(x * (amax.reciprocal() * groups.INT8_MAX)[:, :, token_groups, None])
    return values.clamp_(-128, 127).to(torch.int8), scale


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of K over all keys, accumulated in float32, rounded to k's dtype."""
    return k.mean(dim=2, dtype=torch.float32).to(k.dtype)


def centre_keys(k: torch.Tensor, km: torch.Tensor, per_thread: bool) -> torch.Tensor:
    """float32 ``k − km`` (SPEC §3): per_warp subtracts in float32, per_thread rounds the difference
    to k's dtype, except where that overflows (fp16: a channel spread past 65504, finite inputs),
    which keeps its float32 value instead of ±inf (the official code's inf scale gives NaN)."""
    exact = k.float() - km.float()[:, :, None]
    if not per_thread:
        return exact
    rounded = exact.to(k.dtype).float()
    return torch.where(rounded.isinf(), exact, rounded)


def quantize_qk(q: torch.Tensor, k: torch.Tensor, *, granularity, smooth_k: bool,
                km: torch.Tensor | None = None):
    """``(q_int8, q_scale, k_int8, k_scale, km)`` with the head dim zero-padded (`groups.padded_head_dim`).

    ``km`` (``[B, Hk, D0 or D]``, cast to k's dtype) replaces the computed K mean; the returned
    ``km`` is ``[B, Hk, D]`` in k's dtype, None without smoothing.
    """
    per_thread = QKGranularity.parse(granularity, "granularity") is QKGranularity.PER_THREAD
    head_dim = groups.padded_head_dim(q.shape[-1])
    seq_q, seq_k = q.shape[2], k.shape[2]

    q_tokens = groups.q_group(torch.arange(seq_q, device=q.device), per_thread)
    q_int8, q_scale = quantize_int8_groups(_pad_last(q.float(), head_dim), q_tokens,
                                           groups.q_num_groups(seq_q, per_thread), per_thread)
    if smooth_k:
        km = key_mean(k) if km is None else km[..., : k.shape[-1]].to(k.dtype)
        k_centered = centre_keys(k, km, per_thread)
        km = _pad_last(km, head_dim)
    else:
        k_centered, km = k.float(), None
    k_tokens = groups.k_group(torch.arange(seq_k, device=k.device), per_thread)
    k_int8, k_scale = quantize_int8_groups(_pad_last(k_centered, head_dim), k_tokens,
                                           groups.k_num_groups(seq_k, per_thread), per_thread)
    return q_int8, q_scale, k_int8, k_scale, km


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to e4m3fn to nearest even, saturating at ±448 like ``cvt.rn.satfinite``."""
    return x.clamp(-groups.FP8_E4M3_MAX, groups.FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_v(v: torch.Tensor, *, pv_accum, smooth_v: bool):
    """``(v_fp8 [B,Hk,D,ceil64(Sk)], v_scale [B,Hk,D], v_mean [B,Hk,D] or None)`` per SPEC §4."""
    scale_max = PVAccum.parse(pv_accum, "pv_accum").v_scale_max
    batch, heads, seq_k, _ = v.shape
    head_dim = groups.padded_head_dim(v.shape[-1])
    window = groups.ceil_to(seq_k, groups.V_WINDOW)
    x = F.pad(v.float(), (0, head_dim - v.shape[-1], 0, window - seq_k))
    vmax, vmin = x.amax(dim=2), x.amin(dim=2)
    if smooth_v:
        v_mean = x.sum(dim=2) / window
        amax = torch.maximum((vmax - v_mean).abs(), (vmin - v_mean).abs())
        x = x - v_mean[:, :, None]
    else:
        v_mean = None
        amax = torch.maximum(vmax.abs(), vmin.abs())
    v_scale = amax / scale_max
    # An all-zero channel has amax 0: scale 0 and payload 0 (the official code gives NaN here); a
    # tiny one is prescaled (`groups.V_PRESCALE_BELOW`) so that its inverse scale stays finite.
    prescale = torch.where(amax < groups.V_PRESCALE_BELOW, groups.V_PRESCALE, 1.0)
    inv_scale = torch.where(amax > 0, (amax * prescale).reciprocal() * scale_max, torch.zeros_like(amax))
    payload = to_e4m3(x[:, :, :seq_k] * prescale[:, :, None] * inv_scale[:, :, None])
    v_fp8 = torch.zeros(batch, heads, head_dim, groups.ceil_to(seq_k, groups.K_TILE),
                        dtype=torch.float8_e4m3fn, device=v.device)
    v_fp8[..., :seq_k] = payload.transpose(2, 3)
    return v_fp8, v_scale, v_mean
