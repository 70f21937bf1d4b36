"""DeepSpeed-Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

Every rank holds the same number of tokens of q, k and v (contiguous sharding, rank r the r-th
piece). One all-to-all per tensor gives each rank the whole sequence of ``H / world_size`` heads,
on which it runs `sageflash.sage_attn_sm89_fp16` unchanged; a second all-to-all returns the output
to sequence shards. Each head sees exactly what a single-device call would, so the result is the
single-device op's, bit for bit. Traffic is the 16-bit q, k, v and output (quantizing before the
exchange would need the whole sequence's K mean and V channel maxima first).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import debug
from ..op import as_hnd, check_attn_mask, check_call, sage_attn_sm89_fp16, select_backend
from ..params import resolve_params
from .agreement import agree, describe, describe_mask, device_of
from ..autograd import without_backward
from .sharding import group_rank_and_size


def _as_nhd(x: torch.Tensor, tensor_layout: str) -> torch.Tensor:
    return x if tensor_layout == "NHD" else x.transpose(1, 2)


def heads_from_sequence(x: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """``[B, S/P, H, D]`` sequence shards → ``[B, S, H/P, D]`` head shards (rank r: heads
    ``r·H/P ..``), tokens in rank order. A view of the received buffer when B == 1."""
    batch, seq, heads, dim = x.shape
    send = x.reshape(batch, seq, world_size, heads // world_size, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)  # [source rank, B, S/P, H/P, D]
    dist.all_to_all_single(received, send, group=group)
    return received.transpose(0, 1).reshape(batch, world_size * seq, heads // world_size, dim)


def sequence_from_heads(y: torch.Tensor, world_size: int, group, into: torch.Tensor) -> None:
    """``[B, S, H/P, D]`` head shards → this rank's ``[B, S/P, H, D]`` tokens, written into ``into``."""
    batch, seq, heads, dim = y.shape
    send = y.reshape(batch, world_size, seq // world_size, heads, dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)  # [head group, B, S/P, H/P, D]
    dist.all_to_all_single(received, send, group=group)
    into.unflatten(2, (world_size, heads)).copy_(received.permute(1, 2, 0, 3, 4))


def lse_from_heads(lse: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """``[B, H/P, S]`` head shards of the LSE → this rank's ``[B, H, S/P]``."""
    batch, heads, seq = lse.shape
    send = lse.reshape(batch, heads, world_size, seq // world_size).permute(2, 0, 1, 3).contiguous()
    received = torch.empty_like(send)  # [head group, B, H/P, S/P]
    dist.all_to_all_single(received, send, group=group)
    return received.transpose(0, 1).reshape(batch, world_size * heads, seq // world_size)


def check_heads(q_heads: int, kv_heads: int, world_size: int, caller: str) -> None:
    """Hq must split over the Ulysses group; Hk too, or divide it (KV heads are then repeated)."""
    if q_heads % world_size:
        raise ValueError(f"{caller} splits heads over the Ulysses group's {world_size} ranks: q has "
                         f"{q_heads} heads, not a multiple of {world_size}")
    if kv_heads % world_size and world_size % kv_heads:
        raise ValueError(f"{caller} splits heads over the Ulysses group's {world_size} ranks: k and v have "
                         f"{kv_heads} heads, neither a multiple nor a divisor of {world_size}")


class HeadExchange(NamedTuple):
    """Ulysses' exchanges over ``group``: each rank's sequence shard of every head ↔ the group's
    whole token range of ``1/P`` of the heads (rank r: query heads ``r·Hq/P ..``)."""

    group: object
    rank: int
    world_size: int

    def to_heads(self, q, k, v, tensor_layout: str):
        """This rank's heads of the group's tokens, as NHD ``[B, S·P, H/P, D]`` (views of q, k and
        v on a group of one rank)."""
        q, k, v = (_as_nhd(x, tensor_layout) for x in (q, k, v))
        if self.world_size == 1:
            return q, k, v
        if k.shape[2] < self.world_size:  # each rank's query heads read one KV head: give every rank a copy
            k, v = (x.repeat_interleave(self.world_size // k.shape[2], dim=2) for x in (k, v))
        return tuple(heads_from_sequence(x, self.world_size, self.group) for x in (q, k, v))

    def mask_heads(self, attn_mask, q_heads: int):
        """``attn_mask``'s query heads of this rank (a mask with one head stays as it is)."""
        if attn_mask is None or attn_mask.dim() < 3 or attn_mask.shape[-3] == 1:
            return attn_mask
        local_heads = q_heads // self.world_size
        return attn_mask.narrow(-3, self.rank * local_heads, local_heads)

    def heads_output(self, out: torch.Tensor, tensor_layout: str) -> torch.Tensor:
        """Where the attention over this rank's heads writes (NHD): on a group of one rank ``out``
        itself, else a buffer that `to_sequence` sends back."""
        out = _as_nhd(out, tensor_layout)
        return out if self.world_size == 1 else torch.empty(
            (out.shape[0], out.shape[1] * self.world_size, out.shape[2] // self.world_size, out.shape[3]),
            dtype=out.dtype, device=out.device)

    def to_sequence(self, result, return_lse: bool, out: torch.Tensor, tensor_layout: str):
        """The attention ``result`` over this rank's heads back to this rank's tokens of every
        head: written into ``out`` (the caller's layout; on a group of one rank ``result`` is in
        `heads_output`, ``out`` already), with the LSE when ``return_lse``."""
        local_out, local_lse = result if return_lse else (result, None)
        if self.world_size == 1:
            return (out, local_lse) if return_lse else out
        sequence_from_heads(local_out, self.world_size, self.group, into=_as_nhd(out, tensor_layout))
        return (out, lse_from_heads(local_lse, self.world_size, self.group)) if return_lse else out


def ulysses_attention(q, k, v, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                      pv_accum="fp32+fp16", granularity="per_thread", *, group=None, tensor_layout="HND",
                      return_lse=False, attn_mask=None, backend="auto"):
    """`sage_attn_sm89_fp16` over a sequence split across the ranks of ``group`` (None: the default
    group), DeepSpeed-Ulysses style. Every rank passes its shard: q ``[B, Hq, Sq/P, D]`` and k, v
    ``[B, Hk, Sk/P, D]`` (``[B, S/P, H, D]`` with NHD), the same shapes on every rank, rank r
    holding the r-th piece of the sequence; returns its shard of the output (and of the LSE,
    ``[B, Hq, Sq/P]``). Knobs as the op's; causal is over the whole sequence, bottom-right aligned.

    Hq must be a multiple of the group's size P; Hk a multiple of P, or a divisor of P (KV heads
    are then repeated so that each rank gets the one its query heads read). ``attn_mask`` spans
    the whole sequence, broadcastable to ``[B, Hq, Sq, Sk]``, the same on every rank (its shape
    and dtype are checked; its values are the caller's to keep equal). A rank that refuses its
    arguments, or shapes, knobs or debug toggles that differ between ranks, raise on every rank
    before any message (`agreement`); with debug toggles set, a failure in one rank's op stops
    every rank too. On a group of one rank this is the op itself, with no exchange.
    """
    rank, world_size = group_rank_and_size(group)
    knobs = (softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity)
    call, error = None, None
    try:
        _, lse_wanted = check_call(q, k, v, *knobs, tensor_layout, return_lse, None, backend)
        q_hnd, k_hnd, v_hnd = (as_hnd(x, tensor_layout) for x in (q, k, v))
        check_heads(q_hnd.shape[1], k_hnd.shape[1], world_size, "ulysses_attention")
        check_attn_mask(attn_mask, q, k, tensor_layout, seq_q=q_hnd.shape[2] * world_size,
                        seq_k=k_hnd.shape[2] * world_size)
        toggles_set = debug.active()
        if toggles_set:  # what the op would refuse on its rank only, after the first exchange
            toggles = debug.Toggles.from_env()
            debug.check_sample(toggles.sample_head, toggles.sample_block, q_hnd.shape[1] // world_size,
                               q_hnd.shape[2] * world_size)
        call = {"q": describe(q_hnd), "k": describe(k_hnd), "v": describe(v_hnd),
                "params": resolve_params(*knobs, head_dim=q.shape[-1]).as_dict(),
                "backend": select_backend(backend, q.device).__name__, "return_lse": lse_wanted,
                "attn_mask": describe_mask(attn_mask), "debug toggles": toggles_set}
    except Exception as err:  # whatever stops this rank (an ImportError too) must stop all of them
        error = err
    agree([group], "ulysses_attention", call, error, device_of(q))
    if world_size == 1:  # nothing to exchange: the op itself, without the copies of an all-to-all
        with torch.no_grad():
            result = sage_attn_sm89_fp16(q, k, v, *knobs, tensor_layout=tensor_layout, return_lse=lse_wanted,
                                         attn_mask=attn_mask, backend=backend)
        return without_backward("sageflash.parallel.ulysses_attention", result, q, k, v)
    exchange = HeadExchange(group, rank, world_size)
    out = q.new_empty(q.shape)  # contiguous in the caller's layout, as the op's
    with torch.no_grad():  # no autograd record of copies whose backward raises anyway
        heads = exchange.to_heads(q, k, v, tensor_layout)
    failure = None
    try:
        result = sage_attn_sm89_fp16(*heads, *knobs, tensor_layout="NHD", return_lse=lse_wanted,
                                     attn_mask=exchange.mask_heads(attn_mask, q_hnd.shape[1]), backend=backend)
    except Exception as err:
        if not call["debug toggles"]:
            raise
        failure = err
    if call["debug toggles"]:  # the op's debug path can fail on one rank (a dump it cannot write): all stop
        agree([group], "ulysses_attention", {}, failure, device_of(q), failed="failed in the op")
    return without_backward("sageflash.parallel.ulysses_attention",
                            exchange.to_sequence(result, lse_wanted, out, tensor_layout), q, k, v)
