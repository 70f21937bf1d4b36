"""Sequence parallelism on torch.distributed: each rank of a process group holds a piece of the
sequence, and the attention spans all of it.

- `ulysses_attention` (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards, the op
  on whole sequences, all-to-all back. The single-device op's result bit for bit; 16-bit traffic;
  the group's size must divide the query heads.
- `ring_attention`: each rank's K and V go around the ring as their int8/fp8 payloads (half the
  bytes of fp16 at head dims 64/128/256), quantized once; partial outputs merge by their LSEs.
  Any head count, cross attention, and with ``sharding="zigzag"`` balanced causal work.
- `usp_attention` (unified sequence parallelism, as xDiT runs it): Ulysses inside groups with fast
  links, the ring across them; `usp_groups` makes that grid.

`shard_sequence`, `sequence_positions` and `gather_sequence` cut a whole sequence the way these
expect and put it back together (`gather_sequence` needs the same shard shape on every rank, and
raises on every rank otherwise).
Works on the torch.distributed backend the tensors' device has (NCCL for CUDA, gloo for the CPU
reference). Every call first agrees with its peers that
all of them can go on (`agreement`), so one rank's bad arguments raise everywhere instead of
leaving the others waiting.
"""

from .ring import ring_attention
from .sharding import SHARDINGS, gather_sequence, sequence_positions, shard_sequence
from .ulysses import ulysses_attention
from .usp import usp_attention, usp_groups

__all__ = ["SHARDINGS", "gather_sequence", "ring_attention", "sequence_positions", "shard_sequence",
           "ulysses_attention", "usp_attention", "usp_groups"]
