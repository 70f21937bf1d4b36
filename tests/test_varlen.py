"""`sage_attn_varlen` (packed variable-length batches) on the CPU reference: each sequence gets what
the op gives it alone, and bad input is refused by name."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import sageflash
from conftest import nmse
from helpers import EXACT_NMSE, exact_attention, exact_lse, no_env_overrides  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("no_env_overrides")


def cu_seqlens(lengths, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype)


def packed_qkv(q_lens, k_lens, q_heads=4, kv_heads=2, head_dim=64, *, seed, dtype=torch.float16, device="cpu"):
    """Fresh packed ``q [Tq, Hq, D]``, ``k, v [Tk, Hk, D]``, uniform in [-1, 1] (k with a per-channel
    offset, what smooth_k is for)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.rand(shape, generator=gen) * 2 - 1  # noqa: E731
    q = draw(sum(q_lens), q_heads, head_dim)
    k = draw(sum(k_lens), kv_heads, head_dim) + 2 * draw(1, kv_heads, head_dim)
    v = draw(sum(k_lens), kv_heads, head_dim)
    return tuple(x.to(device, dtype) for x in (q, k, v))


def per_sequence(q, k, v, q_lens, k_lens, **knobs):
    """The op on each sequence alone (NHD, a batch of one): ``(out [Tq, Hq, D], lse [Hq, Tq])``,
    zeros and -inf for a sequence without keys."""
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"))
    for (qs, qe), (ks, ke) in zip(itertools.pairwise(cu_seqlens(q_lens).tolist()),
                                  itertools.pairwise(cu_seqlens(k_lens).tolist())):
        if qe == qs:
            continue
        if ke == ks:
            out[qs:qe], lse[:, qs:qe] = 0, float("-inf")
            continue
        o, l = sageflash.sage_attn_sm89_fp16(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], tensor_layout="NHD",
                                             return_lse=True, **knobs)
        out[qs:qe], lse[:, qs:qe] = o[0], l[0].to(lse.device)
    return out, lse


# (q lengths, k lengths): across 64-key and 128-row blocks, a sequence without queries, one without keys
LENGTHS = [([37], [37]), ([5, 130, 64], [7, 200, 64]), ([3, 0, 70, 12], [9, 5, 0, 130])]
KNOBS = [dict(), dict(is_causal=True), dict(granularity="per_warp", smooth_k=False),
         dict(pv_accum="fp32", smooth_v=True, is_causal=True)]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: str(x).replace(" ", ""))
def test_reference_is_the_op_per_sequence(lengths, knobs):
    q_lens, k_lens = lengths
    q, k, v = packed_qkv(q_lens, k_lens, seed=len(q_lens) + len(knobs))
    inputs = [x.clone() for x in (q, k, v)]
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), return_lse=True,
                                          backend="reference", **knobs)
    want_out, want_lse = per_sequence(q, k, v, q_lens, k_lens, backend="reference", **knobs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), inputs))  # inputs untouched


def test_reference_is_close_to_exact_attention():
    q_lens, k_lens = [50, 3, 100], [80, 64, 20]
    q, k, v = packed_qkv(q_lens, k_lens, seed=1)
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens, torch.int64),
                                          is_causal=True, return_lse=True, backend="reference")
    for (qs, qe), (ks, ke) in zip(itertools.pairwise(cu_seqlens(q_lens).tolist()),
                                  itertools.pairwise(cu_seqlens(k_lens).tolist())):
        one = [x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke])]
        want = exact_attention(*one, is_causal=True)[0].transpose(0, 1)
        assert nmse(out[qs:qe], want) < EXACT_NMSE
        finite = torch.isfinite(lse[:, qs:qe])
        torch.testing.assert_close(lse[:, qs:qe][finite], exact_lse(*one[:2], is_causal=True)[0].float()[finite],
                                   rtol=0, atol=2e-2)  # int8 logits, as in test_layout_lse
    # bottom-right causal: the last sequence's first 80 rows (100 queries, 20 keys) see no key
    assert torch.isneginf(lse[:, 53:133]).all() and (out[53:133] == 0).all() and torch.isfinite(lse[:, 133:]).all()


def test_strided_views_and_sageattn_varlen():
    """q, k and v as views of one packed qkv tensor (what a fused projection gives), through
    SageAttention's name and its knob names."""
    q_lens = [20, 45]  # k and v: the same rows
    qkv = torch.randn(sum(q_lens), 3, 4, 64, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = cu_seqlens(q_lens)
    out = sageflash.sageattn_varlen(q, k, v, cu, cu, 45, 45, is_causal=True, qk_quant_gran="per_warp",
                                    pv_accum_dtype="fp32+fp32", backend="reference")
    want = sageflash.sage_attn_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, is_causal=True,
                                      granularity="per_warp", pv_accum="fp32+fp32", backend="reference")
    assert torch.equal(out, want)


