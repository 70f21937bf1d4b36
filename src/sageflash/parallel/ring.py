"""Ring attention: K and V travel around the ranks as their int8/fp8 payloads.

Every rank holds the same number of tokens of q, k and v. It quantizes its own Q, K and V once,
packs K's and V's payloads (codes, scales, K's mean, V's mean) into one byte buffer and passes it
around the ring: at each of the group's P steps it attends its queries to the shard it holds with
`attention_from_payloads` (returning the LSE) while the next shard is in flight, and merges the
partial outputs by their LSEs in float32. No shard is quantized twice, and the message is half
the bytes of fp16 K and V at head dims 64, 128 and 256 (0.502× at D=128; more where the head dim
is zero-padded: 0.67× at D=96, 0.80× at 80 and 160; and for shards short of a multiple of 64
tokens, to which V's payload is padded).

Each shard's K is smoothed by its own mean and V scaled by its own channel maxima, so the result
is not the single-device op's bit for bit but attention quantized per shard, as accurate
(the LSE adds each shard's smooth_k shift back, so the merge is exact). Causal attention needs
q and k shards of the same length; its pairs of chunks are whole (earlier chunk), causal
(the same chunk) or skipped (later chunk). With contiguous shards rank r then does r + 1 of the P
pairs; ``sharding="zigzag"`` (`sharding.SHARDINGS`) gives every rank the same work.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import debug
from ..op import as_hnd, check_attn_mask, check_call, quantize_for_attention, select_backend
from ..params import SageParams, apply_overrides, warn_once
from .agreement import agree, describe, device_of
from ..autograd import without_backward
from .sharding import RingPeers, check_cuttable, check_sharding, chunk_ids, group_rank_and_size

_ALIGN = 16  # bytes: every payload in the buffer starts where a TMA descriptor may point


class PackedPayloads:
    """Tensors (None allowed) in one flat byte buffer, so that a ring step is one message. Every
    rank's payloads have the same shapes, so a buffer received is read with the local layout."""

    def __init__(self, tensors: list[torch.Tensor | None]):
        self.layout, size = [], 0
        for t in tensors:
            self.layout.append(None if t is None else (size, t.dtype, t.shape))
            size += 0 if t is None else -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        device = next(t.device for t in tensors if t is not None)
        self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        for t, spec in zip(tensors, self.layout):
            if t is not None:
                self.buffer[spec[0]: spec[0] + t.numel() * t.element_size()].copy_(
                    t.contiguous().view(-1).view(torch.uint8))

    def unpack(self, buffer: torch.Tensor) -> list[torch.Tensor | None]:
        """The tensors held in ``buffer`` (this one's or a peer's), as views of it."""
        tensors = []
        for spec in self.layout:
            if spec is None:
                tensors.append(None)
                continue
            offset, dtype, shape = spec
            tensors.append(buffer[offset: offset + shape.numel() * dtype.itemsize].view(dtype).view(shape))
        return tensors


def _exchange(send: torch.Tensor, receive: torch.Tensor, peers: RingPeers, group) -> list:
    """Start sending ``send`` to the next rank and receiving the previous rank's into ``receive``."""
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peers.next, group),
                                   dist.P2POp(dist.irecv, receive, peers.prev, group)])


def _quantize_chunks(module, q, k, v, params: SageParams, chunks: int):
    """Each local chunk quantized once: its Q payload (with the chunk of q, for the LSE's
    smooth_k term), and every chunk's K and V payloads packed for the ring; plus the keyword that
    says how V's payload is ordered (`quantize_for_attention`)."""
    q_len, k_len = q.shape[2] // chunks, k.shape[2] // chunks
    queries, keys = [], []
    for i in range(chunks):
        q_i = q[:, :, i * q_len:(i + 1) * q_len]
        (q_int8, q_scale, k_int8, k_scale, km, v_fp8, v_scale, v_mean), v_order = quantize_for_attention(
            module, q_i, k[:, :, i * k_len:(i + 1) * k_len], v[:, :, i * k_len:(i + 1) * k_len], params)
        queries.append((q_i, q_int8, q_scale))
        keys += [k_int8, k_scale, km, v_fp8, v_scale, v_mean]
    return queries, PackedPayloads(keys), v_order


