"""Triton quantizers (SPEC §3–4): Q/K -> int8 per token group, V -> fp8 e4m3 per channel.

Same payloads as `sageflash.reference.quant`, in at most three launches whatever is quantized,
with no host synchronisation:

1. statistics: per chunk of tokens of one tensor, K's channel sums (for smooth_k's mean) or V's
   channel max and min (and sum, for smooth_v);
2. reduction: per (batch, kv head), the K mean and V's scales (and mean);
3. quantization: one program per 64-token tile of a Q, K or V head, each input read once.

`quantize_qkv` (what the attention path uses) runs the three for Q, K and V together; a pass with
nothing to do (no smoothing, a given K mean, Q/K only) is skipped. On Hopper the passes after the
first are dependent launches (`launch.dependent_launch`): the reduction's programs start during the
statistics' tail, and the quantization's Q tiles run while the reduction still does, its K and V
tiles loaded before they wait for the reduction's means and scales.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import triton
import triton.language as tl

from .. import groups
from ..params import PVAccum, QKGranularity
from .launch import (Launcher, check_grid_batch, dependent_launch, e4m3_cast_in_ptx, let_next_launch_start,
                     wait_for_earlier_launch)
from .sequences import (KEY_BLOCK, K_LEN, K_PADDED, K_START, Q_LEN, Q_PADDED, Q_START, PackedBatch, entry, field,
                        head_offset, program)



def _jit_rule(rule):
    """``triton.jit`` one of the plain-arithmetic rules of `sageflash.groups`.

    The interpreter insists on seeing ``triton.language`` among a jitted function's globals, so
    the rule is rebound to a copy of its module's globals that has it.
    """
    return triton.jit(types.FunctionType(rule.__code__, {**rule.__globals__, "tl": tl}, rule.__name__))


q_group = _jit_rule(groups.q_group)
k_group = _jit_rule(groups.k_group)
v_kernel_token = _jit_rule(groups.v_kernel_token)

# Kernel constants (constexpr: jitted code may read them; ``.value`` on the host).
TILE_ROWS = tl.constexpr(groups.K_TILE)  # tokens per quantization program: whole Q and K groups
# Q's groups cover whole Q_TILE blocks, padding included: a block is this many quantization tiles
Q_BLOCK_TILES = tl.constexpr(groups.Q_TILE // groups.K_TILE)
V_BLOCK_TILES = tl.constexpr(KEY_BLOCK // groups.K_TILE)  # ... and a packed entry's V (`sequences.KEY_BLOCK`)
V_WINDOW = tl.constexpr(groups.V_WINDOW)
STATS_ROWS = tl.constexpr(128)  # tokens per statistics program (a packed entry's KEY_BLOCK holds whole ones)
REDUCE_CHUNKS = tl.constexpr(32)  # partial statistics folded per step of the reduction
# Warps per program, measured on an H200 over 1k-16k tokens, as the whole pass's time
# (benchmarks/NOTES.md v9): quantization (one [64, D] tile) with 4 warps took 4-9% less than with
# 8 (which won in v4, when a program held a K and a V tile), 2 lost at D=128; statistics (one
# [128, D] tile) with 2 warps took 4-10% less than with 4, 1 and 8 lost.
QUANT_WARPS = 4
STATS_WARPS = 2
_KSUM, _VMAX, _VMIN, _VSUM = (tl.constexpr(i) for i in range(4))  # planes of the statistics buffer
# Q's and K's scale groups in a quantization tile, as `groups.group_shape` views, by per_thread.
_GROUP_SHAPES = {per_thread: tuple(groups.group_shape(rule, TILE_ROWS.value, per_thread)
                                   for rule in (groups.q_group, groups.k_group))
                 for per_thread in (False, True)}
PER_THREAD_SCALE_EPS = tl.constexpr(groups.PER_THREAD_SCALE_EPS)
PER_WARP_AMAX_FLOOR = tl.constexpr(groups.PER_WARP_AMAX_FLOOR)
V_PRESCALE_BELOW = tl.constexpr(groups.V_PRESCALE_BELOW)
V_PRESCALE = tl.constexpr(groups.V_PRESCALE)
_SIGN_BIT = tl.constexpr(-2**31)  # float32 bit patterns, as int32
_HALF_BITS = tl.constexpr(0x3F000000)
_ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2**23, whose float32 bits are _ROUNDER_BITS
_ROUNDER_BITS = tl.constexpr(0x4B400000)


@triton.jit
def _round_half_even(x):
    """int32 nearest to float32 ``x`` (|x| < 2**22), ties to even: x + 1.5·2²³ rounds with the
    FPU's mode and holds the integer in its low mantissa bits (libdevice's rint is not available
    in the interpreter; this also saves the float-to-int conversion)."""
    return (x + _ROUNDER).to(tl.int32, bitcast=True) - _ROUNDER_BITS


@triton.jit
def _per_thread_scale(amax):
    """per_thread's group scale (SPEC §3): max|x| / 127 + 1e-7."""
    return tl.div_rn(amax, 127.0) + PER_THREAD_SCALE_EPS


