"""Triton quantizers (SPEC §3–4): Q/K -> int8 per token group, V -> fp8 e4m3 per channel.

Same payloads as `sageflash.reference.quant`. Launches: Q one, K one (+ torch's K mean when
smoothing), V three (partial channel statistics, their reduction to scales, the quantized and
transposed payload). No host synchronisation.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from .. import groups
from ..params import PVAccum, QKGranularity
from ..reference.quant import key_mean



def _jit_rule(rule):
    """``triton.jit`` one of the plain-arithmetic rules of `sageflash.groups`.

    The interpreter insists on seeing ``triton.language`` among a jitted function's globals, so
    the rule is rebound to a copy of its module's globals that has it.
    """
    return triton.jit(types.FunctionType(rule.__code__, {**rule.__globals__, "tl": tl}, rule.__name__))


q_group = _jit_rule(groups.q_group)
k_group = _jit_rule(groups.k_group)

Q_ROWS = 32  # rows per program: a per_warp Q group (per_thread groups lie inside it too)
K_ROWS = groups.K_TILE  # a per_warp K group (per_thread groups lie inside it too)
V_STATS_ROWS = 128  # tokens per partial-statistics program


@triton.jit
def _round_half_even(x):
    # Adding and removing 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to an integer with the
    # FPU's round-to-nearest-even (libdevice's rint is not available in the interpreter).
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _quantize_group_rows(x, groups_of_rows, PER_THREAD: tl.constexpr):
    """int8 values and per-row scales of float32 rows ``x`` whose group ids are ``groups_of_rows``.

    Divisions are IEEE (``div_rn``) as in the reference, not the GPU's default approximate ones;
    inverse scales are reciprocal-then-multiply, as in the official quantizers.
    """
    row_amax = tl.max(tl.abs(x), axis=1)
    same_group = groups_of_rows[:, None] == groups_of_rows[None, :]
    amax = tl.max(tl.where(same_group, row_amax[None, :], 0.0), axis=1)
    if PER_THREAD:
        scale = tl.div_rn(amax, 127.0) + 1e-7
        ratio = tl.div_rn(x, scale[:, None])
        values = (ratio + tl.where(ratio > 0, 0.5, tl.where(ratio < 0, -0.5, 0.0))).to(tl.int32)
    else:
        amax = tl.maximum(amax, 1e-7)
        scale = tl.div_rn(amax, 127.0)
        values = _round_half_even(x * (tl.div_rn(1.0, amax) * 127.0)[:, None]).to(tl.int32)
    return tl.minimum(tl.maximum(values, -128), 127).to(tl.int8), scale


@triton.jit
def _quantize_qk_kernel(X, KM, X8, XS, seq, head_dim, num_heads, n_groups,
                        stride_xb, stride_xh, stride_xs, stride_8b, stride_8h, stride_8s,
                        D: tl.constexpr, ROWS: tl.constexpr, IS_KEY: tl.constexpr,
                        PER_THREAD: tl.constexpr, SMOOTH: tl.constexpr):
    """One program quantizes ROWS tokens of one (batch, head); ROWS covers whole groups."""
    block, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = block * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    in_seq = rows < seq
    x = tl.load(X + batch.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
                + rows[:, None].to(tl.int64) * stride_xs + cols[None, :],
                mask=in_seq[:, None] & (cols < head_dim)[None, :], other=0.0)
    xf = x.to(tl.float32)
    if SMOOTH:
        km = tl.load(KM + (batch * num_heads + head) * D + cols).to(tl.float32)
        if PER_THREAD:  # per_thread centres K in the input dtype, per_warp in float32
            xf = (xf - km[None, :]).to(X.dtype.element_ty).to(tl.float32)
        else:
            xf = xf - km[None, :]
        xf = tl.where(in_seq[:, None], xf, 0.0)
    if IS_KEY:
        row_groups = k_group(rows, PER_THREAD)
    else:
        row_groups = q_group(rows, PER_THREAD)
    values, scale = _quantize_group_rows(xf, row_groups, PER_THREAD)
    tl.store(X8 + batch.to(tl.int64) * stride_8b + head.to(tl.int64) * stride_8h
             + rows[:, None].to(tl.int64) * stride_8s + cols[None, :], values, mask=in_seq[:, None])
    tl.store(XS + (batch * num_heads + head).to(tl.int64) * n_groups + row_groups, scale)


def _quantize_int8(x, km, *, is_key: bool, per_thread: bool):
    batch, heads, seq, head_dim = x.shape
    padded = groups.padded_head_dim(head_dim)
    rows = K_ROWS if is_key else Q_ROWS
    tile = groups.K_TILE if is_key else groups.Q_TILE
    n_groups = (groups.k_num_groups if is_key else groups.q_num_groups)(seq, per_thread)
    x8 = torch.empty(batch, heads, seq, padded, dtype=torch.int8, device=x.device)
    scale = torch.empty(batch, heads, n_groups, dtype=torch.float32, device=x.device)
    grid = (groups.ceil_to(seq, tile) // rows, heads, batch)  # every group, padding included
    _quantize_qk_kernel[grid](
        x, km if km is not None else x, x8, scale, seq, head_dim, heads, n_groups,
        x.stride(0), x.stride(1), x.stride(2), x8.stride(0), x8.stride(1), x8.stride(2),
        D=padded, ROWS=rows, IS_KEY=is_key, PER_THREAD=per_thread, SMOOTH=km is not None)
    return x8, scale


def quantize_qk(q, k, *, granularity, smooth_k: bool, km=None):
    """``(q_int8, q_scale, k_int8, k_scale, km)``, the payloads of `sageflash.reference.quantize_qk`."""
    per_thread = QKGranularity.parse(granularity, "granularity") is QKGranularity.PER_THREAD
    padded = groups.padded_head_dim(q.shape[-1])
    q8, q_scale = _quantize_int8(q, None, is_key=False, per_thread=per_thread)
    if smooth_k:
        km = key_mean(k) if km is None else km[..., : k.shape[-1]].to(k.dtype)
        km = torch.nn.functional.pad(km, (0, padded - km.shape[-1])).contiguous()
    else:
        km = None
    k8, k_scale = _quantize_int8(k, km, is_key=True, per_thread=per_thread)
    return q8, q_scale, k8, k_scale, km


@triton.jit
def _v_partial_stats_kernel(V, PMAX, PMIN, PSUM, seq, head_dim, n_chunks,
                            stride_vb, stride_vh, stride_vs,
                            D: tl.constexpr, ROWS: tl.constexpr):
    """Per-channel max, min and sum of ROWS tokens of one (batch, head)."""
    chunk, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = chunk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    valid = (rows < seq)[:, None] & (cols < head_dim)[None, :]
    x = tl.load(V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
                + rows[:, None].to(tl.int64) * stride_vs + cols[None, :], mask=valid, other=0.0)
    x = x.to(tl.float32)
    out = ((batch * tl.num_programs(1) + head).to(tl.int64) * n_chunks + chunk) * D + cols
    tl.store(PMAX + out, tl.max(tl.where(valid, x, -float("inf")), axis=0))
    tl.store(PMIN + out, tl.min(tl.where(valid, x, float("inf")), axis=0))
    tl.store(PSUM + out, tl.sum(x, axis=0))


@triton.jit
def _v_scales_kernel(PMAX, PMIN, PSUM, VSCALE, VMEAN, INV, n_chunks, window, scale_max,
                     PAD_IN_WINDOW: tl.constexpr, SMOOTH: tl.constexpr, D: tl.constexpr):
    """Reduce the partial statistics of one (batch, head) to v_scale, v_mean and scale_max / amax."""
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, D)
    vmax = tl.full([D], -float("inf"), tl.float32)
    vmin = tl.full([D], float("inf"), tl.float32)
    vsum = tl.zeros([D], tl.float32)
    for chunk in range(n_chunks):
        at = (bh * n_chunks + chunk) * D + cols
        vmax = tl.maximum(vmax, tl.load(PMAX + at))
        vmin = tl.minimum(vmin, tl.load(PMIN + at))
        vsum += tl.load(PSUM + at)
    if PAD_IN_WINDOW:  # the ceil_16(Sk) window holds zero tokens too
        vmax = tl.maximum(vmax, 0.0)
        vmin = tl.minimum(vmin, 0.0)
    if SMOOTH:
        mean = tl.div_rn(vsum, window.to(tl.float32))
        amax = tl.maximum(tl.abs(vmax - mean), tl.abs(vmin - mean))
        tl.store(VMEAN + bh * D + cols, mean)
    else:
        amax = tl.maximum(tl.abs(vmax), tl.abs(vmin))
    tl.store(VSCALE + bh * D + cols, tl.div_rn(amax, scale_max))
    # An all-zero channel has amax 0: scale 0 and payload 0 (the official code gives NaN here).
    tl.store(INV + bh * D + cols, tl.where(amax > 0, tl.div_rn(1.0, tl.where(amax > 0, amax, 1.0)) * scale_max, 0.0))


@triton.jit
def _v_quantize_kernel(V, VMEAN, INV, V8, seq, head_dim, stride_vb, stride_vh, stride_vs,
                       stride_8b, stride_8h, stride_8d,
                       D: tl.constexpr, ROWS: tl.constexpr, SMOOTH: tl.constexpr):
    """fp8 payload of ROWS tokens of one (batch, head), stored transposed ``[D, tokens]``."""
    block, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (batch * tl.num_programs(1) + head).to(tl.int64)
    rows = block * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    valid = (rows < seq)[:, None] & (cols < head_dim)[None, :]
    x = tl.load(V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
                + rows[:, None].to(tl.int64) * stride_vs + cols[None, :], mask=valid, other=0.0)
    x = x.to(tl.float32)
    if SMOOTH:
        x = x - tl.load(VMEAN + bh * D + cols)[None, :]
    y = x * tl.load(INV + bh * D + cols)[None, :]
    y = tl.where(valid, tl.minimum(tl.maximum(y, -448.0), 448.0), 0.0)
    tl.store(V8 + batch.to(tl.int64) * stride_8b + head.to(tl.int64) * stride_8h
             + cols[None, :].to(tl.int64) * stride_8d + rows[:, None], y.to(tl.float8e4nv))


def quantize_v(v, *, pv_accum, smooth_v: bool):
    """``(v_fp8 [B,Hk,D,ceil64(Sk)], v_scale, v_mean)``, the payloads of `sageflash.reference.quantize_v`."""
    scale_max = PVAccum.parse(pv_accum, "pv_accum").v_scale_max
    batch, heads, seq, head_dim = v.shape
    padded = groups.padded_head_dim(head_dim)
    n_chunks = triton.cdiv(seq, V_STATS_ROWS)
    partial = torch.empty(3, batch, heads, n_chunks, padded, dtype=torch.float32, device=v.device)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    _v_partial_stats_kernel[(n_chunks, heads, batch)](
        v, partial[0], partial[1], partial[2], seq, head_dim, n_chunks, *strides, D=padded,
        ROWS=V_STATS_ROWS)
    v_scale = torch.empty(batch, heads, padded, dtype=torch.float32, device=v.device)
    v_mean = torch.empty_like(v_scale) if smooth_v else None
    inv_scale = torch.empty_like(v_scale)
    window = groups.ceil_to(seq, groups.V_WINDOW)
    _v_scales_kernel[(batch * heads,)](
        partial[0], partial[1], partial[2], v_scale, v_mean if smooth_v else v_scale, inv_scale,
        n_chunks, window, scale_max, PAD_IN_WINDOW=window > seq, SMOOTH=smooth_v, D=padded)
    padded_seq = groups.ceil_to(seq, groups.K_TILE)
    v_fp8 = torch.empty(batch, heads, padded, padded_seq, dtype=torch.float8_e4m3fn, device=v.device)
    _v_quantize_kernel[(padded_seq // groups.K_TILE, heads, batch)](
        v, v_mean if smooth_v else v_scale, inv_scale, v_fp8, seq, head_dim, *strides,
        v_fp8.stride(0), v_fp8.stride(1), v_fp8.stride(2), D=padded, ROWS=groups.K_TILE,
        SMOOTH=smooth_v)
    return v_fp8, v_scale, v_mean
