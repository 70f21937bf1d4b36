"""``sageflash run`` / ``dump`` / ``compare`` (SPEC §9–10), in-process on the CPU reference."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import PACKAGE_ROOT, exact_attention, no_env_overrides, random_qkv  # noqa: F401 (a fixture)
from sageflash import debug, dumps, sage_attn_sm89_fp16
from sageflash.cases import CASES, DEFAULT_CASE
from sageflash.cli import main
from sageflash.cli.run import parse_report, pick_backend

REPORT_LINES = [
    r"Case (?P<name>\S+)",
    r"  shape: batch=\d+ seq_q=\d+ seq_k=\d+ nq=\d+ nk=\d+ d=\d+ causal=[01] smooth_k=[01] smooth_v=[01] "
    r"pv=(fp32|fp32\+fp32|fp32\+fp16)",
    r"  granularity: (per_warp|per_thread)",
    r"  iterations: \d+",
    r"  timings \(avg\): sage \d+\.\d{3} ms, flash \d+\.\d{3} ms \(speedup \d+\.\d{2}x\)",
    r"  reference: (flash|sageattention)",
    r"  diff \((flash|sageattention)\): max \d\.\d{3}e[+-]\d\d rms_avg \d\.\d{3}e[+-]\d\d",
]
SUMMARY_LINES = [r"Summary", r"  best speedup: \d+\.\d{2}x \(\S+\)", r"  worst rms diff: \d\.\d{3}e[+-]\d\d \(\S+\)"]
CASE = "b1_causal_seq128_d64_thread"  # small, causal, GQA
pytestmark = pytest.mark.usefixtures("no_env_overrides")


def cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``sageflash *argv`` run in this process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def field(out: str, name: str) -> str:
    """The value of ``name=`` in the report's shape line."""
    return re.search(rf"\b{name}=(\S+)", out).group(1)


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    assert err.startswith("sageflash: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_bare_command_runs_the_default_case_with_the_exact_report(capsys):
    for argv in ([], ["run"]):
        code, out, _ = cli(capsys, *argv)
        lines = out.splitlines()
        assert code == 0
        assert lines[0] == "backend: reference (CPU; no CUDA device)" or lines[0].startswith("backend: triton (cuda")
        for pattern, line in zip(REPORT_LINES + SUMMARY_LINES, lines[1:], strict=True):
            assert re.fullmatch(pattern, line), (pattern, line)
        assert lines[1] == f"Case {DEFAULT_CASE}"


def test_report_numbers_match_an_independent_computation(capsys):
    code, out, _ = cli(capsys, "run", "--case", CASE, "--seed", "5", "--verbose")
    assert code == 0
    [record] = parse_report(out)
    case = CASES[CASE]
    q, k, v = case.inputs(5, device=pick_backend()[0])
    ours = sage_attn_sm89_fp16(q, k, v, is_causal=True, granularity="per_thread").double().cpu()
    error = ours - exact_attention(q, k, v, is_causal=True).cpu()
    assert record["reference"] == "flash"
    assert record["rms_avg"] == pytest.approx(error.square().mean().sqrt().item(), rel=2e-3)
    assert record["max_diff"] == pytest.approx(error.abs().max().item(), rel=2e-3)
    worst = tuple(int(i) for i in torch.unravel_index(error.abs().argmax(), error.shape))
    assert f"  worst: batch={worst[0]} head={worst[1]} seq={worst[2]} dim={worst[3]} " in out
    assert field(out, "causal") == "1" and field(out, "nq") == "12" and field(out, "nk") == "6"


def test_seed_gives_deterministic_inputs(capsys):
    diffs = {}
    for run, seed in (("a", "11"), ("b", "11"), ("c", "12")):
        _, out, _ = cli(capsys, "--case", CASE, "--seed", seed)
        diffs[run] = re.search(r"diff \(flash\): .*", out).group(0)
    assert diffs["a"] == diffs["b"] != diffs["c"]


def test_cases_run_in_the_order_given_and_the_summary_picks_the_extremes(capsys):
    order = ["b1_causal_seq128_d64_smoothv", "b1_causal_seq128_d64", "b1_causal_seq128_d64_nosmooth", CASE]
    code, out, _ = cli(capsys, "--case", order[0], "--cases", f"{order[1]},{order[2]}", "--case", order[3])
    records = parse_report(out)
    assert code == 0 and [r["name"] for r in records] == order
    # the report prints rounded values: any case tied at the printed precision may be the extreme
    best = re.search(r"best speedup: (\S+)x \((\S+)\)", out).groups()
    assert float(best[0]) == max(r["speedup"] for r in records)
    assert any(r["name"] == best[1] and r["speedup"] == float(best[0]) for r in records)
    worst = re.search(r"worst rms diff: (\S+) \((\S+)\)", out).groups()
    assert float(worst[0]) == max(r["rms_avg"] for r in records)
    assert any(r["name"] == worst[1] and r["rms_avg"] == float(worst[0]) for r in records)
    for r in records:  # flash's time over the op's, from the printed times (3 decimals) and ratio (2)
        assert r["speedup"] == pytest.approx(r["flash_ms"] / r["sage_ms"], rel=0.01, abs=0.01)


@pytest.mark.parametrize("extreme_at", [0, 1, 2])
def test_the_summary_picks_the_extremes_wherever_they_are(extreme_at):
    from sageflash import resolve_params
    from sageflash.cli.run import CaseReport, format_summary
    params = resolve_params(head_dim=64)
    reports = [CaseReport(f"c{i}", {}, params, 1, sage_ms=2.0, flash_ms=1.0, reference="flash", max_diff=0.1,
                          rms_avg=1e-3) for i in range(3)]
    reports[extreme_at].flash_ms, reports[extreme_at].rms_avg = 5.0, 7e-3
    summary = format_summary(reports)
    assert f"best speedup: 2.50x (c{extreme_at})" in summary and f"worst rms diff: 7.000e-03 (c{extreme_at})" in summary


def test_all_ten_cases_report_their_table_knobs(capsys):
    code, out, _ = cli(capsys, "--cases", ",".join(CASES))
    records = parse_report(out)
    assert code == 0 and [r["name"] for r in records] == list(CASES)
    for block, case in zip(out.split("Case ")[1:], CASES.values()):
        assert field(block, "d") == str(case.head_dim) and field(block, "seq_q") == str(case.seq)
        assert field(block, "causal") == str(int(case.is_causal))
        assert field(block, "smooth_k") == str(int(case.smooth_k))
        assert field(block, "smooth_v") == str(int(case.smooth_v))
        assert field(block, "pv") == case.pv_accum
        assert f"granularity: {case.granularity}" in block
    for record in records:
        assert 1e-4 < record["rms_avg"] < 1e-2, record  # 8-bit attention on uniform data: ~1e-3


def test_list_and_iters(capsys):
    code, out, _ = cli(capsys, "run", "--list")
    assert code == 0 and out.split() == list(CASES)
    _, out, _ = cli(capsys, "--case", CASE, "--iters", "3")
    assert "  iterations: 3\n" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--iters", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("flags, expected", [
    (["--granularity", "per_thread"], {"granularity": "per_thread"}),
    (["--no-smooth-k"], {"smooth_k": "0"}),
    (["--smooth-v", "--pv-accum", "fp32"], {"smooth_v": "1", "pv": "fp32"}),
    (["--smooth-v"], {"smooth_v": "0", "pv": "fp32+fp16"}),  # smooth_v needs fp32: forced off
    (["--pv-accum", "fp32+fp32"], {"pv": "fp32+fp32"}),
])
def test_knob_flags_override_the_case(capsys, flags, expected):
    _, default, _ = cli(capsys, "--case", "b1_causal_seq128_d64")
    code, out, _ = cli(capsys, "--case", "b1_causal_seq128_d64", *flags)
    assert code == 0
    for name, value in expected.items():
        actual = re.search(r"granularity: (\S+)", out).group(1) if name == "granularity" else field(out, name)
        assert actual == value, (name, out)
    if expected != {"smooth_v": "0", "pv": "fp32+fp16"}:
        assert parse_report(out)[0]["rms_avg"] != parse_report(default)[0]["rms_avg"]


