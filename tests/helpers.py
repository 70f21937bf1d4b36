"""Backend-agnostic test utilities: random inputs, float64 exact attention, payload comparisons.

The exact attention here is an independent oracle written from SPEC §1 and §7 (GQA mapping,
bottom-right causal alignment, default scale), deliberately not reusing the package's rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sageflash
from sageflash import dumps

# the directory holding the sageflash this process imported, for subprocesses to import the same
PACKAGE_ROOT = Path(sageflash.__file__).resolve().parents[1]


# 8-bit attention on uniform [-1, 1] inputs is ~1.2e-3 NMSE away from exact attention.
EXACT_NMSE = 5e-3


def random_qkv(batch=1, q_heads=2, kv_heads=1, seq_q=37, seq_k=None, head_dim=64, *, seed,
               dtype=torch.float16, device="cpu", dist="uniform", k_offset=0.0, v_offset=0.0):
    """Fresh ``q [B,Hq,Sq,D]``, ``k, v [B,Hk,Sk,D]`` from a seeded generator.

    ``dist`` is "uniform" (in [-1, 1], like the official dumps) or "normal". ``k_offset`` /
    ``v_offset`` add that many times a random per-channel offset (shared by all tokens of a
    head) to k / v, the case that smoothing is for.
    """
    seq_k = seq_q if seq_k is None else seq_k
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        if dist == "uniform":
            return torch.rand(shape, generator=gen) * 2 - 1
        return torch.randn(shape, generator=gen)

    q = draw(batch, q_heads, seq_q, head_dim)
    k = draw(batch, kv_heads, seq_k, head_dim) + k_offset * draw(batch, kv_heads, 1, head_dim)
    v = draw(batch, kv_heads, seq_k, head_dim) + v_offset * draw(batch, kv_heads, 1, head_dim)
    return tuple(x.to(device, dtype) for x in (q, k, v))


def exact_scores(q, k, softmax_scale=None, is_causal=False, attn_mask=None) -> torch.Tensor:
    """Float64 scaled scores ``[B, Hq, Sq, Sk]``, hidden keys at -inf: query head h reads KV head
    h // (Hq/Hk); causal is bottom-right (key j visible to query t iff j <= t + Sk - Sq);
    ``attn_mask`` as torch SDPA's (bool: True keeps; float: added to the scaled scores)."""
    q, k = q.double(), k.double()
    seq_q, seq_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        t = torch.arange(seq_q, device=q.device)[:, None]
        j = torch.arange(seq_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > t + seq_k - seq_q, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.double()
    return scores


def exact_attention(q, k, v, softmax_scale=None, is_causal=False, attn_mask=None) -> torch.Tensor:
    """Float64 softmax attention over `exact_scores`; a row with no visible key is 0."""
    scores = exact_scores(q, k, softmax_scale, is_causal, attn_mask)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return weights @ v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def exact_lse(q, k, softmax_scale=None, is_causal=False, attn_mask=None) -> torch.Tensor:
    """Float64 natural-log logsumexp of `exact_scores`, on the CPU (-inf for a row with no visible key)."""
    mask = None if attn_mask is None else attn_mask.cpu()
    return torch.logsumexp(exact_scores(q.cpu(), k.cpu(), softmax_scale, is_causal, mask), dim=-1)


def with_non_finite(q, k, v, tensor: str, value: float, *, seed: int, last_token: bool = False):
    """Copies of q, k, v with ``value`` (NaN or inf) at a random element of the one ``tensor``
    names ("q", "k" or "v"), or of its last token (``last_token``: under causal attention the key
    only the last rows see); returns them and that element's ``(b, h, s, d)``."""
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    gen = torch.Generator().manual_seed(seed)
    position = [int(torch.randint(n, (1,), generator=gen)) for n in tensors[tensor].shape]
    if last_token:
        position[2] = tensors[tensor].shape[2] - 1
    position = tuple(position)
    tensors[tensor][position] = value
    return tensors["q"], tensors["k"], tensors["v"], position


def non_finite_outputs(out_shape, kv_heads: int, tensor: str, position, granularity: str) -> torch.Tensor:
    """The outputs (a bool ``[B, Hq, Sq, D]``) a non-finite input at ``position`` of ``tensor``
    spoils in 8-bit attention without a mask (a key's: non-causal), written from SPEC §3–4: a query's spoils
    its scale group (`SPEC`'s q groups: a warp's 32 rows, or per_thread the 4 rows t, t+8, t+16,
    t+24 of a 32-row block) in its head; a key's spoils every query of the heads reading its KV
    head (its group's scale, or with smooth_k the mean); a value's spoils its channel there."""
    batch, head, token, channel = position
    spoiled = torch.zeros(out_shape, dtype=torch.bool)
    heads = out_shape[1] // kv_heads
    if tensor == "q":
        rows = torch.arange(out_shape[2])
        if granularity == "per_thread":
            same = (rows // 32 == token // 32) & (rows % 8 == token % 8)
        else:
            same = rows // 32 == token // 32
        spoiled[batch, head, same] = True
    elif tensor == "k":
        spoiled[batch, head * heads:(head + 1) * heads] = True
    else:
        spoiled[batch, head * heads:(head + 1) * heads, :, channel] = True
    return spoiled


def load_refdump(prefix: str, *tags: str):
    """``(meta, {tag: tensor})`` of an official dump; ``tags`` defaults to q, k, v.

    Skips the test when a tag is absent (a trimmed copy of the dumps, e.g. without payloads).
    """
    meta = dumps.read_meta(prefix)
    tags = tags or ("q", "k", "v")
    missing = [tag for tag in tags if not dumps.has_tag(prefix, tag)]
    if missing:
        pytest.skip(f"{prefix} has no {', '.join(missing)} (a trimmed copy of the official dumps?)")
    return meta, {tag: dumps.read_tensor(prefix, meta, tag) for tag in tags}


def assert_scales_match(actual, expected, name: str, rtol=1e-6, atol=0.0) -> None:
    """float32 scales equal to float32 rounding (relative ``rtol``)."""
    assert actual.dtype == torch.float32, f"{name}: dtype {actual.dtype}"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_int8_match(actual, expected, name: str, max_fraction=1e-4) -> None:
    """int8 payloads equal except at most ``max_fraction`` of the elements, off by exactly 1."""
    assert actual.dtype == torch.int8 and actual.shape == expected.shape, \
        f"{name}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    diff = (actual.cpu().int() - expected.cpu().int()).abs()
    off = int((diff != 0).sum())
    assert int(diff.max()) <= 1, f"{name}: an element is off by {int(diff.max())}"
    assert off <= max_fraction * diff.numel(), f"{name}: {off} of {diff.numel()} elements differ"


def fp8_ordinal(x: torch.Tensor) -> torch.Tensor:
    """e4m3fn bytes as signed code ordinals: adjacent representable values differ by 1."""
    raw = x.cpu().view(torch.uint8).int()
    magnitude = raw & 0x7F
    return torch.where(raw & 0x80 != 0, -magnitude, magnitude)


def assert_fp8_match(actual, expected, name: str, max_fraction=1e-3) -> None:
    """e4m3fn payloads equal except at most ``max_fraction`` of the bytes, one code apart."""
    assert actual.dtype == torch.float8_e4m3fn and actual.shape == expected.shape, \
        f"{name}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    diff = (fp8_ordinal(actual) - fp8_ordinal(expected)).abs()
    off = int((diff != 0).sum())
    assert int(diff.max()) <= 1, f"{name}: a byte is {int(diff.max())} codes off"
    assert off <= max_fraction * diff.numel(), f"{name}: {off} of {diff.numel()} bytes differ"


@pytest.fixture
def no_env_overrides(monkeypatch):
    """Hide the caller's ``GGML_SAGE_*`` variables from in-process tests of the knobs' effects."""
    for name in [n for n in os.environ if n.startswith("GGML_SAGE_")]:
        monkeypatch.delenv(name)


def run_python(code: str, env: dict[str, str] | None = None, timeout=120):
    """Run ``code`` in a fresh interpreter importing this sageflash, with no inherited
    ``GGML_SAGE_*`` / ``TRITON_INTERPRET``; ``env`` adds variables. Returns
    ``(json_of_last_stdout_line, stderr)``.
    """
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("GGML_SAGE_") and k != "TRITON_INTERPRET"}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    clean.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


MASK_KINDS = ("bool_sq_sk", "key_padding", "bool_per_head", "alibi_fp16", "additive_bf16", "additive_fp32_row")


def make_mask(kind: str, batch: int, q_heads: int, seq_q: int, seq_k: int, *, seed: int,
              device="cpu") -> torch.Tensor:
    """An ``attn_mask`` as callers pass them: bool (True = keep) or additive, full or broadcast."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool_sq_sk":
        mask = torch.rand(seq_q, seq_k, generator=gen) > 0.3
    elif kind == "key_padding":  # [B, 1, 1, Sk]: batch b keeps its first seq_k - 37·b keys
        mask = (torch.arange(seq_k) < seq_k - 37 * torch.arange(batch)[:, None])[:, None, None]
    elif kind == "bool_per_head":  # a different mask per query head (with GQA: not per KV head)
        mask = torch.rand(1, q_heads, seq_q, seq_k, generator=gen) > 0.5
    elif kind == "alibi_fp16":  # [Hq, Sq, Sk], ALiBi-like: finite offsets, a slope per head
        distance = (torch.arange(seq_k)[None, :] - torch.arange(seq_q)[:, None]).abs()
        mask = (-(0.5 ** torch.arange(1, q_heads + 1))[:, None, None] * distance).half()
    elif kind == "additive_bf16":  # [B, Hq, Sq, Sk], some -inf
        mask = torch.randn(batch, q_heads, seq_q, seq_k, generator=gen) * 2
        mask = mask.masked_fill(torch.rand(mask.shape, generator=gen) > 0.8, float("-inf")).bfloat16()
    elif kind == "additive_fp32_row":  # [Sk]: one additive row for every query
        mask = torch.randn(seq_k, generator=gen) * 3
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)
