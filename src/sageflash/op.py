"""The public op: input validation (SPEC §8), knob resolution and backend dispatch.

A backend is a module with ``quantize_qk``, ``quantize_v`` and ``attention(q, k, v, params)``:
`sageflash.reference` (torch, any device) or `sageflash.kernels` (Triton: CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``). Nothing falls back silently from one to the other.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import debug, groups
from .params import PVAccum, QKGranularity, resolve_params

BACKENDS = ("auto", "reference", "triton")
DTYPES = (torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` makes the Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` ("auto", "reference" or "triton") on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "reference":
        from . import reference
        return reference
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_enabled()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    from . import kernels
    kernels.check_device(device)
    return kernels


def _check_tensor(x, name: str, rank: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ([B, H, S, D], ggml's [D, S, H, B]), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {x.stride()}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def validate_qk(q, k) -> None:
    """Check q/k per SPEC §8: rank, dtype, device, batch, heads (GQA) and head dim."""
    _check_tensor(q, "q")
    _check_tensor(k, "k")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head dim {q.shape[-1]}, got {k.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    groups.padded_head_dim(q.shape[-1])


def validate_v(v, like_k=None) -> None:
    """Check v per SPEC §8, and against k when given: same dtype, device, shape."""
    _check_tensor(v, "v")
    if like_k is None:
        groups.padded_head_dim(v.shape[-1])
        return
    if v.dtype != like_k.dtype:
        raise TypeError(f"v must have k's dtype {like_k.dtype}, got {v.dtype}")
    if v.device != like_k.device:
        raise ValueError(f"v must be on k's device {like_k.device}, got {v.device}")
    if v.shape != like_k.shape:
        raise ValueError(f"v must have k's shape {tuple(like_k.shape)} ([B, Hk, Sk, D]), "
                         f"got {tuple(v.shape)}")


def sage_attn_sm89_fp16(q, k, v, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                        pv_accum="fp32+fp16", granularity="per_thread", *, backend="auto"):
    """SageAttention's SM89 quantized attention: INT8 Q·Kᵀ, FP8 P·V (SPEC §3–7).

    q ``[B, Hq, Sq, D]``, k and v ``[B, Hk, Sk, D]`` (ggml's ``[D, S, H, B]``), fp16 or bf16,
    Hq % Hk == 0, D <= 128. Returns a contiguous tensor like q. Knobs: SPEC §2 (strings, or the
    `PVAccum` / `QKGranularity` enums or their ggml codes); ``GGML_SAGE_*`` overrides apply, see
    `sageflash.resolve_params`. ``backend``: "auto" (Triton for CUDA tensors, else the CPU
    reference), "reference" or "triton".
    """
    validate_qk(q, k)
    validate_v(v, like_k=k)
    params = resolve_params(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity,
                            head_dim=q.shape[-1])
    module = select_backend(backend, q.device)
    if debug.enabled():  # GGML_SAGE_* debug toggles (sageflash.debug); unset, this costs an env lookup
        return debug.run(module, q, k, v, params)
    return module.attention(q, k, v, params)


def quantize_qk(q, k, *, granularity, smooth_k, km=None, backend="auto"):
    """Q and K to int8 per SPEC §3: ``(q_int8, q_scale, k_int8, k_scale, km)``.

    Head dim zero-padded to 64/128; scales float32 ``[B, H, n_groups]``; ``km`` (input dtype,
    ``[B, Hk, D]``) replaces the computed K mean when given; the returned km is None without
    smoothing.
    """
    validate_qk(q, k)
    granularity = QKGranularity.parse(granularity, "granularity")
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {smooth_k!r}")
    if km is not None:
        if not isinstance(km, torch.Tensor):
            raise TypeError(f"km must be a torch.Tensor or None, got {type(km).__name__}")
        padded = groups.padded_head_dim(k.shape[-1])
        if km.shape not in ((*k.shape[:2], k.shape[-1]), (*k.shape[:2], padded)):
            raise ValueError(f"km must have shape [B, Hk, D] = {(*k.shape[:2], padded)}, got {tuple(km.shape)}")
        km = km.to(k.device)
    return select_backend(backend, q.device).quantize_qk(
        q, k, granularity=granularity, smooth_k=smooth_k, km=km)


def quantize_v(v, *, pv_accum, smooth_v, backend="auto"):
    """V to fp8 e4m3fn per channel (SPEC §4): ``(v_fp8 [B,Hk,D,ceil64(Sk)], v_scale, v_mean)``."""
    validate_v(v)
    pv_accum = PVAccum.parse(pv_accum, "pv_accum")
    if not isinstance(smooth_v, bool):
        raise TypeError(f"smooth_v must be a bool, got {smooth_v!r}")
    return select_backend(backend, v.device).quantize_v(v, pv_accum=pv_accum, smooth_v=smooth_v)