def test_usage_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    assert_one_line_error(*cli(capsys, "--compare", "sage")[::2], "--load")
    assert_one_line_error(*cli(capsys, "--case", "b9_nothing")[::2], "b9_nothing")
    assert_one_line_error(*cli(capsys, "--load", str(tmp_path / "absent"))[::2], "absent.meta")
    assert_one_line_error(*cli(capsys, "--load", str(tmp_path / "x"), "--case", CASE)[::2], "--load")
    assert_one_line_error(*cli(capsys, "dump", "--case", CASE, "--case", "b2_seq256_d128",
                               "--dump-prefix", str(tmp_path / "two"))[::2], "--dump-prefix")


@pytest.fixture
def case_dump(tmp_path, capsys):
    """A dump of CASE (seed 9) written by ``sageflash dump``: its prefix."""
    prefix = str(tmp_path / "case")
    code, out, _ = cli(capsys, "dump", "--case", CASE, "--seed", "9", "--dump-prefix", prefix)
    assert code == 0 and out.startswith(f"wrote {prefix}: meta q k v flash q_int8 q_scale k_int8 k_scale")
    return prefix


def test_broken_dumps_are_one_line_errors(capsys, case_dump):
    meta_text = open(f"{case_dump}.meta").read()
    with open(f"{case_dump}.q.bin", "ab") as fh:
        fh.write(b"\0\0")  # two bytes too many
    assert_one_line_error(*cli(capsys, "--load", case_dump)[::2], "case.q.bin", "bytes")
    os.remove(f"{case_dump}.q.bin")
    assert_one_line_error(*cli(capsys, "--load", case_dump)[::2], "missing dump file")
    with open(f"{case_dump}.meta", "w") as fh:
        fh.write(meta_text + "colour blue\n")
    assert_one_line_error(*cli(capsys, "--load", case_dump)[::2], "unknown key 'colour'")


