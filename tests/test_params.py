"""The knob contract (SPEC §2): enums and codes, resolve_params, smooth_v, GGML_SAGE_* overrides.

Overrides and once-per-process logging are checked in fresh interpreters (no logging set up), one
per scenario, each making several calls and printing its findings as JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import pytest
import torch

import sageflash
from helpers import no_env_overrides, random_qkv, run_python  # noqa: F401 (fixture)
from sageflash import PVAccum, QKGranularity, params

pytestmark = pytest.mark.usefixtures("no_env_overrides")


def sage(q, k, v, **knobs):
    return sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference", **knobs)


@pytest.mark.parametrize("enum_cls,values", [
    (PVAccum, {"fp32": 0, "fp32+fp32": 1, "fp32+fp16": 2}),
    (QKGranularity, {"per_warp": 2, "per_thread": 3}),
])
def test_enums_carry_ggml_codes_and_compare_as_strings(enum_cls, values):
    assert {m.value: m.code for m in enum_cls} == values
    for text, code in values.items():
        member = enum_cls.parse(text, "knob")
        assert member == text and str(member) == text and f"{member}" == text
        assert enum_cls.parse(code, "knob") is member
        assert enum_cls.parse(f" {code}", "knob") is member  # as text: a dump's meta, a command line
        assert enum_cls.parse(text.upper(), "knob") is member
        assert enum_cls.parse(member, "knob") is member


def test_resolve_params_defaults():
    params = sageflash.resolve_params()
    assert dataclasses.asdict(params) == {
        "softmax_scale": None, "is_causal": False, "smooth_k": True, "smooth_v": False,
        "pv_accum": "fp32+fp16", "granularity": "per_thread"}
    assert sageflash.resolve_params(head_dim=80).softmax_scale == 80 ** -0.5
    assert sageflash.resolve_params(softmax_scale=0.2, head_dim=80).softmax_scale == 0.2


def test_resolve_params_record_is_frozen_with_string_enums():
    params = sageflash.resolve_params(0.5, True, False, True, 0, 2)
    assert params.as_dict() == {"softmax_scale": 0.5, "is_causal": True, "smooth_k": False,
                                "smooth_v": True, "pv_accum": "fp32", "granularity": "per_warp"}
    assert all(type(v) in (float, bool, str) for v in params.as_dict().values())
    assert params.pv_accum is PVAccum.FP32 and params.granularity is QKGranularity.PER_WARP
    assert "'fp32'" in repr(params) and "'per_warp'" in repr(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.smooth_k = True


@pytest.mark.parametrize("pv_accum", ["fp32+fp32", "fp32+fp16", 1, PVAccum.FP32_FP16])
def test_smooth_v_needs_fp32_accumulation(pv_accum):
    assert sageflash.resolve_params(smooth_v=True, pv_accum="fp32").smooth_v is True
    assert sageflash.resolve_params(smooth_v=True, pv_accum=pv_accum).smooth_v is False


def test_quantize_v_keeps_the_smooth_v_contract(monkeypatch, caplog):
    """The payloads quantize_v returns are those the op would use: no V smoothing without fp32."""
    monkeypatch.setattr(params, "_said_once", set())
    v = random_qkv(1, 2, 1, 50, 50, 64, seed=1, v_offset=3)[2]
    with caplog.at_level(logging.WARNING, logger="sageflash"):
        forced = sageflash.quantize_v(v, pv_accum="fp32+fp16", smooth_v=True, backend="reference")
    plain = sageflash.quantize_v(v, pv_accum="fp32+fp16", smooth_v=False, backend="reference")
    assert forced[2] is None and all(torch.equal(a, b) for a, b in zip(forced[:2], plain[:2]))
    assert sageflash.quantize_v(v, pv_accum="fp32", smooth_v=True, backend="reference")[2] is not None
    assert ["smooth_v needs pv_accum='fp32'" in r.getMessage() for r in caplog.records] == [True]


@pytest.mark.parametrize("head_dim, error, message", [
    (0, ValueError, "head_dim must be positive, got 0"), (-4, ValueError, "head_dim must be positive, got -4"),
    ("64", TypeError, "head_dim must be an int or None, got str"),
    (64.5, TypeError, "head_dim must be an int or None, got float"),
    (True, TypeError, "head_dim must be an int or None, got bool")])
def test_resolve_params_checks_head_dim(head_dim, error, message):
    with pytest.raises(error, match=re.escape(message)):
        sageflash.resolve_params(head_dim=head_dim)


def test_numpy_scalars_are_taken_as_their_python_values():
    """What `1 / np.sqrt(np.float32(d))` and numpy comparisons give."""
    np = pytest.importorskip("numpy")
    for scale in (np.float16(0.125), np.float32(0.125), np.float64(0.125)):
        assert sageflash.resolve_params(softmax_scale=scale).softmax_scale == 0.125
    assert sageflash.resolve_params(is_causal=np.True_, smooth_k=np.False_).is_causal is True
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sageflash.resolve_params(is_causal=np.array([True]))
    # numpy's integers, as Python's: 0/1 flags and the knobs' integer codes
    params = sageflash.resolve_params(is_causal=np.int64(1), smooth_k=np.int8(0), pv_accum=np.int64(1),
                                      granularity=np.int32(2))
    assert (params.is_causal, params.smooth_k, params.pv_accum.value, params.granularity.value) == \
        (True, False, "fp32+fp32", "per_warp")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sageflash.resolve_params(is_causal=np.int64(2))


def test_op_forces_smooth_v_off_without_fp32_accumulation():
    q, k, v = random_qkv(1, 2, 1, 50, 50, 64, seed=1, v_offset=3)
    forced = sage(q, k, v, smooth_v=True, pv_accum="fp32+fp32")
    assert torch.equal(forced, sage(q, k, v, smooth_v=False, pv_accum="fp32+fp32"))
    assert not torch.equal(forced, sage(q, k, v, smooth_v=True, pv_accum="fp32"))


@pytest.mark.parametrize("spelling", [
    {"pv_accum": 0, "granularity": 2},
    {"pv_accum": PVAccum.FP32, "granularity": QKGranularity.PER_WARP},
    {"pv_accum": "FP32", "granularity": "Per_Warp"},
])
def test_op_accepts_codes_and_enums(spelling):
    q, k, v = random_qkv(1, 2, 2, 40, 70, 64, seed=2)
    expected = sage(q, k, v, pv_accum="fp32", granularity="per_warp")
    assert torch.equal(sage(q, k, v, **spelling), expected)
    assert not torch.equal(expected, sage(q, k, v))  # the knobs do change the result


def test_quantizers_accept_codes_and_enums():
    q, k, v = random_qkv(1, 2, 1, 40, 70, 64, seed=3)
    by_name = sageflash.quantize_qk(q, k, granularity="per_thread", smooth_k=True, backend="reference")
    by_code = sageflash.quantize_qk(q, k, granularity=3, smooth_k=True, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_code))
    v_by_name = sageflash.quantize_v(v, pv_accum="fp32+fp16", smooth_v=False, backend="reference")
    v_by_enum = sageflash.quantize_v(v, pv_accum=PVAccum.FP32_FP16, smooth_v=False, backend="reference")
    assert torch.equal(v_by_name[1], v_by_enum[1])


def override_lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


VALID_OVERRIDES = """
import json, os, torch, sageflash
gen = torch.Generator().manual_seed(0)
q, k, v = ((torch.rand(1, 2, 40, 64, generator=gen) * 2 - 1).half() for _ in range(3))
caller = dict(smooth_k=True, smooth_v=False, pv_accum="fp32+fp16", granularity="per_thread")
resolved = [sageflash.resolve_params(**caller).as_dict() for _ in range(2)]
overridden = [sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference", **caller) for _ in range(2)]
del os.environ["GGML_SAGE_GRANULARITY"]  # read at every call
after_unset = sageflash.resolve_params(**caller).as_dict()
for name in [n for n in os.environ if n.startswith("GGML_SAGE_")]:
    del os.environ[name]
explicit = sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference", smooth_k=False, smooth_v=True,
                                         pv_accum="fp32", granularity="per_warp")