@triton.jit
def _per_thread_codes(x, scale, reciprocal):
    """per_thread's int32 codes trunc(x/scale + 0.5·sign) of the rows of ``x`` (SPEC §3), for a scale
    per row and its IEEE reciprocal, with x / scale as ``x * reciprocal`` plus one exact-residual
    correction (3 FP32 instructions an element, where the IEEE division takes 12 and two
    corrections, Markstein's guarantee of a correctly rounded quotient, 5). One correction can
    leave the quotient an ulp off, but never its code: checked on an H200 for every input the
    quantizer sees (x any fp16 or bf16 value, the scale `_per_thread_scale` of any 16-bit amax >=
    |x|: 2.07e9 pairs; `tests/kernels/test_triton.py`), where no correction misses 9438 codes."""
    minus_scale = tl.broadcast_to(-scale[:, None], x.shape)  # per row: Triton emits -q as an FADD
    reciprocal = tl.broadcast_to(reciprocal[:, None], x.shape)
    quotient = x * reciprocal
    return _round_half_away(tl.fma(tl.fma(quotient, minus_scale, x), reciprocal, quotient))


@triton.jit
def _round_half_away(x):
    """trunc(x + 0.5·sign(x)) (±0 stay 0): 0.5 takes x's sign bit, no compare-and-select."""
    half = (x.to(tl.int32, bitcast=True) & _SIGN_BIT) | _HALF_BITS
    return (x + half.to(tl.float32, bitcast=True)).to(tl.int32)


@triton.jit
def _per_row(group_values, GROUP_SHAPE: tl.constexpr):
    """``[G1, G2]`` values of a tile's groups as one per row of its `groups.group_shape` view."""
    G1: tl.constexpr = GROUP_SHAPE[0]
    R1: tl.constexpr = GROUP_SHAPE[1]
    G2: tl.constexpr = GROUP_SHAPE[2]
    R2: tl.constexpr = GROUP_SHAPE[3]
    return tl.reshape(tl.broadcast_to(group_values[:, None, :, None], [G1, R1, G2, R2]), [G1 * R1 * G2 * R2])


@triton.jit
def _max_keeping_nan(a, b):
    """A maximum that returns NaN where either operand is NaN (`tl.max`'s drops it): one
    ``FMNMX.NAN``, as `tl.max`'s FMNMX. As a `tl.reduce` combine, the interpreter reduces with
    ``numpy_reduction`` in one call (`interpreter`)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_keeping_nan(a, b):
    """`_max_keeping_nan`'s minimum."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


_max_keeping_nan.numpy_reduction = np.max  # both propagate NaN
_min_keeping_nan.numpy_reduction = np.min


@triton.jit
def _quantize_group_rows(x, real_rows, GROUP_SHAPE: tl.constexpr, PER_THREAD: tl.constexpr):
    """int8 values of float32 rows ``x`` and the scales of their groups; rows not ``real_rows``
    (padding, whose values are not stored) count as zeros in their group's maximum.

    ``GROUP_SHAPE`` (`groups.group_shape`) views the rows as ``[G1, R1, G2, R2]`` with a group per
    (g1, g2): a group's maximum is a reduction over the R axes, mostly inside a thread, and the
    scales come out ``[G1·G2]`` in group order. Rounded exactly as the reference: per_thread's
    codes as from IEEE divisions (`_per_thread_codes`), per_warp's inverse scale
    reciprocal-then-multiply, as in the official quantizers. A NaN in a group makes its scale
    NaN, as the reference's maximum does, so that the attention's output shows it.
    """
    G1: tl.constexpr = GROUP_SHAPE[0]
    R1: tl.constexpr = GROUP_SHAPE[1]
    G2: tl.constexpr = GROUP_SHAPE[2]
    R2: tl.constexpr = GROUP_SHAPE[3]
    row_amax = tl.where(real_rows, tl.reduce(tl.abs(x), 1, _max_keeping_nan), 0.0)
    amax = tl.reduce(tl.reduce(tl.reshape(row_amax, [G1, R1, G2, R2]), 3, _max_keeping_nan), 1,
                     _max_keeping_nan)  # [G1, G2]
    if PER_THREAD:
        scale = _per_thread_scale(amax)
        multiplier = tl.div_rn(1.0, scale)
    else:
        amax = _max_keeping_nan(amax, PER_WARP_AMAX_FLOOR)
        scale = tl.div_rn(amax, 127.0)
        multiplier = tl.div_rn(1.0, amax) * 127.0
    row_multiplier = _per_row(multiplier, GROUP_SHAPE)
    if PER_THREAD:
        values = _per_thread_codes(x, _per_row(scale, GROUP_SHAPE), row_multiplier)
    else:
        values = _round_half_even(x * row_multiplier[:, None])
    # |x| <= amax keeps every code within [-127, 127] (the reference's clamp never binds for
    # finite inputs), so the int8 is the int32's low byte: no clamp (~4 instructions an element).
    return values.to(tl.int8), tl.reshape(scale, [G1 * G2])


