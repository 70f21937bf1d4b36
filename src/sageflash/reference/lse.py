"""LSE work: smooth_k's term, and merging attention outputs over disjoint key sets by their LSEs
(what ring attention does).

With the weights w = exp(lse - lse_total), the output over the union of key sets is the sum of
the parts' outputs times their weights, and lse_total = log Σ exp(lse). A row that no key reached
has LSE -inf and output 0, and stays so; a NaN propagates.
"""

from __future__ import annotations

import torch


def smooth_k_term(q: torch.Tensor, km: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """float64 ``softmax_scale·q·km`` per row ``[B, Hq, S]``: what smooth_k's shift of K by its mean
    ``km [B, Hk, padded]`` took off every logit of a row, and so off its LSE."""
    group = q.shape[1] // km.shape[1]
    km = km[..., : q.shape[-1]].double().repeat_interleave(group, dim=1)
    return softmax_scale * (q.double() @ km[..., None])[..., 0]


def merge_attention(acc: torch.Tensor | None, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                    q: torch.Tensor | None = None, km: torch.Tensor | None = None, softmax_scale: float = 1.0,
                    first: bool, result: torch.Tensor | None = None) -> None:
    """Merge a partial attention ``out [B, Hq, S, D]`` with its ``lse [B, Hq, S]`` into the running
    float32 ``acc`` and ``acc_lse`` (in place). ``first``: there is nothing to merge with yet (acc
    and acc_lse are only written). ``q`` and ``km``: ``lse`` is that of smooth_k's shifted logits
    (`smooth_k_term` is added to it first). ``result``: the last part; the merged output goes
    there, in its dtype and strides, instead of into ``acc`` (which may be None when the first
    part is the last)."""
    if km is not None:
        lse = (lse.double() + smooth_k_term(q, km, softmax_scale)).float()
    target = acc if result is None else result
    if first:
        acc_lse.copy_(lse)
        target.copy_(out)
        return
    merged = torch.logaddexp(acc_lse, lse)
    base = torch.where(merged == -torch.inf, 0.0, merged)  # both -inf: weights 0, not NaN
    target.copy_(acc * torch.exp(acc_lse - base)[..., None] + out.float() * torch.exp(lse - base)[..., None])
    acc_lse.copy_(merged)
