"""Every rank of a call goes on, or every rank raises, before the call's first message.

A rank that refused its arguments (a mask of the wrong shape, an unequal shard, a bad override)
while its peers went on would leave them waiting in a collective until the group times out (gloo:
30 minutes), or send them data of the wrong size. So each call first exchanges, over its own
group, a 64-bit digest of what its messages depend on (q/k/v shapes and dtypes, the knobs after
the ``GGML_SAGE_*`` overrides, the backend; the ring's sharding; Ulysses' and USP's ``return_lse``
and mask shape and dtype, whose values are not compared; USP's grid positions; Ulysses' debug
toggles; whether autograd records ``gather_sequence``) and of its own error, if any. Where the digests differ, the ranks exchange the details and all raise.

On a group with a backend for CPU tensors (``get_backend_config`` names one: gloo, or a group
initialised with ``backend="cpu:gloo,cuda:nccl"``) the digest stays in host memory. Otherwise (an
NCCL-only group) it travels as a one-element tensor on the call's GPU, on a stream of its own
(`_agreement_stream`): reading it back waits for the exchange (and for collectives of the group
queued before it), not for the compute queued on the caller's stream, which kept the GPU idle
while the host launched the call (one GPU, 16k tokens: the ring at 0.64-0.82x the op's speed,
0.88-0.92x on its own stream, 0.90-1.00x with the digest in host memory; NOTES v25). While a
CUDA graph is being captured (where that is not allowed) the agreement is skipped, and so is a
group of one rank.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib

import torch
import torch.distributed as dist


def describe(x: torch.Tensor) -> tuple:
    """A tensor as a signature holds it: shape, dtype, device type (cuda:0 and cuda:1 agree)."""
    return tuple(x.shape), str(x.dtype), x.device.type


def describe_mask(attn_mask) -> tuple | None:
    """A mask as a signature holds it: its shape left-padded to 4 dims (``[Sq, Sk]`` and
    ``[1, 1, Sq, Sk]`` broadcast alike), dtype, device type; None for no mask."""
    if attn_mask is None:
        return None
    shape, dtype, device = describe(attn_mask)
    return (1,) * (4 - len(shape)) + shape, dtype, device


def device_of(q) -> torch.device:
    """q's device, or the CPU where q is not a tensor (a call refused on the spot)."""
    return q.device if isinstance(q, torch.Tensor) else torch.device("cpu")


def _digest(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def _digest_device(group, device: torch.device) -> torch.device:
    """Where the digests travel: host memory when ``group`` has a backend for CPU tensors, else
    ``device`` (the call's GPU, or the current one when the call did not name a CUDA tensor)."""
    if "cpu:" in dist.get_backend_config(group):
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _agreement_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of ``device`` for the digests alone: nothing else is queued on it, so the
    exchange (NCCL waits for the stream it is called from) starts at once; at the highest priority
    (torch maps -100 to it), so that its kernel takes the next free SM slot instead of waiting
    for the queued attention's programs (one H200, torch 2.11, a 4k call then its agreement:
    0.78-0.86x the op's speed at normal priority, 0.91-1.00x at the highest; NOTES v26). Older
    torch versions that run NCCL on the group's own stream do not get this."""
    return torch.cuda.Stream(device, priority=-100)


def _all_digests(group, digest: int, where: torch.device) -> list[int]:
    """Every rank's ``digest``, gathered over ``group`` on ``where`` (the CPU, or a GPU through
    `_agreement_stream`)."""
    size = dist.get_world_size(group)
    with torch.cuda.stream(_agreement_stream(where)) if where.type == "cuda" else contextlib.nullcontext():
        digests = [torch.empty(1, dtype=torch.int64, device=where) for _ in range(size)]
        dist.all_gather(digests, torch.tensor([digest], device=where), group=group)
        return torch.cat(digests).tolist()


def agree(groups, caller: str, call: dict | None, error: Exception | None, device: torch.device,
          within=None, failed: str = "refused its arguments") -> None:
    """Exchange ``call`` (what this rank's messages depend on; None if it refused) and ``error``
    over each of ``groups`` in turn, carrying what one group learnt to the next (USP's grid: a
    Ulysses group, then a ring group, reaches every rank); then raise on every rank, or return on
    every rank. The rank at fault raises its own error; the others a ValueError naming it, or the
    first thing that differs between the ranks' calls (across USP's two groups, ranks may name
    different causes: each the first its groups showed it). ``device``: q's, where an
    NCCL-only group exchanges the digests. ``within``: per group, entries that must match inside
    that group only (USP: a Ulysses group shares its ring position). ``failed``: what a rank
    with an error did, as its peers' message says."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        if error is not None:
            raise error
        return
    refusal = None if error is None else (dist.get_rank(), f"{type(error).__name__}: {error}", False)
    for index, group in enumerate(groups):
        if dist.get_world_size(group) == 1:  # nobody to agree with (nor to wait for this rank)
            continue
        mine = call if call is None or within is None else {**call, **within[index]}
        if len(set(_all_digests(group, _digest((mine, refusal)), _digest_device(group, device)))) == 1:
            continue
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (mine, refusal), group=group)
        if refusal is None:
            refusal = next((theirs for _, theirs in everyone if theirs is not None), None) or \
                (dist.get_rank(), _difference(caller, [theirs for theirs, _ in everyone],
                                              dist.get_process_group_ranks(group or dist.group.WORLD)), True)
            rank, text, mismatch = refusal
            error = ValueError(text if mismatch else f"{caller}: rank {rank} {failed} ({text}); "
                                                     "every rank of the call stops")
    if error is not None:
        raise error


def _difference(caller: str, calls: list[dict], ranks: list[int]) -> str:
    """The first thing that differs between the ranks' ``calls`` (none refused), rank by rank."""
    name = next(name for name in calls[0] if any(call[name] != calls[0][name] for call in calls))
    listed = ", ".join(f"rank {rank}: {call[name]}" for rank, call in zip(ranks, calls))
    return f"{caller} needs the same {name} on every rank of its group, got {listed}"
