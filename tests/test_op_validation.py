"""Bad input (SPEC §8): a ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

import sageflash
from helpers import random_qkv, run_python


def qkv(**changes):
    """Valid fp16 inputs (B=2, Hq=4, Hk=2, Sq=10, Sk=12, D=64) with some of them replaced."""
    q, k, v = random_qkv(2, 4, 2, 10, 12, 64, seed=0)
    return {"q": q, "k": k, "v": v, **changes}


def rand(*shape, dtype=torch.float16, device="cpu"):
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)


# name: (inputs or knobs to replace, exception, argument named, what was expected)
BAD_INPUTS = {
    "q_rank3": ({"q": rand(4, 10, 64)}, ValueError, "q", "rank"),
    "k_rank5": ({"k": rand(1, 2, 2, 12, 64)}, ValueError, "k", "rank"),
    "v_rank3": ({"v": rand(2, 12, 64)}, ValueError, "v", "rank"),
    "q_not_tensor": ({"q": rand(2, 4, 10, 64).numpy()}, TypeError, "q", "Tensor"),
    "v_not_tensor": ({"v": rand(2, 2, 12, 64).tolist()}, TypeError, "v", "Tensor"),
    "k_dtype_mismatch": ({"k": rand(2, 2, 12, 64, dtype=torch.bfloat16)}, TypeError, "k", "float16"),
    "v_dtype_mismatch": ({"v": rand(2, 2, 12, 64, dtype=torch.bfloat16)}, TypeError, "v", "float16"),
    "k_other_device": ({"k": rand(2, 2, 12, 64, device="meta")}, ValueError, "k", "cpu"),
    "v_other_device": ({"v": rand(2, 2, 12, 64, device="meta")}, ValueError, "v", "cpu"),
    "batch_mismatch": ({"k": rand(1, 2, 12, 64), "v": rand(1, 2, 12, 64)}, ValueError, "k", "batch"),
    "k_head_dim_mismatch": ({"k": rand(2, 2, 12, 32), "v": rand(2, 2, 12, 32)}, ValueError, "k", "head dim"),
    "v_head_dim_mismatch": ({"v": rand(2, 2, 12, 32)}, ValueError, "v", "shape"),
    "heads_not_multiple": ({"k": rand(2, 3, 12, 64), "v": rand(2, 3, 12, 64)}, ValueError, "heads", "multiple"),
    "v_seq_mismatch": ({"v": rand(2, 2, 11, 64)}, ValueError, "v", "shape"),
    "v_heads_mismatch": ({"v": rand(2, 1, 12, 64)}, ValueError, "v", "shape"),
    "float32": ({x: rand(2, h, s, 64, dtype=torch.float32) for x, h, s in [("q", 4, 10), ("k", 2, 12), ("v", 2, 12)]},
                TypeError, "q", "float16 or bfloat16"),
    "float64_v": ({"v": rand(2, 2, 12, 64, dtype=torch.float64)}, TypeError, "v", "float16 or bfloat16"),
    "int8": ({x: torch.ones(2, h, 8, 64, dtype=torch.int8) for x, h in [("q", 4), ("k", 2), ("v", 2)]},
             TypeError, "q", "float16 or bfloat16"),
    "head_dim_257": ({x: rand(2, h, 8, 257) for x, h in [("q", 4), ("k", 2), ("v", 2)]}, ValueError, "q",
                     "q head dim must be <= 256, got 257"),
    "empty_seq_q": ({"q": rand(2, 4, 0, 64)}, ValueError, "q", "empty"),
    "empty_seq_k": ({"k": rand(2, 2, 0, 64), "v": rand(2, 2, 0, 64)}, ValueError, "k", "empty"),
    "empty_batch": ({x: rand(0, h, 8, 64) for x, h in [("q", 4), ("k", 2), ("v", 2)]}, ValueError, "q", "empty"),
    "empty_head_dim": ({x: rand(2, h, 8, 0) for x, h in [("q", 4), ("k", 2), ("v", 2)]}, ValueError, "q", "empty"),
    "q_last_stride": ({"q": rand(2, 4, 10, 128)[..., ::2]}, ValueError, "q", "stride"),
    "v_last_stride": ({"v": rand(2, 2, 12, 64, 2)[..., 0]}, ValueError, "v", "stride"),
    "pv_accum_name": ({"pv_accum": "fp16"}, ValueError, "pv_accum", "fp32+fp16"),
    "pv_accum_code": ({"pv_accum": 3}, ValueError, "pv_accum", "fp32+fp16"),
    "pv_accum_none": ({"pv_accum": None}, TypeError, "pv_accum", "string"),
    "granularity_name": ({"granularity": "per_block"}, ValueError, "granularity", "per_thread"),
    "granularity_code": ({"granularity": 1}, ValueError, "granularity", "per_thread"),
    "granularity_float": ({"granularity": 2.0}, TypeError, "granularity", "string"),
    "smooth_k_string": ({"smooth_k": "yes"}, TypeError, "smooth_k", "bool"),
    "smooth_v_two": ({"smooth_v": 2}, TypeError, "smooth_v", "bool"),
    "is_causal_none": ({"is_causal": None}, TypeError, "is_causal", "bool"),
    "scale_nan": ({"softmax_scale": float("nan")}, ValueError, "softmax_scale", "finite positive"),
    "scale_inf": ({"softmax_scale": float("inf")}, ValueError, "softmax_scale", "finite positive"),
    "scale_negative": ({"softmax_scale": -0.125}, ValueError, "softmax_scale", "positive"),
    "scale_zero": ({"softmax_scale": 0.0}, ValueError, "softmax_scale", "positive"),
    "scale_string": ({"softmax_scale": "0.125"}, TypeError, "softmax_scale", "float"),
    "scale_bool": ({"softmax_scale": True}, TypeError, "softmax_scale", "float"),
    "backend_unknown": ({"backend": "cuda"}, ValueError, "backend", "reference"),
}


def assert_names(err: pytest.ExceptionInfo, argument: str, expected: str) -> None:
    message = str(err.value)
    assert re.search(rf"\b{re.escape(argument)}\b", message), f"argument {argument!r} not named: {message}"
    assert expected in message, f"expected value {expected!r} not said: {message}"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_op_rejects_bad_input(case):
    changes, error, argument, expected = BAD_INPUTS[case]
    args = qkv()
    knobs = {key: value for key, value in changes.items() if key not in args}
    args.update({key: value for key, value in changes.items() if key in args})
    with pytest.raises(error) as err:
        sageflash.sage_attn_sm89_fp16(args["q"], args["k"], args["v"], **{"backend": "reference", **knobs})
    assert_names(err, argument, expected)


QUANTIZER_BAD_INPUTS = {
    "qk_rank": (lambda q, k, v: sageflash.quantize_qk(q[0], k, granularity=3, smooth_k=True), ValueError, "q", "rank"),
    "qk_granularity": (lambda q, k, v: sageflash.quantize_qk(q, k, granularity="per_block", smooth_k=True),
                       ValueError, "granularity", "per_warp"),
    "qk_smooth_k": (lambda q, k, v: sageflash.quantize_qk(q, k, granularity=3, smooth_k="yes"),
                    TypeError, "smooth_k", "bool"),
    "qk_km_type": (lambda q, k, v: sageflash.quantize_qk(q, k, granularity=3, smooth_k=True, km=k.mean(2).numpy()),
                   TypeError, "km", "Tensor"),
    "qk_km_shape": (lambda q, k, v: sageflash.quantize_qk(q, k, granularity=3, smooth_k=True, km=k.mean(2)[:, :1]),
                    ValueError, "km", "[B, Hk, D]"),
    "qk_km_without_smooth_k": (lambda q, k, v: sageflash.quantize_qk(q, k, granularity=3, smooth_k=False,
                                                                     km=k.mean(2)), ValueError, "km", "smooth_k=True"),
    "qk_km_dtype": (lambda q, k, v: sageflash.quantize_qk(q, k, granularity=3, smooth_k=True, km=k.mean(2).long()),
                    TypeError, "km", "floating-point"),
    "qk_dtype": (lambda q, k, v: sageflash.quantize_qk(q.float(), k.float(), granularity=3, smooth_k=True),
                 TypeError, "q", "float16"),
    "v_rank": (lambda q, k, v: sageflash.quantize_v(v[0], pv_accum=2, smooth_v=False), ValueError, "v", "rank"),
    "v_head_dim": (lambda q, k, v: sageflash.quantize_v(rand(1, 1, 4, 300), pv_accum=2, smooth_v=False),
                   ValueError, "v", "v head dim must be <= 256, got 300"),
    "v_pv_accum": (lambda q, k, v: sageflash.quantize_v(v, pv_accum="fp8", smooth_v=False),
                   ValueError, "pv_accum", "fp32"),
    "v_smooth_v": (lambda q, k, v: sageflash.quantize_v(v, pv_accum=0, smooth_v="no"), TypeError, "smooth_v", "bool"),
    "v_empty": (lambda q, k, v: sageflash.quantize_v(v[:, :, :0], pv_accum=0, smooth_v=True), ValueError, "v", "empty"),
    "v_backend": (lambda q, k, v: sageflash.quantize_v(v, pv_accum=0, smooth_v=True, backend="cpu"),
                  ValueError, "backend", "reference"),
}


@pytest.mark.parametrize("case", list(QUANTIZER_BAD_INPUTS))
def test_quantizers_reject_bad_input(case):
    call, error, argument, expected = QUANTIZER_BAD_INPUTS[case]
    args = qkv()
    with pytest.raises(error) as err:
        call(**args)
    assert_names(err, argument, expected)


def test_failed_calls_leave_inputs_unchanged():
    args = qkv()
    before = {name: x.clone() for name, x in args.items()}
    for bad in ({"pv_accum": "fp16"}, {"softmax_scale": -1.0}, {"backend": "cuda"}):
        with pytest.raises(ValueError):
            sageflash.sage_attn_sm89_fp16(args["q"], args["k"], args["v"], **bad)
    assert all(torch.equal(before[name], args[name]) for name in args)


TRITON_ON_CPU = """
import json, os, sys, torch, sageflash
q = torch.rand(1, 2, 16, 64).half()
calls = {
    "op": lambda: sageflash.sage_attn_sm89_fp16(q, q, q, backend="triton"),
    "quantize_qk": lambda: sageflash.quantize_qk(q, q, granularity=3, smooth_k=True, backend="triton"),
    "quantize_v": lambda: sageflash.quantize_v(q, pv_accum=2, smooth_v=False, backend="triton"),
}
errors = {}
for interpret in (None, "0", "false", "2"):  # off, as Triton reads them
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = interpret
    for name, call in calls.items():
        try:
            call()
            errors[f"{name}/{interpret}"] = None
        except ValueError as err:
            errors[f"{name}/{interpret}"] = str(err)
