"""The official SageAttention 2.x entry points, so existing call sites (ComfyUI, diffusers, xDiT,
HunyuanVideo) run unchanged: `sageattn` and `sageattn_qk_int8_pv_fp8_cuda` with SageAttention 2.2.0's
parameter names and defaults (``sageattention/core.py``), both running `sage_attn_sm89_fp16`, and
`sageattn_varlen`, running `sage_attn_varlen`.

Keywords beyond the official ones: flash-attn's spellings ``causal`` and ``softmax_scale`` (one
warning per function and spelling per process, none inside ``torch.compile``), what SDPA-style
callers pass (``attn_mask``, except to `sageattn_varlen`, and ``dropout_p=0``) and sageflash's
``backend``. Any other keyword is a TypeError (the official functions swallow them).
"""

from __future__ import annotations

import inspect

import torch

from .op import sage_attn_sm89_fp16
from .params import PVAccum, QKGranularity, check_bool, check_softmax_scale, warn_once
from .varlen import sage_attn_varlen

# flash-attn's name -> SageAttention's
FLASH_SPELLINGS = {"causal": "is_causal", "softmax_scale": "sm_scale"}


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
    """SageAttention's dispatcher, which picks a kernel per GPU; here always the SM89 path with its
    defaults. ``kwargs`` may also set `sageattn_qk_int8_pv_fp8_cuda`'s knobs (the official
    `sageattn` ignores them)."""
    return _run("sageattn", q, k, v, dict(tensor_layout=tensor_layout, is_causal=is_causal,
                                          sm_scale=sm_scale, return_lse=return_lse), kwargs)


def sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread",
                                 sm_scale=None, pv_accum_dtype="fp32+fp16", smooth_k=True, smooth_v=False,
                                 return_lse=False, **kwargs):
    """SageAttention's INT8 Q·Kᵀ, FP8 P·V attention: `sage_attn_sm89_fp16` under the official names
    (``qk_quant_gran`` = granularity, ``sm_scale`` = softmax_scale, ``pv_accum_dtype`` = pv_accum).
    Returns ``out`` in ``tensor_layout``, or ``(out, lse)`` with ``return_lse``."""
    return _run("sageattn_qk_int8_pv_fp8_cuda", q, k, v,
                dict(tensor_layout=tensor_layout, is_causal=is_causal, qk_quant_gran=qk_quant_gran,
                     sm_scale=sm_scale, pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k,
                     smooth_v=smooth_v, return_lse=return_lse), kwargs)


def sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False,
                    sm_scale=None, smooth_k=True, **kwargs):
    """SageAttention's packed variable-length entry point (q ``[Tq, Hq, D]``, k and v ``[Tk, Hk, D]``,
    ``cu_seqlens`` ``[N + 1]``): `sage_attn_varlen` with the SM89 path's defaults (the official one
    runs its Triton kernel, per-block int8 with an fp16 P·V). ``kwargs`` may set
    `sageattn_qk_int8_pv_fp8_cuda`'s other knobs (not ``tensor_layout``: the tensors are packed)."""
    args, _, backend = _sort_keywords("sageattn_varlen", dict(is_causal=is_causal, sm_scale=sm_scale,
                                                              smooth_k=smooth_k), kwargs, packed=True)
    return sage_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, args["sm_scale"], args["is_causal"],
        args["smooth_k"], args["smooth_v"], args["pv_accum_dtype"], args["qk_quant_gran"],
        return_lse=args["return_lse"], backend=backend)


# The official knobs and their defaults, read off the signature above.
_DEFAULTS = {name: p.default for name, p in inspect.signature(sageattn_qk_int8_pv_fp8_cuda).parameters.items()
             if p.default is not p.empty}


def _run(function: str, q, k, v, official: dict, extra: dict):
    """Call `sage_attn_sm89_fp16` for ``function``: ``official`` its named arguments, ``extra`` the
    other keywords (`_sort_keywords`)."""
    args, attn_mask, backend = _sort_keywords(function, official, extra)
    return sage_attn_sm89_fp16(
        q, k, v, args["sm_scale"], args["is_causal"], args["smooth_k"], args["smooth_v"], args["pv_accum_dtype"],
        args["qk_quant_gran"], tensor_layout=args["tensor_layout"], return_lse=args["return_lse"],
        attn_mask=attn_mask, backend=backend)


def _sort_keywords(function: str, official: dict, extra: dict, packed: bool = False) -> tuple[dict, object, str]:
    """``(knobs, attn_mask, backend)`` of a call of ``function``: ``official`` its named arguments,
    ``extra`` the other keywords, sorted out here with errors naming ``function``: the official
    knobs of `_DEFAULTS`, flash-attn's spellings, SDPA's ``attn_mask`` and ``dropout_p``, and
    ``backend``; for ``packed`` tensors (`sageattn_varlen`) neither ``tensor_layout`` nor
    ``attn_mask``. The knobs come checked and parsed (`PVAccum`, `QKGranularity`)."""
    extra = dict(extra)
    defaults = {name: value for name, value in _DEFAULTS.items() if not (packed and name == "tensor_layout")}
    args = {**defaults, **official}
    args.update({name: extra.pop(name) for name in defaults if name not in official and name in extra})
    spelled = {name: name for name in FLASH_SPELLINGS.values()}  # as the caller named them, for errors
    for flash_name, name in FLASH_SPELLINGS.items():
        if flash_name in extra:
            spelled[name] = flash_name
            if args[name] != _DEFAULTS[name]:
                raise TypeError(f"{function}() got both {name!r} and its flash-attn spelling {flash_name!r}")
            if not torch.compiler.is_compiling():  # Dynamo cannot trace logging: silent when compiled
                layout = "" if packed else (f"; tensors are read as tensor_layout={args['tensor_layout']!r} "
                                            "(flash-attn's [B, S, H, D] is 'NHD')")
                warn_once(("compat-spelling", function, flash_name), "%s(): taking flash-attn's %r as "
                          "SageAttention's %r%s", function, flash_name, name, layout)
            args[name] = extra.pop(flash_name)
    attn_mask = None if packed else extra.pop("attn_mask", None)
    dropout_p = extra.pop("dropout_p", 0.0)
    if dropout_p != 0:
        raise ValueError(f"{function}(): dropout_p must be 0 (SageAttention has no dropout), got {dropout_p!r}")
    backend = extra.pop("backend", "auto")
    if extra:
        raise TypeError(f"{function}() got an unexpected keyword argument {next(iter(extra))!r}")
    args.update(sm_scale=check_softmax_scale(args["sm_scale"], spelled["sm_scale"]),
                is_causal=check_bool(args["is_causal"], spelled["is_causal"]),
                pv_accum_dtype=PVAccum.parse(args["pv_accum_dtype"], "pv_accum_dtype"),
                qk_quant_gran=QKGranularity.parse(args["qk_quant_gran"], "qk_quant_gran"))
    return args, attn_mask, backend
