"""The Triton attention kernel over the int8/fp8 payloads (SPEC §5–7).

One program computes BLOCK_M query rows of one (batch, head) against every visible 64-key block:
S = q8·k8ᵀ in int32 (wgmma on sm_90, mma.sync m16n8k32 on sm_89), log2-domain logits, the running
max with the fp8 offset, P rounded to e4m3 in registers, then P·V on fp8 tensor cores, accumulated
as the pv_accum mode says. P's columns and V's payload tokens are in `groups.v_kernel_token`'s
order, so that no thread needs another's scores. The running max is per 64-key block, as in the
official kernel: a larger key block would change P's fp8 rounding and so the numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import groups
from ..params import PVAccum, QKGranularity, SageParams, warn_once
from .launch import (Launcher, check_grid_batch, dependent_launch, device_capability, e4m3_cast_in_ptx,
                     let_next_launch_start, wait_for_earlier_launch)
from .lse import add_smooth_k_term
from .quant import k_group, q_group, to_e4m3
from .sequences import K_PADDED, K_START, Q_PADDED, Q_START, PackedBatch, entry, field, head_offset, program

BLOCK_N = tl.constexpr(groups.K_TILE)  # keys per running-max block (SPEC §5)
LOG2E = tl.constexpr(groups.LOG2E)  # additive attn_mask values are natural-log offsets
FP8_OFFSET_LOG2 = tl.constexpr(groups.FP8_OFFSET_LOG2)
# per_thread's K scale groups per 64-key block, (j % 8) // 2: the 4 lanes of a warp that share an
# accumulator row hold one group each, which `_softmax_step`'s view of the scores relies on.
ROW_LANES = tl.constexpr(groups.groups_per_tile(groups.k_group, groups.K_TILE, True))
LONG_FP32_KEYS = 8192  # pv_accum='fp32' on Hopper past this many keys: warned once (drift, see below)


@triton.jit
def _softmax_step(acc, m_i, l_i, x, x_scale, v, PV_MODE: tl.constexpr, GROUPED: tl.constexpr,
                  PTX_CAST: tl.constexpr):
    """SPEC §5 for one 64-key block whose log2-domain logits are ``x * x_scale[:, None]``, or with
    GROUPED ``x[:, j] * x_scale[:, (j % 8) // 2]`` (per_thread's 4 K groups within a block).

    The scores are viewed as ``[rows, 8, 4, 2]`` (key 8a + 2g + b at [:, a, g, b]): the wgmma/mma
    accumulator gives a thread only columns of one g, so the view moves no data on sm_90 (checked
    in the SASS; sm_89's per_warp loop gains a few shuffles). ``x_scale`` (> 0) stays outside the
    maxima, which is exact for a positive factor (with GROUPED each group's max is scaled, once
    per row), and goes into exp2 as one FMA; hidden keys hold x = -inf. ``l_i`` is ``[rows, ROW_LANES]``:
    each thread's partial row sums, added across the 4 lanes of a row once, after the last block.
    """
    rows_n: tl.constexpr = x.shape[0]
    xg = tl.reshape(x, [rows_n, BLOCK_N // (2 * ROW_LANES), ROW_LANES, 2])
    group_max = tl.max(tl.max(xg, axis=3), axis=1)
    if GROUPED:
        block_max = tl.max(group_max * x_scale, axis=1)
        scale = x_scale[:, None, :, None]
    else:
        block_max = tl.max(group_max, axis=1) * x_scale
        scale = x_scale[:, None, None, None]
    m_new = tl.maximum(m_i, block_max - FP8_OFFSET_LOG2)
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with no visible key yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(tl.fma(xg, scale, -m_safe[:, None, None, None]))
    l_i = l_i * alpha[:, None] + tl.sum(tl.sum(p, axis=3), axis=1)
    # P's columns in V's payload order (`groups.v_kernel_token`: key 16c + 8b + 2t + e at
    # position 16c + 4t + 2b + e): each thread's scores are then its own P·V operand (no shuffles).
    p8 = tl.reshape(to_e4m3(p, PTX_CAST), [rows_n, BLOCK_N // 16, 2, ROW_LANES, 2])
    p8 = tl.reshape(tl.permute(p8, (0, 1, 3, 2, 4)), [rows_n, BLOCK_N])
    if PV_MODE == 0:  # PVAccum.FP32.code: one running accumulator, accumulated by the tensor cores
        acc = tl.dot(p8, v, acc * alpha[:, None])
    elif PV_MODE == 1:  # fp32+fp32: a fresh fp32 accumulator per key block
        acc = acc * alpha[:, None] + tl.dot(p8, v)
    else:  # fp32+fp16: a fresh fp16 accumulator per key block
        block = tl.dot(p8, v, tl.zeros([acc.shape[0], v.shape[1]], tl.float16), out_dtype=tl.float16)
        acc = acc * alpha[:, None] + block.to(tl.float32)
    return acc, m_new, l_i


@triton.jit
def _load_k_block(k_src, k_row, start, cols, dims, seq_k, stride_ks, MASKED: tl.constexpr,
                  USE_TMA: tl.constexpr):
    """K's int8 ``[KEYS, D]`` block from key ``start`` (``cols`` = start + arange(KEYS)).

    With USE_TMA, ``k_src`` is a TMA descriptor of the payload seen as ``[B·Hk·Sk, D]`` and
    ``k_row`` this head's first row: rows past the head belong to the next one (finite values the
    caller masks) or, past the tensor, read as zeros.
    """
    if USE_TMA:
        k = k_src.load([k_row + start, 0])
    elif MASKED:
        k = tl.load(k_src + cols[:, None].to(tl.int64) * stride_ks + dims[None, :],
                    mask=(cols < seq_k)[:, None], other=0)
    else:
        k = tl.load(k_src + cols[:, None].to(tl.int64) * stride_ks + dims[None, :])
    return k


@triton.jit
def _load_v_block(v_src, v_row, v_col, start, dims, seq_k, stride_vd, MASKED: tl.constexpr,
                  USE_TMA: tl.constexpr):
    """V's fp8 ``[64, D]`` block from key ``start`` (the payload is zero-padded to 64 keys only, its
    tokens in `groups.v_kernel_token`'s order: a block holds its own 64 keys, padding included).

    With USE_TMA, ``v_src`` is a TMA descriptor of the payload seen as ``[B·Hk·D, ceil_64(Sk)]``
    and ``v_row`` this head's first row, ``v_col`` the batch entry's first column (a packed batch's,
    `sequences`, which pads each entry to whole 128-key steps; else 0); keys past the padded end
    read as zeros.
    """
    if USE_TMA:
        v = tl.trans(v_src.load([v_row, v_col + start]))
    else:
        cols = start + tl.arange(0, BLOCK_N)
        ptrs = v_src + dims[None, :].to(tl.int64) * stride_vd + cols[:, None]
        if MASKED:  # a block past the padded payload reads as zeros
            v = tl.load(ptrs, mask=start < seq_k, other=0.0)
        else:
            v = tl.load(ptrs)
    return v


@triton.jit
def _block_scale(row_scale, ks_base, start, seq_k, PER_THREAD: tl.constexpr, ADDITIVE: tl.constexpr,
                 MASKED: tl.constexpr):
    """`_softmax_step`'s logit scale of the 64-key block from ``start``: the row scale times the
    block's K scales, ``[rows, 4]`` per_thread (one per group), ``[rows]`` per_warp (one per block);
    1 where an additive mask already scaled the logits by both. In a MASKED step, a block past
    the keys (all -inf) takes K scale 1."""
    present = start < seq_k if MASKED else None
    absent_scale = 1.0 if MASKED else None
    if ADDITIVE:
        return tl.full([row_scale.shape[0]], 1.0, tl.float32)
    elif PER_THREAD:
        ks = tl.load(ks_base + k_group(start, PER_THREAD) + tl.arange(0, ROW_LANES), mask=present, other=absent_scale)
        return row_scale[:, None] * ks[None, :]
    else:
        return row_scale * tl.load(ks_base + k_group(start, PER_THREAD), mask=present, other=absent_scale)


@triton.jit
def _attend_block(acc, m_i, l_i, q, row_scale, rows, start, k_src, k_row, ks_base, v_src, v_row, v_col,
                  seq_k, causal_offset, stride_ks, stride_vd, mask_base, stride_mq, stride_mk, seq_q,
                  D: tl.constexpr, KEYS: tl.constexpr, PER_THREAD: tl.constexpr,
                  PV_MODE: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, USE_TMA: tl.constexpr,
                  PTX_CAST: tl.constexpr):
    """KEYS (64 or 128) keys from ``start``: one Q·Kᵀ dot, then a softmax step per 64-key block.

    A 128-key step keeps SPEC's per-64-key running max (the scores are split in two) while its
    N=128 dot runs the tensor cores far better than two N=64 ones. MASKED steps may hold hidden or
    missing keys. With HAS_MASK, the caller's attn_mask tile applies: bool (MASK_BOOL, stored as
    bytes, 0 hides) or additive, in the natural-log domain, so times log2(e).
    """
    dims = tl.arange(0, D)
    cols = start + tl.arange(0, KEYS)
    k = _load_k_block(k_src, k_row, start, cols, dims, seq_k, stride_ks, MASKED, USE_TMA)
    x = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    # The K scales join the row scale per 64-key block (`_block_scale`), so a score is scaled in
    # exp2's FMA and not by a multiply of its own; an additive mask needs the logits scaled before
    # its bias, so it scales each score.
    ADDITIVE: tl.constexpr = HAS_MASK and not MASK_BOOL
    GROUPED: tl.constexpr = PER_THREAD and not ADDITIVE
    if HAS_MASK:
        bias = tl.load(mask_base + rows[:, None].to(tl.int64) * stride_mq
                       + cols[None, :].to(tl.int64) * stride_mk,
                       mask=(rows < seq_q)[:, None] & (cols < seq_k)[None, :], other=0)
        if MASK_BOOL:
            x = tl.where(bias != 0, x, -float("inf"))
        else:  # the bias joins the scaled logits, so the scales apply here (the same products)
            k_scale = tl.load(ks_base + k_group(cols, PER_THREAD), mask=cols < seq_k, other=1.0)
            scale = row_scale[:, None] * k_scale[None, :]
            x = tl.fma(x, scale, bias.to(tl.float32) * LOG2E)
    if MASKED:
        visible = (cols < seq_k)[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        x = tl.where(visible, x, -float("inf"))
    v = _load_v_block(v_src, v_row, v_col, start, dims, seq_k, stride_vd, MASKED, USE_TMA)
    x_scale = _block_scale(row_scale, ks_base, start, seq_k, PER_THREAD, ADDITIVE, MASKED)
    if KEYS == BLOCK_N:
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, x, x_scale, v, PV_MODE, GROUPED, PTX_CAST)
    else:
        x0, x1 = tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, BLOCK_N]), (0, 2, 1)))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, x0, x_scale, v, PV_MODE, GROUPED, PTX_CAST)
        v = _load_v_block(v_src, v_row, v_col, start + BLOCK_N, dims, seq_k, stride_vd, MASKED, USE_TMA)
        x_scale = _block_scale(row_scale, ks_base, start + BLOCK_N, seq_k, PER_THREAD, ADDITIVE, MASKED)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, x1, x_scale, v, PV_MODE, GROUPED, PTX_CAST)
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(Q8, QS, K8, KS, V8, VS, VM, Out, LSE, Mask, SEQS, TILES,
                      seq_q, seq_k, causal_offset, log2_scale, head_dim, kv_group,
                      q_heads, kv_heads, q_groups, k_groups,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vd, stride_ob, stride_oh, stride_os,
                      stride_mb, stride_mh, stride_mq, stride_mk,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, KEYS: tl.constexpr,
                      PER_THREAD: tl.constexpr, IS_CAUSAL: tl.constexpr, PV_MODE: tl.constexpr,
                      SMOOTH_V: tl.constexpr, WRITE_LSE: tl.constexpr, HAS_MASK: tl.constexpr,
                      MASK_BOOL: tl.constexpr, USE_TMA: tl.constexpr, VARLEN: tl.constexpr,
                      PDL: tl.constexpr, PTX_CAST: tl.constexpr):
    """One tile of BLOCK_M query rows of one (batch entry, head); with VARLEN a tile map's, of the
    entries of a packed batch (`sequences`), whose lengths the table gives (``seq_q`` and ``seq_k``
    are then the packed token counts, and the causal offset the entry's)."""
    tile, batch = program(TILES, VARLEN)
    head = tl.program_id(1)
    if IS_CAUSAL and not VARLEN:  # the longest rows first, for a better tail (a tile map orders its own)
        tile = tl.num_programs(0) - 1 - tile
    kv_head = head // kv_group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    tokens_q, tokens_k = seq_q, seq_k
    q_base, seq_q = entry(SEQS, batch, Q_START, seq_q, stride_qb, stride_qs, VARLEN)
    o_base, _ = entry(SEQS, batch, Q_START, seq_q, stride_ob, stride_os, VARLEN)
    k_base, seq_k = entry(SEQS, batch, K_START, seq_k, stride_kb, stride_ks, VARLEN)
    if VARLEN:
        causal_offset = seq_k - seq_q
    wait_for_earlier_launch(PDL)  # launched while the quantizer may still run: its payloads are complete past this
    let_next_launch_start(PDL)  # the next KV-head chunk's statistics (`quant`)

    q = tl.load(Q8 + q_base + head.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=(rows < seq_q)[:, None], other=0)
    # the scales' [B, H, groups], or a packed batch's [H, groups] from its padded starts (`sequences`)
    first_q_group = q_group(field(SEQS, batch, Q_PADDED), PER_THREAD) if VARLEN else 0
    qs_base = QS + head_offset(batch, head, q_heads, q_groups, first_q_group, VARLEN)
    row_scale = tl.load(qs_base + q_group(rows, PER_THREAD)) * log2_scale
    v_col = field(SEQS, batch, K_PADDED) if VARLEN else 0  # V's first payload column
    ks_base = KS + head_offset(batch, kv_head, kv_heads, k_groups, k_group(v_col, PER_THREAD), VARLEN)
    if VARLEN:  # the packed payloads: K [1, Hk, tokens_k, D], V [1, Hk, D, columns] from K_PADDED
        if USE_TMA:
            k_src, v_src = K8, V8
            k_row, v_row = kv_head * tokens_k + field(SEQS, batch, K_START), kv_head * D
        else:
            k_src = K8 + k_base + kv_head.to(tl.int64) * stride_kh
            # whole 64-key blocks, told to the compiler: aligned, pipelined loads
            v_src = V8 + tl.multiple_of(v_col.to(tl.int64), BLOCK_N) + kv_head.to(tl.int64) * stride_vh
            k_row, v_row, v_col = 0, 0, 0
    elif USE_TMA:  # descriptors of the contiguous payloads: a head starts at a row
        k_src, v_src = K8, V8
        k_row, v_row = (batch * kv_heads + kv_head) * seq_k, (batch * kv_heads + kv_head) * D
    else:
        k_src = K8 + k_base + kv_head.to(tl.int64) * stride_kh
        v_src = V8 + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        k_row, v_row = 0, 0
    mask_base = Mask + batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, ROW_LANES], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Keys [0, full_end) are visible to every row of the tile; [full_end, key_end) need masks.
    full_end = seq_k // KEYS * KEYS
    key_end = seq_k
    if IS_CAUSAL:
        first_row = tile * BLOCK_M + causal_offset
        full_end = tl.minimum(full_end, tl.maximum(first_row + 1, 0) // KEYS * KEYS)
        key_end = tl.minimum(seq_k, tl.maximum(first_row + BLOCK_M, 0))
    for start in range(0, full_end, KEYS):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, row_scale, rows, start, k_src, k_row,
                                      ks_base, v_src, v_row, v_col, seq_k, causal_offset, stride_ks,
                                      stride_vd, mask_base, stride_mq, stride_mk, seq_q, D, KEYS,
                                      PER_THREAD, PV_MODE, False, IS_CAUSAL, HAS_MASK, MASK_BOOL,
                                      USE_TMA, PTX_CAST)
    for start in range(full_end, key_end, KEYS):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, row_scale, rows, start, k_src, k_row,
                                      ks_base, v_src, v_row, v_col, seq_k, causal_offset, stride_ks,
                                      stride_vd, mask_base, stride_mq, stride_mk, seq_q, D, KEYS,
                                      PER_THREAD, PV_MODE, True, IS_CAUSAL, HAS_MASK, MASK_BOOL,
                                      USE_TMA, PTX_CAST)

    row_sum = tl.sum(l_i, axis=1)  # the lanes' partial sums (`_softmax_step`)
    # A row with no visible key (sum 0) gives 0; a NaN sum (a NaN scale from a NaN input) stays NaN.
    empty = row_sum == 0
    bh = (batch * kv_heads + kv_head).to(tl.int64) * D
    out = acc / tl.where(empty, 1.0, row_sum)[:, None] * tl.load(VS + bh + dims)[None, :]
    if SMOOTH_V:
        out += tl.load(VM + bh + dims)[None, :]
    out = tl.where(empty[:, None], 0.0, out)
    tl.store(Out + o_base + head.to(tl.int64) * stride_oh
             + rows[:, None].to(tl.int64) * stride_os + dims[None, :],
             out.to(Out.dtype.element_ty), mask=(rows < seq_q)[:, None] & (dims < head_dim)[None, :])
    if WRITE_LSE:  # [B, Hq, Sq], or a packed batch's [Hq, tokens_q]
        lse = (m_i + tl.math.log2(row_sum)) * 0.6931471805599453
        if VARLEN:
            lse_at = head.to(tl.int64) * tokens_q + field(SEQS, batch, Q_START) + rows
        else:
            lse_at = (batch * q_heads + head).to(tl.int64) * seq_q + rows
        tl.store(LSE + lse_at, lse, mask=rows < seq_q)


