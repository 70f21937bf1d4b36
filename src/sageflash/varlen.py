"""Packed variable-length batches: `sage_attn_varlen`, in flash-attn's varlen layout.

A batch of sequences of different lengths, packed one after another along the token axis (no
padding), with ``cu_seqlens`` marking where each starts: what flash-attn's
``flash_attn_varlen_func`` and SageAttention's ``sageattn_varlen`` take (HunyuanVideo, diffusers'
varlen backends, LLM prefill). Each sequence gets exactly what `sage_attn_sm89_fp16` gives it
alone: its own K mean, V scales and quantization groups, causal alignment and LSE.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from . import debug
from .autograd import without_backward
from .op import check_backend, check_tensor, register_no_backward, select_backend, validate_qk
from .params import SageParams, apply_overrides, check_bool, check_knobs, resolve_params, warn_once

PACKED = "[T, H, D]"  # a packed tensor: T tokens of every sequence in order
CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def check_packed(q, k, v) -> None:
    """q ``[Tq, Hq, D]``, k and v ``[Tk, Hk, D]``: dtypes, devices, heads (GQA) and head dim."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(x, name, 3, f"{PACKED}: the sequences' tokens packed along T")
    # As a batch of one [1, T, H, D] sequence, the op's own checks of everything but the tokens.
    validate_qk(q[None], k[None], "NHD")
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if v.device != k.device:
        raise ValueError(f"v must be on k's device {k.device}, got {v.device}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)} ([Tk, Hk, D]), got {tuple(v.shape)}")


def check_cu_seqlens(cu_seqlens, name: str, device: torch.device) -> None:
    """``cu_seqlens``: an int32/int64 tensor ``[N + 1]``, N >= 1, on the CPU or ``device`` (its
    values are checked where they are read, `sequence_lengths`)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in CU_SEQLENS_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D tensor [N + 1] of N >= 1 sequences' offsets, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"{name} must be on the CPU or on q's device {device}, got {cu_seqlens.device}")


def sequence_lengths(cu_seqlens: torch.Tensor, name: str, tokens: int) -> list[int]:
    """The sequence lengths ``cu_seqlens`` marks: from 0, non-decreasing, ending within the
    ``tokens`` packed (flash-attn's callers may pack into a longer buffer). Its values are read on
    the host (on a GPU, one copy that waits for the work queued before it)."""
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or min(lengths) < 0 or offsets[-1] > tokens:
        raise ValueError(f"{name} must rise from 0 without falling and end within the {tokens} packed tokens, "
                         f"got {_abridged(offsets)}")
    return lengths


def _abridged(values: list[int], shown: int = 8) -> str:
    return str(values) if len(values) <= shown else f"[{', '.join(map(str, values[:shown]))}, ...] ({len(values)})"


def _check_max_seqlen(value, name: str) -> int | None:
    """None, or an int (flash-attn sizes its grid by it; here it is checked against the sequences,
    `_check_longest`, which size the grids themselves)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    return int(value)


def _check_longest(value: int | None, name: str, longest: int) -> None:
    if value is not None and value < longest:
        raise ValueError(f"{name}={value} is below the longest sequence, {longest} tokens")


def check_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal,
               smooth_k, smooth_v, pv_accum, granularity, return_lse, backend):
    """Validate a call of `sage_attn_varlen` as far as it can be without reading ``cu_seqlens``'
    values (pure, so ``torch.compile`` traces it): its checked knobs, ``max_seqlen_*`` as ints and
    ``return_lse``."""
    check_packed(q, k, v)
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must mark as many sequences, got "
                         f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}")
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    params = check_knobs(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                         head_dim=q.shape[-1])
    return_lse = check_bool(return_lse, "return_lse")
    check_backend(backend)
    return params, max_seqlen_q, max_seqlen_k, return_lse


_OP_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int? max_seqlen_q, "
              "int? max_seqlen_k, float? softmax_scale, bool is_causal, bool smooth_k, bool smooth_v, str pv_accum, "
              "str granularity, bool return_lse, str backend) -> (Tensor, Tensor)")


def _attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, smooth_k,
            smooth_v, pv_accum, granularity, return_lse, backend):
    """The registered op, for checked arguments: ``(out, lse)``, lse empty unless ``return_lse``; the
    ``GGML_SAGE_*`` overrides are read here, at run time."""
    params = resolve_params(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                            head_dim=q.shape[-1])
    out, lse = _attend_resolved(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params,
                                return_lse, backend)
    return out, q.new_empty(0, dtype=torch.float32) if lse is None else lse


