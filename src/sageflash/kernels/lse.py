"""LSE work in Triton: smooth_k's term, and the merge of partial outputs by their LSEs
(`sageflash.reference.lse` in one pass each).

With smooth_k the kernel's LSE is that of logits shifted by softmax_scale·q·km per row; the term
is added back for a caller who asked for the LSE (`add_smooth_k_term`), reading q once, where
torch made two float32 copies of it. Ring attention merges one partial output per visible shard:
in torch a float32 copy of each part, exponentials, a scaled sum and that term, ≈ 50 bytes of
traffic per output element per part; `merge_attention` reads a tile of rows of the part's
output, of q and of the running float32 accumulator, and writes the accumulator back (or the
caller's output, on the last part): ≈ 12 bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher, check_grid_batch
from .sequences import K_LEN, Q_START, PackedBatch, entry, field, program

LSE_ROWS = 32  # rows per program
LSE_WARPS = 4
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _smooth_k_term(Q, KM, batch, q_base, head, rows, dims, seq, head_dim, q_heads, kv_group, km_dim,
                   softmax_scale, stride_qh, stride_qs):
    """softmax_scale·q·km of ``rows`` of one (batch, query head), in float32 (the batch entry's
    first token at ``q_base`` in Q; ``km`` padded to ``km_dim``, its KV head ``head // kv_group``)."""
    q = tl.load(Q + q_base + head.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=(rows < seq)[:, None] & (dims < head_dim)[None, :], other=0.0)
    km = tl.load(KM + (batch * (q_heads // kv_group) + head // kv_group).to(tl.int64) * km_dim + dims,
                 mask=dims < head_dim, other=0.0)
    return softmax_scale * tl.sum(q.to(tl.float32) * km.to(tl.float32)[None, :], axis=1)


@triton.jit
def _add_smooth_k_kernel(LSE, Q, KM, SEQS, TILES, seq, head_dim, q_heads, kv_group, km_dim, softmax_scale,
                         stride_qb, stride_qh, stride_qs, D: tl.constexpr, ROWS: tl.constexpr,
                         VARLEN: tl.constexpr):
    """``LSE [B, Hq, seq]`` (contiguous) += `_smooth_k_term`, ROWS rows per program; with VARLEN
    a packed batch's ``LSE [Hq, seq]`` (`sequences`: ``seq`` its token count, Q ``[1, Hq, seq, D]``,
    the programs a tile map's)."""
    tile, batch = program(TILES, VARLEN)
    head = tl.program_id(1)
    if VARLEN:
        if field(SEQS, batch, K_LEN) == 0:  # no keys, no K mean: the LSE stays -inf (q may be non-finite)
            return
    rows = tile * ROWS + tl.arange(0, ROWS)
    tokens = seq
    q_base, seq = entry(SEQS, batch, Q_START, seq, stride_qb, stride_qs, VARLEN)
    if VARLEN:
        at = LSE + head.to(tl.int64) * tokens + field(SEQS, batch, Q_START) + rows
    else:
        at = LSE + (batch * q_heads + head).to(tl.int64) * seq + rows
    term = _smooth_k_term(Q, KM, batch, q_base, head, rows, tl.arange(0, D), seq, head_dim, q_heads, kv_group,
                          km_dim, softmax_scale, stride_qh, stride_qs)
    tl.store(at, tl.load(at, mask=rows < seq) + term, mask=rows < seq)


@triton.jit
def _merge_kernel(ACC, ACC_LSE, OUT, LSE, Q, KM, RESULT, seq, head_dim, q_heads, kv_group, km_dim,
                  softmax_scale,
                  stride_ab, stride_ah, stride_as, stride_ob, stride_oh, stride_os,
                  stride_qb, stride_qh, stride_qs, stride_rb, stride_rh, stride_rs,
                  D: tl.constexpr, ROWS: tl.constexpr, FIRST: tl.constexpr, SMOOTH_K: tl.constexpr,
                  TO_RESULT: tl.constexpr):
    """ROWS rows of one (batch, query head): the part's LSE (plus `_smooth_k_term` with SMOOTH_K),
    merged with the running one unless FIRST; the output into ACC, or with TO_RESULT into RESULT
    in its dtype. LSEs are contiguous ``[B, Hq, seq]`` float32."""
    tile, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, D)
    in_rows = rows < seq
    tile_mask = in_rows[:, None] & (dims < head_dim)[None, :]
    lse_at = (batch * q_heads + head).to(tl.int64) * seq + rows
    lse = tl.load(LSE + lse_at, mask=in_rows, other=0.0)
    if SMOOTH_K:
        lse += _smooth_k_term(Q, KM, batch, batch.to(tl.int64) * stride_qb, head, rows, dims, seq, head_dim,
                              q_heads, kv_group, km_dim, softmax_scale, stride_qh, stride_qs)
    part = tl.load(OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                   + rows[:, None].to(tl.int64) * stride_os + dims[None, :], mask=tile_mask, other=0.0)
    acc_at = (batch.to(tl.int64) * stride_ab + head.to(tl.int64) * stride_ah
              + rows[:, None].to(tl.int64) * stride_as + dims[None, :])
    if FIRST:
        merged = lse
        acc = part.to(tl.float32)
    else:
        old = tl.load(ACC_LSE + lse_at, mask=in_rows, other=0.0)
        high = tl.maximum(old, lse)
        high_safe = tl.where(high == -float("inf"), 0.0, high)  # both -inf: the sum below is 0
        total = tl.exp2((old - high_safe) * LOG2E) + tl.exp2((lse - high_safe) * LOG2E)
        merged = high_safe + tl.log2(total) * LN2  # log(0) = -inf where both are -inf
        base = tl.where(merged == -float("inf"), 0.0, merged)
        acc = tl.load(ACC + acc_at, mask=tile_mask, other=0.0) * tl.exp2((old - base) * LOG2E)[:, None] \
            + part.to(tl.float32) * tl.exp2((lse - base) * LOG2E)[:, None]
    tl.store(ACC_LSE + lse_at, merged, mask=in_rows)
    if TO_RESULT:
        tl.store(RESULT + batch.to(tl.int64) * stride_rb + head.to(tl.int64) * stride_rh
                 + rows[:, None].to(tl.int64) * stride_rs + dims[None, :],
                 acc.to(RESULT.dtype.element_ty), mask=tile_mask)
    else:
        tl.store(ACC + acc_at, acc, mask=tile_mask)


_launch_add_smooth_k = Launcher(_add_smooth_k_kernel)
_launch_merge = Launcher(_merge_kernel)


def _check_lse(lse: torch.Tensor, name: str, shape) -> None:
    """The kernels address an LSE as a contiguous float32 ``[B, Hq, S]``."""
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(shape) or not lse.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 tensor of shape {list(shape)}, got "
                         f"{lse.dtype} {list(lse.shape)} with strides {lse.stride()}")


def merge_attention(acc: torch.Tensor | None, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                    q: torch.Tensor | None = None, km: torch.Tensor | None = None, softmax_scale: float = 1.0,
                    first: bool, result: torch.Tensor | None = None) -> None:
    """`sageflash.reference.lse.merge_attention` in one launch, with the same arguments (``acc_lse``,
    ``lse`` and ``km`` contiguous; the others any strides with a unit last one)."""
    batch, q_heads, seq, head_dim = out.shape
    check_grid_batch(batch)
    _check_lse(acc_lse, "acc_lse", out.shape[:3])
    _check_lse(lse, "lse", out.shape[:3])
    target = acc if result is None else result
    acc = target if acc is None else acc  # None only for a first part that is also the last: unread
    smooth_k = km is not None
    q, km = (q, km.contiguous()) if smooth_k else (out, out)  # unread stand-ins without smooth_k
    _launch_merge(
        (triton.cdiv(seq, LSE_ROWS), q_heads, batch), acc, acc_lse, out, lse, q, km, target,
        seq, head_dim, q_heads, q_heads // km.shape[1] if smooth_k else 1, km.shape[-1], float(softmax_scale),
        *acc.stride()[:3], *out.stride()[:3], *q.stride()[:3], *target.stride()[:3],
        D=triton.next_power_of_2(head_dim), ROWS=LSE_ROWS, FIRST=first, SMOOTH_K=smooth_k,
        TO_RESULT=result is not None, num_warps=LSE_WARPS)


def add_smooth_k_term(lse: torch.Tensor, q: torch.Tensor, km: torch.Tensor, softmax_scale: float, *,
                      packed: PackedBatch | None = None) -> None:
    """``lse [B, Hq, S]`` (contiguous float32) += `sageflash.reference.lse.smooth_k_term`, in place,
    in one launch: softmax_scale·q·km (``q [B, Hq, S, D]`` any strides with a unit last
    one, ``km [B, Hk, padded]``). ``packed``: q is a packed batch's ``[1, Hq, T, D]``
    (`sequences.PackedBatch`), km ``[entries, Hk, padded]`` and lse ``[Hq, T]``."""
    batch, q_heads, seq, head_dim = q.shape
    check_grid_batch(batch)
    _check_lse(lse, "lse", q.shape[:3] if packed is None else (q_heads, seq))
    km = km.contiguous()
    grid, table, tiles = (triton.cdiv(seq, LSE_ROWS), q_heads, batch), lse, lse
    if packed is not None:  # an entry's rows only
        table, tiles = packed.table, packed.tile_map(-(-packed.q_lens // LSE_ROWS))
        grid = (tiles.shape[0], q_heads, 1)
    _launch_add_smooth_k(
        grid, lse, q, km, table, tiles, seq, head_dim, q_heads, q_heads // km.shape[1], km.shape[-1],
        float(softmax_scale), *q.stride()[:3],
        D=triton.next_power_of_2(head_dim), ROWS=LSE_ROWS, VARLEN=packed is not None, num_warps=LSE_WARPS)
