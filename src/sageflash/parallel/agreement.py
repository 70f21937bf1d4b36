"""Every rank of a call stops alike, before the call's first message, or none does.

A rank that refused its arguments (a mask of the wrong shape, an unequal shard) while its peers
went on would leave them waiting in a collective until the process group times out (gloo: 30
minutes), or send them data of the wrong size. So each call first exchanges a digest of what
every check depends on (its shapes, dtypes, knobs and ``GGML_SAGE_*`` overrides) and of its own
error, if any, over a gloo group of the same ranks: host memory only, so the GPU is never
synchronized. Where the digests differ, the ranks learn why and all raise.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from ..params import ENV_GRANULARITY, ENV_PV_ACCUM, ENV_SMOOTH_K, ENV_SMOOTH_V, getenv

_CPU_GROUPS: dict[tuple[int, ...], object] = {}  # global ranks -> their gloo group


def cpu_group(group):
    """A group of ``group``'s ranks that takes CPU tensors: itself when its backend has gloo, else a
    gloo group created on first use by its members alone (no other rank has to take part)."""
    if "gloo" in str(dist.get_backend(group)):
        return group
    ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
    if ranks not in _CPU_GROUPS:
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _CPU_GROUPS[ranks]


def signature(q, k, v, attn_mask, **arguments) -> dict:
    """What a call's checks depend on, printable, the same on every rank of a correct call."""
    def describe(x):
        return (tuple(x.shape), str(x.dtype), x.device.type) if isinstance(x, torch.Tensor) else type(x).__name__
    overrides = {name: getenv(name) for name in (ENV_SMOOTH_K, ENV_SMOOTH_V, ENV_PV_ACCUM, ENV_GRANULARITY)}
    return {"q": describe(q), "k": describe(k), "v": describe(v),
            "attn_mask": None if attn_mask is None else describe(attn_mask),
            **{name: repr(value) for name, value in arguments.items()}, "environment": overrides}


def _digest(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def agree(groups, caller: str, call: dict, error: Exception | None) -> None:
    """Exchange ``call`` (a `signature`) and ``error`` over each of ``groups`` in turn, carrying a
    refusal learnt in one to the next (USP's grid: a Ulysses group, then a ring group, reaches every
    rank); then raise on every rank alike, or return on every rank alike. A rank raises its own
    error; its peers a ValueError naming the rank that refused, or what differs between them."""
    refusal = None if error is None else (dist.get_rank(), f"{type(error).__name__}: {error}")
    for group in groups:
        cpu = cpu_group(group)
        size = dist.get_world_size(cpu)
        digests = [torch.empty(1, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(digests, torch.tensor([_digest((call, refusal))]), group=cpu)
        if len({int(d) for d in digests}) == 1:
            continue
        everyone = [None] * size
        dist.all_gather_object(everyone, (call, refusal), group=cpu)
        if refusal is None:
            refusal = next((theirs for _, theirs in everyone if theirs is not None), None)
            if refusal is None:  # every rank accepted its own call, but the calls differ
                refusal = (dist.get_rank(), _difference(caller, [theirs for theirs, _ in everyone],
                                                        dist.get_process_group_ranks(cpu)))
            error = ValueError(refusal[1] if refusal[0] == dist.get_rank() else
                               f"{caller}: rank {refusal[0]} refused its arguments ({refusal[1]}); every rank "
                               f"of the call stops")
    if error is not None:
        raise error


def _difference(caller: str, calls: list[dict], ranks: list[int]) -> str:
    """The first argument that differs between the ranks' ``calls``, rank by rank."""
    name = next(name for name in calls[0] if any(call[name] != calls[0][name] for call in calls))
    listed = ", ".join(f"rank {rank}: {call[name]}" for rank, call in zip(ranks, calls))
    return (f"{caller} needs the same {name} on every rank of its group (tensors as (shape, dtype, device type)), "
            f"got {listed}")