def _attend_resolved(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params: SageParams,
                     return_lse: bool, backend: str):
    """`_attend` once the knobs are resolved (eager calls start here): reads ``cu_seqlens`` on the
    host, checks them, runs the backend; ``(out, lse)``, lse None unless ``return_lse``."""
    q_lens = sequence_lengths(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    k_lens = sequence_lengths(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    _check_longest(max_seqlen_q, "max_seqlen_q", max(q_lens))
    _check_longest(max_seqlen_k, "max_seqlen_k", max(k_lens))
    module = select_backend(backend, q.device)
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("sage_attn_varlen cannot be captured in a CUDA graph: it reads cu_seqlens and builds "
                           "its tables on the host at every call (capture sage_attn_sm89_fp16 per sequence instead)")
    toggles = debug.active()
    if toggles:
        warn_once(("varlen-debug",), "sage_attn_varlen runs without the debug toggles (%s set): to dump or trace "
                  "a sequence, call sageflash.sage_attn_sm89_fp16 on it", ", ".join(toggles))
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32) if return_lse else None
    keys = sum(k_lens)
    rows = sum(q_lens) if keys else 0  # attended; the rest (past the batch, or no key anywhere) is zeros
    out[rows:] = 0
    if return_lse:
        lse[:, rows:] = -math.inf
    if rows:
        result = module.attention_varlen(q[:rows], k[:keys], v[:keys], q_lens, k_lens, params,
                                         return_lse=return_lse, out=out[:rows])
        if return_lse:
            lse[:, :rows] = result[1]
    return out, lse


# Not in CUDA graphs (its host reads): where this torch has the tag, compiled graphs that use CUDA
# graphs (mode="reduce-overhead") leave it out of them rather than fail to capture it.
_CUDAGRAPH_UNSAFE = ({"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe")
                     and "tags" in inspect.signature(torch.library.custom_op).parameters else {})
_sage_attn_varlen = torch.library.custom_op("sageflash::sage_attn_varlen", _attend, mutates_args=(),
                                            schema=_OP_SCHEMA, **_CUDAGRAPH_UNSAFE)


@_sage_attn_varlen.register_fake
def _sage_attn_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           is_causal, smooth_k, smooth_v, pv_accum, granularity, return_lse, backend):
    lse_shape = (q.shape[1], q.shape[0]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


register_no_backward(_sage_attn_varlen, "sageflash.sage_attn_varlen", 12)


def sage_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False, pv_accum="fp32+fp16",
                     granularity="per_thread", *, return_lse=False, backend="auto"):
    """`sage_attn_sm89_fp16` over a packed batch of sequences of different lengths.

    q ``[Tq, Hq, D]``, k and v ``[Tk, Hk, D]`` (fp16 or bf16, any strides with a unit last one):
    sequence i's queries are ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]``, its keys and values the
    same rows of k and v by ``cu_seqlens_k`` (int32 or int64 ``[N + 1]``, on the CPU or q's device;
    their values are read on the host; rows past their last offset are not read). ``max_seqlen_q``
    / ``max_seqlen_k`` (flash-attn's) may be given: they must hold the longest sequence. The knobs,
    their ``GGML_SAGE_*`` overrides and ``backend`` are the op's. Returns ``out [Tq, Hq, D]``
    (contiguous), and with ``return_lse`` also the float32 LSE ``[Hq, Tq]`` (flash-attn's varlen
    layout). Sequence i's rows are exactly what the op gives ``q``, ``k`` and ``v``'s rows of it
    alone (``tensor_layout="NHD"``, a batch of one): causal alignment bottom-right per sequence; a
    sequence without keys, and rows past ``cu_seqlens_q``'s last offset, give zeros (LSE -inf).
    No backward, no ``attn_mask``, no CUDA graph capture (its tables are built on the host per
    call); ``torch.compile(fullgraph=True)`` traces it as one node, the registered op
    ``torch.ops.sageflash.sage_attn_varlen``, which reads ``cu_seqlens`` when the graph runs; the
    debug toggles do not apply (said once on the logger).
    """
    params, max_seqlen_q, max_seqlen_k, return_lse = check_call(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, smooth_k, smooth_v,
        pv_accum, granularity, return_lse, backend)
    if torch.compiler.is_compiling():  # one node of the graph, run as it is eagerly when the graph runs
        out, lse = torch.ops.sageflash.sage_attn_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params.softmax_scale,
            params.is_causal, params.smooth_k, params.smooth_v, params.pv_accum.value, params.granularity.value,
            return_lse, backend)
        return (out, lse) if return_lse else out
    # eager calls skip the dispatcher, as the op's do; autograd gets a backward that raises
    out, lse = _attend_resolved(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                apply_overrides(params), return_lse, backend)
    return without_backward("sageflash.sage_attn_varlen", (out, lse) if return_lse else out, q, k, v)


__all__ = ["check_call", "check_cu_seqlens", "check_packed", "sage_attn_varlen", "sequence_lengths"]
