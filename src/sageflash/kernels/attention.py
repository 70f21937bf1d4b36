"""The Triton attention kernel over the int8/fp8 payloads (SPEC §5–7).

One program computes BLOCK_M query rows of one (batch, head) against every visible 64-key block:
S = q8·k8ᵀ in int32 (wgmma on sm_90, mma.sync m16n8k32 on sm_89), log2-domain logits, the running
max with the fp8 offset, P rounded to e4m3 in registers, then P·V on fp8 tensor cores, accumulated
as the pv_accum mode says. The running max is per 64-key block, as in the official kernel: a
larger key block would change P's fp8 rounding and so the numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import groups
from ..params import QKGranularity, SageParams
from .quant import k_group, q_group

BLOCK_N = groups.K_TILE


@triton.jit
def _attend_block(acc, m_i, l_i, q, row_scale, rows, start, k_base, ks_base, v_base, seq_k,
                  causal_offset, stride_ks, stride_vd, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  PER_THREAD: tl.constexpr, PV_MODE: tl.constexpr, MASKED: tl.constexpr,
                  IS_CAUSAL: tl.constexpr):
    """One 64-key block of the online softmax; MASKED blocks may hold hidden or missing keys."""
    dims = tl.arange(0, D)
    cols = start + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dims[None, :],
                    mask=(cols < seq_k)[:, None], other=0)
    else:
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dims[None, :])
    scores = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    col_scale = tl.load(ks_base + k_group(cols, PER_THREAD))
    logits = scores * col_scale[None, :] * row_scale[:, None]
    if MASKED:
        visible = (cols < seq_k)[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        logits = tl.where(visible, logits, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1) - 8.807)  # 8.807 = log2(448), FP8_OFFSET_LOG2
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with no visible key yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(logits - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p8 = p.to(tl.float8e4nv)
    v = tl.load(v_base + dims[None, :].to(tl.int64) * stride_vd + cols[:, None])  # [BLOCK_N, D]
    if PV_MODE == 0:  # PVAccum.FP32.code: one running accumulator, accumulated by the tensor cores
        acc = tl.dot(p8, v, acc * alpha[:, None])
    elif PV_MODE == 1:  # fp32+fp32: a fresh fp32 accumulator per key block
        acc = acc * alpha[:, None] + tl.dot(p8, v)
    else:  # fp32+fp16: a fresh fp16 accumulator per key block
        block = tl.dot(p8, v, tl.zeros([acc.shape[0], D], tl.float16), out_dtype=tl.float16)
        acc = acc * alpha[:, None] + block.to(tl.float32)
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(Q8, QS, K8, KS, V8, VS, VM, Out, LSE,
                      seq_q, seq_k, causal_offset, log2_scale, head_dim, kv_group,
                      q_heads, kv_heads, q_groups, k_groups,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vd, stride_ob, stride_oh, stride_os,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PER_THREAD: tl.constexpr, IS_CAUSAL: tl.constexpr, PV_MODE: tl.constexpr,
                      SMOOTH_V: tl.constexpr, WRITE_LSE: tl.constexpr):
    tile, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_CAUSAL:  # the longest rows first, for a better tail
        tile = tl.num_programs(0) - 1 - tile
    kv_head = head // kv_group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)

    q = tl.load(Q8 + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=(rows < seq_q)[:, None], other=0)
    qs_base = QS + (batch * q_heads + head).to(tl.int64) * q_groups
    row_scale = tl.load(qs_base + q_group(rows, PER_THREAD)) * log2_scale
    k_base = K8 + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    ks_base = KS + (batch * kv_heads + kv_head).to(tl.int64) * k_groups
    v_base = V8 + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Keys [0, full_end) are visible to every row of the tile; [full_end, key_end) need masks.
    full_end = seq_k // BLOCK_N * BLOCK_N
    key_end = seq_k
    if IS_CAUSAL:
        first_row = tile * BLOCK_M + causal_offset
        full_end = tl.minimum(full_end, tl.maximum(first_row + 1, 0) // BLOCK_N * BLOCK_N)
        key_end = tl.minimum(seq_k, tl.maximum(first_row + BLOCK_M, 0))
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, row_scale, rows, start, k_base, ks_base,
                                      v_base, seq_k, causal_offset, stride_ks, stride_vd, D,
                                      BLOCK_N, PER_THREAD, PV_MODE, False, IS_CAUSAL)
    for start in range(full_end, key_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, row_scale, rows, start, k_base, ks_base,
                                      v_base, seq_k, causal_offset, stride_ks, stride_vd, D,
                                      BLOCK_N, PER_THREAD, PV_MODE, True, IS_CAUSAL)

    bh = (batch * kv_heads + kv_head).to(tl.int64) * D
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * tl.load(VS + bh + dims)[None, :]
    if SMOOTH_V:
        out += tl.load(VM + bh + dims)[None, :]
    out = tl.where((l_i > 0)[:, None], out, 0.0)  # a row with no visible key gives 0
    tl.store(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
             + rows[:, None].to(tl.int64) * stride_os + dims[None, :],
             out.to(Out.dtype.element_ty), mask=(rows < seq_q)[:, None] & (dims < head_dim)[None, :])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + (batch * q_heads + head).to(tl.int64) * seq_q + rows, lse, mask=rows < seq_q)


def launch_config(padded_dim: int, capability: int) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) for a head dim and a compute capability (major*10+minor)."""
    return 64, 4, 3


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # the interpreter ignores launch details
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def attention_from_payloads(q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, *,
                            params: SageParams, seq_q: int, seq_k: int, head_dim: int,
                            out_dtype: torch.dtype, q=None, km=None, return_lse: bool = False):
    """Attention from the payloads; the signature of `sageflash.reference.attention_from_payloads`."""
    batch, q_heads = q_int8.shape[:2]
    kv_heads, padded = k_int8.shape[1], k_int8.shape[-1]
    out = torch.empty(batch, q_heads, seq_q, head_dim, dtype=out_dtype, device=q_int8.device)
    lse = torch.empty(batch, q_heads, seq_q, dtype=torch.float32, device=q_int8.device) if return_lse else out
    block_m, num_warps, num_stages = launch_config(padded, _capability(q_int8.device))
    grid = (triton.cdiv(seq_q, block_m), q_heads, batch)
    _attention_kernel[grid](
        q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean if v_mean is not None else v_scale,
        out, lse, seq_q, seq_k, groups.causal_offset(seq_q, seq_k),
        params.softmax_scale * groups.LOG2E, head_dim, q_heads // kv_heads, q_heads, kv_heads,
        q_scale.shape[-1], k_scale.shape[-1],
        q_int8.stride(0), q_int8.stride(1), q_int8.stride(2),
        k_int8.stride(0), k_int8.stride(1), k_int8.stride(2),
        v_fp8.stride(0), v_fp8.stride(1), v_fp8.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=padded, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        PER_THREAD=params.granularity is QKGranularity.PER_THREAD, IS_CAUSAL=params.is_causal,
        PV_MODE=params.pv_accum.code, SMOOTH_V=v_mean is not None, WRITE_LSE=return_lse,
        num_warps=num_warps, num_stages=num_stages)
    if not return_lse:
        return out
    if q is not None and km is not None:  # undo smooth_k's shift of every logit by q·km
        km = km[..., : q.shape[-1]].float().repeat_interleave(q_heads // kv_heads, dim=1)
        lse += params.softmax_scale * (q.float() * km[:, :, None]).sum(dim=-1)  # no TF32 matmul
    return out, lse
