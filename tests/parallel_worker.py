"""What each process of a test's process group runs (`torch.multiprocessing` spawns it): the
sequence-parallel calls of a list of cases on this rank's shards of seeded inputs, each result
saved for the test to put back together. Imported by the spawned processes by name, so it imports
nothing from the tests at module level that would need pytest's fixtures."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


# A rank left waiting in a collective (the bug the agreement prevents) fails its test within this,
# rather than after gloo's default 30 minutes.
COLLECTIVE_TIMEOUT_S = 60


def case_inputs(case: dict):
    """The whole sequence's q, k, v (``[B, H, S, D]``) and mask of ``case`` on its ``device``, the
    same in every process."""
    from helpers import make_mask, random_qkv

    batch, q_heads, kv_heads, seq_q, seq_k, head_dim = case["shape"]
    device = case.get("device", "cpu")
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, seed=case["seed"], dtype=case["dtype"],
                         device=device, k_offset=case.get("k_offset", 0.0), v_offset=case.get("v_offset", 0.0))
    mask = None
    if case.get("mask"):
        mask = make_mask(case["mask"], batch, q_heads, seq_q, seq_k, seed=case["seed"] + 1, device=device)
    return q, k, v, mask


def rank_call(case: dict, rank: int, world_size: int, groups: dict | None = None):
    """``case``'s call on this rank's shards: ``(out, lse)`` as ``[B, H, S/P, D]`` and ``[B, H, S/P]``.
    A "usp" case runs on the grid of ``groups[ulysses_size]`` (`parallel.usp_groups`)."""
    from sageflash import parallel

    q, k, v, mask = case_inputs(case)
    sharding = case.get("sharding", "contiguous")
    shard_as = case.get("shard_as", sharding)  # another than the call's: a caller's mistake
    ulysses_size = case.get("ulysses_size", 1)
    ring_rank, ring_size = rank // ulysses_size, world_size // ulysses_size
    if case["fn"] == "ulysses":
        ring_rank, ring_size, ulysses_size = 0, 1, world_size
    if shard_as == "uneven":  # torch's split of 10 tokens over 3 ranks: 4, 3, 3
        q, k, v = (x.tensor_split(world_size, dim=2)[rank] for x in (q, k, v))
    else:
        q, k, v = (parallel.shard_sequence(parallel.shard_sequence(x, ring_rank, ring_size, sharding=shard_as),
                                           rank % ulysses_size, ulysses_size) for x in (q, k, v))
    if case["fn"] != "ulysses" and mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1:
        mask = parallel.shard_sequence(mask, ring_rank, ring_size, dim=-2, sharding=shard_as)  # the ring shard's rows
    if case.get("bad_mask_rank") == rank:  # one rank's mask one key short
        mask = mask[..., :-1]
    if case.get("all_true_mask_on") == rank:  # a mask that hides nothing, where the others pass none
        mask = torch.ones(q.shape[2], k.shape[2] * world_size, dtype=torch.bool, device=q.device)
    if case.get("no_mask_on") == rank:  # the others pass one
        mask = None
    if case.get("mask_unsqueezed_on") == rank:  # the same mask as [1, 1, Sq, Sk]
        mask = mask[None, None]
    layout = case.get("layout", "HND")
    if layout == "NHD":  # views, as a caller holding [B, S, H, D] passes them
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    call, extra = parallel.ulysses_attention, {}
    if case["fn"] == "ring":
        call, extra = parallel.ring_attention, {"sharding": sharding}
    elif case["fn"] == "usp":
        ulysses_group, ring_group = (groups or {})[ulysses_size]
        if case.get("ring_over_world"):  # not a grid: every Ulysses group's ranks at different ring positions
            ring_group = None
        call, extra = parallel.usp_attention, {"sharding": sharding, "ulysses_group": ulysses_group,
                                                "ring_group": ring_group}
    environment = {name: value.format(out_dir=case.get("out_dir", "."))  # overrides on some ranks only
                   for name, value in case.get("environment_of", {}).get(rank, {}).items()}
    os.environ.update(environment)
    knobs = {**case.get("knobs", {}), **case.get("knobs_of", {}).get(rank, {})}  # and knobs
    try:
        out, lse = call(q, k, v, **knobs, tensor_layout=layout, return_lse=True, attn_mask=mask,
                        backend=case.get("backend", "reference"), **extra)
    finally:
        for name in environment:
            del os.environ[name]
    return (out.transpose(1, 2) if layout == "NHD" else out), lse


def gather_weights(case: dict, rank: int) -> torch.Tensor:
    """What rank ``rank`` multiplies the whole q by for a "backward" gather case's loss."""
    q = case_inputs(case)[0]
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(case["seed"] + 100 + rank)).to(q)


def gather_call(case: dict, rank: int, world_size: int):
    """``gather_sequence`` of this rank's shard of ``case``'s q: ``(the whole q, None)`` on every
    rank; with ``backward``, ``(the whole q, the shard's gradient of the loss)``, the loss being
    the sum of the whole q times `gather_weights` (each rank its own)."""
    from sageflash import parallel

    q = case_inputs(case)[0]
    sharding = case.get("sharding", "contiguous")
    shard_as = case.get("shard_as", sharding)  # another than the call's: a caller's mistake
    if shard_as == "uneven":  # torch's split of 10 tokens over 3 ranks: 4, 3, 3
        shard = q.tensor_split(world_size, dim=2)[rank]
    else:
        shard = parallel.shard_sequence(q, rank, world_size, dim=2, sharding=shard_as)
    if not case.get("backward") or case.get("grad_only_on", rank) != rank:
        return parallel.gather_sequence(shard, dim=2, sharding=sharding), None
    shard = shard.detach().requires_grad_()
    whole = parallel.gather_sequence(shard, dim=2, sharding=sharding)
    (whole.float() * gather_weights(case, rank).float()).sum().backward()
    return whole.detach(), shard.grad


def run(rank: int, world_size: int, rendezvous: str, cases: list[dict], out_dir: str,
        dist_backend: str = "gloo") -> None:
    """Join the group at ``rendezvous`` (a file), run every case (on ``cuda:<rank>`` with NCCL), save
    ``<name>.<rank>.pt``: ``{"out", "lse"}``, or ``{"error"}`` for a case that raised."""
    device = "cpu"
    if dist_backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(dist_backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        from sageflash import parallel

        grids = {size: parallel.usp_groups(size)
                 for size in sorted({case["ulysses_size"] for case in cases if case["fn"] == "usp"})}
        for case in cases:
            try:
                case = dict(case, device=device, out_dir=out_dir)
                if case["fn"] == "gather":
                    out, lse = gather_call(case, rank, world_size)
                else:
                    out, lse = rank_call(case, rank, world_size, grids)
                result = {"out": out.cpu(), "lse": None if lse is None else lse.cpu()}
            except (TypeError, ValueError, OSError) as err:
                result = {"error": f"{type(err).__name__}: {err}"}
            torch.save(result, f"{out_dir}/{case['name']}.{rank}.pt")
    finally:
        dist.destroy_process_group()
