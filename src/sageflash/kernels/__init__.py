"""The Triton backend: quantizers and attention for CUDA GPUs of compute capability >= 8.9.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (with the GPU's float casts and FMA, see
`interpreter`), which is how CI without a GPU exercises them.
"""

from __future__ import annotations

import torch

from ..op import interpreter_enabled

if interpreter_enabled():
    from .interpreter import check_numpy, install_gpu_arithmetic

    check_numpy()
    install_gpu_arithmetic()

from .attention import attention_from_payloads  # noqa: E402
from .quant import quantize_qk, quantize_qkv, quantize_v  # noqa: E402

MIN_CAPABILITY = (8, 9)  # fp8 e4m3 tensor cores: Ada (sm_89) and Hopper (sm_90)


class UnsupportedDeviceError(RuntimeError):
    """The GPU cannot run the kernels (fp8 tensor cores need compute capability 8.9)."""


def unsupported_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` (a CUDA device below compute capability 8.9), or None."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability >= MIN_CAPABILITY:
        return None
    return (f"{torch.cuda.get_device_name(device)} on {device} has compute capability "
            f"{capability[0]}.{capability[1]}; sageflash's Triton kernels need fp8 tensor cores "
            f"(compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, Ada or Hopper)")


def check_device(device: torch.device) -> None:
    """Raise `UnsupportedDeviceError` for a CUDA device below compute capability 8.9."""
    reason = unsupported_reason(device)
    if reason is not None:
        raise UnsupportedDeviceError(f"{reason}. Use backend='reference' to run the CPU reference instead.")


def attention(q, k, v, params, return_lse: bool = False, out=None, attn_mask=None):
    """Quantize Q, K and V together (three launches), then run the attention kernel."""
    q_int8, q_scale, k_int8, k_scale, km, v_fp8, v_scale, v_mean = quantize_qkv(
        q, k, v, granularity=params.granularity, smooth_k=params.smooth_k,
        pv_accum=params.pv_accum, smooth_v=params.smooth_v)
    return attention_from_payloads(
        q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, params=params,
        seq_q=q.shape[2], seq_k=k.shape[2], head_dim=q.shape[-1], out_dtype=q.dtype,
        q=q, km=km, return_lse=return_lse, out=out, attn_mask=attn_mask)


__all__ = ["UnsupportedDeviceError", "attention", "attention_from_payloads", "check_device",
           "quantize_qk", "quantize_qkv", "quantize_v", "unsupported_reason"]