def test_overrides_apply(monkeypatch):
    q_lens, k_lens = [30, 10], [40, 70]
    q, k, v = packed_qkv(q_lens, k_lens, seed=3)
    args = (q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens))
    monkeypatch.setenv("GGML_SAGE_GRANULARITY", "per_warp")
    overridden = sageflash.sage_attn_varlen(*args, backend="reference")
    monkeypatch.delenv("GGML_SAGE_GRANULARITY")
    assert torch.equal(overridden, sageflash.sage_attn_varlen(*args, granularity="per_warp", backend="reference"))
    assert not torch.equal(overridden, sageflash.sage_attn_varlen(*args, backend="reference"))


def test_no_backward_and_debug_toggles_said_once(monkeypatch, caplog, tmp_path):
    q_lens = k_lens = [16, 8]
    q, k, v = packed_qkv(q_lens, k_lens, seed=4)
    q.requires_grad_(True)
    out = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), backend="reference")
    with pytest.raises(NotImplementedError, match="sageflash.sage_attn_varlen has no backward"):
        out.float().sum().backward()
    monkeypatch.setenv("GGML_SAGE_DUMP", str(tmp_path / "dump"))
    with caplog.at_level(logging.WARNING, logger="sageflash"):
        for _ in range(2):
            sageflash.sage_attn_varlen(q.detach(), k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), backend="reference")
    said = [r for r in caplog.records if "sage_attn_varlen runs without the debug toggles" in r.getMessage()]
    assert len(said) <= 1 and not list(tmp_path.iterdir())  # once per process (an earlier test may have said it)


CU = cu_seqlens([3, 5])


@pytest.mark.parametrize("change,error,message", [
    (dict(q=torch.randn(1, 8, 2, 64, dtype=torch.float16)), ValueError, r"q must have rank 3 \(\[T, H, D\]"),
    (dict(k=torch.randn(8, 2, 64)), TypeError, "k must be float16 or bfloat16"),
    (dict(v=torch.randn(8, 2, 32, dtype=torch.float16)), ValueError, "v must have k's shape"),
    (dict(k=torch.randn(8, 3, 64, dtype=torch.float16), v=torch.randn(8, 3, 64, dtype=torch.float16)),
     ValueError, r"q heads \(4\) must be a multiple of k heads \(3\)"),
    (dict(cu_seqlens_q=[0, 3, 8]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (dict(cu_seqlens_q=CU.float()), TypeError, "cu_seqlens_q must be int32 or int64"),
    (dict(cu_seqlens_k=CU[None]), ValueError, r"cu_seqlens_k must be a 1-D tensor \[N \+ 1\]"),
    (dict(cu_seqlens_k=CU[:1]), ValueError, r"cu_seqlens_k must be a 1-D tensor \[N \+ 1\]"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8])), ValueError, "cu_seqlens_q must rise from 0 without falling and end"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5])), ValueError, "cu_seqlens_q must rise from 0 without falling"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 9])), ValueError, "cu_seqlens_k .* end within the 8 packed tokens"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 4, 8])), ValueError, "must mark as many sequences, got 2 and 3"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q=4 is below the longest sequence, 5 tokens"),
    (dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k must be an int or None"),
    (dict(max_seqlen_q=True), TypeError, "max_seqlen_q must be an int or None, got bool"),
    (dict(is_causal="yes"), TypeError, "is_causal must be a bool"),
    (dict(return_lse=2), TypeError, "return_lse must be a bool"),
    (dict(pv_accum="fp16"), ValueError, "pv_accum"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_is_named(change, error, message):
    args = dict(q=torch.randn(8, 4, 64, dtype=torch.float16), k=torch.randn(8, 2, 64, dtype=torch.float16),
                v=torch.randn(8, 2, 64, dtype=torch.float16), cu_seqlens_q=CU, cu_seqlens_k=CU,
                backend="reference")
    args.update(change)
    with pytest.raises(error, match=message):
        sageflash.sage_attn_varlen(**args)


def test_rows_past_the_last_offset_and_batches_without_keys():
    """Packed into longer buffers (flash-attn's callers may): rows of q past cu_seqlens_q's end give
    zeros and LSE -inf, keys past cu_seqlens_k's end are not read; a batch whose sequences have no
    key at all (a fully masked diffusers row) gives zeros."""
    q_lens, k_lens = [5, 20], [30, 9]
    q, k, v = packed_qkv([*q_lens, 7], [*k_lens, 11], seed=7)
    k[39:] = float("nan")  # past cu_seqlens_k's end: must not be read
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens), return_lse=True,
                                          backend="reference")
    want_out, want_lse = per_sequence(q[:25], k[:39], v[:39], q_lens, k_lens, backend="reference")
    assert torch.equal(out[:25], want_out) and torch.equal(lse[:, :25], want_lse)
    assert (out[25:] == 0).all() and torch.isneginf(lse[:, 25:]).all() and out.is_contiguous()
    out, lse = sageflash.sage_attn_varlen(q, k, v, cu_seqlens(q_lens), torch.tensor([0, 0, 0]), return_lse=True,
                                          backend="reference")
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_torch_compile_traces_it_as_one_op():
    """``torch.compile(fullgraph=True)`` traces a call as one node, the registered op, which reads
    its cu_seqlens (graph inputs here) when the graph runs; a backward through it raises, naming it."""
    q_lens, k_lens = [20, 30], [40, 30]
    q, k, v = packed_qkv(q_lens, k_lens, seed=8)

    def model(q, k, v, cu_q, cu_k):
        return sageflash.sage_attn_varlen(q * 2, k, v, cu_q, cu_k, is_causal=True, backend="reference") + 1

    graphs = []

    def backend(graph_module, example_inputs):  # records what Dynamo traced, runs it as traced
        graphs.append(graph_module)
        return graph_module.forward

    want = model(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert torch.equal(compiled(q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens)), want)
    assert len(graphs) == 1
    assert [str(n.target) for n in graphs[0].graph.nodes if "sageflash" in str(n.target)] == [
        "sageflash.sage_attn_varlen"]
    other_lengths = compiled(q, k, v, cu_seqlens([25, 25]), cu_seqlens(k_lens))  # values read at run time
    assert torch.equal(other_lengths, model(q, k, v, cu_seqlens([25, 25]), cu_seqlens(k_lens)))
    out = compiled(q.requires_grad_(), k, v, cu_seqlens(q_lens), cu_seqlens(k_lens))
    with pytest.raises(NotImplementedError, match="sageflash.sage_attn_varlen has no backward"):
        out.float().sum().backward()


