"""CPU reference attention over the 8-bit payloads (SPEC §5–7), vectorised torch.

Block sums of P8·V8 are computed exactly (float64), which matches the official output of every
pv_accum mode to NMSE ~1e-7 on the reference dumps; the modes differ here only through V's
scale_max and the smooth_v contract. Query rows are processed in chunks to bound memory.
"""

from __future__ import annotations

import math

import torch

from .. import groups
from ..params import QKGranularity, SageParams
from .lse import smooth_k_term
from .quant import quantize_qk, quantize_v, to_e4m3

_CHUNK_ELEMENTS = 1 << 24  # score elements per query chunk (~64 MiB per float32 buffer)


def expand_scales(scale: torch.Tensor, group_of, seq: int, per_thread: bool) -> torch.Tensor:
    """Per-group scales ``[B,H,n_groups]`` -> per-token scales ``[B,H,seq]``."""
    return scale[:, :, group_of(torch.arange(seq, device=scale.device), per_thread)]


def visible_keys(rows: torch.Tensor, seq_q: int, seq_k: int, is_causal: bool) -> torch.Tensor:
    """``[T, ceil64(Sk)]`` mask of keys each query row may see (SPEC §5, §7)."""
    keys = torch.arange(groups.ceil_to(seq_k, groups.K_TILE), device=rows.device)
    mask = (keys < seq_k)[None, :].expand(rows.numel(), -1)
    if is_causal:
        mask = mask & (keys[None, :] <= rows[:, None] + groups.causal_offset(seq_q, seq_k))
    return mask


def mask_bias(attn_mask: torch.Tensor, padded_keys: int) -> torch.Tensor:
    """``attn_mask`` rows as float32 offsets of the log2-domain logits, keys zero-padded to
    ``padded_keys``: bool False -> -inf (True keeps), an additive float mask times log2(e) (a value
    below ≈ -2.36e38 overflows to -inf there: `hidden_by_mask`)."""
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill_(~attn_mask, -math.inf)
    else:
        bias = attn_mask.float() * groups.LOG2E
    return torch.nn.functional.pad(bias, (0, padded_keys - attn_mask.shape[-1]))


def hidden_by_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """Where ``attn_mask`` hides a key, as the op applies it (its `mask_bias` is -inf): False in a
    bool mask; in an additive one -inf, or a value so low (float32's finfo.min, which transformers'
    padding masks use) that its log2-domain offset overflows to -inf."""
    return torch.isneginf(mask_bias(attn_mask, attn_mask.shape[-1]))


def online_softmax_blocks(logits: torch.Tensor, mask: torch.Tensor):
    """Block-wise running max of SPEC §5 for log2-domain ``logits [..., T, N*64]``.

    Returns ``(p_tilde, block_max, weight)``: the unrounded weights 2**(l - m_n) (0 where masked),
    the running max m_n per block ``[..., T, N]`` and each block's factor 2**(m_n - m_last) that
    the product of the rescales alpha reduces to.
    """
    blocked = logits.masked_fill(~mask, -math.inf).unflatten(-1, (-1, groups.K_TILE))
    block_max = torch.cummax(blocked.amax(dim=-1) - groups.FP8_OFFSET_LOG2, dim=-1).values
    finite = torch.isfinite(block_max)
    safe_max = torch.where(finite, block_max, torch.zeros_like(block_max))
    p_tilde = torch.exp2(blocked - safe_max[..., None]).flatten(-2)  # exp2(-inf) = 0 when masked
    weight = torch.where(finite, torch.exp2(safe_max.double() - safe_max[..., -1:].double()),
                         torch.zeros_like(safe_max, dtype=torch.float64))
    return p_tilde, block_max, weight


