"""Packed variable-length batches (`sageflash.sage_attn_varlen`) as the kernels see them.

Every kernel puts the batch on its grid's z axis and finds an entry's tokens at ``batch ·
stride_b``. In a packed batch the entries' tokens follow one another along the token axis: a
kernel compiled with VARLEN reads the entry's first token and its length from a sequence table,
one int32 row per entry (`TABLE_FIELDS`), and its program's entry and tile from the grid's tile
map (`program`). Without VARLEN, `entry` and `program` compile to the plain ``batch · stride_b``
and program ids (the same code as before the table existed).

The payloads, scales and statistics of a packed batch are packed too, never sized by its longest
entry (10,000 short sequences beside one long one would otherwise take gigabytes): per head, the
entries' V payload columns and their scale groups follow one another, each entry's padded to
whole blocks (`groups.Q_TILE` queries, `KEY_BLOCK` keys), so that an entry's first scale group is
the group rule (`groups.q_group`, `groups.k_group`) of its first padded position. The grids hold
each entry's own tiles (`PackedBatch.tile_map`, read by `program`), never the entries times the
longest entry's tiles.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .. import groups

# A row of the table: the entry's first query and its query count, its first key and key count,
# its first key padded to whole KEY_BLOCKs (the first column of its V payload; its K scales and
# statistics follow from it) and its first query padded to whole Q_TILE blocks (its Q scales).
Q_START, Q_LEN, K_START, K_LEN, K_PADDED, Q_PADDED = (tl.constexpr(i) for i in range(6))
TABLE_FIELDS = tl.constexpr(6)
INT32_MAX = 2 ** 31 - 1  # the table's entries are int32 token counts (element offsets are 64-bit)
# V's payload pads each entry to whole attention steps of 128 keys (two K_TILE blocks: the widest
# step, `attention.LaunchConfig.keys`), so that a step's second block reads the entry's own zero
# padding, never the next entry's columns (whose NaN, times P's zeros, would be NaN here).
KEY_BLOCK = 2 * groups.K_TILE


@triton.jit
def entry(SEQS, batch, START: tl.constexpr, length, stride_b, stride_s, VARLEN: tl.constexpr):
    """``(offset, length)``: the int64 element offset of batch entry ``batch``'s first token in a
    tensor of batch stride ``stride_b`` and token stride ``stride_s``, and its token count. With
    VARLEN, from the table's START column and the one after it (the count), ``stride_b`` unread;
    else ``batch · stride_b`` and ``length``."""
    if VARLEN:
        row = SEQS + batch.to(tl.int64) * TABLE_FIELDS
        return tl.load(row + START).to(tl.int64) * stride_s, tl.load(row + START + 1)
    return batch.to(tl.int64) * stride_b, length


@triton.jit
def field(SEQS, batch, FIELD: tl.constexpr):
    """Column FIELD of batch entry ``batch``'s row of the table."""
    return tl.load(SEQS + batch.to(tl.int64) * TABLE_FIELDS + FIELD)


@triton.jit
def head_offset(batch, head, heads, n, first, VARLEN: tl.constexpr):
    """The int64 offset of (batch entry, head)'s first element in a ``[B, heads, n]`` layout (its
    scales, its statistics), or with VARLEN in a packed batch's ``[heads, n]``, where the entry's
    start at ``first``."""
    if VARLEN:
        return head.to(tl.int64) * n + first
    return (batch * heads + head).to(tl.int64) * n


class PackedBatch(NamedTuple):
    """A packed batch as the kernels take it: its table on the tensors' device, its entries'
    lengths on the host (for the grids' tile maps, `tile_map`), the longest entry's, and its
    queries and keys with every entry padded to whole blocks (the sizes of its packed scales,
    statistics and V payload)."""

    table: torch.Tensor  # int32 [entries, TABLE_FIELDS]
    q_lens: np.ndarray
    k_lens: np.ndarray
    q_padded: int  # Σ ceil_to(q_len, Q_TILE)
    k_padded: int  # Σ ceil_to(k_len, KEY_BLOCK): V's payload columns

    @property
    def entries(self) -> int:
        return self.table.shape[0]

    @property
    def max_q(self) -> int:
        return int(self.q_lens.max())

    @property
    def max_k(self) -> int:
        return int(self.k_lens.max())

    @classmethod
    def build(cls, q_lens: list[int], k_lens: list[int], device: torch.device) -> PackedBatch:
        """The packed batch of entries of ``q_lens`` queries and ``k_lens`` keys, in that order."""
        q_lens, k_lens = np.asarray(q_lens, dtype=np.int64), np.asarray(k_lens, dtype=np.int64)
        if q_lens.shape != k_lens.shape:
            raise ValueError(f"{len(q_lens)} query lengths for {len(k_lens)} key lengths")
        q_padded = _padded(q_lens, groups.Q_TILE)
        k_padded = _padded(k_lens, KEY_BLOCK)
        if max(q_padded[-1], k_padded[-1]) > INT32_MAX:
            raise ValueError(f"a packed batch of {q_lens.sum()} queries and {k_lens.sum()} keys ({q_padded[-1]} and "
                             f"{k_padded[-1]} with every sequence padded to whole {groups.Q_TILE}-query and "
                             f"{KEY_BLOCK}-key blocks) is past the {INT32_MAX} tokens the sequence table holds")
        table = np.stack([_starts(q_lens), q_lens, _starts(k_lens), k_lens, k_padded[:-1], q_padded[:-1]], axis=1)
        return cls(_to_device(table, device), q_lens, k_lens, int(q_padded[-1]), int(k_padded[-1]))

    def tile_map(self, counts: np.ndarray, work=None) -> torch.Tensor:
        """A grid's programs as ``(entry, tile)`` int32 pairs ``[P, 2]`` on the table's device (`program`):
        ``counts[i]`` tiles of entry i, so that no program of the grid idles (a grid of entries ×
        the longest entry's tiles would be mostly idle programs beside one long entry); with
        ``work(entry, tile)`` (the pairs' columns, entry-major, to one value per pair), the heaviest
        first, for a shorter tail."""
        counts = np.asarray(counts, dtype=np.int64)
        entry = np.repeat(np.arange(len(counts)), counts)
        tile = np.arange(counts.sum()) - np.repeat(_starts(counts), counts)
        pairs = np.stack([entry, tile], axis=1)
        if work is not None:
            pairs = pairs[np.argsort(-work(entry, tile), kind="stable")]
        return _to_device(pairs, self.table.device)


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _padded(lengths: np.ndarray, block: int) -> np.ndarray:
    """The entries' starts with each padded to whole ``block``s, and their total last."""
    return np.concatenate([[0], np.cumsum(-(-lengths // block) * block)])


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as int32 on ``device``: on a GPU by a pinned, asynchronous copy (a pageable one
    waits for the work queued on the stream)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


@triton.jit
def program(TILES, VARLEN: tl.constexpr):
    """``(tile, batch)`` of this program: grid axes 0 and 2, or with VARLEN its pair of the grid's
    tile map (`PackedBatch.tile_map`) along axis 0."""
    if VARLEN:
        pair = TILES + tl.program_id(0).to(tl.int64) * 2
        return tl.load(pair + 1), tl.load(pair)
    return tl.program_id(0), tl.program_id(2)


__all__ = ["KEY_BLOCK", "K_LEN", "K_PADDED", "K_START", "PackedBatch", "Q_LEN", "Q_PADDED", "Q_START",
           "TABLE_FIELDS", "entry", "field", "head_offset", "program"]