def test_max_seqlen_is_checked_against_its_own_side():
    q_lens, k_lens = [3, 5], [3, 9]
    q, k, v = packed_qkv(q_lens, k_lens, seed=10)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    want = sageflash.sage_attn_varlen(q, k, v, cu_q, cu_k, backend="reference")
    assert torch.equal(sageflash.sage_attn_varlen(q, k, v, cu_q, cu_k, 5, 9, backend="reference"), want)
    assert torch.equal(sageflash.sageattn_varlen(q, k, v, cu_q, cu_k, 5, 9, backend="reference"), want)
    with pytest.raises(ValueError, match="max_seqlen_k=5 is below the longest sequence, 9 tokens"):
        sageflash.sageattn_varlen(q, k, v, cu_q, cu_k, 9, 5, backend="reference")


def test_sageattn_varlen_takes_flash_attn_spellings(caplog):
    q_lens = k_lens = [6, 2]
    q, k, v = packed_qkv(q_lens, k_lens, seed=6)
    cu = cu_seqlens(q_lens)
    with caplog.at_level(logging.WARNING, logger="sageflash"):
        out = sageflash.sageattn_varlen(q, k, v, cu, cu, 6, 6, causal=True, softmax_scale=0.3, backend="reference")
    assert torch.equal(out, sageflash.sage_attn_varlen(q, k, v, cu, cu, softmax_scale=0.3, is_causal=True,
                                                       backend="reference"))
    said = [r.getMessage() for r in caplog.records if "sageattn_varlen(): taking flash-attn's" in r.getMessage()]
    assert len(said) <= 2 and not any("tensor_layout" in message for message in said)


def test_each_function_says_its_own_spelling_warning(monkeypatch, caplog):
    """sageattn's warning (which names a tensor_layout) does not silence sageattn_varlen's."""
    from sageflash import params
    monkeypatch.setattr(params, "_said_once", set())
    q, k, v = packed_qkv([4], [4], seed=11)
    cu = cu_seqlens([4])
    with caplog.at_level(logging.WARNING, logger="sageflash"):
        sageflash.sageattn(q[None], k[None], v[None], tensor_layout="NHD", causal=True, backend="reference")
        sageflash.sageattn_varlen(q, k, v, cu, cu, 4, 4, causal=True, backend="reference")
    said = [r.getMessage() for r in caplog.records if "taking flash-attn's 'causal'" in r.getMessage()]
    assert [m.split("(")[0] for m in said] == ["sageattn", "sageattn_varlen"], said


def test_sageattn_varlen_refuses_what_packed_tensors_lack():
    q = k = v = torch.randn(8, 2, 64, dtype=torch.float16)
    for keyword in ("tensor_layout", "attn_mask"):
        with pytest.raises(TypeError, match=f"sageattn_varlen.. got an unexpected keyword argument '{keyword}'"):
            sageflash.sageattn_varlen(q, k, v, CU, CU, 5, 5, **{keyword: None})
