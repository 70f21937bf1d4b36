"""Packed variable-length batches (`sageflash.sage_attn_varlen`) as the kernels see them.

Every kernel puts the batch on its grid's z axis and finds an entry's tokens at ``batch ·
stride_b``. In a packed batch the entries' tokens follow one another along the token axis: a
kernel compiled with VARLEN reads the entry's first token and its length from a sequence table,
one int32 row per entry (`TABLE_FIELDS`), and its programs past the entry's length do nothing.
Without VARLEN, `entry` compiles to the plain ``batch · stride_b`` (the same code as before the
table existed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import groups

# A row of the table: the entry's first query and its query count, its first key and key count,
# and the first column of its V payload (V's payload pads each entry to whole 64-key blocks).
Q_START, Q_LEN, K_START, K_LEN, V_START = (tl.constexpr(i) for i in range(5))
TABLE_FIELDS = tl.constexpr(5)
INT32_MAX = 2 ** 31 - 1  # the table's entries are int32 token counts (element offsets are 64-bit)


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


class PackedBatch(NamedTuple):
    """A packed batch as the kernels take it: its table on the tensors' device, the longest
    entry's query and key counts (the grids and the scales are sized by them) and the columns of
    V's payload (every entry's keys padded to whole `groups.K_TILE` blocks)."""

    table: torch.Tensor  # int32 [entries, TABLE_FIELDS]
    max_q: int
    max_k: int
    v_columns: int

    @property
    def entries(self) -> int:
        return self.table.shape[0]

    @classmethod
    def build(cls, q_lens: list[int], k_lens: list[int], device: torch.device) -> PackedBatch:
        """The packed batch of entries of ``q_lens`` queries and ``k_lens`` keys, in that order."""
        rows, q_start, k_start, v_start = [], 0, 0, 0
        for q_len, k_len in zip(q_lens, k_lens, strict=True):
            rows.append((q_start, q_len, k_start, k_len, v_start))
            q_start, k_start = q_start + q_len, k_start + k_len
            v_start += groups.ceil_to(k_len, groups.K_TILE)
        if max(q_start, v_start) > INT32_MAX:
            raise ValueError(f"a packed batch of {q_start} queries and {k_start} keys ({v_start} in V's payload, "
                             f"whose sequences start on whole {groups.K_TILE}-key blocks) is past the {INT32_MAX} "
                             "tokens the sequence table holds")
        table = torch.tensor(rows, dtype=torch.int32)
        if device.type == "cuda":  # a pinned, asynchronous copy: a pageable one waits for the GPU's queue
            table = table.pin_memory().to(device, non_blocking=True)
        return cls(table, max(q_lens), max(k_lens), v_start)


__all__ = ["K_LEN", "K_START", "PackedBatch", "Q_LEN", "Q_START", "TABLE_FIELDS", "V_START", "entry", "field"]
