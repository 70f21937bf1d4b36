"""Quantization layout rules of SPEC §3–5, written once for every backend.

The group functions use only ``//``, ``%``, ``*`` and ``+`` on their index argument, so the same
source serves Python ints, torch index tensors (CPU reference) and, wrapped by ``triton.jit``,
Triton kernels. ``per_thread`` must be a Python bool / ``tl.constexpr``.
"""

from __future__ import annotations

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
# log2(448): softmax weights are computed as 2**(logit - max - FP8_OFFSET) so the block maximum
# lands near 448, the top of e4m3.
FP8_OFFSET_LOG2 = 8.807
LOG2E = 1.4426950408889634
PER_WARP_AMAX_FLOOR = 1e-7  # per_warp: amax = max(1e-7, max|x|)
PER_THREAD_SCALE_EPS = 1e-7  # per_thread: scale = max|x|/127 + 1e-7
# V channels with amax below V_PRESCALE_BELOW (bf16 only: fp16's nonzero amax is >= 2**-25) are
# quantized as (v·2**64)·(scale_max / (amax·2**64)): below ~1e-36 scale_max / amax overflows float32
# and inf times the channel's zeros gave NaN. Both products are exact power-of-two shifts of SPEC
# §4's, so every other channel's payload is unchanged bit for bit.
V_PRESCALE_BELOW = 2.0 ** -64
V_PRESCALE = 2.0 ** 64

# The SM89 kernel's tiles, from which the groups derive.
Q_TILE = 128  # query rows per block (4 warps x 32 rows)
K_TILE = 64  # keys per block
V_WINDOW = 16  # V's per-channel statistics cover ceil_16(Sk) tokens (zero padded)
# Head dims the kernels run (powers of two: Triton's tl.arange needs them); a caller's head dim is
# zero-padded up to the first that holds it, so 64 and 128 stay as the official kernel pads them.
HEAD_DIMS = (64, 128, 256)


def cdiv(x: int, divisor: int) -> int:
    """ceil(x / divisor) for positive ints (plain Python: ``triton.cdiv`` costs ~10 us per call)."""
    return -(-x // divisor)


def ceil_to(x: int, multiple: int) -> int:
    return cdiv(x, multiple) * multiple


def padded_head_dim(head_dim: int, argument: str = "head dim") -> int:
    """The kernel head dim a caller's ``head_dim`` is zero-padded to; a ValueError naming
    ``argument`` (e.g. "q head dim") above the largest."""
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"{argument} must be <= {HEAD_DIMS[-1]}, got {head_dim}")


def q_group(t, per_thread):
    """Scale group of query token ``t``: a warp's 32 rows, or the 4 rows t, t+8, t+16, t+24."""
    if per_thread:
        return 8 * (t // 32) + t % 8
    return t // 32


def k_group(j, per_thread):
    """Scale group of key token ``j``: a 64-key block, or the 16 keys one mma thread owns."""
    if per_thread:
        return 4 * (j // 64) + (j % 8) // 2
    return j // 64


def v_kernel_token(p):
    """The key token the attention kernel's V payload keeps at position ``p``: within each 16,
    position 4t + 2b + e (b, e in {0, 1}, t in 0..3) holds token 8b + 2t + e, i.e. tokens 0, 1, 8,
    9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15 in that order (the official kernel's order).

    The mma accumulator gives the thread of lane t % 4 the scores of keys 2t and 2t + 1 of every
    8; the fp8 P·V product wants from it 4 consecutive k positions 4t..4t+3 of every 16. P's
    columns taken in this order, with V's tokens in the same order, leave every thread its own
    scores (no shuffles) and the product unchanged."""
    return (p // 16) * 16 + (p % 4) // 2 * 8 + (p % 16) // 4 * 2 + p % 2


def groups_per_tile(rule, rows: int, per_thread: bool) -> int:
    """Scale groups that ``rows`` tokens from a multiple of ``rows`` hold (G1·G2 of `group_shape`)."""
    g1, _, g2, _ = group_shape(rule, rows, per_thread)
    return g1 * g2


def group_shape(rule, rows: int, per_thread: bool) -> tuple[int, int, int, int]:
    """``(G1, R1, G2, R2)``: ``rows`` tokens from a multiple of ``rows`` seen as ``[G1, R1, G2, R2]``
    (token ((g1·R1 + r1)·G2 + g2)·R2 + r2) so that ``rule`` (`q_group` or `k_group`) puts the token
    of (g1, r1, g2, r2) in group rule(first token) + g1·G2 + g2: a group's maximum is then a
    reduction over the R axes (how the Triton quantizer finds them; per_thread's Q groups, rows
    t, t+8, t+16, t+24, are (2, 4, 8, 1)). Derived from the rule and checked on the tokens of a few
    tiles, so it cannot drift from it."""
    exponent = rows.bit_length() - 1
    for e1, f1, e2 in ((a, b, c) for a in range(exponent + 1) for b in range(exponent + 1 - a)
                       for c in range(exponent + 1 - a - b)):
        g1, r1, g2 = 1 << e1, 1 << f1, 1 << e2
        r2 = rows // (g1 * r1 * g2)
        if all(rule(base + t, per_thread) - rule(base, per_thread) == (t // (r1 * g2 * r2)) * g2 + t // r2 % g2
               for base in (0, rows, 5 * rows) for t in range(rows)):
            return g1, r1, g2, r2
    raise ValueError(f"{rule.__name__}'s groups over {rows} tokens are not a [G1, R1, G2, R2] view")


def q_num_groups(seq_q: int, per_thread: bool) -> int:
    return ceil_to(seq_q, Q_TILE) // Q_TILE * (32 if per_thread else 4)


def k_num_groups(seq_k: int, per_thread: bool) -> int:
    return ceil_to(seq_k, K_TILE) // K_TILE * (4 if per_thread else 1)


def causal_offset(seq_q: int, seq_k: int) -> int:
    """Key j is visible to query t iff j <= t + offset: top-left when Sq == Sk, else bottom-right."""
    return seq_k - seq_q
