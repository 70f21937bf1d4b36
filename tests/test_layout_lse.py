"""``return_lse``, ``tensor_layout`` and causal Sq != Sk on both backends.

The Triton backend runs on the GPU when there is one, else under TRITON_INTERPRET=1 on CPU, where
shapes stay tiny; tests marked ``gpu`` add GPU-sized shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import sageflash
from conftest import HAS_CUDA, nmse
from helpers import EXACT_NMSE, exact_attention, exact_lse, load_refdump, no_env_overrides, random_qkv  # noqa: F401 (fixture)
from sageflash import debug, reference

pytestmark = pytest.mark.usefixtures("no_env_overrides")
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ("reference", "triton")
# Measured on the official dumps: max |lse - official| <= 3e-5 on both backends.
LSE_ATOL = 1e-4


def device_of(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def inputs(backend, *shape, seed, layout="HND", **kw):
    """Seeded inputs on the backend's device, as [B, H, S, D] or (NHD) contiguous [B, S, H, D]."""
    qkv = random_qkv(*shape, seed=seed, device=device_of(backend), **kw)
    return qkv if layout == "HND" else tuple(x.transpose(1, 2).contiguous() for x in qkv)


# --- return_lse --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_matches_official(refdump_prefix, backend):
    """The op's LSE against the official one; under the interpreter, one (batch, KV head) only."""
    meta, ref = load_refdump(refdump_prefix, "q", "k", "v", "lse")
    q, k, v, lse = ref["q"], ref["k"], ref["v"], ref["lse"]
    if backend == "triton" and not HAS_CUDA:  # the LSE of a head depends on that head's inputs only
        if meta.seq_q * meta.seq_k > 256 * 256:
            pytest.skip("too slow for the Triton interpreter")
        group = meta.num_q_heads // meta.num_k_heads
        q, lse, k, v = q[:1, :group], lse[:1, :group], k[:1, :1], v[:1, :1]
    p = meta.params
    out, got = sageflash.sage_attn_sm89_fp16(
        *(x.to(device_of(backend)) for x in (q, k, v)), p.softmax_scale, p.is_causal, p.smooth_k,
        p.smooth_v, p.pv_accum, p.granularity, return_lse=True, backend=backend)
    assert got.dtype == torch.float32 and got.shape == q.shape[:3] and out.shape == q.shape
    torch.testing.assert_close(got.cpu(), lse, rtol=0, atol=LSE_ATOL)


def merge_by_lse(parts):
    """Combine attention over disjoint key sets from their outputs and LSEs (ring attention)."""
    lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    return sum(out.double() * torch.exp(part_lse - lse).double()[..., None] for out, part_lse in parts), lse


RING_SHAPES = {  # batch, q heads, kv heads, Sq, Sk, head dim
    "reference": [(1, 2, 1, 64, 128, 64), (1, 2, 2, 37, 200, 40), (2, 4, 2, 100, 150, 64)],
    "triton": [(1, 2, 1, 64, 128, 64), (1, 2, 2, 37, 200, 40)],
}


@pytest.mark.parametrize("backend,shape", [(b, s) for b in BACKENDS for s in RING_SHAPES[b]],
                         ids=lambda x: x if isinstance(x, str) else "x".join(map(str, x)))
def test_lse_merges_halves_like_ring_attention(backend, shape):
    """Attention over two halves of K/V merged by their LSEs is attention over the whole.

    K carries a large per-channel offset, so each half has its own smooth_k mean: the merge only
    works because the LSE includes the softmax_scale·q·km correction. Each half is quantized on
    its own, so merged and whole agree to the 8-bit noise, like each of them and exact attention.
    """
    q, k, v = inputs(backend, *shape, seed=sum(shape), dist="normal", k_offset=3.0)
    def run(k, v):
        return sageflash.sage_attn_sm89_fp16(q, k, v, return_lse=True, backend=backend)

    half = k.shape[2] // 2
    merged, merged_lse = merge_by_lse([run(k[:, :, :half], v[:, :, :half]), run(k[:, :, half:], v[:, :, half:])])
    whole, whole_lse = run(k, v)
    assert nmse(merged, exact_attention(q, k, v)) < EXACT_NMSE
    assert nmse(merged, whole) < EXACT_NMSE
    torch.testing.assert_close(merged_lse.cpu(), exact_lse(q, k).float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=0, atol=2e-2)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")  # interpreter: log2(0)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_q,seq_k", [(50, 130), (130, 70)], ids=["sq_lt_sk", "sq_gt_sk"])
