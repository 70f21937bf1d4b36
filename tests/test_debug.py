"""The ``GGML_SAGE_*`` debug toggles (sageflash.debug): each writes or prints what it names."""

from __future__ import annotations

import math
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import random_qkv
from sageflash import debug, dumps, reference, sage_attn_sm89_fp16
from sageflash.cli import main
from sageflash.params import resolve_params


@pytest.fixture(autouse=True)
def fresh_toggles(monkeypatch):
    """No toggle inherited from the environment, and call counting from 0."""
    for name in list(os.environ):
        if name.startswith("GGML_SAGE_"):
            monkeypatch.delenv(name)
    debug.reset()


def gqa_inputs(seed, head_dim=40, seq_q=200, seq_k=None, dtype=torch.float16):
    """GQA inputs with a head dim that gets padded and sequences that end mid-tile."""
    return random_qkv(batch=2, q_heads=4, kv_heads=2, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim, seed=seed,
                      dtype=dtype)


def op(q, k, v, **knobs):
    return sage_attn_sm89_fp16(q, k, v, backend="reference", **knobs)


def test_unset_toggles_never_reach_the_debug_path(monkeypatch):
    q, k, v = gqa_inputs(1)
    calls = []
    monkeypatch.setattr(debug, "run", lambda *args, **kwargs: calls.append(args) or args[1])
    op(q, k, v)
    monkeypatch.setenv(debug.Q_SERIAL, "0")  # "0" means off
    monkeypatch.setenv(debug.SAMPLE_HEAD, "1")  # refines the others, turns nothing on
    op(q, k, v)
    assert calls == [] and not debug.enabled()
    monkeypatch.setenv(debug.Q_SERIAL, "1")  # read at call time
    op(q, k, v)
    assert len(calls) == 1 and debug.enabled()


@pytest.mark.parametrize("toggle", [debug.Q_SERIAL, debug.FORCE_HOST_QK, debug.FORCE_SIMPLE_QK, debug.DEBUG_QUANT])
@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
def test_debug_path_gives_the_same_output(monkeypatch, toggle, granularity):
    q, k, v = gqa_inputs(2, seq_k=150)
    expected = op(q, k, v, is_causal=True, granularity=granularity)
    monkeypatch.setenv(toggle, "1")
    assert torch.equal(op(q, k, v, is_causal=True, granularity=granularity), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["per_warp", "per_thread"])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_simple_and_serial_quantizers_reproduce_the_reference_payloads(dtype, granularity, smooth_k):
    q, k, v = gqa_inputs(3, seq_k=150, dtype=dtype)
    knobs = dict(granularity=granularity, smooth_k=smooth_k)
    expected = reference.quantize_qk(q, k, **knobs)
    for toggles in (debug.Toggles(force_simple_qk=True), debug.Toggles(q_serial=True),
                    debug.Toggles(force_simple_qk=True, q_serial=True)):
        quantize, _ = debug.qk_quantizer(reference, toggles)
        for name, got, want in zip(("q_int8", "q_scale", "k_int8", "k_scale", "km"), quantize(q, k, **knobs),
                                   expected):
            assert (got is None and want is None) or torch.equal(got, want), (toggles, name)


def test_force_host_qk_bypasses_the_backend_quantizer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the backend's quantize_qk was called")

    backend = types.SimpleNamespace(__name__="fake", quantize_qk=refuse, quantize_v=reference.quantize_v,
                                    attention_from_payloads=reference.attention_from_payloads)
    q, k, v = gqa_inputs(4)
    params = resolve_params(head_dim=q.shape[-1])
    monkeypatch.setenv(debug.DEBUG_QUANT, "1")
    with pytest.raises(AssertionError, match="backend's quantize_qk"):
        debug.run(backend, q, k, v, params)
    monkeypatch.setenv(debug.FORCE_HOST_QK, "1")
    assert torch.equal(debug.run(backend, q, k, v, params), reference.attention(q, k, v, params))