_launch_attention = Launcher(_attention_kernel)
# Triton compiles an int argument equal to 1 as a constant: built so for seq_k == 1, the kernel gave
# NaN rows at random on Hopper's and Ada's code paths (Triton 3.6, benchmarks/NOTES.md v29). A
# single key takes this build, seq_k a runtime value; other lengths the one the table was measured with.
_launch_attention_one_key = Launcher(triton.jit(_attention_kernel.fn, do_not_specialize=["seq_k"]))


class LaunchConfig(NamedTuple):
    block_m: int  # query rows per program
    keys: int  # keys per loop step: 64, or 128 as two 64-key softmax blocks
    num_warps: int
    num_stages: int
    tma: bool = False  # K and V tiles through TMA descriptors (Hopper), not pointer loads
    max_registers: int | None = None  # Triton's maxnreg: a cap that fits more programs per SM


TMA_MIN_KEYS = 2048  # below, TMA measured slower or within 5% (H200: v4, v7, v9), except rows below


class HopperRow(NamedTuple):
    """A Hopper launch for calls of at least ``min_keys`` keys: the default 64-row tile with these
    loads, stages, register cap and keys per loop step."""

    min_keys: int
    tma: bool
    num_stages: int
    max_registers: int | None
    keys: int = 128


# Hopper launches by (padded head dim, pv_accum code, causal); other calls take the default 64x128
# tile below with pointer loads. Measured on an H200, kernel-only (benchmarks/NOTES.md v4, v7, v9
# and v10: the rows were re-measured after v10's grouped K scales; v11: D=128 fp32+fp32 from 1k;
# v14: the fp32 rows; v17: D=64 under 128 registers; v18: D=128 fp32+fp32 and fp32 in 64-key steps).
_FP32, _FP32_FP32, _FP32_FP16 = (mode.code for mode in (PVAccum.FP32, PVAccum.FP32_FP32, PVAccum.FP32_FP16))
_HOPPER = {
    # D=128 fp32+fp32 in 64-key steps under 168 registers: 3 programs per SM without spills (165
    # registers once P needs no shuffles; 128-key steps take 228, 2 per SM). Against TMA with 3
    # stages and 128-key steps (v18, interleaved), 1k / 4k / 16k: +14% / +7% / +4%, causal +24% /
    # +12% / +5%.
    (128, _FP32_FP32, False): HopperRow(1024, True, 3, 168, keys=64),
    (128, _FP32_FP32, True): HopperRow(1024, True, 3, 168, keys=64),
    # D=128 fp32+fp16 under 168 registers, 3 programs per SM: +4-10% at 2k-16k, +15% at 1k, causal
    # +5-9% (v10); in 64-key steps 2-4% slower (v18).
    (128, _FP32_FP16, False): HopperRow(1024, True, 2, 168),
    (128, _FP32_FP16, True): HopperRow(1024, True, 2, 168),
    # D=64 under 128 registers: 4 programs per SM instead of 3 (v17: ncu showed its warps waiting on
    # the next K tile and on their wgmmas with no other warp to issue). Against the rows before, at
    # 1k / 4k / 16k: fp32+fp16 (3 stages) -8% / -8% / -4%, causal (2 stages; 16 bytes of spills)
    # -8% / -9% / -8%; fp32+fp32 (3 stages; <=124 bytes of spills) -11% / -6% / -4%, causal -6% /
    # -6% / -2%. pv_accum fp32 spills 130+ bytes under the cap and lost 14-21%.
    (64, _FP32_FP32, False): HopperRow(1024, True, 3, 128),
    (64, _FP32_FP32, True): HopperRow(1024, True, 3, 128),
    (64, _FP32_FP16, False): HopperRow(1024, True, 3, 128),
    (64, _FP32_FP16, True): HopperRow(1024, True, 2, 128),
    # pv_accum fp32 (the mode smooth_v needs). D=128 as fp32+fp32 (140 registers), against TMA with 3
    # stages and 128-key steps (v18), 1k / 4k / 16k: +21% / +9% / +6%, causal +27% / +16% / +5%.
    (128, _FP32, False): HopperRow(1024, True, 3, 168, keys=64),
    (128, _FP32, True): HopperRow(1024, True, 3, 168, keys=64),
    # D=64, v14's sweep against the launch before, at 1k / 4k / 16k:
    (64, _FP32, False): HopperRow(1024, True, 2, 168),  # +5% / +14% / +11%
    (64, _FP32, True): HopperRow(1024, True, 2, 168),  # 4k +20%, 16k +14% (before: TMA, 4 stages); 1k +7%
    # (v15, timed from a CUDA graph: v14's eager timings at 1k read the launch's host time)
}
# Ada's launches (mma.sync; the interpreter takes them too), by padded head dim. Triton spreads a
# dot's warps along N when N > M: Hopper's default 64x128 score tile, or a P·V product with
# D > BLOCK_M, put every row on four warps, whose row max and P then cross warps through shared
# memory in each key block (sm_89 SASS at D=128: 1520 instructions per 128 keys, 96 shared-memory
# stores, 17 barriers). These tiles keep each row in one warp: 387 (D=64) and 499 (D=128)
# instructions per 64 keys, no stores. Ada's code path timed on an H200 (TRITON_OVERRIDE_ARCH=sm89,
# v19), kernel-only against the 64x128 tile, 1k-16k, causal and not, all three pv_accum modes:
# D=64 2.0-2.5x, D=128 1.3-1.7x. D=256 (a 64x256 fp32 accumulator on 8 warps) still splits N in its
# P·V, [1, 8]: no tile avoids that without splitting the product (not done, not measured on Ada).
_MMA_SYNC = {64: LaunchConfig(64, 64, 4, 3), 128: LaunchConfig(128, 64, 8, 3),
             256: LaunchConfig(64, 64, 8, 2)}
