"""How a sequence is split over the ranks of a process group, and the group's ranks."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .agreement import agree, describe, device_of

# contiguous: the sequence in world_size chunks, rank r holding the r-th. zigzag: in 2·world_size
# chunks, rank r holding the r-th and the (2·world_size − 1 − r)-th, so that under causal attention
# every rank has the same work (the first chunks see few keys, the last ones many).
SHARDINGS = ("contiguous", "zigzag")


def check_sharding(sharding) -> None:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(map(repr, SHARDINGS))}, got {sharding!r}")


def chunk_ids(rank: int, world_size: int, sharding: str) -> tuple[int, ...]:
    """The global chunks ``rank`` holds, ascending (chunks of ``seq_len / (world_size·len(ids))``)."""
    return (rank,) if sharding == "contiguous" else (rank, 2 * world_size - 1 - rank)


def check_cuttable(chunks: int, what: str, *lengths: int) -> None:
    """A rank's local token counts must cut into the ``chunks`` it holds (`chunk_ids`: zigzag two)."""
    if any(length % chunks for length in lengths):
        raise ValueError(f"sharding='zigzag' holds two chunks per rank: {what} must be even, got "
                         f"{' and '.join(map(str, lengths))}")


def sequence_positions(seq_len: int, rank: int, world_size: int, sharding: str = "contiguous") -> torch.Tensor:
    """The global positions of the tokens ``rank`` holds, in its local order (int64)."""
    check_sharding(sharding)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    ids = chunk_ids(rank, world_size, sharding)
    chunks = world_size * len(ids)
    if seq_len % chunks:
        raise ValueError(f"sharding={sharding!r} over {world_size} ranks splits a sequence into {chunks} equal "
                         f"chunks: seq_len must be a multiple of {chunks}, got {seq_len}")
    size = seq_len // chunks
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in ids])


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, *, dim: int = 2,
                   sharding: str = "contiguous") -> torch.Tensor:
    """``rank``'s shard of the whole-sequence tensor ``x`` along ``dim`` (2 for ``[B, H, S, D]``, 1 for
    ``[B, S, H, D]``, -2 for a mask's query rows, as `ring_attention` takes it): a view for
    contiguous sharding, a copy for zigzag."""
    positions = sequence_positions(x.shape[dim], rank, world_size, sharding)
    if sharding == "contiguous":
        return x.narrow(dim, int(positions[0]), positions.numel())
    return x.index_select(dim, positions.to(x.device))


def gather_sequence(x: torch.Tensor, *, group=None, dim: int = 2, sharding: str = "contiguous") -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (all-gather), tokens in global order.
    Shards of different shapes or dtypes, or arguments one rank refuses, raise on every rank
    before the gather (`agreement`). Differentiable: the gradient of a shard sums every rank's
    gradient of its tokens, so every rank must run its backward (an all-reduce), and a call that
    autograd records on some ranks only raises on every rank."""
    rank, world_size = group_rank_and_size(group)
    call, error = None, None
    try:
        check_sharding(sharding)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
        check_cuttable(len(chunk_ids(rank, world_size, sharding)), f"x's local length along dim {dim}", x.shape[dim])
        dim %= x.dim()
        call = {"x": describe(x), "dim": dim, "sharding": sharding,
                "autograd": torch.is_grad_enabled() and x.requires_grad}  # its backward is a collective too
    except Exception as err:  # whatever stops this rank must stop all of them
        error = err
    agree([group], "gather_sequence", call, error, device_of(x))
    whole = _GatheredSequence.apply(x.contiguous(), dim, group, rank, world_size)
    if sharding == "contiguous":
        return whole
    local = x.shape[dim]
    order = torch.cat([sequence_positions(local * world_size, r, world_size, sharding) for r in range(world_size)])
    return whole.index_select(dim, torch.argsort(order).to(x.device))


class _GatheredSequence(torch.autograd.Function):
    """Every rank's ``x`` concatenated along ``dim`` in rank order; backward: the sum of every
    rank's gradient of the whole (all-reduce), this rank's piece of it."""

    @staticmethod
    def forward(ctx, x, dim: int, group, rank: int, world_size: int):
        ctx.dim, ctx.group, ctx.first, ctx.length = dim, group, rank * x.shape[dim], x.shape[dim]
        pieces = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(pieces, x, group=group)
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: not autograd's buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.first, ctx.length), None, None, None, None


def group_rank_and_size(group) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and the group's size."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group does not contain this process")
    return rank, dist.get_world_size(group)


class RingPeers(NamedTuple):
    """The ranks a ring step sends to and receives from, as global ranks (what P2P ops take)."""

    next: int
    prev: int

    @classmethod
    def of(cls, group, rank: int, world_size: int) -> "RingPeers":
        def global_rank(r: int) -> int:
            return r if group is None else dist.get_global_rank(group, r)
        return cls(global_rank((rank + 1) % world_size), global_rank((rank - 1) % world_size))