@triton.jit
def _tile_offsets(base, head, rows, cols, stride_h, stride_s):
    """Offsets of a ``[rows, cols]`` tile of one head of a batch entry whose first token is at ``base``."""
    return base + head.to(tl.int64) * stride_h + rows[:, None].to(tl.int64) * stride_s + cols[None, :]


@triton.jit
def _quantize_int8_tile(X, KM, X8, XS, batch, x_base, x8_base, xs_base, head, tile, seq, head_dim, num_heads,
                        stride_xh, stride_xs, stride_8h, stride_8s,
                        D: tl.constexpr, IS_KEY: tl.constexpr, PER_THREAD: tl.constexpr,
                        SMOOTH: tl.constexpr, GROUP_SHAPE: tl.constexpr, PDL: tl.constexpr):
    """int8 payload and group scales of TILE_ROWS tokens of one (batch, head) of Q or K, the batch
    entry's first token at ``x_base`` in X and ``x8_base`` in X8 (`sequences.entry`), its head's
    first scale at ``xs_base`` in XS (`sequences.head_offset`)."""
    rows = tile * TILE_ROWS + tl.arange(0, TILE_ROWS)
    cols = tl.arange(0, D)
    in_seq = rows < seq
    x = tl.load(X + _tile_offsets(x_base, head, rows, cols, stride_xh, stride_xs),
                mask=in_seq[:, None] & (cols < head_dim)[None, :], other=0.0)
    xf = x.to(tl.float32)
    if SMOOTH:
        wait_for_earlier_launch(PDL)  # K's mean comes from the reduction
        km = tl.load(KM + (batch * num_heads + head).to(tl.int64) * D + cols).to(tl.float32)
        xf = xf - km[None, :]
        if PER_THREAD:  # per_thread rounds k - km to the input dtype, unless it overflows there
            rounded = xf.to(X.dtype.element_ty).to(tl.float32)  # (reference.quant.centre_keys)
            xf = tl.where(tl.abs(rounded) == float("inf"), xf, rounded)
    if IS_KEY:
        first_group = k_group(tile * TILE_ROWS, PER_THREAD)
    else:
        first_group = q_group(tile * TILE_ROWS, PER_THREAD)
    values, scale = _quantize_group_rows(xf, in_seq, GROUP_SHAPE, PER_THREAD)
    tl.store(X8 + _tile_offsets(x8_base, head, rows, cols, stride_8h, stride_8s), values,
             mask=in_seq[:, None])
    tl.store(XS + xs_base + first_group + tl.arange(0, scale.shape[0]), scale)


@triton.jit
def to_e4m3(x, PTX_CAST: tl.constexpr):
    """float32 ``x`` as fp8 e4m3fn, rounded once to nearest even and saturated to ±448 (SPEC §4).
    With PTX_CAST (`launch.e4m3_cast_in_ptx`: compiled below sm_90) by ``cvt.rn.satfinite.e4m3x2.f32``,
    two values per instruction (the second element in the upper byte), as Hopper's cast compiles."""
    if PTX_CAST:
        return tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,r,r", [x],
                                         dtype=tl.float8e4nv, is_pure=True, pack=2)
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_fp8_tile(V, VMEAN, INV, PRESCALE, V8, batch, v_base, v8_base, head, tile, seq, head_dim,
                       num_heads, stride_vh, stride_vs, stride_8h, stride_8d,
                       D: tl.constexpr, SMOOTH: tl.constexpr, KERNEL_ORDER: tl.constexpr,
                       PDL: tl.constexpr, PTX_CAST: tl.constexpr):
    """fp8 payload of TILE_ROWS tokens of one (batch, head) of V, stored transposed ``[D, tokens]``
    from ``v8_base`` (the batch entry's first token at ``v_base`` in V): the tokens in natural
    order, or with KERNEL_ORDER in the attention kernel's (`groups.v_kernel_token`).

    The tile's rows are loaded in the order they are stored, so its positions are contiguous:
    Triton then stores 16 bytes of a channel per instruction (through a layout change in shared
    memory) where addresses permuted per token gave one byte per store."""
    bh = (batch * num_heads + head).to(tl.int64)
    positions = tile * TILE_ROWS + tl.arange(0, TILE_ROWS)
    rows = v_kernel_token(positions) if KERNEL_ORDER else positions
    cols = tl.arange(0, D)
    valid = (rows < seq)[:, None] & (cols < head_dim)[None, :]
    x = tl.load(V + _tile_offsets(v_base, head, rows, cols, stride_vh, stride_vs),
                mask=valid, other=0.0).to(tl.float32)
    wait_for_earlier_launch(PDL)  # V's scales (and mean) come from the reduction
    if SMOOTH:
        x = x - tl.load(VMEAN + bh * D + cols)[None, :]
    if V.dtype.element_ty == tl.bfloat16:  # fp16 never needs the prescale (`groups.V_PRESCALE_BELOW`)
        x = x * tl.load(PRESCALE + bh * D + cols)[None, :]
    # No clamp: the e4m3 cast saturates to ±448 (`to_e4m3`; the interpreter's cast too).
    y = x * tl.load(INV + bh * D + cols)[None, :]  # channels past head_dim: 0 · 0
    # Tokens past the sequence load as zeros and stay zero under the finite prescale and scale;
    # only smooth_v's mean would move them.
    if SMOOTH:
        y = tl.where(valid, y, 0.0)
    tl.store(V8 + v8_base + head.to(tl.int64) * stride_8h
             + cols[None, :].to(tl.int64) * stride_8d + positions[:, None], to_e4m3(y, PTX_CAST))


