"""Debug toggles: ``GGML_SAGE_*`` environment variables, read at every call of the op.

When one of `ACTIVATING` is set, `sageflash.sage_attn_sm89_fp16` runs through `run`, which calls
the backend's own ``quantize_qk`` / ``quantize_v`` / ``attention_from_payloads`` (so it covers both
backends) and adds what the toggles ask for: dumps of every intermediate, another Q/K quantizer,
scale statistics, online-softmax telemetry. With none set the op never comes here. Messages go to
stderr, prefixed ``sageflash <topic>:``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import dumps, groups, reference
from .params import QKGranularity, SageParams, getenv
from .reference.attention import expand_scales, mask_bias, online_softmax_blocks, visible_keys
from .reference.quant import centre_keys, quantize_int8_groups

DUMP = "GGML_SAGE_DUMP"
DUMP_QK_INT8 = "GGML_SAGE_DUMP_QK_INT8"
DEBUG_QUANT = "GGML_SAGE_DEBUG_QUANT"
FORCE_HOST_QK = "GGML_SAGE_FORCE_HOST_QK"
FORCE_SIMPLE_QK = "GGML_SAGE_FORCE_SIMPLE_QK"
Q_SERIAL = "GGML_SAGE_Q_SERIAL"
SAMPLE_PREFIX = "GGML_SAGE_SAMPLE_PREFIX"
SAMPLE_HEAD = "GGML_SAGE_SAMPLE_HEAD"
SAMPLE_BLOCK = "GGML_SAGE_SAMPLE_BLOCK"
SAMPLE_LIMIT = "GGML_SAGE_SAMPLE_LIMIT"
KERNEL_ITERS = "GGML_SAGE_DEBUG_KERNEL_ITERS"
KERNEL_PRINT_LIMIT = "GGML_SAGE_KERNEL_PRINT_LIMIT"

# The toggles that put the op on the debug path; the others only refine these.
ACTIVATING = (DUMP, DUMP_QK_INT8, SAMPLE_PREFIX, DEBUG_QUANT, FORCE_HOST_QK, FORCE_SIMPLE_QK, Q_SERIAL,
              KERNEL_ITERS)
_OFF = ("", "0", "false", "no", "off")
_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16"}
_MASK_DTYPE_NAMES = {dtype: name for name, dtype in dumps.MASK_DTYPES.items()}
# Tags indexed by query head (the rest by KV head), and those with a query-token axis (dim 2);
# the mask's head and row axes may be broadcast (size 1).
_QUERY_HEAD_TAGS = {"q", "q_pad", "q_int8", "q_scale", "out", "flash", "sage_quant", "lse", dumps.ATTN_MASK}
_QUERY_ROW_TAGS = _QUERY_HEAD_TAGS - {"q_scale"}

_calls = itertools.count()


def _is_set(name: str) -> bool:
    raw = getenv(name)
    return raw is not None and raw.strip().lower() not in _OFF


def _env_int(name: str, default: int | None, minimum: int) -> int | None:
    raw = (getenv(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"environment variable {name} must be an integer >= {minimum}, got {raw!r}")
    return value


def active() -> tuple[str, ...]:
    """The toggles of `ACTIVATING` that are set (cheap: one lookup per toggle)."""
    return tuple(name for name in ACTIVATING if _is_set(name))


def enabled() -> bool:
    """True when a toggle that changes what the op does is set."""
    return bool(active())


def reset() -> None:
    """Start counting calls from 0 again: the next call is dumped as if it were the first."""
    global _calls
    _calls = itertools.count()


@dataclasses.dataclass(frozen=True)
class Toggles:
    """The toggles in effect for one call; the defaults are all off."""

    dump: str | None = None
    dump_qk_int8: str | None = None
    sample_prefix: str | None = None
    sample_head: int | None = None
    sample_block: int | None = None
    sample_limit: int = 8
    debug_quant: bool = False
    force_host_qk: bool = False
    force_simple_qk: bool = False
    q_serial: bool = False
    kernel_iters: int = 0
    kernel_print_limit: int = 4

    @classmethod
    def from_env(cls) -> "Toggles":
        def prefix(name):
            return getenv(name) if _is_set(name) else None

        return cls(dump=prefix(DUMP), dump_qk_int8=prefix(DUMP_QK_INT8), sample_prefix=prefix(SAMPLE_PREFIX),
                   sample_head=_env_int(SAMPLE_HEAD, None, 0), sample_block=_env_int(SAMPLE_BLOCK, None, 0),
                   sample_limit=_env_int(SAMPLE_LIMIT, cls.sample_limit, 0),
                   debug_quant=_is_set(DEBUG_QUANT), force_host_qk=_is_set(FORCE_HOST_QK),
                   force_simple_qk=_is_set(FORCE_SIMPLE_QK), q_serial=_is_set(Q_SERIAL),
                   kernel_iters=_env_int(KERNEL_ITERS, 0, 0) if _is_set(KERNEL_ITERS) else 0,
                   kernel_print_limit=_env_int(KERNEL_PRINT_LIMIT, cls.kernel_print_limit, 1))


@dataclasses.dataclass
class Payloads:
    """The quantized operands of one call; field names are the dump tags (SPEC §9)."""

    q_int8: torch.Tensor
    q_scale: torch.Tensor
    k_int8: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor | None
    v_fp8: torch.Tensor
    v_scale: torch.Tensor
    v_mean: torch.Tensor | None

    def tags(self, names=None) -> dict[str, torch.Tensor]:
        names = names or [f.name for f in dataclasses.fields(self)]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


# --- Q/K quantizers -------------------------------------------------------------------------


def _quantize_per_group(x, group_of, num_groups: int, per_thread: bool):
    """int8 values and scales of float32 ``x [B,H,S,D]``, one group at a time."""
    token_groups = group_of(torch.arange(x.shape[2], device=x.device), per_thread)
    values = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(*x.shape[:2], num_groups, dtype=torch.float32, device=x.device)
    for group in range(num_groups):
        members = (token_groups == group).nonzero().flatten()
        group_values, group_scale = quantize_int8_groups(x[:, :, members], torch.zeros_like(members), 1,
                                                         per_thread)
        values[:, :, members] = group_values
        scales[:, :, group] = group_scale[:, :, 0]
    return values, scales


def simple_quantize_qk(q, k, *, granularity, smooth_k: bool):
    """Q/K to int8 by a plain loop over the scale groups (``GGML_SAGE_FORCE_SIMPLE_QK``).

    A second, deliberately naive route through SPEC §3 to cross-check a backend's grouping: each
    group's tokens are picked by membership and quantized as one group with the reference rule.
    """
    per_thread = QKGranularity.parse(granularity, "granularity") is QKGranularity.PER_THREAD
    head_dim = groups.padded_head_dim(q.shape[-1])
    pad = (0, head_dim - q.shape[-1])
    km = None
    k_centered = k.float()
    if smooth_k:
        km = reference.key_mean(k)
        k_centered = centre_keys(k, km, per_thread)
        km = F.pad(km, pad)
    q_int8, q_scale = _quantize_per_group(F.pad(q.float(), pad), groups.q_group,
                                          groups.q_num_groups(q.shape[2], per_thread), per_thread)
    k_int8, k_scale = _quantize_per_group(F.pad(k_centered, pad), groups.k_group,
                                          groups.k_num_groups(k.shape[2], per_thread), per_thread)
    return q_int8, q_scale, k_int8, k_scale, km


def _on_host(quantize):
    """``quantize`` run on CPU copies, its payloads moved back to the inputs' device."""
    def host_quantize(q, k, **knobs):
        payloads = quantize(q.cpu(), k.cpu(), **knobs)
        return tuple(None if t is None else t.to(q.device) for t in payloads)
    return host_quantize


