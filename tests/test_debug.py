"""The ``GGML_SAGE_*`` debug toggles (sageflash.debug): each writes or prints what it names."""

from __future__ import annotations

import math
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import MASK_KINDS, exact_attention, make_mask, random_qkv
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


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_a_masked_calls_dump_records_the_mask_and_load_replays_it(monkeypatch, tmp_path, capsys, kind):
    """The mask is dumped as the call passed it (4 dims, broadcast sizes kept at 1) and `run
    --load` calls the op and exact attention with it: the report's worst element is the dumped
    output there, against exact attention under the mask."""
    prefix = str(tmp_path / "masked")
    monkeypatch.setenv(debug.DUMP, prefix)
    q, k, v = gqa_inputs(8, seq_k=170)
    mask = make_mask(kind, 2, 4, 200, 170, seed=8)
    out = op(q, k, v, attn_mask=mask, is_causal=True)
    monkeypatch.delenv(debug.DUMP)

    meta = dumps.read_meta(prefix)
    recorded = dumps.read_mask(prefix, meta)
    assert recorded.dtype == mask.dtype and recorded.shape == (1,) * (4 - mask.dim()) + mask.shape
    assert torch.equal(recorded.expand(2, 4, 200, 170), mask.expand(2, 4, 200, 170))
    assert main(["--load", prefix, "--verbose"]) == 0
    report = capsys.readouterr().out
    assert f"  attn_mask: {str(mask.dtype).removeprefix('torch.')} {list(recorded.shape)}" in report
    b, h, t, d, worst_out, worst_ref = (float(x) for x in re.search(
        r"worst: batch=(\d+) head=(\d+) seq=(\d+) dim=(\d+) out=(\S+) ref=(\S+)", report).groups())
    index = (int(b), int(h), int(t), int(d))
    expected = exact_attention(q, k, v, is_causal=True, attn_mask=mask).nan_to_num(0.0)
    assert worst_out == pytest.approx(out[index].item(), rel=1e-5, abs=1e-12)
    assert worst_ref == pytest.approx(expected[index].item(), rel=1e-4, abs=1e-6)


def test_a_broadcast_view_of_a_mask_is_dumped_at_its_own_size(monkeypatch, tmp_path):
    """An expanded mask (stride 0) is not materialised: a [B, 1, 1, Sk] key padding mask
    expanded to [B, Hq, Sq, Sk] is dumped as [B, 1, 1, Sk]."""
    prefix = str(tmp_path / "expanded")
    monkeypatch.setenv(debug.DUMP, prefix)
    q, k, v = gqa_inputs(9)
    padding = make_mask("key_padding", 2, 4, 200, 200, seed=9)
    op(q, k, v, attn_mask=padding.expand(2, 4, 200, 200))
    meta = dumps.read_meta(prefix)
    assert (meta.mask_dtype, meta.mask_shape) == ("bool", (2, 1, 1, 200))
    assert torch.equal(dumps.read_mask(prefix, meta), padding)
    assert os.path.getsize(dumps.tag_path(prefix, dumps.ATTN_MASK)) == 2 * 200


_ROWS = torch.randn(200, 1, generator=torch.Generator().manual_seed(15))


@pytest.mark.parametrize("mask", [torch.tensor(-0.5).expand(200, 200),  # a scalar, broadcast both ways
                                  _ROWS.masked_fill(_ROWS > 1, float("-inf")).bfloat16().expand(200, 200),
                                  (_ROWS[:1, :1] + 2)[None, None].expand(2, 4, 200, 200)])
def test_masks_broadcast_along_keys_and_odd_strides_are_dumped(monkeypatch, tmp_path, capsys, mask):
    """A float mask whose key axis only broadcasts (stride 0, kept at size 1) is written as a
    fresh C-order copy (a byte view of it failed), and the dump replays (a row offset is lost in
    the softmax, a row at -inf hides the row: zeros)."""
    prefix = str(tmp_path / "odd")
    monkeypatch.setenv(debug.DUMP, prefix)
    q, k, v = gqa_inputs(15)
    out = op(q, k, v, attn_mask=mask)
    monkeypatch.delenv(debug.DUMP)
    meta = dumps.read_meta(prefix)
    assert meta.mask_shape[-1] == 1
    assert torch.equal(dumps.read_mask(prefix, meta).expand(2, 4, 200, 200), mask.expand(2, 4, 200, 200))
    assert main(["--load", prefix, "--verbose"]) == 0
    b, h, t, d, worst_out = (int(x) if i < 4 else float(x) for i, x in enumerate(re.search(
        r"worst: batch=(\d+) head=(\d+) seq=(\d+) dim=(\d+) out=(\S+)", capsys.readouterr().out).groups()))
    assert worst_out == pytest.approx(out[b, h, t, d].item(), rel=1e-5, abs=1e-12)


def test_a_head_dim_of_one_with_any_stride_is_dumped(monkeypatch, tmp_path):
    prefix = str(tmp_path / "d1")
    monkeypatch.setenv(debug.DUMP, prefix)
    q, k, v = (x.squeeze(-1).unsqueeze(-2).transpose(-1, -2) for x in gqa_inputs(16, head_dim=1))
    assert q.stride(-1) != 1
    op(q, k, v)
    assert torch.equal(dumps.read_tensor(prefix, dumps.read_meta(prefix), "q"), q)