print(json.dumps({"resolved": resolved, "after_unset": after_unset,
                  "op_uses_overrides": all(torch.equal(o, explicit) for o in overridden)}))
"""


def test_env_overrides_apply_and_are_logged_once():
    env = {"GGML_SAGE_SMOOTH_K": "FALSE", "GGML_SAGE_SMOOTH_V": "Yes", "GGML_SAGE_PV_ACCUM": "FP32",
           "GGML_SAGE_GRANULARITY": "PER_WARP"}
    result, stderr = run_python(VALID_OVERRIDES, env)
    expected = {"softmax_scale": None, "is_causal": False, "smooth_k": False, "smooth_v": True,
                "pv_accum": "fp32", "granularity": "per_warp"}
    assert result["resolved"] == [expected, expected]
    assert result["after_unset"] == {**expected, "granularity": "per_thread"}
    assert result["op_uses_overrides"]
    # the raw values above are spelled unlike the effective ones, which the log line must name
    for name, effective in [("GGML_SAGE_SMOOTH_K", r"\b(0|False|false)\b"),
                            ("GGML_SAGE_SMOOTH_V", r"\b(1|True|true)\b"),
                            ("GGML_SAGE_PV_ACCUM", r"\bfp32\b"),
                            ("GGML_SAGE_GRANULARITY", r"\bper_warp\b")]:
        lines = override_lines(stderr, name)
        assert len(lines) == 1, f"{name} logged {len(lines)} times:\n{stderr}"
        assert re.search(effective, lines[0]), lines[0]
    assert len(override_lines(stderr, "smooth_v")) == 1, stderr  # fp32: smooth_v is not forced off


BAD_OVERRIDES = """
import json, os, torch, sageflash
gen = torch.Generator().manual_seed(0)
q, k, v = ((torch.rand(1, 2, 40, 64, generator=gen) * 2 - 1).half() for _ in range(3))
ignored = [sageflash.resolve_params(smooth_k=flag, smooth_v=flag, pv_accum="fp32").as_dict()
           for flag in (True, False)]