def _one_head_at_a_time(quantize):
    """``quantize`` called once per query head (with its KV head), the payloads concatenated."""
    def serial_quantize(q, k, **knobs):
        group = q.shape[1] // k.shape[1]
        parts = [quantize(q[:, h:h + 1].contiguous(), k[:, h // group:h // group + 1].contiguous(), **knobs)
                 for h in range(q.shape[1])]
        kv_parts = parts[::group]  # K payloads from the first query head of each KV head
        q_int8, q_scale = (torch.cat([p[i] for p in parts], dim=1) for i in (0, 1))
        k_int8, k_scale = (torch.cat([p[i] for p in kv_parts], dim=1) for i in (2, 3))
        km = None if kv_parts[0][4] is None else torch.cat([p[4] for p in kv_parts], dim=1)
        return q_int8, q_scale, k_int8, k_scale, km
    return serial_quantize


def qk_quantizer(backend, toggles: Toggles):
    """(quantize_qk, a few words saying which) for the toggles: simple, host reference, the backend."""
    if toggles.force_simple_qk:
        quantize, where = simple_quantize_qk, "the simple per-group quantizer"
    elif toggles.force_host_qk:
        quantize, where = reference.quantize_qk, "the CPU reference"
    else:
        quantize, where = backend.quantize_qk, backend.__name__
    if toggles.force_host_qk:
        quantize, where = _on_host(quantize), f"{where} on the host"
    if toggles.q_serial:
        quantize, where = _one_head_at_a_time(quantize), f"{where}, one head at a time"
    return quantize, where


def quantize(backend, q, k, v, params: SageParams, toggles: Toggles = Toggles()) -> Payloads:
    """Every payload of one call, from the backend (or the quantizer the toggles choose for Q/K)."""
    quantize_qk, _ = qk_quantizer(backend, toggles)
    q_int8, q_scale, k_int8, k_scale, km = quantize_qk(q, k, granularity=params.granularity,
                                                       smooth_k=params.smooth_k)
    v_fp8, v_scale, v_mean = backend.quantize_v(v, pv_accum=params.pv_accum, smooth_v=params.smooth_v)
    return Payloads(q_int8, q_scale, k_int8, k_scale, km, v_fp8, v_scale, v_mean)


def attend(backend, payloads: Payloads, q, seq_k: int, params: SageParams, return_lse: bool = False,
           out=None, attn_mask=None):
    return backend.attention_from_payloads(
        payloads.q_int8, payloads.q_scale, payloads.k_int8, payloads.k_scale, payloads.v_fp8,
        payloads.v_scale, payloads.v_mean, params=params, seq_q=q.shape[2], seq_k=seq_k,
        head_dim=q.shape[-1], out_dtype=q.dtype, q=q, km=payloads.k_mean, return_lse=return_lse, out=out,
        attn_mask=attn_mask)


# --- dumps ----------------------------------------------------------------------------------


def compact_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """``attn_mask`` as a 4-dim view whose broadcast sizes (an ``expand``: stride 0) are cut to 1:
    what a dump records, never the materialised ``[B, Hq, Sq, Sk]``."""
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for dim in range(4):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


def meta_for(q, k, params: SageParams, attn_mask=None, **provenance) -> dumps.DumpMeta:
    """The `DumpMeta` of a call on ``q``/``k`` with the knobs it really used (and the shape of
    its `compact_mask`)."""
    if attn_mask is not None:
        provenance.update(mask_dtype=_MASK_DTYPE_NAMES[attn_mask.dtype],
                          mask_shape=tuple(compact_mask(attn_mask).shape))
    return dumps.DumpMeta(head_dim=q.shape[-1], seq_q=q.shape[2], seq_k=k.shape[2], num_q_heads=q.shape[1],
                          num_k_heads=k.shape[1], batch=q.shape[0], is_causal=params.is_causal,
                          smooth_k=params.smooth_k, smooth_v=params.smooth_v, pv_accum=str(params.pv_accum),
                          granularity=str(params.granularity), dtype=_DTYPE_NAMES[q.dtype],
                          softmax_scale=params.softmax_scale, **provenance)


def input_tags(q, k, v) -> dict[str, torch.Tensor]:
    """q, k, v, and their zero-padded copies when the head dim is not already a kernel head dim."""
    tags = {"q": q, "k": k, "v": v}
    head_dim = groups.padded_head_dim(q.shape[-1])
    if head_dim != q.shape[-1]:
        tags.update({f"{tag}_pad": F.pad(x, (0, head_dim - x.shape[-1])) for tag, x in tags.items()})
    return tags


def check_sample(head: int | None, block: int | None, num_q_heads: int, seq_q: int) -> None:
    """The sampled head and block (`Toggles`) must exist in a call of that many query heads and rows."""
    if head is not None and head >= num_q_heads:
        raise ValueError(f"{SAMPLE_HEAD}={head} is out of range: the call has {num_q_heads} query heads")
    if block is not None and block * groups.Q_TILE >= seq_q:
        raise ValueError(f"{SAMPLE_BLOCK}={block} is out of range: the call has "
                         f"{groups.cdiv(seq_q, groups.Q_TILE)} query blocks of {groups.Q_TILE} rows")


def restrict(meta: dumps.DumpMeta, tensors: dict, head: int | None, block: int | None):
    """(meta, tensors) cut down to one query head (and its KV head) and/or one 128-row query block
    (both in range: `run` checks them first, whichever toggle reads them)."""
    meta = dataclasses.replace(meta)
    notes = []
    if head is not None:
        kv_head = head // (meta.num_q_heads // meta.num_k_heads)
        tensors = {tag: _narrow(t, 1, head) if tag in _QUERY_HEAD_TAGS else _narrow(t, 1, kv_head)
                   for tag, t in tensors.items()}
        meta.num_q_heads = meta.num_k_heads = 1
        notes.append(f"query head {head} (kv head {kv_head})")
    if block is not None:
        start, stop = block * groups.Q_TILE, min(meta.seq_q, (block + 1) * groups.Q_TILE)
        per_block = groups.q_num_groups(groups.Q_TILE, meta.params.granularity is QKGranularity.PER_THREAD)
        scale_groups = slice(block * per_block, (block + 1) * per_block)
        tensors = {tag: _narrow(t, 2, start, stop - start) if tag in _QUERY_ROW_TAGS else
                   t[:, :, scale_groups] if tag == "q_scale" else t for tag, t in tensors.items()}
        meta.seq_q = stop - start
        notes.append(f"query rows {start}..{stop - 1}")
    if notes:
        meta.source = f"{meta.source}; sample: {', '.join(notes)}"
    if dumps.ATTN_MASK in tensors:
        meta.mask_shape = tuple(tensors[dumps.ATTN_MASK].shape)
    return meta, tensors


def _narrow(tensor: torch.Tensor, dim: int, start: int, length: int = 1) -> torch.Tensor:
    """``tensor`` cut to ``length`` indices from ``start`` along ``dim``, unless it only broadcasts
    there (size 1: an `ATTN_MASK`'s head or row axis)."""
    return tensor if tensor.shape[dim] == 1 else tensor.narrow(dim, start, length)


# --- prints ---------------------------------------------------------------------------------


def _say(topic: str, message: str) -> None:
    print(f"sageflash {topic}: {message}", file=sys.stderr)


def _print_stats(name: str, axis: str, rows: torch.Tensor, labels) -> None:
    """min/mean/max of each row of ``rows`` (reduced where it lives, then one copy to the host)."""
    stats = torch.stack([rows.amin(dim=1), rows.mean(dim=1), rows.amax(dim=1)], dim=1).tolist()
    for label, (low, mean, high) in zip(labels, stats):
        _say("quant", f"{name} {axis} {label}: min {low:.4e} mean {mean:.4e} max {high:.4e}")


def print_scale_stats(payloads: Payloads, meta: dumps.DumpMeta, where: str, call: int) -> None:
    """``GGML_SAGE_DEBUG_QUANT``: scale statistics per head and per group (groups holding tokens)."""
    per_thread = meta.params.granularity is QKGranularity.PER_THREAD
    _say("quant", f"call {call}: Q/K quantized by {where}, on {payloads.q_scale.device}")
    for name, scale, group_of, seq in (("q_scale", payloads.q_scale, groups.q_group, meta.seq_q),
                                       ("k_scale", payloads.k_scale, groups.k_group, meta.seq_k)):
        used_groups = torch.unique(group_of(torch.arange(seq), per_thread))
        used = scale[:, :, used_groups.to(scale.device)]
        _print_stats(name, "head", used.transpose(0, 1).flatten(1), range(used.shape[1]))
        _print_stats(name, "group", used.permute(2, 0, 1).flatten(1), used_groups.tolist())
    v_scale = payloads.v_scale[..., :meta.head_dim]
    _print_stats("v_scale", "head", v_scale.transpose(0, 1).flatten(1), range(v_scale.shape[1]))


def print_softmax_telemetry(payloads: Payloads, params: SageParams, meta: dumps.DumpMeta,
                            toggles: Toggles, call: int, attn_mask=None) -> None:
    """``GGML_SAGE_DEBUG_KERNEL_ITERS``: the online softmax of SPEC §5, block by block.

    For batch 0, query head ``GGML_SAGE_SAMPLE_HEAD`` (default 0) and the first
    ``GGML_SAGE_KERNEL_PRINT_LIMIT`` rows of query block ``GGML_SAGE_SAMPLE_BLOCK`` (default 0):
    per 64-key block n, the running max m_n, the rescale alpha_n = 2^(m_{n-1} - m_n) and the
    running denominator l_n = alpha_n * l_{n-1} + sum_j P~, computed by the reference from the
    call's payloads and ``attn_mask``.
    """
    head, block = toggles.sample_head or 0, toggles.sample_block or 0
    sampled, picked = restrict(meta, payloads.tags(["q_int8", "q_scale", "k_int8", "k_scale"]), head, block)
    per_thread = params.granularity is QKGranularity.PER_THREAD
    local_rows = torch.arange(sampled.seq_q)[:toggles.kernel_print_limit]
    rows = local_rows + block * groups.Q_TILE
    padded_keys = groups.ceil_to(meta.seq_k, groups.K_TILE) - meta.seq_k
    q8 = picked["q_int8"][0, 0, local_rows].cpu().float()
    k8 = F.pad(picked["k_int8"][0, 0].cpu().float(), (0, 0, 0, padded_keys))
    row_scale = expand_scales(picked["q_scale"][:1].cpu(), groups.q_group, sampled.seq_q, per_thread)[0, 0]
    key_scale = expand_scales(picked["k_scale"][:1].cpu(), groups.k_group, meta.seq_k, per_thread)[0, 0]
    logits = (q8 @ k8.T) * row_scale[local_rows, None] * F.pad(key_scale, (0, padded_keys))[None] \
        * params.softmax_scale * groups.LOG2E
    if attn_mask is not None:
        rows_mask = _narrow(_narrow(compact_mask(attn_mask)[:1], 1, head)[0, 0], 0, rows[0].item(), rows.numel())
        logits = logits + mask_bias(rows_mask.expand(rows.numel(), meta.seq_k).cpu(), logits.shape[-1])
    mask = visible_keys(rows, meta.seq_q, meta.seq_k, params.is_causal)
    p_tilde, block_max, _ = online_softmax_blocks(logits, mask)
    block_sums = p_tilde.unflatten(-1, (-1, groups.K_TILE)).sum(dim=-1).tolist()
    for row, maxima, sums in zip(rows.tolist(), block_max.tolist(), block_sums):
        previous, denominator = -math.inf, 0.0
        for n, (m, block_sum) in enumerate(zip(maxima[:toggles.kernel_iters], sums)):
            alpha = 2.0 ** (previous - m) if math.isfinite(previous) else 0.0
            denominator = alpha * denominator + block_sum
            _say("kernel", f"call {call} batch 0 head {head} row {row} block {n}: "
                           f"m {m:.6f} alpha {alpha:.6f} l {denominator:.6f}")
            previous = m


# --- the debug path of the op ---------------------------------------------------------------


def rank_prefix(prefix: str) -> str:
    """``prefix``, plus ``.rank<r>`` in a torch.distributed group of several processes, whose
    ranks would otherwise write the same files at once (sequence parallelism, data parallelism)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"{prefix}.rank{dist.get_rank()}"
    return prefix


def run(backend, q, k, v, params: SageParams, return_lse: bool = False, out=None, attn_mask=None):
    """The op with the toggles set now: same result as ``backend.attention`` (same arguments; up
    to a swapped Q/K quantizer), plus the dumps and prints asked for."""
    toggles = Toggles.from_env()
    check_sample(toggles.sample_head, toggles.sample_block, q.shape[1], q.shape[2])  # whichever toggle reads them
    call = next(_calls)
    _, where = qk_quantizer(backend, toggles)
    payloads = quantize(backend, q, k, v, params, toggles)
    meta = meta_for(q, k, params, attn_mask, source=f"sageflash debug dump, call {call}, Q/K by {where}")
    mask_tag = {} if attn_mask is None else {dumps.ATTN_MASK: compact_mask(attn_mask)}
    sample = (toggles.sample_head, toggles.sample_block)

    def dump(prefix: str, tags: dict) -> None:
        dumps.write_dump(rank_prefix(prefix), *restrict(meta, {**tags, **mask_tag}, *sample))

    if toggles.dump_qk_int8 and call == 0:
        dump(toggles.dump_qk_int8, {"q": q, "k": k, **payloads.tags(["q_int8", "q_scale", "k_int8", "k_scale",
                                                                     "k_mean"])})
    if toggles.debug_quant:
        print_scale_stats(payloads, meta, where, call)
    if toggles.kernel_iters:
        print_softmax_telemetry(payloads, params, meta, toggles, call, attn_mask)
    result = attend(backend, payloads, q, k.shape[2], params, return_lse, out, attn_mask)
    out = result[0] if return_lse else result
    tensors = {**input_tags(q, k, v), **payloads.tags(), "out": out}
    if toggles.dump and call == 0:
        dump(toggles.dump, tensors)
    if toggles.sample_prefix and call < toggles.sample_limit:
        dump(f"{toggles.sample_prefix}{call}", tensors)
    return result
