"""The CPU reference backend: exact quantizers and attention in plain torch (runs anywhere)."""

from .attention import attention, attention_from_payloads, attention_varlen
from .lse import merge_attention
from .quant import key_mean, quantize_qk, quantize_v

__all__ = ["attention", "attention_from_payloads", "attention_varlen", "key_mean", "merge_attention", "quantize_qk",
           "quantize_v"]
