"""The registered op ``torch.ops.sageflash.sage_attn_sm89``: opcheck, torch.compile, and
`sageflash.is_supported`."""

from __future__ import annotations

import pytest
import torch

import sageflash
from conftest import HAS_CUDA
from helpers import no_env_overrides, random_qkv  # noqa: F401 (fixture)
from sageflash import debug
from test_op_validation import BAD_INPUTS, qkv

pytestmark = pytest.mark.usefixtures("no_env_overrides")
OP = torch.ops.sageflash.sage_attn_sm89.default


def op_args(q, k, v, *, softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False, pv_accum="fp32+fp16",
            granularity="per_thread", tensor_layout="HND", return_lse=False, attn_mask=None,
            backend="reference"):
    """The registered op's arguments, in its schema's order."""
    return (q, k, v, softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity, tensor_layout,
            return_lse, attn_mask, backend)


@pytest.mark.parametrize("layout,return_lse,masked", [("HND", False, False), ("NHD", True, False),
                                                      ("HND", True, True)])
def test_opcheck(layout, return_lse, masked):
    """Schema, fake (shapes, strides, dtypes) and AOT-dispatch checks of torch.library."""
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=1)
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    mask = torch.arange(70) % 3 > 0 if masked else None
    torch.library.opcheck(OP, op_args(q, k, v, is_causal=True, tensor_layout=layout, return_lse=return_lse,
                                      attn_mask=mask))


def test_fake_matches_real_layouts():
    q, k, v = random_qkv(1, 4, 2, 40, 70, 64, seed=2)
    nhd = [x.transpose(1, 2) for x in (q, k, v)]  # NHD views with non-standard strides
    real = OP(*op_args(*nhd, tensor_layout="NHD", return_lse=True))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = OP(*op_args(*(mode.from_tensor(x) for x in nhd), tensor_layout="NHD", return_lse=True))
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert real[0].shape == (1, 40, 4, 64) and real[0].is_contiguous() and real[1].shape == (1, 4, 40)
    assert OP(*op_args(q, k, v))[1].numel() == 0  # no LSE asked: an empty placeholder


def attention(q, k, v):
    out, lse = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, return_lse=True, backend="reference")
    return out.float() * 2, lse


def test_eager_calls_skip_the_dispatcher_but_autograd_sees_the_op(monkeypatch):
    """Plain eager calls run the implementation directly (no custom-op overhead); a call autograd
    records goes through the registered op, so backward fails clearly instead of silently."""
    q, k, v = random_qkv(1, 2, 2, 40, 40, 64, seed=40)
    dispatched = []
    real = torch.ops.sageflash.sage_attn_sm89
    monkeypatch.setattr(torch.ops.sageflash, "sage_attn_sm89",
                        lambda *args: dispatched.append(True) or real(*args), raising=False)
    plain = sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference")
    assert not dispatched and plain.grad_fn is None
    out = sageflash.sage_attn_sm89_fp16(q.requires_grad_(), k, v, backend="reference")
    assert dispatched and torch.equal(out.detach(), plain)
    with pytest.raises(RuntimeError, match="sage_attn_sm89"):
        out.float().sum().backward()


def test_compile_fullgraph_gives_the_same_numbers():
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=3)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v), attention(q, k, v)):
        assert torch.equal(got, want)


def test_compile_compat_nhd_with_dynamic_shapes():
    """diffusers-style `sageattn` on NHD views, compiled once for several sequence lengths."""
    def block(x, k, v):  # flash-attn's spelling too: its warning must stay out of the graph
        return sageflash.sageattn(x.transpose(1, 2), k, v, tensor_layout="NHD", causal=True,
                                  backend="reference").flatten(2)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    for seq in (40, 70):
        q, k, v = random_qkv(1, 2, 1, seq, seq + 10, 64, seed=seq)
        x, k, v = q.contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        assert torch.equal(compiled(x, k, v), block(x, k, v))


def test_compile_dynamic_with_a_softmax_scale_from_the_shape():
    """A scale computed from a symbolic head dim is checked by comparisons the tracer follows."""
    def scaled(q, k, v):
        return sageflash.sage_attn_sm89_fp16(q, k, v, softmax_scale=q.shape[-1] ** -0.5 * 2, backend="reference")

    compiled = torch.compile(scaled, fullgraph=True, backend="aot_eager", dynamic=True)
    for seq in (40, 70):
        q, k, v = random_qkv(1, 2, 1, seq, seq, 64, seed=seq)
        assert torch.equal(compiled(q, k, v), scaled(q, k, v))


def test_compile_dynamic_with_a_mask_of_the_symbolic_length():
    """A model that met several lengths before its first masked call: the mask's shape is checked
    against symbolic sizes (a `not in (1, s0)` test refused a [48, 48] mask at s0 = 48)."""
    def masked(q, k, v, mask):
        return sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=mask, backend="reference")

    compiled = torch.compile(masked, fullgraph=True, backend="aot_eager")
    for seq, with_mask in ((32, False), (48, False), (48, True), (56, True)):
        q, k, v = random_qkv(1, 2, 1, seq, seq, 64, seed=seq)
        mask = torch.rand(seq, seq, generator=torch.Generator().manual_seed(seq)) > 0.3 if with_mask else None
        assert torch.equal(compiled(q, k, v, mask), masked(q, k, v, mask))


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if not HAS_CUDA else []))
def test_a_learnable_mask_gets_the_ops_no_backward(backend):
    """A float mask that requires grad (a learnt bias) is recorded like q, k and v: the forward
    runs, a backward says why not (the reference's torch ops would otherwise differentiate it,
    and the Triton backend detached the output)."""
    q, k, v = random_qkv(1, 2, 1, 40, 40, 64, seed=7)
    bias = torch.zeros(40, 40, requires_grad=True)
    out = sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=bias, backend=backend)
    assert out.requires_grad
    assert torch.equal(out.detach(), sageflash.sage_attn_sm89_fp16(q, k, v, attn_mask=bias.detach(), backend=backend))
    with pytest.raises(NotImplementedError, match="sage_attn_sm89 has no backward"):
        out.float().sum().backward()