def test_causal_unequal_lengths_is_bottom_right(backend, seq_q, seq_k):
    """is_causal with Sq != Sk: key j visible to query t iff j <= t + Sk - Sq (SPEC §7), against
    exact float64 attention; a row with no visible key gives zeros and lse = -inf."""
    q, k, v = inputs(backend, 1, 2, 1, seq_q, seq_k, 64, seed=seq_q + seq_k)
    out, lse = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, return_lse=True, backend=backend)
    assert nmse(out, exact_attention(q, k, v, is_causal=True)) < EXACT_NMSE
    blind = max(0, seq_q - seq_k)  # rows t < Sq - Sk see no key
    assert (out[:, :, :blind] == 0).all() and (lse[:, :, :blind] == -math.inf).all()
    torch.testing.assert_close(lse[:, :, blind:].cpu(), exact_lse(q, k, is_causal=True)[:, :, blind:].float(),
                               rtol=0, atol=2e-2)


def test_return_lse_must_be_bool():
    q, k, v = random_qkv(seed=0)
    with pytest.raises(TypeError, match="return_lse"):
        sageflash.sage_attn_sm89_fp16(q, k, v, return_lse="yes", backend="reference")


# --- tensor_layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("knobs", [{"is_causal": True}, {"pv_accum": "fp32", "smooth_v": True,
                                                          "granularity": "per_warp"}], ids=["causal", "fp32"])
def test_nhd_equals_hnd(backend, knobs):
    """NHD in, NHD out (contiguous [B, S, H, D]), bit for bit the HND result transposed."""
    q, k, v = inputs(backend, 1, 4, 2, 70, 100, 64, seed=3)
    out, lse = sageflash.sage_attn_sm89_fp16(q, k, v, **knobs, return_lse=True, backend=backend)
    nhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    out_nhd, lse_nhd = sageflash.sage_attn_sm89_fp16(*nhd, **knobs, tensor_layout="NHD", return_lse=True,
                                                     backend=backend)
    assert out_nhd.shape == (1, 70, 4, 64) and out_nhd.is_contiguous()
    assert torch.equal(out_nhd.transpose(1, 2), out) and torch.equal(lse_nhd, lse)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_views_are_read_in_place(monkeypatch, layout):
    """The backend gets q/k/v as views of the caller's storage (no copy), HND-shaped."""
    q, k, v = inputs("reference", 1, 2, 1, 40, 40, 64, seed=4, layout=layout)
    seen = []
    real = reference.attention
    monkeypatch.setattr(reference, "attention", lambda *a, **kw: seen.append(a[:3]) or real(*a, **kw))
    sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout=layout, backend="reference")
    for given, passed in zip((q, k, v), seen[0]):
        assert passed.data_ptr() == given.data_ptr()
        assert passed.shape == sageflash.op.as_hnd(given, layout).shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizers_read_nhd_views(backend):
    """quantize_qk / quantize_v on NHD tensors give the payloads of the HND ones ([B, H, ...])."""
    q, k, v = inputs(backend, 1, 2, 1, 40, 70, 64, seed=5)
    nhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    qk = sageflash.quantize_qk(q, k, granularity="per_thread", smooth_k=True, backend=backend)
    qk_nhd = sageflash.quantize_qk(*nhd[:2], granularity="per_thread", smooth_k=True, tensor_layout="NHD",
                                   backend=backend)
    vq = sageflash.quantize_v(v, pv_accum="fp32", smooth_v=True, backend=backend)
    vq_nhd = sageflash.quantize_v(nhd[2], pv_accum="fp32", smooth_v=True, tensor_layout="NHD", backend=backend)
    for a, b in zip(qk + vq, qk_nhd + vq_nhd):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_debug_path_keeps_layout_and_lse(monkeypatch):
    """With a debug toggle set, the op still returns NHD output and the LSE, the same numbers."""
    q, k, v = inputs("reference", 1, 2, 1, 40, 70, 64, seed=8, layout="NHD")
    want = sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout="NHD", return_lse=True)
    monkeypatch.setenv(debug.Q_SERIAL, "1")
    got = sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout="NHD", return_lse=True)
    assert got[0].is_contiguous() and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("call", ["op", "quantize_qk", "quantize_v"])