def test_a_dump_that_fails_to_write_leaves_no_meta(monkeypatch, tmp_path):
    """The meta is written last (and an older one removed first), so a failed write never
    leaves a dump that looks loadable."""
    prefix = str(tmp_path / "broken")
    monkeypatch.setenv(debug.DUMP, prefix)
    op(*gqa_inputs(17))
    assert os.path.exists(f"{prefix}.meta")
    debug.reset()

    def failing(prefix, meta, tag, tensor):
        if tag == "out":
            raise OSError("disk full")
        return write_tensor(prefix, meta, tag, tensor)
    write_tensor = dumps.write_tensor
    monkeypatch.setattr(dumps, "write_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        op(*gqa_inputs(18))
    assert not os.path.exists(f"{prefix}.meta")


def test_a_masks_dump_meta_is_checked(monkeypatch, tmp_path):
    """mask_dtype and mask_shape go together, name a known dtype and sizes that broadcast; a bool
    mask's bytes are 0 or 1."""
    prefix = str(tmp_path / "m")
    monkeypatch.setenv(debug.DUMP, prefix)
    op(*gqa_inputs(10), attn_mask=make_mask("bool_sq_sk", 2, 4, 200, 200, seed=10))
    text = open(f"{prefix}.meta").read()
    assert "mask_dtype bool\nmask_shape 1,1,200,200\n" in text
    for bad, message in [(text.replace("mask_dtype bool\n", ""), "given together"),
                         (text.replace("mask_dtype bool", "mask_dtype u8"), "mask_dtype must be one of"),
                         (text.replace("1,1,200,200", "1,2,200,200"), "mask_shape must be four sizes"),
                         (text.replace("1,1,200,200", "200,200"), "mask_shape must be four sizes"),
                         (text.replace("1,1,200,200", "1,1,200,x"), "m.meta: invalid literal")]:
        with pytest.raises(dumps.DumpError, match=message):
            dumps.DumpMeta.from_text(bad, f"{prefix}.meta")
    with open(dumps.tag_path(prefix, dumps.ATTN_MASK), "r+b") as fh:
        fh.write(b"\x02")
    with pytest.raises(dumps.DumpError, match="a bool mask holds bytes 0 and 1 only, found 2"):
        dumps.read_mask(prefix, dumps.read_meta(prefix))
    with pytest.raises(dumps.DumpError, match="this dump has no attn_mask"):
        dumps.read_tensor(prefix, dumps.DumpMeta.from_text(text.replace("mask_dtype bool\nmask_shape 1,1,200,200\n", "")),
                          dumps.ATTN_MASK)


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


@pytest.mark.parametrize("kind, sampled", [("bool_per_head", (1, 1, 72, 200)), ("bool_sq_sk", (1, 1, 72, 200)),
                                            ("key_padding", (2, 1, 1, 200)), ("additive_bf16", (2, 1, 72, 200))])
def test_a_sampled_dump_keeps_the_masks_rows_and_head(monkeypatch, tmp_path, capsys, kind, sampled):
    """Sampling head 3 and block 1 cuts the mask's head and row axes where it has them, and the
    cut dump replays its rows of the call (non-causal: the rows need no alignment)."""
    prefix = str(tmp_path / "s")
    monkeypatch.setenv(debug.SAMPLE_PREFIX, prefix)
    monkeypatch.setenv(debug.SAMPLE_HEAD, "3")
    monkeypatch.setenv(debug.SAMPLE_BLOCK, "1")
    q, k, v = gqa_inputs(14)
    mask = make_mask(kind, 2, 4, 200, 200, seed=14)
    out = op(q, k, v, attn_mask=mask)
    monkeypatch.delenv(debug.SAMPLE_PREFIX)
    meta = dumps.read_meta(f"{prefix}0")
    recorded = dumps.read_mask(f"{prefix}0", meta)
    assert recorded.shape == sampled
    full = mask.expand(2, 4, 200, 200)[:, 3:4, 128:]
    assert torch.equal(recorded.expand(full.shape), full)
    assert main(["--load", f"{prefix}0", "--verbose"]) == 0
    b, h, t, d, worst_out = (float(x) for x in re.search(
        r"worst: batch=(\d+) head=(\d+) seq=(\d+) dim=(\d+) out=(\S+)", capsys.readouterr().out).groups())
    assert worst_out == pytest.approx(out[int(b), 3, 128 + int(t), int(d)].item(), rel=1e-5, abs=1e-12)


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


@pytest.mark.parametrize("causal, mask_kind", [(False, None), (True, None), (False, "bool_per_head"),
                                               (True, "additive_bf16"), (False, "key_padding")])
def test_kernel_telemetry_follows_the_online_softmax_to_the_lse(monkeypatch, capsys, causal, mask_kind):
    q, k, v = gqa_inputs(13, head_dim=64, seq_q=200, seq_k=200)
    mask = None if mask_kind is None else make_mask(mask_kind, 2, 4, 200, 200, seed=13)
    if mask_kind == "key_padding":
        mask = mask.flip(0)  # the telemetry shows batch 0: pad its keys
    monkeypatch.setenv(debug.KERNEL_ITERS, "99")
    monkeypatch.setenv(debug.KERNEL_PRINT_LIMIT, "3")
    monkeypatch.setenv(debug.SAMPLE_HEAD, "2")
    monkeypatch.setenv(debug.SAMPLE_BLOCK, "1")
    op(q, k, v, is_causal=causal, smooth_k=False, attn_mask=mask)
    lines = re.findall(r"head 2 row (\d+) block (\d+): m (\S+) alpha (\S+) l (\S+)", capsys.readouterr().err)
    assert len(lines) == 3 * 4  # 3 rows x ceil(200 / 64) key blocks
    assert sorted({int(row) for row, *_ in lines}) == [128, 129, 130]
    params = resolve_params(is_causal=causal, smooth_k=False, head_dim=64)
    _, lse = reference.attention(q, k, v, params, return_lse=True, attn_mask=mask)
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
    op(q, k, v, is_causal=causal, smooth_k=False, attn_mask=mask)
    assert len(re.findall(r"sageflash kernel: .* block [01]:", capsys.readouterr().err)) == 3 * 2