print(json.dumps({"errors": errors, "kernels_imported": "sageflash.kernels" in sys.modules}))
"""


LATE_INTERPRETER = """
import json, os, torch, sageflash, sageflash.kernels
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were built for the GPU
q = torch.rand(1, 2, 16, 64).half()
support = sageflash.is_supported(q, q, q, backend="triton")
try:
    sageflash.sage_attn_sm89_fp16(q, q, q, backend="triton")
    error = None
except ValueError as err:
    error = str(err)
print(json.dumps({"ok": support.ok, "reason": support.reason, "error": error}))
"""


def test_an_interpreter_switched_on_after_the_kernels_were_built_is_a_clear_error():
    result, _ = run_python(LATE_INTERPRETER)
    assert not result["ok"] and result["reason"] == result["error"]
    assert "TRITON_INTERPRET" in result["error"] and "before importing" in result["error"]


def test_triton_backend_on_cpu_needs_the_interpreter():
    """No silent fallback to the reference: a clear error, raised before the Triton backend is
    imported (a fresh interpreter, since conftest turns the interpreter on for CPU machines)."""
    result, _ = run_python(TRITON_ON_CPU)
    assert len(result["errors"]) == 12
    for call, message in result["errors"].items():
        assert message is not None, f"{call} did not raise"
        assert "backend" in message and "TRITON_INTERPRET" in message and "cpu" in message, message
    assert not result["kernels_imported"]


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "Yes", "0", "", "false", "off", "no", "2", " 1"])
def test_the_interpreter_is_on_exactly_when_triton_says_so(monkeypatch, value):
    from triton import knobs

    from sageflash.op import interpreter_enabled
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_enabled() == knobs.runtime.interpret


def test_gpu_below_ada_gets_an_error_naming_its_capability(monkeypatch, request):
    """A CUDA device below compute capability 8.9 is refused by name, never run by another kernel;
    `sageflash run` says it falls back to the CPU reference."""
    from sageflash import kernels
    from sageflash.cli.run import pick_backend

    kernels.unsupported_reason.cache_clear()  # kept per device: cleared around the faked ones
    request.addfinalizer(kernels.unsupported_reason.cache_clear)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(kernels.UnsupportedDeviceError, match=r"NVIDIA A100 on cuda:0 has compute capability 8\.0"):
        kernels.check_device(torch.device("cuda", 0))
    device, backend, line = pick_backend()
    assert (device.type, backend) == ("cpu", "reference")
    assert line.startswith("backend: reference (CPU; NVIDIA A100 on cuda:0 has compute capability 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    kernels.unsupported_reason.cache_clear()
    assert kernels.unsupported_reason(torch.device("cuda", 0)) is None
