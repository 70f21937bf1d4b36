"""The built-in test cases of ``sageflash run`` (SPEC §10): the one case table."""

from __future__ import annotations

import dataclasses

import torch

from .dumps import DumpMeta


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    head_dim: int
    seq: int
    num_q_heads: int
    num_k_heads: int
    batch: int
    is_causal: bool
    smooth_k: bool
    granularity: str
    smooth_v: bool
    pv_accum: str

    def meta(self, seed: int | None = None, dtype: str = "f16") -> DumpMeta:
        """The dump metadata of this case (seq_q == seq_k == seq)."""
        return DumpMeta(head_dim=self.head_dim, seq_q=self.seq, seq_k=self.seq,
                        num_q_heads=self.num_q_heads, num_k_heads=self.num_k_heads,
                        batch=self.batch, is_causal=self.is_causal, smooth_k=self.smooth_k,
                        smooth_v=self.smooth_v, pv_accum=self.pv_accum,
                        granularity=self.granularity, dtype=dtype,
                        softmax_scale=self.head_dim ** -0.5, seed=seed, distribution="uniform")

    def inputs(self, seed: int, dtype=torch.float16, device="cpu"):
        """Deterministic q, k, v, uniform in [-1, 1]: the same seed gives the same tensors."""
        gen = torch.Generator().manual_seed(seed)
        shapes = [(self.batch, h, self.seq, self.head_dim)
                  for h in (self.num_q_heads, self.num_k_heads, self.num_k_heads)]
        return tuple((torch.rand(s, generator=gen, dtype=torch.float32) * 2 - 1).to(device, dtype)
                     for s in shapes)


def _case(name, d, seq, nq, nk, b, causal, smooth_k, gran, smooth_v, pv) -> Case:
    return Case(name, d, seq, nq, nk, b, bool(causal), bool(smooth_k),
                "per_thread" if gran == "thread" else "per_warp", bool(smooth_v), pv)


CASES = {c.name: c for c in [
    _case("b2_seq256_d128", 128, 256, 16, 8, 2, 0, 1, "warp", 0, "fp32+fp16"),
    _case("b1_causal_seq128_d64", 64, 128, 12, 6, 1, 1, 1, "warp", 0, "fp32+fp16"),
    _case("b1_causal_seq128_d64_nosmooth", 64, 128, 12, 6, 1, 1, 0, "warp", 0, "fp32+fp16"),
    _case("b4_seq512_d128", 128, 512, 8, 4, 4, 0, 0, "warp", 0, "fp32+fp16"),
    _case("b1_long_seq768_d128_causal", 128, 768, 4, 4, 1, 1, 0, "warp", 0, "fp32+fp16"),
    _case("b2_seq256_d128_thread", 128, 256, 16, 8, 2, 0, 1, "thread", 0, "fp32+fp16"),
    _case("b1_causal_seq128_d64_thread", 64, 128, 12, 6, 1, 1, 1, "thread", 0, "fp32+fp16"),
    _case("b1_causal_seq128_d64_smoothv", 64, 128, 12, 6, 1, 1, 1, "warp", 1, "fp32"),
    _case("b2_seq256_d128_fp32", 128, 256, 16, 8, 2, 0, 1, "warp", 0, "fp32"),
    _case("b2_seq256_d128_fp32fp32", 128, 256, 16, 8, 2, 0, 1, "warp", 0, "fp32+fp32"),
]}

DEFAULT_CASE = "b1_causal_seq128_d64"