def with_meta_line(prefix: str, key: str, value: str | None) -> None:
    """Rewrite ``<prefix>.meta`` with ``key``'s line set to ``value`` (None: removed)."""
    lines = [line for line in open(f"{prefix}.meta").read().splitlines() if line.split(" ")[0] != key]
    with open(f"{prefix}.meta", "w") as fh:
        fh.write("\n".join(lines + ([] if value is None else [f"{key} {value}"])) + "\n")


@pytest.mark.parametrize("key, value, message", [
    ("is_causal", None, "missing keys is_causal"),  # SPEC §9 gives it and smooth_k no default
    ("smooth_k", None, "missing keys smooth_k"),
    ("seq_q", "0", "seq_q must be positive"),
    ("head_dim", "-64", "head_dim must be positive"),
    ("is_causal", "2", "is_causal must be 0 or 1"),
    ("softmax_scale", "-1", "case.meta: softmax_scale must be a finite positive float, got -1.0"),
    ("seq_q", "64\nseq_q 65", "key 'seq_q' given twice"),
])
def test_meta_errors_are_one_line(capsys, case_dump, key, value, message):
    """A meta that misses a key without a default, or has a size below 1 or a flag not 0/1, is a
    one-line error, never a silent default or a traceback."""
    with_meta_line(case_dump, key, value)
    assert_one_line_error(*cli(capsys, "--load", case_dump)[::2], message)


def test_meta_knobs_may_be_ggml_codes_and_the_defaulted_ones_missing(capsys, case_dump):
    named = dumps.read_meta(case_dump)
    with_meta_line(case_dump, "granularity", str(named.params.granularity.code))
    with_meta_line(case_dump, "pv_accum", "1")
    with_meta_line(case_dump, "smooth_v", None)
    meta = dumps.read_meta(case_dump)
    assert (meta.granularity, meta.pv_accum, meta.smooth_v) == (named.granularity, "fp32+fp32", False)
    assert cli(capsys, "--load", case_dump)[0] == 0