class RingCall(NamedTuple):
    """A checked ring call: its knobs after the overrides, its backend, q/k/v as ``[B, H, S, D]``
    views, the mask broadcast to ``[B, Hq, Sq/P, Sk]`` (or None), its sharding."""

    params: SageParams
    module: ModuleType
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    sharding: str

    def signature(self) -> dict:
        """What the ring's messages depend on, for `agree` (the mask and LSE stay on their rank)."""
        return {"q": describe(self.q), "k": describe(self.k), "v": describe(self.v),
                "params": self.params.as_dict(), "backend": self.module.__name__, "sharding": self.sharding}


def check_ring_lengths(seq_q: int, seq_k: int, is_causal: bool, chunks: int) -> None:
    """A rank's q and k token counts must cut into its ``chunks`` (zigzag: 2), and match when causal."""
    check_cuttable(chunks, "q's and k's local token counts", seq_q, seq_k)
    if is_causal and seq_q != seq_k:
        raise ValueError(f"causal ring attention needs q and k shards of the same length, got {seq_q} and {seq_k}")


def check_ring_call(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity, sharding,
                    tensor_layout, return_lse, attn_mask, backend, world_size: int) -> RingCall:
    """Every check of `ring_attention` that needs no message (the op's, the sharding's, the mask's)."""
    params, _ = check_call(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                           tensor_layout, return_lse, None, backend)
    check_sharding(sharding)
    q, k, v = (as_hnd(x, tensor_layout) for x in (q, k, v))
    check_ring_lengths(q.shape[2], k.shape[2], params.is_causal, len(chunk_ids(0, world_size, sharding)))
    check_attn_mask(attn_mask, q, k, seq_k=k.shape[2] * world_size)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*q.shape[:3], k.shape[2] * world_size)
    params = apply_overrides(params)
    return RingCall(params, select_backend(backend, q.device), q, k, v, attn_mask, sharding)


def ring_attention(q, k, v, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                   pv_accum="fp32+fp16", granularity="per_thread", *, group=None, sharding="contiguous",
                   tensor_layout="HND", return_lse=False, attn_mask=None, backend="auto"):
    """`sage_attn_sm89_fp16` over a sequence split across the ranks of ``group`` (None: the
    default group), as ring attention. Every rank passes its shard, the same shapes on every
    rank: q ``[B, Hq, Sq/P, D]``, k and v ``[B, Hk, Sk/P, D]`` (``[B, S/P, H, D]`` with NHD), cut
    as ``sharding`` says (`shard_sequence`); returns its shard of the output (and of the LSE,
    ``[B, Hq, Sq/P]``). Knobs as the op's. ``is_causal`` is over the whole sequence and needs
    Sq == Sk. ``attn_mask``: this rank's query rows against the whole sequence's keys in global
    order, broadcastable to ``[B, Hq, Sq/P, Sk]``. A rank that refuses its arguments, or shapes
    or knobs that differ between ranks, raise on every rank before any message (`agreement`).
    """
    rank, world_size = group_rank_and_size(group)
    call, error = None, None
    try:
        call = check_ring_call(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                               sharding, tensor_layout, return_lse, attn_mask, backend, world_size)
    except Exception as err:  # whatever stops this rank (an ImportError too) must stop all of them
        error = err
    agree([group], "ring_attention", None if call is None else call.signature(), error, device_of(q))
    out = q.new_empty(q.shape)  # contiguous in the caller's layout, as the op's
    with torch.no_grad():  # the backends' LSE term reads q: no graph for a backward that raises anyway
        lse = ring_attend(call, group, rank, world_size, as_hnd(out, tensor_layout))
    return without_backward("sageflash.parallel.ring_attention", (out, lse) if return_lse else out, q, k, v)


