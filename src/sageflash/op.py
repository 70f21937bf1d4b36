"""The public op: input validation (SPEC §8), knob resolution and backend dispatch.

A backend is a module with ``quantize_qk``, ``quantize_v`` and ``attention(q, k, v, params)``:
`sageflash.reference` (torch, any device) or `sageflash.kernels` (Triton: CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``). Nothing falls back silently from one to the other.

`sage_attn_sm89_fp16` checks its arguments (`check_call`: pure Python, which ``torch.compile``
traces), then runs `_attend`, which reads the ``GGML_SAGE_*`` overrides and debug toggles and
calls the backend: directly for a plain eager call, else as the registered op
``torch.ops.sageflash.sage_attn_sm89`` (under ``torch.compile``, or when autograd records the call).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import NamedTuple

import torch

from . import debug, groups
from .params import (PVAccum, QKGranularity, SageParams, apply_overrides, check_bool, check_knobs, getenv,
                     resolve_params, smooth_v_contract)

BACKENDS = ("auto", "reference", "triton")
DTYPES = (torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32)  # attn_mask: keep flags or additive
# tensor_layout: HND is ggml's native layout, NHD what flash-attn and diffusers pass.
LAYOUTS = {"HND": "[B, H, S, D]", "NHD": "[B, S, H, D]"}
KV_LAYOUTS = {"HND": "[B, Hk, Sk, D]", "NHD": "[B, Sk, Hk, D]"}


_TRITON_TRUE = ("1", "true", "on", "yes")  # what Triton's getenv_bool takes as set (any case)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` makes the Triton kernels run on CPU tensors, read as Triton
    reads it (``false`` or ``2`` leave it off)."""
    return (getenv("TRITON_INTERPRET") or "").lower() in _TRITON_TRUE