@triton.jit
def _max_min(x):
    """Per column of a 16-bit float tile, its maximum and minimum as float32 (exact: a maximum is
    one of the values), NaN where the column holds one (as the reference's, so that V's scale and
    every output of the channel show it). fp16 reduces in fp16, packed two to an instruction;
    `tl.max` would widen every element first, which at [128, 128] over 64 threads also spills.
    Triton's bf16 min/max widen anyway (an integer reduction of the bits measured within 1% of
    it: NOTES v15)."""
    if x.dtype != tl.float16:
        x = x.to(tl.float32)
    return (tl.reduce(x, 0, _max_keeping_nan).to(tl.float32),
            tl.reduce(x, 0, _min_keeping_nan).to(tl.float32))


@triton.jit
def _first_chunk(SEQS, batch, VARLEN: tl.constexpr):
    """A packed batch entry's first chunk in the statistics: its keys padded to whole KEY_BLOCKs
    (`sequences.K_PADDED`) are whole STATS_ROWS chunks."""
    if VARLEN:
        return field(SEQS, batch, K_PADDED) // STATS_ROWS
    return 0


@triton.jit
def _stats_kernel(K, V, STATS, SEQS, TILES, stat_stride, seq, head_dim, kv_heads, n_chunks,
                  stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  D: tl.constexpr, K_SUM: tl.constexpr, V_STATS: tl.constexpr, SMOOTH_V: tl.constexpr,
                  VARLEN: tl.constexpr, PDL: tl.constexpr):
    """Pass 1: channel statistics of STATS_ROWS tokens of one (batch, kv head) of K or V: along
    grid axis 1 the K heads (K_SUM), then the V heads (V_STATS), one tensor per program.

    ``STATS`` holds four ``[B, Hk, n_chunks, D]`` float32 planes ``stat_stride`` apart: K's sum,
    V's max, min and (SMOOTH_V) sum (`_KSUM`, `_VMAX`, `_VMIN`, `_VSUM`); a channel past
    ``head_dim`` loads as zeros, so its statistics are 0 and its V scale 0, as the reference's.
    With VARLEN (`sequences`) the programs are a tile map's, a batch entry has its own length,
    and the planes are packed ``[Hk, n_chunks, D]``: an entry's chunks from slot `_first_chunk`.
    """
    let_next_launch_start(PDL)
    chunk, batch = program(TILES, VARLEN)
    head = tl.program_id(1)
    k_base, seq = entry(SEQS, batch, K_START, seq, stride_kb, stride_ks, VARLEN)
    v_base, _ = entry(SEQS, batch, K_START, seq, stride_vb, stride_vs, VARLEN)
    first_v = kv_heads if K_SUM else 0
    is_key = head < first_v
    if not is_key:
        head -= first_v
    rows = chunk * STATS_ROWS + tl.arange(0, STATS_ROWS)
    cols = tl.arange(0, D)
    in_seq = rows < seq
    in_head = cols < head_dim
    first_chunk = head_offset(batch, head, kv_heads, n_chunks, _first_chunk(SEQS, batch, VARLEN), VARLEN)
    out = (first_chunk + chunk) * D + cols
    plane = stat_stride.to(tl.int64)
    # As a dependent launch (a chained chunk's) the stores wait: STATS may reuse memory the attention
    # kernel before still reads.
    if is_key:
        k = tl.load(K + _tile_offsets(k_base, head, rows, cols, stride_kh, stride_ks),
                    mask=in_seq[:, None] & in_head[None, :], other=0.0)
        k_sum = tl.sum(k.to(tl.float32), axis=0)
        wait_for_earlier_launch(PDL)
        tl.store(STATS + _KSUM * plane + out, k_sum)
    elif V_STATS:
        # Rows past the sequence repeat its last token, which moves no maximum or minimum: no
        # select per element. With `_max_min` in fp16 a V program takes 832 instructions and 153
        # registers where float32 with selects took 2368 and 255 plus spills (sm_90, D=128).
        v = tl.load(V + _tile_offsets(v_base, head, tl.minimum(rows, seq - 1), cols, stride_vh, stride_vs),
                    mask=in_head[None, :], other=0.0)
        v_max, v_min = _max_min(v)
        if SMOOTH_V:
            v_sum = tl.sum(tl.where(in_seq[:, None], v.to(tl.float32), 0.0), axis=0)
        wait_for_earlier_launch(PDL)
        tl.store(STATS + _VMAX * plane + out, v_max)
        tl.store(STATS + _VMIN * plane + out, v_min)
        if SMOOTH_V:
            tl.store(STATS + _VSUM * plane + out, v_sum)