# D=256 on Hopper, every length and mode: 128 rows on two warpgroups, 64-key steps through TMA with 3
# stages (254 registers, no spills but fp32+fp32's 280 bytes; 1 program per SM). The launch before
# (64 rows on 8 warps, Ada's in `_MMA_SYNC`) had both warpgroups compute the same scores. H200,
# kernel-only (v19), 1k / 4k / 16k: fp32+fp16 2.0x / 2.0x / 2.2x, causal 1.7x / 2.0x / 2.2x;
# fp32 1.97-2.73x; fp32+fp32 1.25-1.56x.
_HOPPER_D256 = LaunchConfig(128, 64, 8, 3, tma=True)
# Hopper launches below a row's min_keys that cap the registers, by (padded head dim, pv_accum code).
# D=64 under 168 registers: +7-13% at 1k for fp32+fp32 and causal fp32+fp16, the rest within 3%
# (H200, two sweeps, benchmarks/NOTES.md v8). Causal fp32+fp32 takes 197 uncapped (2 programs per
# SM, 3 capped); the other gains come with the same 167-168 registers, so from ptxas's schedule.
_HOPPER_SHORT_REGISTERS = {(64, _FP32_FP32): 168, (64, _FP32_FP16): 168}


# Architectures that take Ada's launches: below Hopper, and consumer Blackwell (sm_120/121, RTX 50xx:
# mma.sync and Ada's 99 KiB of shared memory per block, where Hopper's tables, sized for 227 KiB,
# failed with OutOfResources at D=256 and with masks; official SageAttention also runs its sm_89
# kernel there). Not run on such a card yet.
MMA_SYNC_ARCHS = range(0, 90), range(120, 130)
# Ada's 128-row tile (D=128) pipelines a 128x64 mask tile per stage: a 4-byte (float32) mask over
# 3 stages needs 115,200 bytes of shared memory, past sm_89's 101,376; 2 stages need 65,792.
_MMA_SYNC_4_BYTE_MASK_STAGES = 2