def check_backend(backend) -> None:
    """``backend`` must be one of `BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def select_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` ("auto", "reference" or "triton") on ``device``."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "reference":
        from . import reference
        return reference
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_enabled()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    from . import kernels
    if device.type == "cpu" and not kernels.INTERPRETED:
        raise ValueError("backend='triton' on CPU tensors: TRITON_INTERPRET=1 was set after sageflash's Triton "
                         "kernels were imported, and Triton reads it when it builds them: set it before importing "
                         "sageflash")
    kernels.check_device(device)
    return kernels


def quantize_for_attention(module: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           params: SageParams) -> tuple[tuple, dict]:
    """The payloads ``(q_int8, q_scale, k_int8, k_scale, km, v_fp8, v_scale, v_mean)`` of
    ``[B, H, S, D]`` views as ``module.attention_from_payloads`` reads them, and the keyword saying
    how: the Triton kernel reads each 16 tokens of V in its mma registers' order
    (`groups.v_kernel_token`), which its quantizer writes directly (one set of launches for the
    three tensors); the reference reads natural order. For payloads attended more than once
    (the ring's, the bench's kernel mode)."""
    from . import reference
    if module is reference:
        return (*module.quantize_qk(q, k, granularity=params.granularity, smooth_k=params.smooth_k),
                *module.quantize_v(v, pv_accum=params.pv_accum, smooth_v=params.smooth_v)), {}
    payloads = module.quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=params.smooth_k,
                                   pv_accum=params.pv_accum, smooth_v=params.smooth_v, v_kernel_order=True)
    return payloads, {"v_kernel_order": True}


def check_layout(tensor_layout) -> None:
    """``tensor_layout`` must be "HND" (``[B, H, S, D]``) or "NHD" (``[B, S, H, D]``)."""
    if not isinstance(tensor_layout, str):
        raise TypeError(f"tensor_layout must be a string, 'HND' or 'NHD', got {type(tensor_layout).__name__}")
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' ({LAYOUTS['HND']}) or 'NHD' ({LAYOUTS['NHD']}), "
                         f"got {tensor_layout!r}")


def as_hnd(x: torch.Tensor, tensor_layout: str) -> torch.Tensor:
    """``x`` as ``[B, H, S, D]``: itself, or for NHD the view ``x.transpose(1, 2)`` (no copy)."""
    return x.transpose(1, 2) if tensor_layout == "NHD" else x


def _check_tensor(x, name: str, tensor_layout: str) -> None:
    ggml = ", ggml's [D, S, H, B]" if tensor_layout == "HND" else ""
    check_tensor(x, name, 4, f"{LAYOUTS[tensor_layout]} for tensor_layout={tensor_layout!r}{ggml}")


def check_tensor(x, name: str, rank: int, layout: str) -> None:
    """``x``: a fp16/bf16 tensor of ``rank`` dims (``layout`` says which, for the message) with a
    unit last stride and no empty dim; else a TypeError/ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {x.stride()}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def validate_qk(q, k, tensor_layout: str = "HND") -> None:
    """Check q/k per SPEC §8: rank, dtype, device, batch, heads (GQA) and head dim."""
    _check_tensor(q, "q", tensor_layout)
    _check_tensor(k, "k", tensor_layout)
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
    q, k = as_hnd(q, tensor_layout), as_hnd(k, tensor_layout)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head dim {q.shape[-1]}, got {k.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    groups.padded_head_dim(q.shape[-1], "q head dim")


def validate_v(v, like_k=None, tensor_layout: str = "HND") -> None:
    """Check v per SPEC §8, and against k when given: same dtype, device, shape."""
    _check_tensor(v, "v", tensor_layout)
    if like_k is None:
        groups.padded_head_dim(v.shape[-1], "v head dim")
        return
    if v.dtype != like_k.dtype:
        raise TypeError(f"v must have k's dtype {like_k.dtype}, got {v.dtype}")
    if v.device != like_k.device:
        raise ValueError(f"v must be on k's device {like_k.device}, got {v.device}")
    if v.shape != like_k.shape:
        raise ValueError(f"v must have k's shape {tuple(like_k.shape)} ({KV_LAYOUTS[tensor_layout]}), "
                         f"got {tuple(v.shape)}")


def check_attn_mask(attn_mask, q, k, tensor_layout: str = "HND", *, seq_q: int | None = None,
                    seq_k: int | None = None) -> None:
    """``attn_mask``: None, or a bool / float16 / bfloat16 / float32 tensor on q's device that
    broadcasts to ``[B, Hq, Sq, Sk]`` (whatever ``tensor_layout``, as torch SDPA's). ``seq_q`` /
    ``seq_k`` replace q's and k's token counts (`sageflash.parallel`: a shard's mask spans the
    whole sequence)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in MASK_DTYPES:
        raise TypeError(f"attn_mask must be bool (True = keep) or an additive float16, bfloat16 or "
                        f"float32 mask, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    q, k = as_hnd(q, tensor_layout), as_hnd(k, tensor_layout)
    target = (*q.shape[:2], q.shape[2] if seq_q is None else seq_q, k.shape[2] if seq_k is None else seq_k)
    # != rather than `not in (1, t)`: Dynamo gets the membership test of a symbolic size wrong
    if attn_mask.dim() > 4 or any(m != 1 and m != t for m, t in zip(attn_mask.shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask must be broadcastable to [B, Hq, Sq, Sk] = {list(target)}, "
                         f"got shape {list(attn_mask.shape)}")


def check_call(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
               tensor_layout, return_lse, attn_mask, backend) -> tuple[SageParams, bool]:
    """Validate a call of `sage_attn_sm89_fp16` (SPEC §8): its checked knobs (before the
    ``GGML_SAGE_*`` overrides) and ``return_lse``. Pure, so ``torch.compile`` traces it."""
    check_layout(tensor_layout)
    validate_qk(q, k, tensor_layout)
    validate_v(v, like_k=k, tensor_layout=tensor_layout)
    check_attn_mask(attn_mask, q, k, tensor_layout)
    params = check_knobs(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                         head_dim=q.shape[-1])
    return_lse = check_bool(return_lse, "return_lse")
    check_backend(backend)
    return params, return_lse


_OP_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float? softmax_scale, bool is_causal, bool smooth_k, "
              "bool smooth_v, str pv_accum, str granularity, str tensor_layout, bool return_lse, "
              "Tensor? attn_mask, str backend) -> (Tensor, Tensor)")


def _attend(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                    tensor_layout, return_lse, attn_mask, backend):
    """The registered op, for checked arguments: ``(out, lse)``, out contiguous in the caller's
    layout, lse empty unless ``return_lse``. The ``GGML_SAGE_*`` overrides and debug toggles are
    read here, at run time, so compiled graphs follow them too."""
    params = resolve_params(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                            head_dim=q.shape[-1])
    out, lse = _attend_resolved(q, k, v, params, tensor_layout, return_lse, attn_mask, backend)
    return out, q.new_empty(0, dtype=torch.float32) if lse is None else lse


def _attend_resolved(q, k, v, params: SageParams, tensor_layout, return_lse, attn_mask, backend):
    """`_attend` once the knobs are checked and the overrides applied (eager calls start here):
    ``(out, lse)``, lse None unless ``return_lse``."""
    module = select_backend(backend, q.device)
    out = q.new_empty(q.shape)
    args = (*(as_hnd(x, tensor_layout) for x in (q, k, v)), params)
    if debug.enabled():  # GGML_SAGE_* debug toggles (sageflash.debug); unset, a few env lookups
        result = debug.run(module, *args, return_lse=return_lse, out=as_hnd(out, tensor_layout),
                           attn_mask=attn_mask)
    else:
        result = module.attention(*args, return_lse=return_lse, out=as_hnd(out, tensor_layout),
                                  attn_mask=attn_mask)
    return out, result[1] if return_lse else None


_sage_attn_sm89 = torch.library.custom_op("sageflash::sage_attn_sm89", _attend, mutates_args=(),
                                          schema=_OP_SCHEMA)


@_sage_attn_sm89.register_fake
def _sage_attn_sm89_fake(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                         tensor_layout, return_lse, attn_mask, backend):
    lse_shape = as_hnd(q, tensor_layout).shape[:3] if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


# No backward (the quantized forward is for inference), but a formula all the same: without one,
# torch.compile refuses even the forward of a call whose inputs require grad (a model compiled
# outside no_grad). The backward is an opaque op, so only running it raises, with a clear error.
@torch.library.custom_op("sageflash::no_backward", mutates_args=())
def _no_backward(grad_out: torch.Tensor, q_shape: list[int], kv_shape: list[int], name: str) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError(f"{name} has no backward: the 8-bit forward is for inference. "
                              "Call it under torch.no_grad() or torch.inference_mode(), or on detached inputs")


@_no_backward.register_fake
def _no_backward_fake(grad_out, q_shape, kv_shape, name):
    return grad_out.new_empty(q_shape), grad_out.new_empty(kv_shape), grad_out.new_empty(kv_shape)


def _save_shapes(ctx, inputs, output):
    ctx.q_shape, ctx.kv_shape = list(inputs[0].shape), list(inputs[1].shape)


def register_no_backward(op, name: str, other_inputs: int) -> None:
    """Give the registered ``op`` (inputs q, k, v and ``other_inputs`` more; outputs out and lse) a
    backward that raises naming ``name`` when it runs."""
    def backward(ctx, grad_out, grad_lse):
        grads = torch.ops.sageflash.no_backward(grad_out, ctx.q_shape, ctx.kv_shape, name)
        return (*grads, *[None] * other_inputs)
    op.register_autograd(backward, setup_context=_save_shapes)


register_no_backward(_sage_attn_sm89, "sageflash.sage_attn_sm89", 10)


def sage_attn_sm89_fp16(q, k, v, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                        pv_accum="fp32+fp16", granularity="per_thread", *, tensor_layout="HND",
                        return_lse=False, attn_mask=None, backend="auto"):
    """SageAttention's SM89 quantized attention: INT8 Q·Kᵀ, FP8 P·V (SPEC §3–7).

    q ``[B, Hq, Sq, D]``, k and v ``[B, Hk, Sk, D]`` (ggml's ``[D, S, H, B]``) with
    ``tensor_layout="HND"``, or ``[B, S, H, D]`` with "NHD" (read in place, no copy); fp16 or bf16,
    Hq % Hk == 0, D <= 256. Returns a tensor like q, contiguous in the same layout, and with
    ``return_lse`` also the float32 ``[B, Hq, Sq]`` natural-log logsumexp of the scaled scores
    (``-inf`` for a causal row with no visible key). Knobs: SPEC §2 (strings, or the `PVAccum` /
    `QKGranularity` enums or their ggml codes); ``GGML_SAGE_*`` overrides apply, see
    `sageflash.resolve_params`. ``attn_mask``: None, or a tensor broadcastable to
    ``[B, Hq, Sq, Sk]`` (in either layout, as torch SDPA's) on q's device: bool (True = keep,
    False hides the key) or float16/bfloat16/float32 added to the scaled scores
    ``softmax_scale·q·kᵀ`` (natural-log domain; ``-inf`` hides) before the softmax, i.e. before
    the running max; it combines with ``is_causal``, and a row left with no visible key gives
    zeros (LSE ``-inf``). ``backend``: "auto" (Triton for CUDA tensors, else the CPU
    reference), "reference" or "triton". Runs as ``torch.ops.sageflash.sage_attn_sm89``, so
    ``torch.compile(fullgraph=True)`` traces it.
    """
    params, return_lse = check_call(q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum,
                                    granularity, tensor_layout, return_lse, attn_mask, backend)
    # Plain eager calls skip the dispatcher: its custom-op path cost ~150 us of host time per call
    # on an H200 host, more than the whole attention at 1k tokens. Traced calls (torch.compile) and
    # calls that autograd records go through the registered op.
    traced = torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (attn_mask is not None and attn_mask.requires_grad)))
    if traced:
        out, lse = torch.ops.sageflash.sage_attn_sm89(
            q, k, v, params.softmax_scale, params.is_causal, params.smooth_k, params.smooth_v,
            params.pv_accum.value, params.granularity.value, tensor_layout, return_lse, attn_mask,
            backend)
    else:
        out, lse = _attend_resolved(q, k, v, apply_overrides(params), tensor_layout, return_lse,
                                    attn_mask, backend)
    return (out, lse) if return_lse else out


class Support(NamedTuple):
    """`is_supported`'s answer: truthy when the call is supported, else ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def is_supported(q, k, v, **knobs) -> Support:
    """Whether ``sage_attn_sm89_fp16(q, k, v, **knobs)`` would run here, by the op's own checks:
    arguments, ``GGML_SAGE_*`` overrides and debug toggles, backend and device. Nothing is computed."""
    try:
        call = inspect.signature(sage_attn_sm89_fp16).bind(q, k, v, **knobs)
        call.apply_defaults()
        params, _ = check_call(**call.arguments)
        apply_overrides(params)
        if debug.enabled():  # a toggle that is not a number where one is expected, a head the call lacks
            toggles = debug.Toggles.from_env()
            debug.check_sample(toggles.sample_head, toggles.sample_block,
                               *as_hnd(q, call.arguments["tensor_layout"]).shape[1:3])
        select_backend(call.arguments["backend"], q.device)
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: kernels.UnsupportedDeviceError
        return Support(False, str(err))
    return Support(True)


def quantize_qk(q, k, *, granularity, smooth_k, km=None, tensor_layout="HND", backend="auto"):
    """Q and K to int8 per SPEC §3: ``(q_int8, q_scale, k_int8, k_scale, km)``.

    q and k are read in ``tensor_layout`` (no copy); the payloads are ``[B, H, S, D]`` whatever it
    is. Head dim zero-padded to 64/128/256; scales float32 ``[B, H, n_groups]``; ``km`` (input dtype,
    ``[B, Hk, D]``, with ``smooth_k`` only) replaces the computed K mean when given; the returned
    km is None without smoothing.
    """
    check_layout(tensor_layout)
    validate_qk(q, k, tensor_layout)
    q, k = as_hnd(q, tensor_layout), as_hnd(k, tensor_layout)
    granularity = QKGranularity.parse(granularity, "granularity")
    smooth_k = check_bool(smooth_k, "smooth_k")
    if km is not None:
        if not isinstance(km, torch.Tensor):
            raise TypeError(f"km must be a torch.Tensor or None, got {type(km).__name__}")
        if not smooth_k:
            raise ValueError("km is K's smoothing mean: pass it with smooth_k=True, or leave it None")
        if not km.is_floating_point():
            raise TypeError(f"km must be a floating-point tensor, got {km.dtype}")
        padded = groups.padded_head_dim(k.shape[-1])
        if km.shape not in ((*k.shape[:2], k.shape[-1]), (*k.shape[:2], padded)):
            raise ValueError(f"km must have shape [B, Hk, D] = {(*k.shape[:2], padded)}, got {tuple(km.shape)}")
        km = km.to(k.device)
    return select_backend(backend, q.device).quantize_qk(
        q, k, granularity=granularity, smooth_k=smooth_k, km=km)


def quantize_v(v, *, pv_accum, smooth_v, tensor_layout="HND", backend="auto"):
    """V to fp8 e4m3fn per channel (SPEC §4): ``(v_fp8 [B,Hk,D,ceil64(Sk)], v_scale, v_mean)``;
    v is read in ``tensor_layout`` (no copy). smooth_v as the op uses it (`smooth_v_contract`)."""
    check_layout(tensor_layout)
    validate_v(v, tensor_layout=tensor_layout)
    v = as_hnd(v, tensor_layout)
    pv_accum = PVAccum.parse(pv_accum, "pv_accum")
    smooth_v = smooth_v_contract(check_bool(smooth_v, "smooth_v"), pv_accum)  # as the op would use it
    return select_backend(backend, v.device).quantize_v(v, pv_accum=pv_accum, smooth_v=smooth_v)
