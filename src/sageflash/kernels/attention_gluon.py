"""Experimental Hopper attention kernel in Gluon: the QK of the next key block runs on the tensor
cores while the current block's softmax runs (what `tl.dot` never overlaps, benchmarks/NOTES.md
v4 and v6). Same payloads and semantics (SPEC §5–7) as `attention._attention_kernel`; sm_90 only,
no attn_mask, head dims 64 and 128. Not chosen by `launch_config`: ``LaunchConfig(gluon=True)``
(`benchmarks/sweep_attention.py`'s "gluon") runs it. Gluon has no interpreter, so it is tested
on the GPU against the Triton kernel, and offline (CI) for what ptxas makes of its pipeline.

Per program: one 64-row tile of one (batch, head); K and V 64-key blocks through a two-stage TMA
ring. Full blocks go in pairs with two S register sets (A, B): while block j's softmax runs, QK of
block j+1 is in flight into the other set, so no instruction touches an in-flight accumulator
(ptxas would serialize every wgmma, C7514/C7515). The last full block when their number is odd,
the causal diagonal and the tail run one at a time, masked, without overlap.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .. import groups

BLOCK_M = gl.constexpr(64)  # query rows per program: one warpgroup
BLOCK_N = gl.constexpr(groups.K_TILE)  # keys per QK wgmma and per softmax block (SPEC §5)
FP8_OFFSET_LOG2 = gl.constexpr(groups.FP8_OFFSET_LOG2)
NUM_WARPS = 4
HEAD_DIMS = (64, 128)


# The plain-arithmetic group rules of `sageflash.groups`, as Gluon functions.
q_group = gluon.jit(groups.q_group)
k_group = gluon.jit(groups.k_group)


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, bars, block, k_row, v_row):
    """TMA loads of key block ``block`` into ring stage block % 2."""
    stage = block % 2
    mbarrier.expect(bars.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row + block * BLOCK_N, 0], bars.index(stage), k_smem.index(stage))
    tma.async_copy_global_to_shared(v_desc, [v_row, block * BLOCK_N], bars.index(stage), v_smem.index(stage))


@gluon.jit
def _qk(q_smem, k_smem, bars, block, acc):
    """Issue S = q·kᵀ of key block ``block`` (asynchronous) into ``acc``'s registers."""
    stage = block % 2
    mbarrier.wait(bars.index(stage), phase=(block // 2) & 1)
    return warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), acc, use_acc=False, is_async=True)