def test_dump_load_compare_round_trip(capsys, case_dump):
    meta = dumps.read_meta(case_dump)
    q, k, v = CASES[CASE].inputs(9, device=pick_backend()[0])
    assert torch.equal(dumps.read_tensor(case_dump, meta, "q"), q.cpu())
    ours = sage_attn_sm89_fp16(q, k, v, is_causal=True, granularity="per_thread")
    assert torch.equal(dumps.read_tensor(case_dump, meta, "out"), ours.float().cpu())
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    flash = dumps.read_tensor(case_dump, meta, "flash")
    torch.testing.assert_close(flash, exact_attention(q, k, v, is_causal=True).float(), atol=2e-6, rtol=0)

    _, direct, _ = cli(capsys, "--case", CASE, "--seed", "9")
    code, loaded, _ = cli(capsys, "--load", case_dump, "--iters", "4")
    assert code == 0 and f"Case {case_dump}\n" in loaded and "  iterations: 1\n" in loaded
    assert re.search(r"diff .*", loaded).group(0) == re.search(r"diff .*", direct).group(0)

    shutil.copy(dumps.tag_path(case_dump, "out"), dumps.tag_path(case_dump, "sage_quant"))
    code, out, _ = cli(capsys, "--load", case_dump, "--compare", "sage")
    [record] = parse_report(out)
    assert code == 0 and record["reference"] == "sageattention"
    assert record["max_diff"] == 0.0 and record["rms_avg"] == 0.0  # same op, same inputs and knobs


def test_flags_override_the_dump_knobs(capsys, case_dump):
    shutil.copy(dumps.tag_path(case_dump, "out"), dumps.tag_path(case_dump, "sage_quant"))
    code, out, _ = cli(capsys, "--load", case_dump, "--compare", "sage", "--granularity", "per_warp",
                       "--no-smooth-k")
    assert code == 0 and "granularity: per_warp" in out and field(out, "smooth_k") == "0"
    assert parse_report(out)[0]["rms_avg"] > 0  # other knobs than the dump's output was made with


def test_legacy_dump_is_converted_with_the_spec_warning(capsys, case_dump):
    meta = dumps.read_meta(case_dump)
    out = dumps.read_tensor(case_dump, meta, "out")
    out.permute(3, 2, 1, 0).contiguous().numpy().tofile(dumps.tag_path(case_dump, "sage"))  # [D, S, H, B]
    code, report, err = cli(capsys, "--load", case_dump, "--compare", "sage")
    assert code == 0
    assert (f"warning: {case_dump} missing .sage_quant.bin; converting legacy layout "
            "(expect ~0.39 RMS vs float refs if not regenerated)\n") in err
    assert parse_report(report)[0]["max_diff"] == 0.0


def test_official_dumps_within_1e3_rms(capsys, refdump_prefix):
    code, out, _ = cli(capsys, "run", "--load", refdump_prefix, "--compare", "sage")
    [record] = parse_report(out)
    assert code == 0 and record["reference"] == "sageattention" and record["name"] == refdump_prefix
    assert record["rms_avg"] <= 1e-3


def test_compare_of_a_missing_dump_says_only_that(capsys, tmp_path):
    code, _, err = cli(capsys, "compare", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "missing dump metadata")


def test_compare_falls_back_to_flash_without_an_official_output(capsys, case_dump):
    code, out, err = cli(capsys, "compare", case_dump)
    assert code == 0 and f"note: {case_dump} has no official output" in err
    [record] = parse_report(out)
    assert record["reference"] == "flash"
    assert re.search(rf"^  {re.escape(case_dump)}: rms_avg {record['rms_avg']:.3e} max .* \(vs flash\)", out,
                     re.MULTILINE)


