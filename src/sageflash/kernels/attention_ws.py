"""Warp-specialised Hopper attention kernel in Gluon (sm_90): FA3's structure on SPEC §5–7.

Per program a 128-row query tile of one (batch, head), in three partitions: a producer warp that
streams K and V 64-key blocks through a TMA ring, and two consumer warpgroups of 64 rows each that
share every K/V block (half the shared-memory traffic per row of the 64-row Triton kernel) and run
independently, so one's softmax overlaps the other's tensor-core work. Within a consumer, the Q·Kᵀ
of block b+1 is in flight while block b's softmax runs. Same payloads and numbers as
`attention._attention_kernel` (the same per-64-key running max, P rounding and pv_accum modes);
no attn_mask, head dims 64 and 128. Gluon has no interpreter: it is tested on the GPU against the
Triton kernel, and compiled offline (CI) for what ptxas makes of it.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .. import groups
from .launch import Launcher

BLOCK_M = gl.constexpr(64)  # query rows per consumer warpgroup
CONSUMERS = gl.constexpr(2)
TILE_M = gl.constexpr(BLOCK_M.value * CONSUMERS.value)  # query rows per program
BLOCK_N = gl.constexpr(groups.K_TILE)  # keys per softmax block (SPEC §5)
STAGE_KEYS = gl.constexpr(2 * groups.K_TILE)  # keys per ring stage and per QK wgmma (N=128 runs the tensor cores
# better than N=64: 0.79-0.97x against 0.90-1.09x of cuDNN at D=128, H200)
FP8_OFFSET_LOG2 = gl.constexpr(groups.FP8_OFFSET_LOG2)
NUM_WARPS = gl.constexpr(4)  # a consumer warpgroup (the default partition is consumer 0)
CONSUMER_REGISTERS = gl.constexpr(224)  # consumer 1's; consumer 0 (the default partition) is given 256
PRODUCER_REGISTERS = gl.constexpr(24)  # the minimum: the producer holds only scalars
QK_AHEAD = False  # see `_qk_ahead`
PV_OVERLAP = False
MAX_REGISTERS = 168  # x 12 warps: the register file; Triton 3.6 gives the default partition 256, so
# consumer 1 (208) + the producer (24) + 256 stay within 3 x 168 (more and TRY_ALLOC never returns)

q_group = gluon.jit(groups.q_group)
k_group = gluon.jit(groups.k_group)


@gluon.jit
def _produce(p, PER_THREAD: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_MODE: gl.constexpr,
             SMOOTH_V: gl.constexpr, WRITE_LSE: gl.constexpr):
    """The producer warp: both consumers' Q tiles, then every key block the tile sees (K as one
    tile, V as one [D, 64] tile per softmax block)."""
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem = p[0], p[1], p[2], p[3], p[4], p[5]
    q_bars, ready, empty, q_row, k_row, v_row, total = p[6], p[7], p[8], p[9], p[10], p[11], p[12]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    for c in gl.static_range(CONSUMERS):
        mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + c * BLOCK_M, 0], q_bars.index(c), q_smem.index(c))
    for block in range(total):
        stage = block % STAGES
        mbarrier.wait(empty.index(stage), ((block // STAGES) & 1) ^ 1)  # both consumers are done with it
        bar = ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + (STAGE_KEYS // BLOCK_N) * v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + block * STAGE_KEYS, 0], bar, k_smem.index(stage))
        for h in gl.static_range(STAGE_KEYS // BLOCK_N):
            tma.async_copy_global_to_shared(v_desc, [v_row, block * STAGE_KEYS + h * BLOCK_N], bar,
                                            v_smem.index(stage * (STAGE_KEYS // BLOCK_N) + h))


@gluon.jit
def _qk(q, k_smem, ready, block, acc):
    """Issue S = q·kᵀ of key block ``block`` into ``acc``'s (dead) registers, asynchronously."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    stage = block % STAGES
    mbarrier.wait(ready.index(stage), (block // STAGES) & 1)
    return warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), acc, use_acc=False, is_async=True)


@gluon.jit
def _halves(x):
    """A [rows, 128] block's two 64-key halves (no data moves)."""
    return gl.split(gl.permute(gl.reshape(x, [x.shape[0], 2, BLOCK_N]), (0, 2, 1)))