@gluon.jit
def _softmax_pv(s, block, m_i, l_i, acc, x_scale, rows, ks_base, v_smem, seq_k, causal_offset,
                PER_THREAD: gl.constexpr, PV_MODE: gl.constexpr, MASKED: gl.constexpr,
                IS_CAUSAL: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """SPEC §5 for one 64-key block of int32 scores ``s``, then P·V (synchronous)."""
    cols = block * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    x = s.to(gl.float32) * gl.load(ks_base + k_group(cols, PER_THREAD))[None, :]
    if MASKED:
        visible = (cols < seq_k)[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        x = gl.where(visible, x, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(x, axis=1) * x_scale - FP8_OFFSET_LOG2)
    m_safe = gl.where(m_new == -float("inf"), 0.0, m_new)  # rows with no visible key yet
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(gl.fma(x, x_scale[:, None], -m_safe[:, None]))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    p8 = gl.convert_layout(p.to(gl.float8e4nv), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4))
    alpha = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    v = v_smem.index(block % 2).permute((1, 0))
    if PV_MODE == 0:  # PVAccum.FP32: the tensor cores accumulate into the running O
        acc = warpgroup_mma(p8, v, acc * alpha, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    elif PV_MODE == 1:  # fp32+fp32: a fresh fp32 accumulator per block
        part = warpgroup_mma(p8, v, gl.zeros(acc.shape, gl.float32, o_layout), use_acc=False, is_async=True)
        acc = acc * alpha + warpgroup_mma_wait(0, deps=(part,))
    else:  # fp32+fp16: a fresh fp16 accumulator per block
        part = warpgroup_mma(p8, v, gl.zeros(acc.shape, gl.float16, o_layout), use_acc=False, is_async=True)
        acc = acc * alpha + warpgroup_mma_wait(0, deps=(part,)).to(gl.float32)
    return m_new, l_i, acc


@gluon.jit
def _gluon_attention_kernel(q_desc, k_desc, v_desc, QS, KS, VS, VM, Out, LSE,
                            seq_q, seq_k, causal_offset, log2_scale, head_dim, kv_group,
                            q_heads, kv_heads, q_groups, k_groups, stride_ob, stride_oh, stride_os,
                            PER_THREAD: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_MODE: gl.constexpr,
                            SMOOTH_V: gl.constexpr, WRITE_LSE: gl.constexpr):
    D: gl.constexpr = q_desc.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile, head, batch = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    if IS_CAUSAL:  # the longest rows first, for a better tail
        tile = gl.num_programs(0) - 1 - tile
    kv_head = head // kv_group
    k_row = (batch * kv_heads + kv_head) * seq_k  # this head's first row in the 2-D payload views
    v_row = (batch * kv_heads + kv_head) * D

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(3):
        mbarrier.init(bars.index(i), count=1)
    mbarrier.expect(bars.index(2), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [(batch * q_heads + head) * seq_q + tile * BLOCK_M, 0], bars.index(2),
                                    q_smem)

    # Key blocks [0, full) are visible to every row of the tile; [full, total) need masks.
    full = seq_k // BLOCK_N
    total = (seq_k + BLOCK_N - 1) // BLOCK_N
    if IS_CAUSAL:
        first_row = tile * BLOCK_M + causal_offset
        full = gl.minimum(full, gl.maximum(first_row + 1, 0) // BLOCK_N)
        total = gl.minimum(total, (gl.minimum(seq_k, gl.maximum(first_row + BLOCK_M, 0)) + BLOCK_N - 1) // BLOCK_N)
    if total > 0:
        _issue_kv(k_desc, v_desc, k_smem, v_smem, bars, 0, k_row, v_row)
    if total > 1:
        _issue_kv(k_desc, v_desc, k_smem, v_smem, bars, 1, k_row, v_row)

    rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
    x_scale = gl.load(QS + (batch * q_heads + head).to(gl.int64) * q_groups + q_group(rows, PER_THREAD)) * log2_scale
    ks_base = KS + (batch * kv_heads + kv_head).to(gl.int64) * k_groups
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    mbarrier.wait(bars.index(2), phase=0)

    # At every block's start its QK is in flight (registers A for even pair blocks and the masked
    # blocks, B for odd ones); the QK issued after the last block repeats the last block (its stage
    # is loaded) and is only waited for. A QK never writes registers a softmax still reads.
    pairs = full // 2
    last = gl.maximum(total - 1, 0)
    s_b = warpgroup_mma_init(gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout))
    if total > 0:
        s_a = _qk(q_smem, k_smem, bars, 0, gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout))
        for pair in range(pairs):  # blocks 2·pair (A) and 2·pair + 1 (B), unmasked
            block = 2 * pair
            s = warpgroup_mma_wait(0, deps=(s_a,))
            s_b = _qk(q_smem, k_smem, bars, block + 1, s_b)
            m_i, l_i, acc = _softmax_pv(s, block, m_i, l_i, acc, x_scale, rows, ks_base, v_smem, seq_k,
                                        causal_offset, PER_THREAD, PV_MODE, False, IS_CAUSAL, s_layout, o_layout)
            if block + 2 < total:
                _issue_kv(k_desc, v_desc, k_smem, v_smem, bars, block + 2, k_row, v_row)
            s = warpgroup_mma_wait(0, deps=(s_b,))
            s_a = _qk(q_smem, k_smem, bars, gl.minimum(block + 2, last), s_a)
            m_i, l_i, acc = _softmax_pv(s, block + 1, m_i, l_i, acc, x_scale, rows, ks_base, v_smem, seq_k,
                                        causal_offset, PER_THREAD, PV_MODE, False, IS_CAUSAL, s_layout, o_layout)
            if block + 3 < total:
                _issue_kv(k_desc, v_desc, k_smem, v_smem, bars, block + 3, k_row, v_row)
        for block in range(2 * pairs, total):  # an odd last full block, the causal diagonal, the tail:
            s = warpgroup_mma_wait(0, deps=(s_a,))  # no overlap, the next QK reuses these registers
            m_i, l_i, acc = _softmax_pv(s, block, m_i, l_i, acc, x_scale, rows, ks_base, v_smem, seq_k,
                                        causal_offset, PER_THREAD, PV_MODE, True, IS_CAUSAL, s_layout, o_layout)
            s_a = _qk(q_smem, k_smem, bars, gl.minimum(block + 1, last), s)
            if block + 2 < total:
                _issue_kv(k_desc, v_desc, k_smem, v_smem, bars, block + 2, k_row, v_row)
        warpgroup_mma_wait(0, deps=(s_a,))
    for i in gl.static_range(3):
        mbarrier.invalidate(bars.index(i))

    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    dims = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    out_rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, orow_layout)
    l_o = gl.convert_layout(l_i, orow_layout)
    bh = (batch * kv_heads + kv_head).to(gl.int64) * D
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None] * gl.load(VS + bh + dims)[None, :]
    if SMOOTH_V:
        out += gl.load(VM + bh + dims)[None, :]
    out = gl.where((l_o > 0)[:, None], out, 0.0)  # a row with no visible key gives 0
    gl.store(Out + batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
             + out_rows[:, None].to(gl.int64) * stride_os + dims[None, :],
             out.to(Out.dtype.element_ty), mask=(out_rows < seq_q)[:, None] & (dims < head_dim)[None, :])
    if WRITE_LSE:
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + (batch * q_heads + head).to(gl.int64) * seq_q + rows, lse, mask=rows < seq_q)


def shared_layouts(padded_dim: int) -> dict:
    """The NVMMA shared layouts of the Q, K and V tiles (what the TMA descriptors carry)."""
    return {"q": gl.NVMMASharedLayout.get_default_for([BLOCK_M.value, padded_dim], gl.int8),
            "k": gl.NVMMASharedLayout.get_default_for([BLOCK_N.value, padded_dim], gl.int8),
            "v": gl.NVMMASharedLayout.get_default_for([padded_dim, BLOCK_N.value], gl.float8e4nv)}


def descriptors(q_int8, k_int8, v_fp8) -> tuple:
    """TMA descriptors over the contiguous payloads seen as 2-D row-major tensors."""
    padded = q_int8.shape[-1]
    layouts = shared_layouts(padded)
    return (TensorDescriptor.from_tensor(q_int8.view(-1, padded), [BLOCK_M.value, padded], layouts["q"]),
            TensorDescriptor.from_tensor(k_int8.view(-1, padded), [BLOCK_N.value, padded], layouts["k"]),
            TensorDescriptor.from_tensor(v_fp8.view(-1, v_fp8.shape[-1]), [padded, BLOCK_N.value], layouts["v"]))
