"""Unified sequence parallelism (USP): Ulysses inside groups of ranks with fast links (a node's
NVLink), ring attention across those groups (between nodes), as xDiT runs video models.

The ranks form a grid: a Ulysses group of ``P_u`` ranks shares one ring position, a ring group
of ``P_r`` ranks one Ulysses position. The sequence is cut into ``P_r`` ring shards (contiguous
or zigzag) and each ring shard into ``P_u`` contiguous pieces: rank (ring r, Ulysses u) holds
``shard_sequence(shard_sequence(x, r, P_r, sharding=s), u, P_u)``. Ulysses' all-to-all gives
each rank its ring shard for ``1/P_u`` of the heads, ring attention runs over the ring group on
those, and a second all-to-all returns the output. Each head's result is the ring's over
``P_r`` shards; only 8-bit payloads cross the ring's (slower) links.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..op import as_hnd, check_attn_mask, check_call
from .agreement import agree, describe, describe_mask, device_of
from ..autograd import without_backward
from .ring import check_ring_call, ring_attend
from .sharding import check_sharding, group_rank_and_size
from .ulysses import HeadExchange, check_heads


def usp_groups(ulysses_size: int):
    """This rank's ``(ulysses_group, ring_group)`` for `usp_attention` on a grid of all ranks:
    Ulysses groups of ``ulysses_size`` consecutive ranks (a node's GPUs, where ranks are numbered
    node by node), ring groups across them. Every rank must call it, in the same order as its
    other ``new_group`` calls (torch creates groups collectively)."""
    rank, world_size = group_rank_and_size(None)
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1 \
            or world_size % ulysses_size:
        raise ValueError(f"ulysses_size must be a positive divisor of the {world_size} ranks, got {ulysses_size!r}")
    ulysses = ring = None
    for first in range(0, world_size, ulysses_size):
        group = dist.new_group(list(range(first, first + ulysses_size)))
        ulysses = group if first <= rank < first + ulysses_size else ulysses
    for position in range(ulysses_size):
        group = dist.new_group(list(range(position, world_size, ulysses_size)))
        ring = group if rank % ulysses_size == position else ring
    return ulysses, ring


def usp_attention(q, k, v, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                  pv_accum="fp32+fp16", granularity="per_thread", *, ulysses_group, ring_group,
                  sharding="contiguous", tensor_layout="HND", return_lse=False, attn_mask=None, backend="auto"):
    """`sage_attn_sm89_fp16` over a sequence split across a grid of ranks: Ulysses inside
    ``ulysses_group``, `ring_attention` across ``ring_group`` (None: the default group), ``sharding``
    the ring's. Every rank passes its piece (module docstring; the same shapes on every rank) and
    gets its piece of the output (and of the LSE). Head counts as `ulysses_attention` needs over
    ``ulysses_group``; causal as `ring_attention` needs. ``attn_mask``: the query rows of this
    rank's ring shard (its Ulysses group's tokens) against every key in global order,
    broadcastable to ``[B, Hq, Sq·P_u / P, Sk]``, the same within a Ulysses group. A refusal on
    any rank of the grid, shapes or knobs that differ, or groups that do not form a grid (a
    Ulysses group's ranks at one ring position, a ring group's at one Ulysses position) raise on
    every rank before any message (agreed over the Ulysses group, then the ring group). With
    Ulysses groups of one rank the ring runs on the caller's tensors, with no exchange.
    """
    ulysses_rank, ulysses_size = group_rank_and_size(ulysses_group)
    ring_rank, ring_size = group_rank_and_size(ring_group)
    exchange = HeadExchange(ulysses_group, ulysses_rank, ulysses_size)
    knobs = (softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity)
    call, error = None, None
    try:
        _, lse_wanted = check_call(q, k, v, *knobs, tensor_layout, return_lse, None, backend)
        check_sharding(sharding)
        q_hnd, k_hnd, v_hnd = (as_hnd(x, tensor_layout) for x in (q, k, v))
        check_heads(q_hnd.shape[1], k_hnd.shape[1], ulysses_size, "usp_attention")
        check_attn_mask(attn_mask, q, k, tensor_layout, seq_q=q_hnd.shape[2] * ulysses_size,
                        seq_k=k_hnd.shape[2] * ulysses_size * ring_size)
        # the ring's own checks, on stand-ins of the shapes it will get (this rank's heads of its
        # ring shard: a broadcast view, no memory) before any message
        ring_shard = [x[:, :max(1, x.shape[1] // ulysses_size), :1].expand(-1, -1, x.shape[2] * ulysses_size, -1)
                      for x in (q_hnd, k_hnd, v_hnd)]
        call = check_ring_call(*ring_shard, *knobs, sharding, "HND", return_lse,
                               exchange.mask_heads(attn_mask, q_hnd.shape[1]), backend, ring_size)
    except Exception as err:  # whatever stops this rank (an ImportError too) must stop all of them
        error = err
    grid = "(ulysses_group and ring_group must form a grid)"
    agree([ulysses_group, ring_group], "usp_attention",
          None if call is None else {**call.signature(), "q": describe(q_hnd), "k": describe(k_hnd),
                                     "v": describe(v_hnd), "return_lse": lse_wanted}, error, device_of(q),
          within=[{"attn_mask": describe_mask(attn_mask),
                   f"(rank, size) in ring_group {grid}": (ring_rank, ring_size)},
                  {f"(rank, size) in ulysses_group {grid}": (ulysses_rank, ulysses_size)}])
    out = q.new_empty(q.shape)  # contiguous in the caller's layout, as the op's
    with torch.no_grad():  # no autograd record of copies whose backward raises anyway
        heads = exchange.to_heads(q, k, v, tensor_layout)  # NHD [B, S_ring, H/P_u, D]
        heads_out = exchange.heads_output(out, tensor_layout)
        lse = ring_attend(call._replace(**{name: as_hnd(x, "NHD") for name, x in zip("qkv", heads)}), ring_group,
                          ring_rank, ring_size, as_hnd(heads_out, "NHD"))
    result = (heads_out, lse) if lse_wanted else heads_out
    return without_backward("sageflash.parallel.usp_attention",
                            exchange.to_sequence(result, lse_wanted, out, tensor_layout), q, k, v)