forced = [sageflash.resolve_params(smooth_v=True, pv_accum=pv).smooth_v for pv in ("fp32+fp16", 1)]
outs = [sageflash.sage_attn_sm89_fp16(q, k, v, smooth_v=True, backend="reference") for _ in range(2)]
off = sageflash.sage_attn_sm89_fp16(q, k, v, smooth_v=False, backend="reference")
errors = {}
for name, value in [("GGML_SAGE_PV_ACCUM", "fp64"), ("GGML_SAGE_GRANULARITY", "per_block")]:
    os.environ[name] = value
    for call in (sageflash.resolve_params, lambda: sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference")):
        try:
            call()
        except ValueError as err:
            errors.setdefault(name, []).append(str(err))
    del os.environ[name]
print(json.dumps({"ignored": ignored, "forced": forced, "errors": errors,
                  "forced_equals_off": all(torch.equal(out, off) for out in outs)}))
"""


def test_bad_env_values_and_smooth_v_warning():
    """Bad booleans: one warning, override ignored. Bad enums: ValueError naming the variable and
    the allowed values. smooth_v forced off: one warning per process."""
    result, stderr = run_python(BAD_OVERRIDES, {"GGML_SAGE_SMOOTH_K": "maybe", "GGML_SAGE_SMOOTH_V": "2"})
    assert [(p["smooth_k"], p["smooth_v"]) for p in result["ignored"]] == [(True, True), (False, False)]
    assert result["forced"] == [False, False] and result["forced_equals_off"]
    for name, allowed in [("GGML_SAGE_PV_ACCUM", ["fp32", "fp32+fp32", "fp32+fp16"]),
                          ("GGML_SAGE_GRANULARITY", ["per_warp", "per_thread"])]:
        assert len(result["errors"][name]) == 2, result["errors"]  # resolve_params and the op
        for message in result["errors"][name]:
            assert name in message and all(word in message for word in allowed), message
    for name, value in [("GGML_SAGE_SMOOTH_K", "maybe"), ("GGML_SAGE_SMOOTH_V", "2")]:
        lines = override_lines(stderr, name)
        assert len(lines) == 1 and value in lines[0], stderr
    assert len([line for line in override_lines(stderr, "smooth_v") if "GGML_SAGE" not in line]) == 1, stderr


def test_getenv_reads_every_change_made_through_os_environ(monkeypatch):
    """`params.getenv` is ``os.environ.get``, read at the call: set, changed, non-ASCII, deleted,
    and through ``os.environ.get`` where `os.environ` keeps no mapping of its own."""
    from sageflash.params import getenv

    name = "GGML_SAGE_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    seen = [getenv(name)]
    for value in ("1", "per_warp", " Ünïcode ", ""):
        monkeypatch.setenv(name, value)
        seen.append(getenv(name))
    monkeypatch.delenv(name)
    seen.append(getenv(name))
    assert seen == [None, "1", "per_warp", " Ünïcode ", "", None]
    assert getenv("PATH") == os.environ.get("PATH")

    monkeypatch.setattr(os, "environ", {name: "plain"})  # no `_data`: the fallback
    assert getenv(name) == "plain" and getenv("PATH") is None