def test_module_entry_point_in_a_fresh_interpreter():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGML_SAGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "sageflash", "--case", CASE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [record] = parse_report(proc.stdout)
    assert record["name"] == CASE and math.isfinite(record["rms_avg"])


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_reader_that_leaves_is_not_reported_as_bad_input(unbuffered):
    """`sageflash run --list | head -1`: stdout closed before the listing is written gives no
    `sageflash: error: [Errno 32] Broken pipe` (which the bad-input handler used to print), nor,
    with Python's buffered stdout, a BrokenPipeError at the exit's flush (exit code 120)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGML_SAGE_") and k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "sageflash", "run", "--list"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even imported sageflash
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"rror" not in err and b"Traceback" not in err, err


def test_load_runs_any_dump_shape_against_bottom_right_causal_flash(capsys, tmp_path, monkeypatch):
    """A bf16 dump with Sq > Sk, causal: rows 0..49 see no key (zeros), the rest align bottom-right."""
    q, k, v = random_qkv(batch=1, q_heads=4, kv_heads=2, seq_q=150, seq_k=100, head_dim=96, seed=31,
                         dtype=torch.bfloat16)
    prefix = str(tmp_path / "tall")
    monkeypatch.setenv(debug.DUMP, prefix)
    debug.reset()
    out = sage_attn_sm89_fp16(q, k, v, is_causal=True, backend="reference")
    monkeypatch.delenv(debug.DUMP)
    assert torch.count_nonzero(out[:, :, :50]) == 0
    code, report, _ = cli(capsys, "--load", prefix)
    [record] = parse_report(report)
    error = (out.double() - exact_attention(q, k, v, is_causal=True)).square().mean().sqrt().item()
    assert code == 0 and "seq_q=150 seq_k=100" in report and "d=96" in report
    assert record["rms_avg"] == pytest.approx(error, rel=0.05) and record["rms_avg"] < 2e-2


def test_flash_counts_the_mask_values_the_op_counts_as_hidden(capsys, tmp_path, monkeypatch):
    """A transformers padding mask (float32 finfo.min on the first keys), causal: the first rows
    see no key. The op gives them zeros (README), and so does the exact reference of `--load`,
    which counts finfo.min as -inf as the op does; SDPA alone would average V there."""
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, seq_q=100, head_dim=64, seed=41)
    mask = torch.zeros(1, 1, 1, 100).masked_fill(torch.arange(100) < 4, torch.finfo(torch.float32).min)
    prefix = str(tmp_path / "padded")
    monkeypatch.setenv(debug.DUMP, prefix)
    debug.reset()
    out = sage_attn_sm89_fp16(q, k, v, is_causal=True, attn_mask=mask, backend="reference")
    monkeypatch.delenv(debug.DUMP)
    assert torch.count_nonzero(out[:, :, :4]) == 0
    code, report, _ = cli(capsys, "--load", prefix)
    [record] = parse_report(report)
    assert code == 0 and record["max_diff"] < 0.1  # 0.045 (fp8 V on rows with few keys); SDPA's: 1.0


def test_the_reference_keeps_a_nan_and_the_summary_ranks_it_worst():
    """A NaN input (an fp16 overflow upstream) stays NaN in the exact reference (only rows with
    no visible key are zeroed), and the summary names a NaN case as the worst wherever it is."""
    from sageflash.cli.run import CaseReport, format_summary
    from sageflash.cli.run import exact_attention as run_exact
    from sageflash.params import resolve_params

    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, seq_q=40, head_dim=64, seed=42)
    q[0, 1, 7, 3] = float("nan")
    ref = run_exact(q, k, v, resolve_params(head_dim=64, is_causal=True))
    assert ref[0, 1, 7].isnan().all() and not ref[0, 0].isnan().any() and not ref[0, 1, :7].isnan().any()
    params = resolve_params(head_dim=64)
    reports = [CaseReport(name, {}, params, 1, 1.0, 1.0, "flash", 0.0, rms)
               for name, rms in (("fine", 5e-3), ("overflowed", math.nan), ("ok", 1e-3))]
    for order in (reports, reports[::-1]):
        assert "worst rms diff: nan (overflowed)" in format_summary(order)