def launch_config(padded_dim: int, capability: int, pv_mode: int, is_causal: bool,
                  seq_k: int, mask_itemsize: int = 0) -> LaunchConfig:
    """The launch for a padded head dim, a compute capability (major*10+minor), the pv_accum code,
    causality and the key count.

    Hopper, measured on an H200 (benchmarks/NOTES.md, v2, v4, v7, v8 and v10): a 64-row tile with
    128-key steps and 4 warps beats every 128-row or 8-warp variant at D=64 and D=128, with 4 stages
    at D=64 and 3 at D=128; `_HOPPER` changes the loads, stages, register cap or key step where that
    measured faster, and `_HOPPER_SHORT_REGISTERS` caps the registers of the other short calls.
    D=256 on Hopper: `_HOPPER_D256`. Below sm_90 (Ada's mma.sync), `_MMA_SYNC`'s tiles, which keep
    each row of scores in one warp at D=64 and D=128 (`MMA_SYNC_ARCHS`), with fewer stages for a
    float32 mask (``mask_itemsize`` 4) where its tiles would not fit.
    Triton's automatic warp specialisation crashed its 3.6 compiler or changed nothing; experimental
    Gluon kernels were slower everywhere: QK overlapping the softmax in a 64-row tile by 2-33% (v7),
    FA3's layout (two consumer warpgroups of 64 rows sharing a TMA ring fed by a producer warp) by
    2-21% (v12; both kernels are in git history).
    """
    if any(capability in archs for archs in MMA_SYNC_ARCHS):
        config = _MMA_SYNC[padded_dim]
        if mask_itemsize == 4 and config.block_m == 128:
            config = config._replace(num_stages=_MMA_SYNC_4_BYTE_MASK_STAGES)
        return config
    if padded_dim == 256:
        return _HOPPER_D256
    default = LaunchConfig(64, 128, 4, 4 if padded_dim == 64 else 3)
    row = _HOPPER.get((padded_dim, pv_mode, is_causal),
                      HopperRow(TMA_MIN_KEYS, False, default.num_stages, None))
    if seq_k >= row.min_keys:
        return default._replace(keys=row.keys, tma=row.tma, num_stages=row.num_stages,
                                max_registers=row.max_registers)
    return default._replace(max_registers=_HOPPER_SHORT_REGISTERS.get((padded_dim, pv_mode)))


