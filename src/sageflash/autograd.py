"""No backward for the calls outside the registered op, said where it matters: when autograd runs it.

The sequence-parallel calls' collectives and `sage_attn_varlen`'s kernels do not record autograd,
so without this a caller training through them would get an output detached from q, k and v and
gradients silently missing (the op itself raises)."""

from __future__ import annotations

import torch


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name: str, holder: list, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.name = name
        return holder[0]  # passed in a list, so autograd sees a new tensor, not a view of an input

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(f"{ctx.name} has no backward: the 8-bit forward is for "
                                  "inference. Call it under torch.no_grad() or torch.inference_mode(), or on "
                                  "detached inputs")


def without_backward(name: str, result, q, k, v):
    """``result`` (a tensor, or ``(out, lse)``) tied to q, k and v by a backward that raises naming
    ``name`` (e.g. ``sageflash.parallel.ring_attention``), when
    autograd would record the call; else ``result`` itself. In-place ops on it stay allowed."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return result
    if isinstance(result, tuple):
        return tuple(_NoBackward.apply(name, [t.detach()], q, k, v) for t in result)
    return _NoBackward.apply(name, [result.detach()], q, k, v)
