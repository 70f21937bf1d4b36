"""The Triton backend: quantizers and attention for CUDA GPUs of compute capability >= 8.9.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (with the GPU's float casts and FMA, see
`interpreter`), which is how CI without a GPU exercises them.
"""

from __future__ import annotations

import functools

import torch
from triton.runtime import driver

from .. import groups
from ..op import interpreter_enabled

# Triton reads TRITON_INTERPRET when it decorates the kernels (this import): fixed from here on.
INTERPRETED = interpreter_enabled()
if INTERPRETED:
    from .interpreter import check_numpy, install_gpu_arithmetic

    check_numpy()
    install_gpu_arithmetic()

from . import attention as _attention, launch, lse as _lse, quant as _quant, replay  # noqa: E402
from .sequences import PackedBatch  # noqa: E402

MIN_CAPABILITY = (8, 9)  # fp8 e4m3 tensor cores: Ada (sm_89) and Hopper (sm_90)


class UnsupportedDeviceError(RuntimeError):
    """The GPU cannot run the kernels (fp8 tensor cores need compute capability 8.9)."""


@functools.lru_cache(maxsize=None)  # asked on every call of the op
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


def _on_tensor_device(fn):
    """``fn`` run with the CUDA device of its first tensor argument current: Triton, `Launcher` and
    the replays launch on the current device, so a tensor on ``cuda:1`` while ``cuda:0`` is current
    would otherwise be read by a kernel on the wrong GPU."""
    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:  # tensors by keyword only (the op's own calls pass them by position)
            device = next((a.device for a in kwargs.values() if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return on_device


attention_from_payloads = _on_tensor_device(_attention.attention_from_payloads)
merge_attention = _on_tensor_device(_lse.merge_attention)
quantize_qk = _on_tensor_device(_quant.quantize_qk)
quantize_qkv = _on_tensor_device(_quant.quantize_qkv)
quantize_v = _on_tensor_device(_quant.quantize_v)
v_in_kernel_order = _attention.v_in_kernel_order


# Calls whose q, k and v take at least CHUNKED_FROM_BYTES quantize and attend in KV-head chunks,
# so that payloads of at most PAYLOAD_FRACTION of those bytes are alive at once: peak extra memory
# ~0.33x (the output, which also holds Q's payload) + 0.17x (two chunks of K and V's payloads) +
# statistics, against 0.33x + 0.33x in one piece. Smaller calls stay in one piece: each chunk adds
# four launches (≈60 µs of host time even replayed, against ≈120-220 µs of GPU work for a whole 1k
# call) and smaller quantizer grids.
CHUNKED_FROM_BYTES = 256 << 20
PAYLOAD_FRACTION = 0.2


def q_payload_in_output(head_dim: int) -> bool:
    """Whether Q's int8 payload is written into the output's own bytes (`_quantize_and_attend`): a
    row of the 16-bit output holds 2·head_dim bytes, a row of the payload the padded head dim."""
    return 2 * head_dim >= groups.padded_head_dim(head_dim)


def kv_head_chunks(q, k, v) -> int:
    """How many KV-head chunks `attention` splits a call into (1: one piece): for memory, and so
    that the quantizer's grid, which puts the heads of Q, K and V on its y axis, stays within
    `launch.MAX_GRID_HEADS` (more than 21845 heads, e.g. attention that folds a latent's pixels
    into the heads)."""
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    kv_heads_per_launch = launch.MAX_GRID_HEADS // (group + 2)
    if kv_heads_per_launch == 0:
        raise ValueError(f"{group} query heads per KV head is above {launch.MAX_GRID_HEADS - 2}, the most "
                         "one launch's grid holds")
    grid_chunks = groups.cdiv(kv_heads, kv_heads_per_launch)
    input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    if input_bytes < CHUNKED_FROM_BYTES:
        return grid_chunks
    head_dim = q.shape[-1]
    payloads = (k, v) if q_payload_in_output(head_dim) else (q, k, v)
    payload_bytes = sum(t.numel() for t in payloads) // head_dim * groups.padded_head_dim(head_dim)
    return max(grid_chunks, min(kv_heads, groups.cdiv(payload_bytes, int(PAYLOAD_FRACTION * input_bytes))))


@_on_tensor_device
def attention(q, k, v, params, return_lse: bool = False, out=None, attn_mask=None):
    """Quantize Q, K and V, then run the attention kernel; large calls in `kv_head_chunks` pieces,
    and batches past the grid's `launch.MAX_GRID_BATCH` in slices, with the same result (every
    quantization statistic is per batch and KV head)."""
    if out is None:
        out = q.new_empty(q.shape)
    if q.shape[0] > launch.MAX_GRID_BATCH:
        return _in_batch_slices(q, k, v, params, return_lse, out, attn_mask)
    chunks = kv_head_chunks(q, k, v)
    if chunks == 1:
        return _attend_heads(q, k, v, params, return_lse, out, attn_mask, chained=False)
    batch, q_heads, seq_q = q.shape[:3]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    lse = q.new_empty(batch, q_heads, seq_q, dtype=torch.float32) if return_lse else None
    mask = None if attn_mask is None else attn_mask.expand(batch, q_heads, seq_q, k.shape[2])
    step = groups.cdiv(kv_heads, chunks)
    for first in range(0, kv_heads, step):  # chained unless the LSE's term (a launch of its own) follows each chunk
        kv, qh = slice(first, first + step), slice(first * group, (first + step) * group)
        result = _attend_heads(q[:, qh], k[:, kv], v[:, kv], params, return_lse, out[:, qh],
                               None if mask is None else mask[:, qh], chained=first > 0 and not return_lse)
        if return_lse:
            lse[:, qh] = result[1]
    return (out, lse) if return_lse else out


def _in_batch_slices(q, k, v, params, return_lse, out, attn_mask):
    """`attention` over slices of at most `launch.MAX_GRID_BATCH` batch entries (temporal attention
    that folds a 256x256 latent into the batch has 65536), into ``out``'s slices."""
    lse = q.new_empty(q.shape[:3], dtype=torch.float32) if return_lse else None
    batched_mask = attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] > 1
    for first in range(0, q.shape[0], launch.MAX_GRID_BATCH):
        b = slice(first, first + launch.MAX_GRID_BATCH)
        result = attention(q[b], k[b], v[b], params, return_lse, out[b], attn_mask[b] if batched_mask else attn_mask)
        if return_lse:
            lse[b] = result[1]
    return (out, lse) if return_lse else out


_REPLAYS = replay.Replays()


def _attend_heads(q, k, v, params, return_lse, out, attn_mask, chained):
    """`_quantize_and_attend`, through `replay` on CUDA (recorded on a pattern's second call,
    replayed from its third), except with ``return_lse`` (whose LSE, allocated per call, is not recorded)."""
    if return_lse or q.device.type != "cuda":
        return _quantize_and_attend(q, k, v, params, return_lse, out, attn_mask, chained)
    inputs = (q, k, v, out, attn_mask)
    device = driver.active.get_current_device()  # where `Launcher` launches
    arch = launch.device_capability(q.device)  # TRITON_OVERRIDE_ARCH switches the kernels a call launches
    _REPLAYS(replay.pattern(inputs, params, device, arch, chained), inputs,
             lambda: _quantize_and_attend(q, k, v, params, False, out, attn_mask, chained),
             stream=driver.active.get_current_stream(device))
    return out


def _quantize_and_attend(q, k, v, params, return_lse, out, attn_mask, chained, packed=None):
    """Quantize Q, K and V together (three launches), then run the attention kernel; the payloads
    are freed on return. ``chained``: the previous launch is the attention of the call's previous
    KV-head chunk. ``packed``: q, k, v and out are a packed batch's ``[1, H, T, D]`` views
    (`sequences.PackedBatch`).

    Q's payload goes into the output's bytes where it fits (`q_payload_in_output`): the program
    that reads a tile of it is the one that writes the output over that tile, and after the read."""
    q_int8 = None
    if q_payload_in_output(q.shape[-1]):
        q_int8 = out.view(torch.int8)[..., : groups.padded_head_dim(q.shape[-1])]
    q_int8, q_scale, k_int8, k_scale, km, v_fp8, v_scale, v_mean = _quant.quantize_qkv(
        q, k, v, granularity=params.granularity, smooth_k=params.smooth_k, pv_accum=params.pv_accum,
        smooth_v=params.smooth_v, q_int8=q_int8, v_kernel_order=True, chained=chained, packed=packed)
    return _attention.attention_from_payloads(
        q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, params=params,
        seq_q=q.shape[2], seq_k=k.shape[2], head_dim=q.shape[-1], out_dtype=q.dtype,
        q=q, km=km, return_lse=return_lse, out=out, attn_mask=attn_mask, v_kernel_order=True,
        packed=packed)


@_on_tensor_device
def attention_varlen(q, k, v, q_lens: list[int], k_lens: list[int], params, return_lse: bool = False, out=None):
    """`attention` of a packed batch: q ``[Tq, Hq, D]``, k and v ``[Tk, Hk, D]`` (any strides with a
    unit last one), sequence i ``q_lens[i]`` queries and ``k_lens[i]`` keys, packed in order; into
    ``out`` (like q) and, with ``return_lse``, an LSE ``[Hq, Tq]``. Each sequence gets what
    `attention` gives it alone, its own quantization statistics and groups, in four launches for
    all of them (`sequences`)."""
    if out is None:
        out = q.new_empty(q.shape)
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads + 2 * kv_heads > launch.MAX_GRID_HEADS:
        raise ValueError(f"{q_heads} query and {kv_heads} KV heads are more than a packed batch's launch holds "
                         f"(q heads + 2 * k heads <= {launch.MAX_GRID_HEADS})")
    packed = PackedBatch.build(q_lens, k_lens, q.device)
    q, k, v, out_hnd = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v, out))  # [1, H, T, D] views
    result = _quantize_and_attend(q, k, v, params, return_lse, out_hnd, None, chained=False, packed=packed)
    return (out, result[1]) if return_lse else out


__all__ = ["UnsupportedDeviceError", "attention", "attention_from_payloads", "attention_varlen", "check_device",
           "kv_head_chunks", "merge_attention", "quantize_qk", "quantize_qkv", "quantize_v", "unsupported_reason",
           "v_in_kernel_order"]