def attention_from_payloads(q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, *,
                            params: SageParams, seq_q: int, seq_k: int, head_dim: int,
                            out_dtype: torch.dtype, q=None, km=None, return_lse: bool = False,
                            out=None, attn_mask=None):
    """Attention from the int8/fp8 payloads; returns ``out [B,Hq,Sq,head_dim]`` (and the LSE).

    ``attn_mask`` (bool, True = keep, or additive float; broadcastable to ``[B, Hq, Sq, Sk]``) is
    added to the scaled logits before the running max: ``logits + mask`` in the natural-log
    domain, i.e. ``+ mask·log2(e)`` here (`mask_bias`), combined with causal; a row left with no
    visible key gives 0.

    ``out``, when given, is written and returned: any strides with a unit last one (the op passes
    an HND view of the caller's NHD output).

    The LSE (natural log of the scaled scores' sum of exponentials, float32 ``[B,Hq,Sq]``) adds
    the smooth_k correction ``softmax_scale * q·km`` when ``q`` and ``km`` are given.
    """
    per_thread = params.granularity is QKGranularity.PER_THREAD
    batch, q_heads = q_int8.shape[:2]
    kv_heads = k_int8.shape[1]
    group = q_heads // kv_heads
    log2_scale = params.softmax_scale * groups.LOG2E
    row_scale = expand_scales(q_scale, groups.q_group, seq_q, per_thread) * log2_scale
    key_scale = expand_scales(k_scale, groups.k_group, seq_k, per_thread)
    key_scale = torch.nn.functional.pad(key_scale, (0, v_fp8.shape[-1] - seq_k))[:, :, None, None]
    keys = torch.nn.functional.pad(k_int8.float(), (0, 0, 0, v_fp8.shape[-1] - seq_k))
    keys = keys[:, :, None]  # [B, Hk, 1, N*64, D]: query heads h = hk*group + g share KV head hk
    values = v_fp8.double()[:, :, None]  # [B, Hk, 1, D, N*64]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, q_heads, seq_q, seq_k)

    if out is None:
        out = torch.empty(batch, q_heads, seq_q, head_dim, dtype=out_dtype, device=q_int8.device)
    lse = torch.empty(batch, q_heads, seq_q, dtype=torch.float32, device=q_int8.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * q_heads * keys.shape[-2]))
    for start in range(0, seq_q, chunk):
        rows = torch.arange(start, min(seq_q, start + chunk), device=q_int8.device)
        q_rows = q_int8[:, :, rows].float().unflatten(1, (kv_heads, group))
        scores = q_rows @ keys.transpose(-1, -2)  # exact: |S| < 2**24
        logits = scores * row_scale[:, :, rows].unflatten(1, (kv_heads, group))[..., None] * key_scale
        if attn_mask is not None:
            bias = mask_bias(attn_mask[:, :, start:start + rows.numel()], keys.shape[-2])
            logits = logits + bias.unflatten(1, (kv_heads, group))
        mask = visible_keys(rows, seq_q, seq_k, params.is_causal)
        p_tilde, block_max, weight = online_softmax_blocks(logits, mask)
        key_weight = weight.repeat_interleave(groups.K_TILE, dim=-1)
        p8 = to_e4m3(p_tilde).double()
        numer = (p8 * key_weight) @ values.transpose(-1, -2)
        denom = (p_tilde.double() * key_weight).sum(dim=-1, keepdim=True)
        o = numer / denom.clamp_min(1e-300) * v_scale.double()[:, :, None, None]
        if v_mean is not None:
            o = o + v_mean.double()[:, :, None, None]
        # A row with no visible key (denom 0) gives 0; a NaN denom (from a NaN input) stays NaN.
        o = torch.where(denom == 0, torch.zeros_like(o), o)
        out[:, :, rows] = o.flatten(1, 2)[..., :head_dim].to(out_dtype)
        row_lse = ((block_max[..., -1:].double() + torch.log2(denom)) * math.log(2.0)).flatten(1, 2)[..., 0]
        if q is not None and km is not None:
            row_lse = row_lse + smooth_k_term(q[:, :, rows], km, params.softmax_scale)
        lse[:, :, rows] = row_lse.float()
    return (out, lse) if return_lse else out


def attention(q, k, v, params: SageParams, return_lse: bool = False, out=None, attn_mask=None):
    """Quantize with the reference quantizers, then run `attention_from_payloads`."""
    q_int8, q_scale, k_int8, k_scale, km = quantize_qk(
        q, k, granularity=params.granularity, smooth_k=params.smooth_k)
    v_fp8, v_scale, v_mean = quantize_v(v, pv_accum=params.pv_accum, smooth_v=params.smooth_v)
    return attention_from_payloads(
        q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, params=params,
        seq_q=q.shape[2], seq_k=k.shape[2], head_dim=q.shape[-1], out_dtype=q.dtype,
        q=q, km=km, return_lse=return_lse, out=out, attn_mask=attn_mask)


def attention_varlen(q, k, v, q_lens: list[int], k_lens: list[int], params: SageParams, return_lse: bool = False,
                     out=None):
    """A packed batch (q ``[Tq, Hq, D]``, k and v ``[Tk, Hk, D]``, sequence i ``q_lens[i]`` queries and
    ``k_lens[i]`` keys, packed in order) by its definition: `attention` of each sequence alone, as
    a batch of one; a sequence without keys gives zeros (LSE -inf). Into ``out`` (like q), and with
    ``return_lse`` an LSE ``[Hq, Tq]``."""
    if out is None:
        out = q.new_empty(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, device=q.device) if return_lse else None
    one = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  [T, H, D] -> [1, H, T, D]
    q_start = k_start = 0
    for q_len, k_len in zip(q_lens, k_lens, strict=True):
        rows, keys = slice(q_start, q_start + q_len), slice(k_start, k_start + k_len)
        q_start, k_start = rows.stop, keys.stop
        if q_len == 0:
            continue
        if k_len == 0:
            out[rows] = 0
            continue
        result = attention(one(q[rows]), one(k[keys]), one(v[keys]), params, return_lse, out=one(out[rows]))
        if return_lse:
            lse[:, rows] = result[1][0]
    return (out, lse) if return_lse else out