@triton.jit
def _reduce_kernel(STATS, SEQS, stat_stride, KM, VSCALE, VMEAN, INV, PRESCALE, n_chunks, key_count, window,
                   scale_max, kv_heads,
                   D: tl.constexpr, K_SUM: tl.constexpr, V_STATS: tl.constexpr,
                   PAD_IN_WINDOW: tl.constexpr, SMOOTH_V: tl.constexpr, VARLEN: tl.constexpr,
                   PDL: tl.constexpr):
    """Pass 2, per (batch, kv head): K's mean in K's dtype; v_scale, v_mean, and scale_max / amax as
    a prescale and an inverse scale (`groups.V_PRESCALE_BELOW`). With VARLEN the key count, the
    window and the chunks are the batch entry's (`sequences`); an entry without keys gets K mean 0
    (its queries see no key)."""
    wait_for_earlier_launch(PDL)
    let_next_launch_start(PDL)  # after the wait: the quantization's Q tiles do not wait
    bh = tl.program_id(0).to(tl.int64)
    chunks_here = n_chunks
    first_chunk = bh * n_chunks
    if VARLEN:
        batch, head = bh // kv_heads, bh % kv_heads
        first_chunk = head_offset(batch, head, kv_heads, n_chunks, _first_chunk(SEQS, batch, VARLEN), VARLEN)
        length = field(SEQS, batch, K_LEN)
        chunks_here = tl.cdiv(length, STATS_ROWS)
        key_count = length.to(tl.float32)
        window = (tl.cdiv(length, V_WINDOW) * V_WINDOW).to(tl.float32)
    cols = tl.arange(0, D)
    chunks = tl.arange(0, REDUCE_CHUNKS)
    plane = stat_stride.to(tl.int64)
    ksum = tl.zeros([D], tl.float32)
    vmax = tl.full([D], -float("inf"), tl.float32)
    vmin = tl.full([D], float("inf"), tl.float32)
    vsum = tl.zeros([D], tl.float32)
    for first in range(0, chunks_here, REDUCE_CHUNKS):
        at = (first_chunk + first + chunks[:, None]) * D + cols[None, :]
        present = (first + chunks < chunks_here)[:, None]
        if K_SUM:
            ksum += tl.sum(tl.load(STATS + _KSUM * plane + at, mask=present, other=0.0), axis=0)
        if V_STATS:
            vmax = _max_keeping_nan(vmax, tl.reduce(tl.load(STATS + _VMAX * plane + at, mask=present,
                                                            other=-float("inf")), 0, _max_keeping_nan))
            vmin = _min_keeping_nan(vmin, tl.reduce(tl.load(STATS + _VMIN * plane + at, mask=present,
                                                            other=float("inf")), 0, _min_keeping_nan))
            if SMOOTH_V:  # the statistics store V's sums for smooth_v only
                vsum += tl.sum(tl.load(STATS + _VSUM * plane + at, mask=present, other=0.0), axis=0)
    if K_SUM:
        divisor = key_count
        if VARLEN:  # an entry without keys: 0 / 1
            divisor = tl.maximum(key_count, 1.0)
        tl.store(KM + bh * D + cols, tl.div_rn(ksum, divisor).to(KM.dtype.element_ty))
    if V_STATS:
        if VARLEN:  # the ceil_16(Sk) window holds zero tokens too
            vmax = tl.where(window > key_count, _max_keeping_nan(vmax, 0.0), vmax)
            vmin = tl.where(window > key_count, _min_keeping_nan(vmin, 0.0), vmin)
        elif PAD_IN_WINDOW:
            vmax = _max_keeping_nan(vmax, 0.0)
            vmin = _min_keeping_nan(vmin, 0.0)
        if SMOOTH_V:
            mean = tl.div_rn(vsum, window)
            amax = _max_keeping_nan(tl.abs(vmax - mean), tl.abs(vmin - mean))
            tl.store(VMEAN + bh * D + cols, mean)
        else:
            amax = _max_keeping_nan(tl.abs(vmax), tl.abs(vmin))
        tl.store(VSCALE + bh * D + cols, tl.div_rn(amax, scale_max))
        # An all-zero channel has amax 0: scale 0 and payload 0 (the official code gives NaN here).
        prescale = tl.where(amax < V_PRESCALE_BELOW, V_PRESCALE, 1.0)
        tl.store(PRESCALE + bh * D + cols, prescale)
        tl.store(INV + bh * D + cols,
                 tl.where(amax > 0, tl.div_rn(1.0, tl.where(amax > 0, amax * prescale, 1.0)) * scale_max, 0.0))


