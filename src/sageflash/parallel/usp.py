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

from ..op import as_hnd, check_attn_mask, check_call
from .autograd import without_backward
from .ring import ring_attention
from .sharding import check_sharding, group_rank_and_size
from .ulysses import HeadExchange


def usp_attention(q, k, v, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                  pv_accum="fp32+fp16", granularity="per_thread", *, ulysses_group, ring_group,
                  sharding="contiguous", tensor_layout="HND", return_lse=False, attn_mask=None, backend="auto"):
    """`sage_attn_sm89_fp16` over a sequence split across a grid of ranks: Ulysses inside
    ``ulysses_group``, `ring_attention` across ``ring_group`` (None: the default group), ``sharding``
    the ring's. Every rank passes its piece (module docstring; the same shapes on every rank) and
    gets its piece of the output (and of the LSE). Head counts as `ulysses_attention` needs over
    ``ulysses_group``; causal as `ring_attention` needs. ``attn_mask``: the query rows of this
    rank's ring shard (its Ulysses group's tokens) against every key in global order,
    broadcastable to ``[B, Hq, Sq·P_u / P, Sk]``.
    """
    check_call(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity, tensor_layout,
               return_lse, None, backend)
    check_sharding(sharding)
    q_hnd, k_hnd = as_hnd(q, tensor_layout), as_hnd(k, tensor_layout)
    exchange = HeadExchange.checked(ulysses_group, q_hnd.shape[1], k_hnd.shape[1], "usp_attention")
    _, ring_size = group_rank_and_size(ring_group)
    check_attn_mask(attn_mask, q, k, tensor_layout, seq_q=q_hnd.shape[2] * exchange.world_size,
                    seq_k=k_hnd.shape[2] * exchange.world_size * ring_size)
    out = q.new_empty(q.shape)  # contiguous in the caller's layout, as the op's
    result = ring_attention(*exchange.to_heads(q, k, v, tensor_layout), softmax_scale, is_causal, smooth_k, smooth_v,
                            pv_accum, granularity, group=ring_group, sharding=sharding, tensor_layout="NHD",
                            return_lse=return_lse, attn_mask=exchange.mask_heads(attn_mask, q_hnd.shape[1]),
                            backend=backend)
    return without_backward("usp_attention", exchange.to_sequence(result, return_lse, out, tensor_layout),
                            q, k, v)