def test_compiled_forward_of_inputs_that_require_grad_runs_and_backward_says_why_not():
    """A model compiled outside no_grad (its projections' outputs require grad) compiles and runs
    the forward; only a backward fails, naming the op and what to do."""
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=6)
    project = torch.nn.Linear(64, 64).half()

    def block(x):
        return sageflash.sage_attn_sm89_fp16(project(x), k, v, backend="reference")

    out = torch.compile(block, backend="aot_eager")(q)
    assert out.requires_grad and torch.equal(out, block(q))
    for result in (out, block(q)):  # compiled and eager alike
        with pytest.raises(NotImplementedError, match="sage_attn_sm89 has no backward.*no_grad"):
            result.float().sum().backward()


def test_compiled_graph_reads_overrides_and_toggles_at_run_time(monkeypatch, capfd):
    """GGML_SAGE_* overrides and debug toggles are read by the registered op, per call."""
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=4)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    compiled(q, k, v)
    monkeypatch.setenv("GGML_SAGE_PV_ACCUM", "fp32")
    monkeypatch.setenv(debug.DEBUG_QUANT, "1")
    got, _ = compiled(q, k, v)
    assert "sageflash quant:" in capfd.readouterr().err
    want = sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=True, pv_accum="fp32", backend="reference")
    assert torch.equal(got, want.float() * 2)


@pytest.mark.gpu
def test_gpu_compile_inductor():
    """The Triton backend inside an inductor-compiled graph on CUDA, NHD with the LSE."""
    q, k, v = (x.transpose(1, 2).contiguous() for x in random_qkv(2, 8, 2, 500, 700, 128, seed=5, device="cuda"))
    def block(q, k, v):
        out, lse = sageflash.sageattn(q, k, v, tensor_layout="NHD", is_causal=True, return_lse=True)
        return out.flatten(2) * 2, lse

    for got, want in zip(torch.compile(block, fullgraph=True)(q, k, v), block(q, k, v)):
        assert torch.equal(got, want)


# --- is_supported ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_is_supported_says_what_the_op_says(case):
    """is_supported(...) is False with the op's own message exactly when the op raises."""
    changes, _, _, _ = BAD_INPUTS[case]
    args = qkv()
    knobs = {"backend": "reference", **{key: value for key, value in changes.items() if key not in args}}
    args.update({key: value for key, value in changes.items() if key in args})
    support = sageflash.is_supported(args["q"], args["k"], args["v"], **knobs)
    try:
        sageflash.sage_attn_sm89_fp16(args["q"], args["k"], args["v"], **knobs)
    except (TypeError, ValueError) as err:
        assert not support and support.reason == str(err)
    else:
        assert support and support.reason == ""


def test_is_supported_result():
    q, k, v = random_qkv(seed=6)
    ok, reason = sageflash.is_supported(q, k, v, is_causal=True, tensor_layout="HND")
    assert ok is True and reason == ""
    nhd = [x.transpose(1, 2) for x in (q, k, v)]
    assert sageflash.is_supported(*nhd, tensor_layout="NHD")
    assert not sageflash.is_supported(*nhd, tensor_layout="NHD", window=(1, 1))
    assert "window" in sageflash.is_supported(q, k, v, window=(1, 1)).reason
    assert "tensor_layout" in sageflash.is_supported(q, k, v, tensor_layout="BHSD").reason


def test_is_supported_checks_overrides_and_device(monkeypatch):
    q, k, v = random_qkv(seed=7)
    monkeypatch.setenv("GGML_SAGE_PV_ACCUM", "fp64")
    assert "GGML_SAGE_PV_ACCUM" in sageflash.is_supported(q, k, v).reason
    monkeypatch.delenv("GGML_SAGE_PV_ACCUM")
    monkeypatch.setenv(debug.DEBUG_QUANT, "1")
    monkeypatch.setenv(debug.SAMPLE_HEAD, "first")  # the call would raise naming it
    assert debug.SAMPLE_HEAD in sageflash.is_supported(q, k, v, backend="reference").reason
    with pytest.raises(ValueError, match=debug.SAMPLE_HEAD):
        sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference")
    monkeypatch.setenv(debug.SAMPLE_HEAD, str(q.shape[1]))  # a number, past the call's heads
    for layout, args in (("HND", (q, k, v)), ("NHD", [x.transpose(1, 2) for x in (q, k, v)])):
        support = sageflash.is_supported(*args, backend="reference", tensor_layout=layout)
        with pytest.raises(ValueError, match=f"{debug.SAMPLE_HEAD}={q.shape[1]} is out of range") as raised:
            sageflash.sage_attn_sm89_fp16(*args, backend="reference", tensor_layout=layout)
        assert not support and support.reason == str(raised.value)
    monkeypatch.delenv(debug.SAMPLE_HEAD)
    monkeypatch.delenv(debug.DEBUG_QUANT)
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET" in sageflash.is_supported(q, k, v, backend="triton").reason