def _ring_steps(rank: int, world_size: int, sharding: str, is_causal: bool) -> list[tuple[tuple[int, ...], list]]:
    """Per ring step, the sequence chunks of the K/V shard this rank holds and the (local query
    chunk, held key chunk) index pairs it attends: all of them, or with ``is_causal`` those whose
    key chunk is not later in the sequence."""
    mine = chunk_ids(rank, world_size, sharding)
    steps = []
    for step in range(world_size):
        held = chunk_ids((rank - step) % world_size, world_size, sharding)
        steps.append((held, [(i, j) for i, a in enumerate(mine) for j, b in enumerate(held)
                             if not (is_causal and b > a)]))
    return steps


def ring_attend(call: RingCall, group, rank: int, world_size: int, out: torch.Tensor) -> torch.Tensor:
    """The ring's steps for a checked call, agreed on by every rank: writes the output into ``out``
    (``[B, Hq, Sq/P, D]``, any strides) and returns the LSE ``[B, Hq, Sq/P]``.

    Each pair's output and raw LSE go through ``module.merge_attention``, which adds the pair's
    smooth_k term to the LSE, merges into a float32 accumulator per query chunk, and writes the
    chunk's last pair's result straight into ``out``."""
    params, module, q, k, v, attn_mask, sharding = call
    toggles = debug.active()
    if toggles:  # its pairs call the backend directly, not the op that honours them
        warn_once(("ring-debug",), "ring attention runs its chunk pairs without the debug toggles (%s set): "
                  "to dump or trace a call, run sageflash.sage_attn_sm89_fp16 on one device", ", ".join(toggles))
    mine = chunk_ids(rank, world_size, sharding)
    q_len, k_len = q.shape[2] // len(mine), k.shape[2] // len(mine)
    queries, packed, v_order = _quantize_chunks(module, q, k, v, params, len(mine))
    steps = _ring_steps(rank, world_size, sharding, params.is_causal)
    pair_count = [sum(i == chunk for _, pairs in steps for i, _ in pairs) for chunk in range(len(mine))]
    pairs_left = list(pair_count)
    peers = RingPeers.of(group, rank, world_size)
    current, spare = packed.buffer, (torch.empty_like(packed.buffer) if world_size > 1 else None)
    whole = dataclasses.replace(params, is_causal=False)  # a chunk pair where every key is visible
    acc = q.new_empty(*q.shape[:3], q.shape[-1], dtype=torch.float32) if max(pair_count) > 1 else None
    lse = [q.new_empty(*q.shape[:2], q_len, dtype=torch.float32) for _ in mine]
    part = q.new_empty(*q.shape[:2], q_len, q.shape[-1])  # each pair's output before its merge
    for step, (held, pairs) in enumerate(steps):
        in_flight = _exchange(current, spare, peers, group) if step + 1 < world_size else []
        payloads = packed.unpack(current)
        for i, j in pairs:
            q_i, q_int8, q_scale = queries[i]
            k_int8, k_scale, km, v_fp8, v_scale, v_mean = payloads[6 * j: 6 * j + 6]
            rows, keys = slice(i * q_len, (i + 1) * q_len), slice(held[j] * k_len, (held[j] + 1) * k_len)
            part, part_lse = module.attention_from_payloads(
                q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean,
                params=params if mine[i] == held[j] else whole, seq_q=q_len, seq_k=k_len, head_dim=q.shape[-1],
                out_dtype=q.dtype, return_lse=True, out=part,
                attn_mask=None if attn_mask is None else attn_mask[:, :, rows, keys], **v_order)
            pairs_left[i] -= 1
            module.merge_attention(None if acc is None else acc[:, :, rows], lse[i], part, part_lse, q=q_i, km=km,
                                   softmax_scale=params.softmax_scale, first=pairs_left[i] + 1 == pair_count[i],
                                   result=out[:, :, rows] if pairs_left[i] == 0 else None)
        for work in in_flight:
            work.wait()
        current, spare = spare, current
    return torch.cat(lse, dim=2)