@triton.jit
def _quantize_kernel(Q, K, V, KM, Q8, QS, K8, KS, VMEAN, INV, PRESCALE, V8, SEQS, TILES,
                     seq_q, seq_k, head_dim, q_heads, kv_heads, q_tiles, q_groups, k_groups,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_q8b, stride_q8h, stride_q8s,
                     stride_k8b, stride_k8h, stride_k8s, stride_v8b, stride_v8h, stride_v8d,
                     D: tl.constexpr, PER_THREAD: tl.constexpr, DO_Q: tl.constexpr,
                     DO_K: tl.constexpr, DO_V: tl.constexpr, SMOOTH_K: tl.constexpr,
                     SMOOTH_V: tl.constexpr, Q_GROUP_SHAPE: tl.constexpr, K_GROUP_SHAPE: tl.constexpr,
                     V_KERNEL_ORDER: tl.constexpr, VARLEN: tl.constexpr, PDL: tl.constexpr,
                     PTX_CAST: tl.constexpr):
    """Pass 3: one tile per program; along grid axis 1 the Q heads (DO_Q), then the K heads (DO_K),
    then the V heads (DO_V), so a program holds one tensor's tile (fewer registers, more programs
    in flight). Q's tiles need nothing from the passes before; K's and V's wait for them (PDL).
    With VARLEN the programs are a tile map's and each batch entry has its own lengths
    (`sequences`); V's payload then starts each entry at its table's K_PADDED column,
    ``stride_v8b`` unread."""
    let_next_launch_start(PDL)
    tile, batch = program(TILES, VARLEN)
    head = tl.program_id(1)
    first_k = q_heads if DO_Q else 0
    first_v = first_k + (kv_heads if DO_K else 0)
    if head < first_k:
        if VARLEN:  # padding groups get scales too (`quantize_qkv`)
            seq_q = field(SEQS, batch, Q_LEN)
            q_tiles = tl.cdiv(seq_q, Q_BLOCK_TILES * TILE_ROWS) * Q_BLOCK_TILES
        if tile < q_tiles:
            q_base, _ = entry(SEQS, batch, Q_START, seq_q, stride_qb, stride_qs, VARLEN)
            q8_base, _ = entry(SEQS, batch, Q_START, seq_q, stride_q8b, stride_q8s, VARLEN)
            first_group = q_group(field(SEQS, batch, Q_PADDED), PER_THREAD) if VARLEN else 0
            qs_base = head_offset(batch, head, q_heads, q_groups, first_group, VARLEN)
            _quantize_int8_tile(Q, KM, Q8, QS, batch, q_base, q8_base, qs_base, head, tile, seq_q, head_dim,
                                q_heads, stride_qh, stride_qs, stride_q8h, stride_q8s,
                                D, False, PER_THREAD, False, Q_GROUP_SHAPE, PDL)
    else:
        last_tile = seq_k
        if VARLEN:  # V's padding to whole KEY_BLOCKs is written too (`sequences.KEY_BLOCK`)
            seq_k = field(SEQS, batch, K_LEN)
            last_tile = tl.where(head < first_v, seq_k, tl.cdiv(seq_k, V_BLOCK_TILES * TILE_ROWS) * V_BLOCK_TILES
                                 * TILE_ROWS)
        if tile * TILE_ROWS < last_tile:
            if head < first_v:
                k_base, _ = entry(SEQS, batch, K_START, seq_k, stride_kb, stride_ks, VARLEN)
                k8_base, _ = entry(SEQS, batch, K_START, seq_k, stride_k8b, stride_k8s, VARLEN)
                first_group = k_group(field(SEQS, batch, K_PADDED), PER_THREAD) if VARLEN else 0
                ks_base = head_offset(batch, head - first_k, kv_heads, k_groups, first_group, VARLEN)
                _quantize_int8_tile(K, KM, K8, KS, batch, k_base, k8_base, ks_base, head - first_k, tile, seq_k,
                                    head_dim, kv_heads, stride_kh, stride_ks, stride_k8h, stride_k8s,
                                    D, True, PER_THREAD, SMOOTH_K, K_GROUP_SHAPE, PDL)
            else:
                v_base, _ = entry(SEQS, batch, K_START, seq_k, stride_vb, stride_vs, VARLEN)
                if VARLEN:  # whole 64-key blocks (told to the compiler: 16-byte stores)
                    v8_base = tl.multiple_of(field(SEQS, batch, K_PADDED).to(tl.int64), TILE_ROWS)
                else:
                    v8_base = batch.to(tl.int64) * stride_v8b
                _quantize_fp8_tile(V, VMEAN, INV, PRESCALE, V8, batch, v_base, v8_base, head - first_v, tile,
                                   seq_k, head_dim, kv_heads, stride_vh, stride_vs, stride_v8h, stride_v8d,
                                   D, SMOOTH_V, V_KERNEL_ORDER, PDL, PTX_CAST)