def _tma_addressable(*payloads) -> bool:
    """TMA reads the payloads as 2-D row-major tensors from 16-byte aligned addresses, with int32
    row coordinates (payloads packed by a caller of `attention_from_payloads` may be neither)."""
    return all(p.is_contiguous() and p.data_ptr() % 16 == 0 and p.numel() // p.shape[-1] < 2 ** 31
               for p in payloads)


def _tile_map(packed: PackedBatch, block_m: int, is_causal: bool) -> torch.Tensor:
    """The attention grid of a packed batch: every entry's tiles of ``block_m`` query rows, the ones
    that see the most keys first (the tail of a grid is its longest programs)."""
    def keys_seen(entry, tile):
        keys = packed.k_lens[entry]
        if not is_causal:
            return keys
        rows = np.minimum((tile + 1) * block_m, packed.q_lens[entry])  # the tile's last row + 1
        return np.clip(rows + keys - packed.q_lens[entry], 0, keys)  # bottom-right: row t sees j <= t + Sk - Sq

    return packed.tile_map(-(-packed.q_lens // block_m), work=keys_seen)


def v_in_kernel_order(v_fp8: torch.Tensor) -> torch.Tensor:
    """A V payload in natural token order (SPEC §4) rewritten in the kernel's
    (`groups.v_kernel_token`), as `quant.quantize_qkv` writes it with ``v_kernel_order``."""
    natural = v_fp8.view(torch.uint8)
    return natural[..., groups.v_kernel_token(torch.arange(natural.shape[-1], device=natural.device))].view(v_fp8.dtype)


def attention_from_payloads(q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, *,
                            params: SageParams, seq_q: int, seq_k: int, head_dim: int,
                            out_dtype: torch.dtype, q=None, km=None, return_lse: bool = False,
                            out=None, attn_mask=None, launch: LaunchConfig | None = None,
                            v_kernel_order: bool = False, packed: PackedBatch | None = None):
    """Attention from the payloads; the signature of `sageflash.reference.attention_from_payloads`.

    ``v_fp8`` in natural token order is first copied into the kernel's (`v_in_kernel_order`);
    ``v_kernel_order`` says it already is (`quant.quantize_qkv`'s ``v_kernel_order``).
    ``launch`` replaces `launch_config`'s choice (benchmarks/sweep_attention.py compares them).
    ``attn_mask`` is read in place through broadcast strides (0 on the broadcast dims; a bool
    mask as its bytes), with the semantics of the reference.
    ``packed``: the payloads (and ``q`` and ``out``) are a packed batch's (`sequences.PackedBatch`,
    `quant.quantize_qkv`'s), ``[1, H, T, D]`` with ``seq_q`` and ``seq_k`` its token counts and no
    ``attn_mask``; the LSE is then ``[Hq, T]``.
    """
    batch, q_heads = q_int8.shape[:2]
    kv_heads, padded = k_int8.shape[1], k_int8.shape[-1]
    if packed is not None and attn_mask is not None:
        raise ValueError("attn_mask: a packed batch takes none (its packing is its mask)")
    longest_k = seq_k if packed is None else packed.max_k
    if packed is None:  # a packed batch's entries are on no grid axis of their own (`sequences.program`)
        check_grid_batch(batch)
    if not v_kernel_order:
        v_fp8 = v_in_kernel_order(v_fp8)
    if out is None:
        out = torch.empty(*q_int8.shape[:2], seq_q, head_dim, dtype=out_dtype, device=q_int8.device)
    lse = out
    if return_lse:
        lse = torch.empty(*q_int8.shape[:2] if packed is None else (q_heads,), seq_q, dtype=torch.float32,
                          device=q_int8.device)
    arch = device_capability(q_int8.device)
    config = launch or launch_config(padded, arch, params.pv_accum.code, params.is_causal, longest_k,
                                     0 if attn_mask is None else attn_mask.element_size())
    if params.pv_accum is PVAccum.FP32 and arch // 10 == 9 and longest_k > LONG_FP32_KEYS:  # Hopper
        warn_once(("fp32-accumulator",), "pv_accum='fp32' sums P·V in Hopper's reduced-precision fp8 "
                  "tensor-core accumulator and drifts on long rows (NMSE against exact attention, H200: "
                  "0.013 at 16k keys, 0.04 at 32k; fp32+fp32: 3e-6, a few percent slower): prefer "
                  "'fp32+fp32' or 'fp32+fp16'; this warning shows past %d keys", LONG_FP32_KEYS)
    mask = out if attn_mask is None else attn_mask.expand(batch, q_heads, seq_q, seq_k)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    k_src, v_src = k_int8, v_fp8
    if config.tma and not _tma_addressable(k_int8, v_fp8):
        config = config._replace(tma=False)
    if config.tma:
        k_src = TensorDescriptor.from_tensor(k_int8.view(-1, padded), [config.keys, padded])
        v_src = TensorDescriptor.from_tensor(v_fp8.view(-1, v_fp8.shape[-1]), [padded, BLOCK_N.value])
    grid, table, tiles = (groups.cdiv(seq_q, config.block_m), q_heads, batch), out, out
    if packed is not None:
        table, tiles = packed.table, _tile_map(packed, config.block_m, params.is_causal)
        grid = (tiles.shape[0], q_heads, 1)
    pdl = dependent_launch(q_int8.device)  # the kernel waits before its first load
    launcher = _launch_attention_one_key if seq_k == 1 else _launch_attention
    launcher(
        grid, q_int8, q_scale, k_src, k_scale, v_src, v_scale, v_mean if v_mean is not None else v_scale,
        out, lse, mask, table, tiles, seq_q, seq_k, groups.causal_offset(seq_q, seq_k),
        params.softmax_scale * groups.LOG2E, head_dim, q_heads // kv_heads, q_heads, kv_heads,
        q_scale.shape[-1], k_scale.shape[-1],
        q_int8.stride(0), q_int8.stride(1), q_int8.stride(2),
        k_int8.stride(0), k_int8.stride(1), k_int8.stride(2),
        v_fp8.stride(0), v_fp8.stride(1), v_fp8.stride(2),
        out.stride(0), out.stride(1), out.stride(2), *mask.stride(),
        D=padded, BLOCK_M=config.block_m, KEYS=config.keys,
        PER_THREAD=params.granularity is QKGranularity.PER_THREAD, IS_CAUSAL=params.is_causal,
        PV_MODE=params.pv_accum.code, SMOOTH_V=v_mean is not None, WRITE_LSE=return_lse,
        HAS_MASK=attn_mask is not None, MASK_BOOL=mask.dtype == torch.uint8, USE_TMA=config.tma,
        VARLEN=packed is not None, PDL=pdl,
        PTX_CAST=e4m3_cast_in_ptx(q_int8.device),
        num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers,
        launch_pdl=pdl)
    if not return_lse:
        return out
    if q is not None and km is not None:  # undo smooth_k's shift of every logit by q·km
        add_smooth_k_term(lse, q, km, params.softmax_scale, packed=packed)
    return out, lse