@pytest.mark.parametrize("layout,error", [("BHSD", ValueError), ("nhd", ValueError), (1, TypeError)])
def test_bad_layout_is_rejected(call, layout, error):
    q, k, v = random_qkv(seed=0)
    calls = {
        "op": lambda: sageflash.sage_attn_sm89_fp16(q, k, v, tensor_layout=layout),
        "quantize_qk": lambda: sageflash.quantize_qk(q, k, granularity=3, smooth_k=True, tensor_layout=layout),
        "quantize_v": lambda: sageflash.quantize_v(v, pv_accum=2, smooth_v=False, tensor_layout=layout),
    }
    with pytest.raises(error, match="tensor_layout.*'HND'.*'NHD'"):
        calls[call]()


def test_errors_name_the_layout():
    q, k, v = (x.transpose(1, 2).contiguous() for x in random_qkv(1, 4, 2, 10, 12, 64, seed=0))
    with pytest.raises(ValueError, match=r"q must have rank 4 \(\[B, S, H, D\] for tensor_layout='NHD'\)"):
        sageflash.sage_attn_sm89_fp16(q[0], k, v, tensor_layout="NHD")
    with pytest.raises(ValueError, match=r"v must have k's shape \(1, 12, 2, 64\) \(\[B, Sk, Hk, D\]\)"):
        sageflash.sage_attn_sm89_fp16(q, k, v[:, :11], tensor_layout="NHD")
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k heads \(3\)"):
        sageflash.sage_attn_sm89_fp16(q, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2),
                                      tensor_layout="NHD")
    with pytest.raises(ValueError, match=r"\[B, H, S, D\] for tensor_layout='HND'"):
        sageflash.sage_attn_sm89_fp16(q[0], k, v)


# --- on the GPU, at sizes the interpreter cannot run --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_nhd_and_lse(causal):
    """Triton on CUDA: NHD bit for bit like HND, and the LSE like the reference's."""
    q, k, v = random_qkv(2, 8, 2, 1000, 1100, 128, seed=6, device="cuda")
    out, lse = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal, return_lse=True)
    nhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    out_nhd, lse_nhd = sageflash.sage_attn_sm89_fp16(*nhd, is_causal=causal, return_lse=True, tensor_layout="NHD")
    assert out_nhd.is_contiguous() and torch.equal(out_nhd.transpose(1, 2), out) and torch.equal(lse_nhd, lse)
    _, ref_lse = sageflash.sage_attn_sm89_fp16(*(x.cpu() for x in (q, k, v)), is_causal=causal,
                                               return_lse=True, backend="reference")
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=LSE_ATOL)


@pytest.mark.gpu
def test_gpu_lse_merges_halves():
    q, k, v = random_qkv(1, 8, 8, 512, 4096, 128, seed=7, device="cuda", dist="normal", k_offset=3.0)
    def run(k, v):
        return sageflash.sage_attn_sm89_fp16(q, k, v, return_lse=True)

    merged, merged_lse = merge_by_lse([run(k[:, :, :2048], v[:, :, :2048]), run(k[:, :, 2048:], v[:, :, 2048:])])
    whole, whole_lse = run(k, v)
    assert nmse(merged, whole) < EXACT_NMSE
    torch.testing.assert_close(merged_lse, whole_lse, rtol=0, atol=2e-2)