@gluon.jit
def _softmax(x, start, m_i, row_scale, rows, ks_base, seq_k, causal_offset, PER_THREAD: gl.constexpr,
             MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """SPEC §5 for the 64-key block from ``start`` with logits ``x`` (the int32 scores as float):
    the new running max, the rescale factor and P (fp32)."""
    cols = start + gl.arange(0, BLOCK_N, gl.SliceLayout(0, x.type.layout))
    if PER_THREAD:  # four K groups per block: scale each score
        x = x * gl.load(ks_base + k_group(cols, PER_THREAD))[None, :]
        x_scale = row_scale
    else:
        x_scale = row_scale * gl.load(ks_base + k_group(start, PER_THREAD))
    if MASKED:
        visible = (cols < seq_k)[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        x = gl.where(visible, x, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(x, axis=1) * x_scale - FP8_OFFSET_LOG2)
    m_safe = gl.where(m_new == -float("inf"), 0.0, m_new)  # rows with no visible key yet
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(gl.fma(x, x_scale[:, None], -m_safe[:, None]))
    return m_new, alpha, p


@gluon.jit
def _pv(p, v, acc, alpha_o, PV_MODE: gl.constexpr, o_layout: gl.constexpr):
    """Issue P·V for one 64-key block (asynchronously): into the running O with pv_accum fp32,
    else as a fresh fp32 or fp16 accumulator."""
    p8 = gl.convert_layout(p.to(gl.float8e4nv), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4))
    if PV_MODE == 0:  # PVAccum.FP32: the tensor cores accumulate
        return warpgroup_mma(p8, v, acc * alpha_o, is_async=True)
    elif PV_MODE == 1:
        return warpgroup_mma(p8, v, gl.zeros(acc.shape, gl.float32, o_layout), use_acc=False, is_async=True)
    else:
        return warpgroup_mma(p8, v, gl.zeros(acc.shape, gl.float16, o_layout), use_acc=False, is_async=True)


@gluon.jit
def _accumulate(part, acc, alpha_o, PV_MODE: gl.constexpr):
    """The running O after a block's (waited) P·V ``part``."""
    if PV_MODE == 0:
        return part
    else:
        return acc * alpha_o + part.to(gl.float32)


@gluon.constexpr_function
def _qk_ahead(pv_mode):
    """Whether a stage issues the next stage's QK during its softmax. Off: with it (and
    `_pv_overlap`) fp32+fp16 ran 0.78-0.88x of the Triton kernel against 0.85-0.93x without, H200;
    fp32+fp32's fresh fp32 accumulators leave no registers for it (ptxas serialized the wgmmas)."""
    return QK_AHEAD and pv_mode != 1


@gluon.constexpr_function
def _pv_overlap(pv_mode):
    """Whether a stage's second softmax block runs while its first P·V is in flight (off, see above)."""
    return PV_OVERLAP


@gluon.jit
def _stage(s, block, last, m_i, l_i, acc, q, k_smem, v_smem, ready, empty, row_scale, rows, ks_base, seq_k,
           causal_offset, PER_THREAD: gl.constexpr, PV_MODE: gl.constexpr, MASKED: gl.constexpr,
           IS_CAUSAL: gl.constexpr, o_layout: gl.constexpr):
    """One 128-key ring stage: one N=128 QK, then SPEC's two 64-key softmax blocks and their P·V.
    With `_qk_ahead` the stage's QK is in flight in ``s`` on entry and the next stage's goes into
    its registers once read (the one issued after the last stage repeats it and is only waited
    for, so no branch merges registers); with `_pv_overlap` the second block's softmax runs while
    the first block's P·V is in flight."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    QK_AHEAD: gl.constexpr = _qk_ahead(PV_MODE)
    PV_OVERLAP: gl.constexpr = _pv_overlap(PV_MODE)
    stage = block % STAGES
    if QK_AHEAD:
        s = warpgroup_mma_wait(0, deps=(s,))
    else:
        s = warpgroup_mma_wait(0, deps=(_qk(q, k_smem, ready, block, s),))
    x0, x1 = _halves(s.to(gl.float32))
    start = block * 2 * BLOCK_N
    m_i, alpha, p = _softmax(x0, start, m_i, row_scale, rows, ks_base, seq_k, causal_offset, PER_THREAD, MASKED,
                             IS_CAUSAL)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    part = _pv(p, v_smem.index(2 * stage).permute((1, 0)), acc, alpha_o, PV_MODE, o_layout)
    if QK_AHEAD:
        s = _qk(q, k_smem, ready, gl.minimum(block + 1, last), s)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    if not PV_OVERLAP:
        part = warpgroup_mma_wait(1 if QK_AHEAD else 0, deps=(part,))
        acc = _accumulate(part, acc, alpha_o, PV_MODE)
    m_i, alpha, p = _softmax(x1, start + BLOCK_N, m_i, row_scale, rows, ks_base, seq_k, causal_offset, PER_THREAD,
                             MASKED, IS_CAUSAL)
    if PV_OVERLAP:
        part = warpgroup_mma_wait(1 if QK_AHEAD else 0, deps=(part,))  # the first P·V (committed before the QK)
        acc = _accumulate(part, acc, alpha_o, PV_MODE)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    part = _pv(p, v_smem.index(2 * stage + 1).permute((1, 0)), acc, alpha_o, PV_MODE, o_layout)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    part = warpgroup_mma_wait(0, deps=(part,))
    mbarrier.arrive(empty.index(stage), count=1)
    return s, m_i, l_i, _accumulate(part, acc, alpha_o, PV_MODE)


@gluon.jit
def _consume(p, WHICH: gl.constexpr, PER_THREAD: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_MODE: gl.constexpr,
             SMOOTH_V: gl.constexpr, WRITE_LSE: gl.constexpr):
    """One consumer warpgroup: rows [WHICH·64, WHICH·64 + 64) of the tile, SPEC §5–7."""
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready, empty, q_row, k_row, v_row, total,
     full, row0, QS, KS, VS, VM, Out, LSE, seq_q, seq_k, causal_offset, log2_scale, head_dim, q_base, qs_base,
     ks_base, vs_base, out_base, stride_os, q_groups) = p
    D: gl.constexpr = q_desc.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, STAGE_KEYS, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 32])
    s = gl.zeros([BLOCK_M, STAGE_KEYS], gl.int32, s_layout)
    row_layout: gl.constexpr = gl.SliceLayout(1, _halves(s.to(gl.float32))[0].type.layout)
    rows = row0 + WHICH * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
    row_scale = gl.load(QS + qs_base + q_group(rows, PER_THREAD)) * log2_scale
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    q = q_smem.index(WHICH)
    ks = KS + ks_base
    mbarrier.wait(q_bars.index(WHICH), 0)
    if total > 0:
        if _qk_ahead(PV_MODE):
            s_ahead = _qk(q, k_smem, ready, 0, s)
        else:
            s_ahead = s
        for block in range(full):
            s_ahead, m_i, l_i, acc = _stage(s_ahead, block, total - 1, m_i, l_i, acc, q, k_smem, v_smem,
                                                   ready, empty, row_scale, rows, ks, seq_k, causal_offset, PER_THREAD,
                                                   PV_MODE, False, IS_CAUSAL, o_layout)
        for block in range(full, total):  # the causal diagonal and the tail, masked
            s_ahead, m_i, l_i, acc = _stage(s_ahead, block, total - 1, m_i, l_i, acc, q, k_smem, v_smem,
                                                   ready, empty, row_scale, rows, ks, seq_k, causal_offset, PER_THREAD,
                                                   PV_MODE, True, IS_CAUSAL, o_layout)
        if _qk_ahead(PV_MODE):
            warpgroup_mma_wait(0, deps=(s_ahead,))

    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    dims = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    out_rows = row0 + WHICH * BLOCK_M + gl.arange(0, BLOCK_M, orow_layout)
    l_o = gl.convert_layout(l_i, orow_layout)
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None] * gl.load(VS + vs_base + dims)[None, :]
    if SMOOTH_V:
        out += gl.load(VM + vs_base + dims)[None, :]
    out = gl.where((l_o > 0)[:, None], out, 0.0)  # a row with no visible key gives 0
    gl.store(Out + out_base + out_rows[:, None].to(gl.int64) * stride_os + dims[None, :],
             out.to(Out.dtype.element_ty), mask=(out_rows < seq_q)[:, None] & (dims < head_dim)[None, :])
    if WRITE_LSE:
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + q_base + rows, lse, mask=rows < seq_q)


@gluon.jit
def _consumer_0(p, PER_THREAD: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_MODE: gl.constexpr,
                SMOOTH_V: gl.constexpr, WRITE_LSE: gl.constexpr):
    _consume(p, 0, PER_THREAD, IS_CAUSAL, PV_MODE, SMOOTH_V, WRITE_LSE)


@gluon.jit
def _consumer_1(p, PER_THREAD: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_MODE: gl.constexpr,
                SMOOTH_V: gl.constexpr, WRITE_LSE: gl.constexpr):
    _consume(p, 1, PER_THREAD, IS_CAUSAL, PV_MODE, SMOOTH_V, WRITE_LSE)


@gluon.jit
def _ws_attention_kernel(q_desc, k_desc, v_desc, QS, KS, VS, VM, Out, LSE,
                         seq_q, seq_k, causal_offset, log2_scale, head_dim, kv_group,
                         q_heads, kv_heads, q_groups, k_groups, stride_ob, stride_oh, stride_os,
                         PER_THREAD: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_MODE: gl.constexpr,
                         SMOOTH_V: gl.constexpr, WRITE_LSE: gl.constexpr, STAGES: gl.constexpr):
    D: gl.constexpr = q_desc.block_type.shape[1]
    tile, head, batch = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    if IS_CAUSAL:  # the longest rows first, for a better tail
        tile = gl.num_programs(0) - 1 - tile
    kv_head = head // kv_group
    row0 = tile * TILE_M
    # Key blocks [0, full) are visible to every row of the tile; [full, total) need masks.
    full = seq_k // STAGE_KEYS
    total = (seq_k + STAGE_KEYS - 1) // STAGE_KEYS
    if IS_CAUSAL:
        first_row = row0 + causal_offset
        full = gl.minimum(full, gl.maximum(first_row + 1, 0) // STAGE_KEYS)
        total = gl.minimum(total, (gl.minimum(seq_k, gl.maximum(first_row + TILE_M, 0)) + STAGE_KEYS - 1) // STAGE_KEYS)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES * (STAGE_KEYS // BLOCK_N)] + v_desc.block_type.shape,
                                       v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(q_bars.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)

    bh_q = batch * q_heads + head
    bh_k = batch * kv_heads + kv_head
    p = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready, empty,
         bh_q * seq_q + row0, bh_k * seq_k, bh_k * D, total,
         full, row0, QS, KS, VS, VM, Out, LSE, seq_q, seq_k, causal_offset, log2_scale, head_dim,
         bh_q.to(gl.int64) * seq_q, bh_q.to(gl.int64) * q_groups, bh_k.to(gl.int64) * k_groups,
         bh_k.to(gl.int64) * D, batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh, stride_os,
         q_groups)
    # Constexprs go to the partitions as constexpr locals in a tuple written in the call: a
    # parameter, or a tuple assigned to a variable first, would turn them into tensors.
    per_thread: gl.constexpr = PER_THREAD
    is_causal: gl.constexpr = IS_CAUSAL
    pv_mode: gl.constexpr = PV_MODE
    smooth_v: gl.constexpr = SMOOTH_V
    write_lse: gl.constexpr = WRITE_LSE
    gl.warp_specialize([(_consumer_0, (p, per_thread, is_causal, pv_mode, smooth_v, write_lse)),
                        (_consumer_1, (p, per_thread, is_causal, pv_mode, smooth_v, write_lse)),
                        (_produce, (p, per_thread, is_causal, pv_mode, smooth_v, write_lse))],
                       [NUM_WARPS, NUM_WARPS], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


def tiles(padded_dim: int) -> dict:
    """The (block shape, NVMMA shared layout) of the Q, K and V tiles a TMA copy moves."""
    shapes = {"q": [BLOCK_M.value, padded_dim], "k": [STAGE_KEYS.value, padded_dim], "v": [padded_dim, BLOCK_N.value]}
    types = {"q": gl.int8, "k": gl.int8, "v": gl.float8e4nv}
    return {name: (shape, gl.NVMMASharedLayout.get_default_for(shape, types[name])) for name, shape in shapes.items()}


def descriptors(q_int8, k_int8, v_fp8) -> tuple:
    """TMA descriptors over the contiguous payloads seen as 2-D row-major tensors."""
    layout = tiles(q_int8.shape[-1])
    return tuple(TensorDescriptor.from_tensor(t.view(-1, t.shape[-1]), *layout[name])
                 for name, t in (("q", q_int8), ("k", k_int8), ("v", v_fp8)))


_launch = Launcher(_ws_attention_kernel)


def attend(q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, out, lse, *, per_thread: bool,
           is_causal: bool, pv_mode: int, softmax_scale: float, seq_q: int, seq_k: int, head_dim: int,
           write_lse: bool, stages: int):
    """Launch the kernel on payloads `attention.attention_from_payloads` has checked (sm_90, head
    dim 64/128, contiguous payloads, no attn_mask)."""
    batch, q_heads = q_int8.shape[:2]
    kv_heads = k_int8.shape[1]
    q_desc, k_desc, v_desc = descriptors(q_int8, k_int8, v_fp8)
    _launch((groups.cdiv(seq_q, TILE_M.value), q_heads, batch),
            q_desc, k_desc, v_desc, q_scale, k_scale, v_scale, v_mean if v_mean is not None else v_scale, out, lse,
            seq_q, seq_k, groups.causal_offset(seq_q, seq_k), softmax_scale * groups.LOG2E, head_dim,
            q_heads // kv_heads, q_heads, kv_heads, q_scale.shape[-1], k_scale.shape[-1],
            out.stride(0), out.stride(1), out.stride(2),
            PER_THREAD=per_thread, IS_CAUSAL=is_causal, PV_MODE=pv_mode, SMOOTH_V=v_mean is not None,
            WRITE_LSE=write_lse, STAGES=stages, num_warps=NUM_WARPS.value, maxnreg=MAX_REGISTERS)