def test_dump_writes_every_intermediate_of_the_first_call(monkeypatch, tmp_path, capsys):
    prefix = str(tmp_path / "call")
    monkeypatch.setenv(debug.DUMP, prefix)
    q, k, v = gqa_inputs(5)
    knobs = dict(pv_accum="fp32", smooth_v=True, granularity="per_thread", softmax_scale=0.3)
    out = op(q, k, v, **knobs)
    op(*gqa_inputs(6), **knobs)  # a later call leaves the dump alone

    meta = dumps.read_meta(prefix)
    read = {tag: dumps.read_tensor(prefix, meta, tag) for tag in
            ("q", "k", "v", "q_pad", "k_pad", "v_pad", "q_int8", "q_scale", "k_int8", "k_scale", "k_mean",
             "v_fp8", "v_scale", "v_mean", "out")}
    q_int8, q_scale, k_int8, k_scale, km = reference.quantize_qk(q, k, granularity="per_thread", smooth_k=True)
    v_fp8, v_scale, v_mean = reference.quantize_v(v, pv_accum="fp32", smooth_v=True)
    expected = dict(q=q, k=k, v=v, q_pad=F.pad(q, (0, 24)), k_pad=F.pad(k, (0, 24)), v_pad=F.pad(v, (0, 24)),
                    q_int8=q_int8, q_scale=q_scale, k_int8=k_int8, k_scale=k_scale, k_mean=km.float(),
                    v_fp8=v_fp8, v_scale=v_scale, v_mean=v_mean, out=out.float())
    for tag, tensor in expected.items():
        assert torch.equal(read[tag].view(torch.uint8), tensor.view(torch.uint8)), tag
    assert (meta.granularity, meta.pv_accum, meta.smooth_v, meta.num_q_heads) == ("per_thread", "fp32", True, 4)
    assert meta.params.softmax_scale == 0.3  # written and read back (the default would be 40 ** -0.5)

    monkeypatch.delenv(debug.DUMP)
    assert main(["--load", prefix]) == 0 and f"Case {prefix}\n" in capsys.readouterr().out


