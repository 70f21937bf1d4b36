"""sageflash: 8-bit quantized attention (SageAttention's SM89 path) for PyTorch, in pure Python.

INT8 Q·Kᵀ and FP8 P·V, with Triton kernels for NVIDIA Ada/Hopper GPUs and an exact CPU reference.
"""

from .compat import sageattn, sageattn_qk_int8_pv_fp8_cuda, sageattn_varlen
from .op import Support, is_supported, quantize_qk, quantize_v, sage_attn_sm89_fp16
from .params import PVAccum, QKGranularity, SageParams, resolve_params
from .varlen import sage_attn_varlen

__version__ = "0.1.0"

__all__ = [
    "PVAccum",
    "QKGranularity",
    "SageParams",
    "Support",
    "is_supported",
    "quantize_qk",
    "quantize_v",
    "resolve_params",
    "sage_attn_sm89_fp16",
    "sage_attn_varlen",
    "sageattn",
    "sageattn_qk_int8_pv_fp8_cuda",
    "sageattn_varlen",
]