_launch_stats = Launcher(_stats_kernel)
_launch_reduce = Launcher(_reduce_kernel)
_launch_quantize = Launcher(_quantize_kernel)


def _strides(x):
    return x.stride()[:3]


def quantize_qkv(q, k, v, *, granularity, smooth_k: bool, km=None, pv_accum=None,
                 smooth_v: bool = False, q_int8=None, v_kernel_order: bool = False, chained: bool = False,
                 packed: PackedBatch | None = None):
    """Any of Q, K (int8) and V (fp8) in at most three launches; None for a tensor not asked for.

    Returns ``(q_int8, q_scale, k_int8, k_scale, km, v_fp8, v_scale, v_mean)``: the payloads of
    `sageflash.reference.quantize_qk` / `quantize_v` (q and k go together, v may be None), V's
    tokens in the attention kernel's order with ``v_kernel_order`` (`groups.v_kernel_token`).
    ``q_int8``: where to write Q's payload (an int8 ``[B, Hq, Sq, D]`` view with unit last stride,
    e.g. of the output's bytes), else a new tensor.
    ``chained``: the launch before is the attention kernel of the same call (the previous KV-head
    chunk's), so the statistics may start during its tail (`launch.dependent_launch`).
    ``packed``: q, k and v are a packed batch (`sequences.PackedBatch`) seen as ``[1, H, T, D]``;
    the payloads are then ``[1, H, T, D]`` too, V's ``[1, Hk, D, packed.k_padded]``, the scales
    ``[H, n_groups]`` and K's mean and V's scales ``[entries, Hk, D]`` (`sequences`).
    """
    per_thread = QKGranularity.parse(granularity, "granularity") is QKGranularity.PER_THREAD
    batch, kv_heads, seq_k, head_dim = (k if k is not None else v).shape
    tokens_k = seq_k  # the K payload's token axis
    # per entry (batch, [], or a packed batch's [] and its padded token counts): scales and statistics
    lead, q_padded, k_padded = (batch,), None, groups.ceil_to(seq_k, groups.K_TILE)
    if packed is not None:  # its entries are on no grid axis of their own (`sequences.program`)
        batch, seq_k, lead, q_padded, k_padded = packed.entries, packed.max_k, (), packed.q_padded, packed.k_padded
    else:
        check_grid_batch(batch)
    padded = groups.padded_head_dim(head_dim)
    device = (k if k is not None else v).device
    if (q is None) != (k is None):
        raise ValueError("quantize_qkv quantizes q and k together: pass both or neither")
    new = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731

    q8 = q_scale = k8 = k_scale = v8 = v_scale = v_mean = inv = prescale = None
    q_heads = seq_q = q_tiles = 0
    if q is not None:
        q_heads, seq_q = q.shape[1], q.shape[2]
        q8 = new(*q.shape[:3], padded, dtype=torch.int8) if q_int8 is None else q_int8
        if packed is not None:
            seq_q = packed.max_q
        q_scale = new(*lead, q_heads, groups.q_num_groups(q_padded or seq_q, per_thread))
        k8 = new(*k.shape[:2], tokens_k, padded, dtype=torch.int8)
        k_scale = new(*lead, kv_heads, groups.k_num_groups(k_padded, per_thread))
        q_tiles = groups.cdiv(seq_q, groups.Q_TILE) * Q_BLOCK_TILES.value  # padding groups get scales too
        if smooth_k and km is not None:
            km = torch.nn.functional.pad(km[..., :head_dim].to(k.dtype), (0, padded - head_dim)).contiguous()
    k_sum = q is not None and smooth_k and km is None
    if k_sum:
        km = new(batch, kv_heads, padded, dtype=k.dtype)
    if not smooth_k:
        km = None
    if v is not None:
        scale_max = PVAccum.parse(pv_accum, "pv_accum").v_scale_max
        v8 = new(v.shape[0], kv_heads, padded, k_padded, dtype=torch.float8_e4m3fn)
        v_scale = new(batch, kv_heads, padded)
        inv, prescale = new(2, batch, kv_heads, padded).unbind(0)
        v_mean = new(batch, kv_heads, padded) if smooth_v else None

    stand_in = k if k is not None else v  # the pointer argument of a tensor a pass does not use
    arg = lambda x: stand_in if x is None else x  # noqa: E731
    table = stand_in if packed is None else packed.table
    pdl = dependent_launch(device)
    with_stats = k_sum or v is not None
    if with_stats:  # passes 1 and 2; the first launch of a call is a dependent one only when chained
        n_chunks = groups.cdiv(seq_k, STATS_ROWS.value)  # per entry (a packed batch's longest)
        slots = n_chunks if packed is None else k_padded // STATS_ROWS.value  # a packed batch's (`_first_chunk`)
        stats = new(4, *lead, kv_heads, slots, padded)
        window = groups.ceil_to(seq_k, groups.V_WINDOW)
        k_in = k if k_sum else None
        grid, tiles = (n_chunks, 1, batch), stand_in
        if packed is not None:  # an entry's chunks only
            tiles = packed.tile_map(-(-packed.k_lens // STATS_ROWS.value))
            grid = (tiles.shape[0], 1, 1)
        _launch_stats(
            (grid[0], kv_heads * (k_sum + (v is not None)), grid[2]), arg(k_in), arg(v), stats, table, tiles,
            stats.stride(0), seq_k, head_dim, kv_heads, slots, *_strides(arg(k_in)), *_strides(arg(v)),
            D=padded, K_SUM=k_sum, V_STATS=v is not None, SMOOTH_V=smooth_v, VARLEN=packed is not None, PDL=pdl,
            num_warps=STATS_WARPS, launch_pdl=pdl and chained)
        _launch_reduce(
            (batch * kv_heads, 1, 1), stats, table, stats.stride(0), arg(km if k_sum else None),
            arg(v_scale), arg(v_mean), arg(inv), arg(prescale), slots, float(seq_k), float(window),
            scale_max if v is not None else 1.0, kv_heads, D=padded,
            K_SUM=k_sum, V_STATS=v is not None, PAD_IN_WINDOW=window > seq_k, SMOOTH_V=smooth_v,
            VARLEN=packed is not None, PDL=pdl, launch_pdl=pdl)

    heads = q_heads + (kv_heads if q is not None else 0) + (kv_heads if v is not None else 0)
    grid, tiles = (max(q_tiles, groups.cdiv(seq_k, TILE_ROWS.value)), heads, batch), stand_in
    if packed is not None:  # an entry's Q, K and V tiles only
        q_counts = -(-packed.q_lens // groups.Q_TILE) * Q_BLOCK_TILES.value if q is not None else 0
        tiles = packed.tile_map(np.maximum(q_counts, -(-packed.k_lens // KEY_BLOCK) * V_BLOCK_TILES.value))
        grid = (tiles.shape[0], heads, 1)
    _launch_quantize(
        grid, arg(q), arg(k), arg(v), arg(km), arg(q8), arg(q_scale), arg(k8), arg(k_scale),
        arg(v_mean), arg(inv), arg(prescale), arg(v8), table, tiles, seq_q, seq_k, head_dim, q_heads, kv_heads, q_tiles,
        q_scale.shape[-1] if q is not None else 0, k_scale.shape[-1] if q is not None else 0,
        *_strides(arg(q)), *_strides(arg(k)), *_strides(arg(v)), *_strides(arg(q8)),
        *_strides(arg(k8)), *_strides(arg(v8)),
        D=padded, PER_THREAD=per_thread, DO_Q=q is not None, DO_K=q is not None,
        DO_V=v is not None, SMOOTH_K=km is not None, SMOOTH_V=smooth_v,
        Q_GROUP_SHAPE=_GROUP_SHAPES[per_thread][0], K_GROUP_SHAPE=_GROUP_SHAPES[per_thread][1],
        V_KERNEL_ORDER=v_kernel_order, VARLEN=packed is not None, PDL=pdl, PTX_CAST=e4m3_cast_in_ptx(device),
        num_warps=QUANT_WARPS, launch_pdl=pdl and with_stats,
        enable_fp_fusion=False)  # per_warp rounds x·(127/amax) as the reference does, not by an FMA
    return q8, q_scale, k8, k_scale, km, v8, v_scale, v_mean


def quantize_qk(q, k, *, granularity, smooth_k: bool, km=None):
    """``(q_int8, q_scale, k_int8, k_scale, km)``, the payloads of `sageflash.reference.quantize_qk`."""
    return quantize_qkv(q, k, None, granularity=granularity, smooth_k=smooth_k, km=km)[:5]


def quantize_v(v, *, pv_accum, smooth_v: bool):
    """``(v_fp8 [B,Hk,D,ceil64(Sk)], v_scale, v_mean)``, the payloads of `sageflash.reference.quantize_v`."""
    return quantize_qkv(None, None, v, granularity="per_thread", smooth_k=False, pv_accum=pv_accum,
                        smooth_v=smooth_v)[5:]