@pytest.mark.parametrize("world_size", [1, 3])
def test_each_rank_of_a_process_group_dumps_to_its_own_files(monkeypatch, tmp_path, world_size):
    """Ranks that share a prefix (sequence or data parallelism) would write the same files at once."""
    monkeypatch.setattr(debug.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(debug.dist, "get_world_size", lambda: world_size)
    monkeypatch.setattr(debug.dist, "get_rank", lambda: world_size - 1)
    prefix = str(tmp_path / "call")
    monkeypatch.setenv(debug.DUMP, prefix)
    op(*gqa_inputs(8))
    written = prefix if world_size == 1 else f"{prefix}.rank2"
    assert sorted(p.name for p in tmp_path.glob("*.meta")) == [os.path.basename(written) + ".meta"]
    assert dumps.read_meta(written).num_q_heads == 4


def test_a_masked_calls_dump_and_telemetry_say_they_leave_the_mask_out(monkeypatch, tmp_path, capsys):
    """The dump format has no mask (SPEC §9): the meta's source and a stderr line say so, and the
    kernel telemetry says its values leave the mask out."""
    prefix = str(tmp_path / "masked")
    monkeypatch.setenv(debug.DUMP, prefix)
    monkeypatch.setenv(debug.KERNEL_ITERS, "1")
    q, k, v = gqa_inputs(8)
    mask = torch.rand(q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(8)) > 0.5
    op(q, k, v, attn_mask=mask)
    err = capsys.readouterr().err
    assert f"sageflash dump: {prefix}: attn_mask is not recorded" in err
    assert "sageflash kernel: call 0: the values below leave out attn_mask" in err
    assert "attn_mask not recorded" in dumps.read_meta(prefix).source
    op(*gqa_inputs(9))  # unmasked: no such line
    assert "attn_mask" not in capsys.readouterr().err


def test_dump_qk_int8_writes_only_the_qk_payloads(monkeypatch, tmp_path):
    prefix = str(tmp_path / "qk")
    monkeypatch.setenv(debug.DUMP_QK_INT8, prefix)
    q, k, v = gqa_inputs(7)
    op(q, k, v, smooth_k=False)
    written = sorted(p.name.removeprefix("qk.") for p in tmp_path.iterdir())
    assert written == ["k.bin", "k_int8.bin", "k_scale.bin", "meta", "q.bin", "q_int8.bin", "q_scale.bin"]
    meta = dumps.read_meta(prefix)
    assert torch.equal(dumps.read_tensor(prefix, meta, "k_int8"),
                       reference.quantize_qk(q, k, granularity="per_thread", smooth_k=False)[2])


def test_sample_prefix_writes_one_head_and_block_per_call_up_to_the_limit(monkeypatch, tmp_path):
    monkeypatch.setenv(debug.SAMPLE_PREFIX, str(tmp_path / "s"))
    monkeypatch.setenv(debug.SAMPLE_LIMIT, "2")
    monkeypatch.setenv(debug.SAMPLE_HEAD, "3")
    monkeypatch.setenv(debug.SAMPLE_BLOCK, "1")
    inputs = [gqa_inputs(seed) for seed in (8, 9, 10)]
    for q, k, v in inputs:
        op(q, k, v, granularity="per_warp")
    assert sorted(p.name for p in tmp_path.glob("*.meta")) == ["s0.meta", "s1.meta"]
    for call, (q, k, v) in enumerate(inputs[:2]):
        prefix = str(tmp_path / f"s{call}")
        meta = dumps.read_meta(prefix)
        assert (meta.num_q_heads, meta.num_k_heads, meta.seq_q, meta.seq_k) == (1, 1, 200 - 128, 200)
        q_int8, q_scale, k_int8, _, _ = reference.quantize_qk(q, k, granularity="per_warp", smooth_k=True)
        assert torch.equal(dumps.read_tensor(prefix, meta, "q_int8"), q_int8[:, 3:4, 128:])
        assert torch.equal(dumps.read_tensor(prefix, meta, "q_scale"), q_scale[:, 3:4, 4:8])
        assert torch.equal(dumps.read_tensor(prefix, meta, "k_int8"), k_int8[:, 1:2])  # head 3 reads kv head 1
        assert torch.equal(dumps.read_tensor(prefix, meta, "q"), q[:, 3:4, 128:])


def test_sample_toggles_reject_what_the_call_does_not_have(monkeypatch, tmp_path):
    monkeypatch.setenv(debug.SAMPLE_PREFIX, str(tmp_path / "s"))
    monkeypatch.setenv(debug.SAMPLE_HEAD, "4")
    with pytest.raises(ValueError, match="GGML_SAGE_SAMPLE_HEAD=4 is out of range"):
        op(*gqa_inputs(11))
    monkeypatch.setenv(debug.SAMPLE_HEAD, "first")
    with pytest.raises(ValueError, match="GGML_SAGE_SAMPLE_HEAD must be an integer"):
        op(*gqa_inputs(11))


def test_debug_quant_prints_scale_statistics_per_head_and_group(monkeypatch, capsys):
    monkeypatch.setenv(debug.DEBUG_QUANT, "yes")
    q, k, v = gqa_inputs(12, seq_k=150)
    op(q, k, v, granularity="per_warp")
    err = capsys.readouterr().err
    q_int8, q_scale, k_int8, k_scale, _ = reference.quantize_qk(q, k, granularity="per_warp", smooth_k=True)
    head_2 = q_scale[:, 2, :7]  # Sq = 200: groups 0..6 hold tokens
    assert (f"sageflash quant: q_scale head 2: min {head_2.min():.4e} mean {head_2.mean():.4e} "
            f"max {head_2.max():.4e}") in err
    group_2 = k_scale[:, :, 2]  # Sk = 150: k groups 0..2
    assert f"sageflash quant: k_scale group 2: min {group_2.min():.4e} mean {group_2.mean():.4e}" in err
    assert "k_scale group 3" not in err and "q_scale group 7" not in err
    assert len(re.findall(r"v_scale head \d", err)) == 2
    assert "Q/K quantized by sageflash.reference" in err


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_telemetry_follows_the_online_softmax_to_the_lse(monkeypatch, capsys, causal):
    q, k, v = gqa_inputs(13, head_dim=64, seq_q=200, seq_k=200)
    monkeypatch.setenv(debug.KERNEL_ITERS, "99")
    monkeypatch.setenv(debug.KERNEL_PRINT_LIMIT, "3")
    monkeypatch.setenv(debug.SAMPLE_HEAD, "2")
    monkeypatch.setenv(debug.SAMPLE_BLOCK, "1")
    op(q, k, v, is_causal=causal, smooth_k=False)
    lines = re.findall(r"head 2 row (\d+) block (\d+): m (\S+) alpha (\S+) l (\S+)", capsys.readouterr().err)
    assert len(lines) == 3 * 4  # 3 rows x ceil(200 / 64) key blocks
    assert sorted({int(row) for row, *_ in lines}) == [128, 129, 130]
    params = resolve_params(is_causal=causal, smooth_k=False, head_dim=64)
    _, lse = reference.attention(q, k, v, params, return_lse=True)
    for row, block, m, _, row_sum in lines:
        if block == "3":  # the last block: m and l are final, LSE = (m + log2 l) ln 2
            assert (float(m) + math.log2(float(row_sum))) * math.log(2) == pytest.approx(
                lse[0, 2, int(row)].item(), abs=1e-5)
    by_row = {}
    for row, block, m, alpha, row_sum in lines:  # each block rescales by 2^(m_before - m_now)
        before = by_row.get(row)
        if before is not None:
            # printed to 6 places
            assert float(alpha) == pytest.approx(2 ** (before[0] - float(m)), rel=1e-5, abs=1.5e-6)
            assert float(row_sum) >= (float(alpha) - 1e-6) * before[1]  # l = alpha l_before + this block's sum
        by_row[row] = (float(m), float(row_sum))
    monkeypatch.setenv(debug.KERNEL_ITERS, "2")
    op(q, k, v, is_causal=causal, smooth_k=False)
    assert len(re.findall(r"sageflash kernel: .* block [01]:", capsys.readouterr().err)) == 3 * 2
