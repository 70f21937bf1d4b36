"""`sageflash bench` on the CPU: the TOPS formula, flag parsing, and the table/JSON/CSV writers on a
real ``--allow-cpu`` run (reference backend and CPU SDPA, tiny shape)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import gc
import importlib.util
import io
import itertools
import json
import random
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

import sageflash.op
from sageflash import bench

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch", "1", "--heads", "2", "--seq", "128", "--head-dim", "64", "--warmup", "0", "--rep", "1"]


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse through ``register``, as the ``sageflash`` CLI does."""
    parser = argparse.ArgumentParser(prog="sageflash")
    bench.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One real CPU run of the tiny shape, causal and not: (rc, stdout, json, csv rows)."""
    out = tmp_path_factory.mktemp("bench")
    argv = [*TINY, "--allow-cpu", "--providers", "sageflash,sdpa-flash,sdpa-cudnn,sageattention",
            "--baseline", "sdpa-flash", "--json", str(out / "r.json"), "--csv", str(out / "r.csv")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = bench.run(parse(argv))
    with open(out / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rc, stdout.getvalue(), json.loads((out / "r.json").read_text()), rows


def test_tops_formula():
    rng = random.Random(7)
    for causal in (False, True):
        b, h, s, d = rng.randint(1, 8), rng.randint(1, 64), rng.randint(1, 1 << 15), rng.choice([64, 128])
        ms = rng.uniform(0.01, 100.0)
        shape = bench.Shape(b, h, max(1, h // 2), s, d, causal)
        expected = 4 * b * h * s * s * d / (2 if causal else 1) / (ms / 1000) / 1e12
        assert bench.tops(shape, ms) == pytest.approx(expected, rel=1e-12)
    # H is the query heads: the KV head count does not change the work.
    assert bench.attention_flops(bench.Shape(1, 8, 1, 64, 64, False)) == \
        bench.attention_flops(bench.Shape(1, 8, 8, 64, 64, False))


@pytest.mark.parametrize("text, value", [("1k", 1024), ("4K", 4096), ("32k", 32768), (" 640 ", 640)])
def test_parse_size(text, value):
    assert bench.parse_size(text) == value


@pytest.mark.parametrize("text", ["0", "-4k", "1x", "k", "1.5k", ""])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        bench.parse_size(text)


def test_flag_lists_and_presets():
    args = parse(["--seq", "1k,4k", "--seq", "2k", "--head-dim", "128", "--causal", "on",
                  "--pv-accum", "fp32,FP32+FP32", "--granularity", "per_warp", "--no-smooth-k",
                  "--providers", "sdpa-flash,sageflash", "--modes", "kernel", "--heads", "16",
                  "--kv-heads", "4"])
    settings = bench.settings_from_args(args, torch.device("cuda"))
    assert settings.seqs == [1024, 4096, 2048]
    assert settings.head_dims == [128]
    assert settings.causals == [True]
    assert (settings.heads, settings.kv_heads, settings.batch) == (16, 4, bench.PRESETS["full"]["batch"])
    assert settings.providers == ["sdpa-cudnn", "sdpa-flash", "sageflash"]  # the baseline always, first
    assert [k.label for k in settings.knobs] == ["fp32/per_warp/no-smooth-k", "fp32+fp32/per_warp/no-smooth-k"]
    # sdpa has one timing, run whatever mode was asked; sageflash runs the modes asked for.
    assert [(p.name, m) for p, _, m in settings.runs()] == [("sdpa-cudnn", "e2e"), ("sdpa-flash", "e2e"),
                                                            ("sageflash", "kernel"), ("sageflash", "kernel")]

    full = bench.settings_from_args(parse([]), torch.device("cuda"))
    assert full.seqs == [1024, 2048, 4096, 8192, 16384, 32768] and full.head_dims == [64, 128]
    assert (full.batch, full.heads, full.kv_heads, full.causals) == (4, 32, 32, [False, True])
    assert full.providers[0] == bench.BASELINE and full.modes == ["e2e", "kernel"]
    quick = bench.settings_from_args(parse(["--quick", "--seq", "512"]), torch.device("cuda"))
    assert (quick.batch, quick.seqs) == (bench.PRESETS["quick"]["batch"], [512])  # explicit flags win
    cpu = bench.settings_from_args(parse(["--quick"]), torch.device("cpu"))
    assert (cpu.batch, cpu.heads, cpu.seqs, cpu.head_dims) == (1, 2, [128], [64])


@pytest.mark.parametrize("argv, message", [
    (["--providers", "sdpa-flash,flashinfer"], "flashinfer"),
    (["--pv-accum", "fp8"], "--pv-accum must be one of"),
    (["--granularity", "per_block"], "--granularity must be one of"),
    (["--modes", "e2e,fast"], "fast"),
    (["--seq", "1k,,x"], "positive integer"),
])
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_inconsistent_heads_exit_2(no_cuda, capsys):
    assert bench.run(parse([*TINY, "--allow-cpu", "--kv-heads", "3"])) == 2
    assert "--kv-heads" in capsys.readouterr().err


def test_no_cuda_is_a_one_line_error(no_cuda, capsys):
    assert bench.run(parse([])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "CUDA GPU" in captured.err and "--allow-cpu" in captured.err


def test_plot_without_matplotlib_is_a_clear_error(no_cuda, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.run(parse([*TINY, "--allow-cpu", "--plot", str(tmp_path / "p.png")])) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_cpu_run_rows(cpu_run):
    rc, _, report, _ = cpu_run
    assert rc == 0
    rows = report["results"]
    runs = [(r["causal"], r["provider"], r["mode"]) for r in rows]
    # The baseline first; sdpa-cudnn and sageattention fail on the CPU and are rows, not crashes.
    expected = [(c, p, m) for c in (False, True) for p, m in [
        ("sdpa-flash", "e2e"), ("sageflash", "e2e"), ("sageflash", "kernel"), ("sdpa-cudnn", "e2e"),
        ("sageattention", "e2e")]]
    assert runs == expected
    for row in rows:
        assert (row["batch"], row["heads"], row["kv_heads"], row["seq"], row["head_dim"]) == (1, 2, 2, 128, 64)
        if row["provider"] in ("sdpa-cudnn", "sageattention"):
            assert row["error"] and row["ms"] is None and row["tops"] is None
            continue
        assert row["error"] is None and row["ms"] > 0
        shape = bench.Shape(**{f: row[f] for f in ("batch", "heads", "kv_heads", "seq", "head_dim", "causal")})
        assert row["tops"] == pytest.approx(bench.tops(shape, row["ms"]))
        baseline = next(b for b in rows if b["provider"] == "sdpa-flash" and b["causal"] == row["causal"])
        assert row["vs_baseline"] == pytest.approx(baseline["ms"] / row["ms"])
        assert row["peak_mib"] is None and row["x_qkv"] is None  # no GPU memory on the CPU
    assert [r["config"] for r in rows if r["provider"] == "sageflash"] == ["fp32+fp16/per_thread"] * 4
    assert "sageattention" in next(r["error"] for r in rows if r["provider"] == "sageattention").lower()
    assert next(r["error"] for r in rows if r["provider"] == "sdpa-cudnn") == \
        "skipped: SDPA's CUDNN_ATTENTION backend needs CUDA tensors"
    meta = report["meta"]
    assert meta["timer"] == bench.timer_description(torch.device("cpu"))
    assert meta["settings"]["providers"][0] == "sdpa-flash"


def test_cpu_run_table_and_csv_match_json(cpu_run):
    """Every CSV field is the JSON row's, and every table cell, cut at the columns' widths, is the
    JSON value in its column's format (a cell under the wrong header fails)."""
    _, stdout, report, csv_rows = cpu_run
    rows = report["results"]
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    columns = bench.table_columns("sdpa-flash")
    assert lines[header] == "  ".join(f"{name:>{width}}" for name, width, _ in columns).rstrip()
    table = lines[header + 1:]
    assert len(table) == len(rows) == len(csv_rows)
    formats = {"B": ("batch", "d"), "H": ("heads", "d"), "Hkv": ("kv_heads", "d"), "S": ("seq", "d"),
               "D": ("head_dim", "d"), "provider": ("provider", "s"), "config": ("config", "s"), "mode": ("mode", "s"),
               "ms": ("ms", ".4g"), "host µs": ("host_us", ".0f"), "TOPS": ("tops", ".4g"),
               "vs sdpa-flash": ("vs_baseline", ".2f"), "peak MiB": ("peak_mib", ".1f"), "xQKV": ("x_qkv", ".2f")}
    for line, row, csv_row in zip(table, rows, csv_rows):
        assert csv_row == {key: "" if value is None else str(value) for key, value in row.items()}
        start = 0
        for name, width, _ in columns:
            cell, start = line[start:start + width].strip(), start + width + 2
            if name == "causal":
                assert cell == ("yes" if row["causal"] else "no")
            elif row["error"] and name in ("ms", "host µs", "TOPS", "vs sdpa-flash", "peak MiB", "xQKV"):
                assert line.endswith(row["error"])
                break
            else:
                key, spec = formats[name]
                assert cell == ("-" if row[key] is None else format(row[key], spec)), (name, line)
    assert any(row["vs_baseline"] not in (None, 1.0) for row in rows)  # the ratio column is exercised
    assert {row["baseline"] for row in rows} == {"sdpa-flash"}  # what the CSV's vs_baseline is to


def test_the_config_column_fits_the_longest_label(no_cuda, monkeypatch, capsys):
    """A label longer than the column's 22 characters widens it for every row, so the columns after
    it stay under their headers (the table `sageflash bench` prints)."""
    argv = [*TINY, "--allow-cpu", "--no-smooth-k", "--causal", "off"]
    settings = bench.settings_from_args(parse(argv), torch.device("cpu"))
    label = "fp32+fp16/per_thread/no-smooth-k"
    assert settings.config_width == len(label) > bench.CONFIG_WIDTH

    def one_measured_row(settings, device, on_result):
        row = next(r for r in bench.blank_rows(bench.Shape(1, 2, 2, 128, 64, False), settings) if r.config == label)
        row.ms = 1.0
        on_result(row)
    monkeypatch.setattr(bench, "run_benchmarks", one_measured_row)
    assert bench.run(parse(argv)) == 0
    header, line = [row for row in capsys.readouterr().out.splitlines() if not row.startswith("#")]
    assert line.index(label) + len(label) == header.index("config") + len("config")
    assert line.index("e2e") + len("e2e") == header.index("mode") + len("mode")
    assert len(line) == len(header)  # the last column ends under its header


def test_the_sageattention_rows_name_the_kernel_sageattn_picks(monkeypatch):
    """`sageattn` runs another kernel per arch (on Hopper fp32+fp32, not our default fp32+fp16):
    its rows say which."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, label in [((9, 0), "sm90:fp32+fp32/per_thread"), ((8, 9), "sm89:fp32+fp16/per_thread"),
                              ((7, 5), "")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert bench.PROVIDERS["sageattention"].config_label(None) == label
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    settings = bench.settings_from_args(parse([*TINY, "--providers", "sageattention,sageattention-sm89"]),
                                        torch.device("cpu"))
    configs = {r.provider: r.config for r in bench.blank_rows(bench.Shape(1, 2, 2, 128, 64, False), settings)}
    assert configs == {"sageattention": "sm90:fp32+fp32/per_thread", "sageattention-sm89": "fp32+fp16/per_thread",
                       "sdpa-flash": ""}  # (the baseline, always timed)


def test_a_failed_runs_memory_is_released_before_the_cache_is_emptied(monkeypatch):
    """After a provider fails (an OOM), the allocator's cache is emptied once the failure's
    traceback, which held the call's tensors, is gone."""
    import weakref

    class Payload:
        pass
    alive_at_empty = []

    def failing_time_run(*args, **kwargs):
        held = Payload()  # a local of the failing frame, as a call's tensors are
        refs.append(weakref.ref(held))
        raise RuntimeError("CUDA out of memory")
    refs = []
    monkeypatch.setattr(bench, "time_run", failing_time_run)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_at_empty.append(refs[-1]() is not None))
    settings = bench.settings_from_args(parse([*TINY, "--rounds", "1", "--causal", "off", "--providers", "sdpa-flash"]),
                                        torch.device("cpu"))
    rows = bench.run_shape(bench.Shape(1, 2, 2, 128, 64, False), None, settings, torch.device("cuda"))
    assert rows[0].error == "RuntimeError: CUDA out of memory"
    assert alive_at_empty and not any(alive_at_empty)
    alive_at_empty.clear()
    monkeypatch.setattr(bench, "make_inputs", failing_time_run)  # the inputs of a shape, the same way
    bench.run_benchmarks(settings, torch.device("cuda"), lambda row: None)
    assert alive_at_empty and not any(alive_at_empty)


@pytest.mark.parametrize("provider,mode", [("sageflash", "e2e"), ("sageflash", "kernel"), ("sdpa-flash", "e2e")])
def test_nhd_inputs_reach_each_provider_in_their_own_layout(provider, mode):
    """--layout NHD: inputs are [B, S, H, D] tensors, and every provider computes from them what it
    computes from the same values as [B, H, S, D] (sageflash's e2e output in NHD, as a caller gets it)."""
    nhd = bench.settings_from_args(parse([*TINY, "--kv-heads", "1", "--layout", "NHD"]), torch.device("cpu"))
    q, k, v = bench.make_inputs(nhd, 128, 64, torch.device("cpu"))
    assert nhd.layout == "NHD" and (q.shape, k.shape) == ((1, 128, 2, 64), (1, 128, 1, 64)) and q.is_contiguous()
    knobs = nhd.knobs[0]
    build = bench.PROVIDERS[provider].build
    got = build(q, k, v, True, knobs, mode, "NHD")()
    want = build(*(x.transpose(1, 2).contiguous() for x in (q, k, v)), True, knobs, mode, "HND")()
    if provider == "sageflash" and mode == "e2e":
        assert got.shape == q.shape and got.is_contiguous()
        got = got.transpose(1, 2)
    assert got.shape == want.shape == (1, 2, 128, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_knob_flags_take_ggml_codes_and_name_a_smooth_v_override(monkeypatch):
    """--pv-accum/--granularity take the integer codes their messages offer; a GGML_SAGE_SMOOTH_V
    override shows in the label, the JSON meta and the preamble."""
    settings = bench.settings_from_args(parse(["--pv-accum", "2,0", "--granularity", "3"]), torch.device("cpu"))
    assert [k.label for k in settings.knobs] == ["fp32+fp16/per_thread", "fp32/per_thread"]
    monkeypatch.setenv("GGML_SAGE_SMOOTH_V", "1")
    settings = bench.settings_from_args(parse(["--pv-accum", "fp32"]), torch.device("cpu"))
    assert [k.label for k in settings.knobs] == ["fp32/per_thread/smooth-v"]
    meta = bench.environment(torch.device("cpu"), settings)
    assert meta["ggml_sage_env"] == {"GGML_SAGE_SMOOTH_V": "1"}
    assert "GGML_SAGE_SMOOTH_V=1" in bench.preamble(meta, settings.baseline)


@pytest.mark.parametrize("flag", ["--rep", "--warmup"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_budgets_must_be_finite(no_cuda, flag, value, capsys):
    assert bench.run(parse([*TINY, "--allow-cpu", flag, value])) == 2
    assert "finite" in capsys.readouterr().err


def test_the_baseline_is_its_providers_first_row_or_none(monkeypatch):
    """With several rows of the baseline provider, the ratios are to its first (first knobs, first
    mode); when that one failed, no row of the shape gets a ratio, not one against another row."""
    def fake_time_run(provider, knobs, mode, inputs, shape, settings, device, first_round, telemetry):
        if mode == "e2e" and fail_first:
            raise RuntimeError("out of memory")
        return {"e2e": 2.0, "kernel": 1.0, "graph": 4.0}[mode], None, None
    monkeypatch.setattr(bench, "time_run", fake_time_run)
    settings = bench.settings_from_args(parse([*TINY, "--rounds", "1", "--causal", "off", "--modes", "e2e,kernel",
                                               "--providers", "sdpa-flash", "--baseline", "sageflash"]),
                                        torch.device("cpu"))
    shape = bench.Shape(1, 2, 2, 128, 64, False)
    fail_first = False
    rows = bench.run_shape(shape, None, settings, torch.device("cpu"))
    assert [(r.provider, r.mode, r.vs_baseline) for r in rows] == [
        ("sageflash", "e2e", 1.0), ("sageflash", "kernel", 2.0), ("sdpa-flash", "e2e", 1.0)]
    fail_first = True
    rows = bench.run_shape(shape, None, settings, torch.device("cpu"))
    assert rows[0].error == "RuntimeError: out of memory" and rows[1].ms == 1.0
    assert all(r.vs_baseline is None for r in rows)


def test_a_shape_whose_inputs_cannot_be_made_is_error_rows_and_the_run_goes_on(no_cuda, monkeypatch, tmp_path):
    make_inputs = bench.make_inputs

    def failing(settings, seq, head_dim, device):
        if seq == 256:
            raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return make_inputs(settings, seq, head_dim, device)
    monkeypatch.setattr(bench, "make_inputs", failing)
    out = tmp_path / "r.json"
    argv = [*TINY, "--allow-cpu", "--seq", "256,128", "--causal", "off", "--providers", "sdpa-flash",
            "--json", str(out)]
    assert bench.run(parse(argv)) == 0
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["seq"], r["error"] or "") for r in rows) == [
        (128, ""), (256, "inputs: RuntimeError: CUDA out of memory. Tried to allocate 64.00 GiB")]


def test_an_output_that_cannot_be_written_fails_before_the_run(no_cuda, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run_benchmarks", lambda *args: pytest.fail("must not start"))
    (tmp_path / "taken").mkdir()
    assert bench.run(parse([*TINY, "--allow-cpu", "--csv", str(tmp_path / "taken")])) == 2
    assert f"cannot write {tmp_path / 'taken'}: it is a directory" in capsys.readouterr().err
    (tmp_path / "plain").write_text("")  # a file where a folder must be: what os.access could not tell root
    assert bench.run(parse([*TINY, "--allow-cpu", "--json", str(tmp_path / "plain" / "r.json")])) == 2
    assert "cannot write" in capsys.readouterr().err
    assert bench.unwritable(str(tmp_path / "new" / "r.csv")) is None and not (tmp_path / "new" / "r.csv").exists()


def test_an_interrupted_run_writes_the_shapes_completed(no_cuda, monkeypatch, tmp_path, capsys):
    run_shape = bench.run_shape

    def interrupted_after_the_first(shape, inputs, settings, device):
        if shape.seq == 256:
            raise KeyboardInterrupt
        return run_shape(shape, inputs, settings, device)
    monkeypatch.setattr(bench, "run_shape", interrupted_after_the_first)
    out = tmp_path / "deep" / "r.csv"
    argv = [*TINY, "--allow-cpu", "--seq", "128,256", "--causal", "off", "--providers", "sdpa-flash",
            "--csv", str(out)]
    assert bench.run(parse(argv)) == 130
    assert [r["seq"] for r in csv.DictReader(out.open())] == ["128"]
    assert "interrupted" in capsys.readouterr().err


def test_the_cli_runs_under_python_oo(tmp_path):
    """Without docstrings (python -OO) the parsers lose their descriptions, not their lives
    (``--help`` builds every subcommand's parser)."""
    import subprocess
    done = subprocess.run([sys.executable, "-OO", "-m", "sageflash", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "bench" in done.stdout, done.stderr


def test_rounds_go_round_robin_and_report_the_median(monkeypatch):
    """Each round times every run of the shape once (the baseline first), with rep/rounds ms; a
    row's time is the median of its rounds, so one slow round (a clock drop) does not decide it."""
    settings = bench.settings_from_args(parse([*TINY, "--rep", "3", "--rounds", "3", "--causal", "off",
                                               "--modes", "e2e", "--providers", "sageflash,sdpa-flash",
                                               "--baseline", "sdpa-flash"]), torch.device("cpu"))
    times = iter([3.0, 10.0, 1.0, 30.0, 2.0, 20.0])  # in call order: sdpa-flash, sageflash, ...
    budgets = []

    def fake_time_ms(fn, warmup, rep, device, telemetry):
        budgets.append(rep)
        return next(times)
    monkeypatch.setattr(bench, "time_ms", fake_time_ms)
    shape = bench.Shape(1, 2, 2, 128, 64, False)
    rows = bench.run_shape(shape, bench.make_inputs(settings, 128, 64, torch.device("cpu")), settings,
                           torch.device("cpu"))
    assert [(r.provider, r.ms) for r in rows] == [("sdpa-flash", 2.0), ("sageflash", 20.0)]
    assert rows[1].vs_baseline == pytest.approx(0.1) and budgets == [1.0] * 6


def test_a_long_call_is_timed_at_least_min_timed_calls_times():
    """A call longer than the budget still gets one warm-up call and MIN_TIMED_CALLS timed ones
    (before, a 100 ms call in a round's 33 ms budget was one sample, so one clock drop decided it)."""
    calls = []

    def slow():
        calls.append(None)
        time.sleep(0.004)
    ms = bench.time_ms(slow, warmup=0.1, rep=1.0, device=torch.device("cpu"))
    assert 4 <= ms < 40 and len(calls) >= 3 + bench.MIN_TIMED_CALLS


def test_on_a_gpu_the_budgets_given_to_do_bench_cover_min_timed_calls(monkeypatch):
    """do_bench turns budgets into call counts with its own estimate of a call with its L2 flush:
    the call is timed the same way (the flush between the events), and the budgets handed to
    do_bench hold a warm-up call and MIN_TIMED_CALLS + 1 such calls of 40 ms."""
    import triton.testing

    events = []

    class FakeEvent:
        def __init__(self, enable_timing):
            pass
        record = lambda self: events.append("record")  # noqa: E731
        synchronize = lambda self: None  # noqa: E731
        elapsed_time = lambda self, end: 40.0  # noqa: E731
    budgets = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(bench, "_l2_flush", lambda: lambda: events.append("flush"))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: budgets.append(
        (warmup, rep, return_mode)) or 41.0)
    assert bench.time_ms(lambda: events.append("call"), warmup=25, rep=100, device=torch.device("cuda")) == 41.0
    assert events == ["call", "record", "flush", "call", "record"]
    assert budgets == [(40.0, 40.0 * (bench.MIN_TIMED_CALLS + 1), "median")]


def test_telemetry_reports_each_rows_median_clock_and_power(monkeypatch):
    """With --telemetry each row carries the median of the clock and power read while it was timed
    (not while another run was), in the table and the JSON."""
    clocks = {"sdpa-flash": 1980, "sageflash": 1755}
    running = []

    def fake_time_run(provider, knobs, mode, inputs, shape, settings, device, first_round, telemetry):
        running.append(provider.name)
        with telemetry:
            time.sleep(0.12)  # two or three samples, then one at the end
        return 1.0, None, None
    monkeypatch.setattr(bench, "time_run", fake_time_run)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: clocks[running[-1]])
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device: {"sdpa-flash": 690_000, "sageflash": 650_500}[running[-1]])
    settings = bench.settings_from_args(parse([*TINY, "--rounds", "2", "--causal", "off", "--modes", "e2e",
                                               "--providers", "sageflash,sdpa-flash", "--baseline", "sdpa-flash",
                                               "--telemetry"]), torch.device("cpu"))
    rows = bench.run_shape(bench.Shape(1, 2, 2, 128, 64, False), None, settings, torch.device("cpu"))
    assert [(r.provider, r.sm_mhz, r.watts) for r in rows] == [("sdpa-flash", 1980, 690.0),
                                                                ("sageflash", 1755, 650.5)]
    assert {k: rows[1].as_row()[k] for k in ("sm_mhz", "watts")} == {"sm_mhz": 1755, "watts": 650.5}
    line = bench.format_row(rows[1], "sdpa-flash", telemetry=True)
    assert line.split()[-2:] == ["1755", "650"]
    assert bench.format_header("sdpa-flash", telemetry=True).split()[-2:] == ["MHz", "W"]
    assert "MHz" not in bench.format_header("sdpa-flash")


def test_host_time_is_timed_between_synchronizes_in_the_first_round_only(monkeypatch):
    """`host_us` times the calls issued into an idle queue (a synchronize before and after) and
    reports their median; the first round measures it, once per row, and the table shows it."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    durations = iter([0.030, 0.002, 0.003, 0.004, 0.002])  # one slow call (an allocation, say)

    def call():
        events.append("call")
        time.sleep(next(durations))
    assert 3000 <= bench.host_us(call, torch.device("cuda")) < 6000  # the median, not the mean (8 ms)
    assert events == ["sync", *["call"] * bench.HOST_CALLS, "sync"]
    assert bench.host_us(call, torch.device("cpu")) is None  # a CPU call is all host time

    rounds = []

    def fake_time_run(provider, knobs, mode, inputs, shape, settings, device, first_round, telemetry):
        rounds.append(first_round)
        return 2.0, None, 120.0 if first_round else None
    monkeypatch.setattr(bench, "time_run", fake_time_run)
    settings = bench.settings_from_args(parse([*TINY, "--rounds", "3", "--causal", "off", "--modes", "e2e",
                                               "--providers", "sdpa-flash", "--baseline", "sdpa-flash"]),
                                        torch.device("cpu"))
    [row] = bench.run_shape(bench.Shape(1, 2, 2, 128, 64, False), None, settings, torch.device("cpu"))
    assert rounds == [True, False, False] and row.host_us == 120.0 and row.as_row()["host_us"] == 120.0
    [(_, width, cell)] = [c for c in bench.table_columns("sdpa-flash") if c[0] == "host µs"]
    assert f"  {cell(row):>{width}}  " in bench.format_row(row, "sdpa-flash") and cell(row) == "120"


def test_telemetry_skips_the_first_calls(monkeypatch):
    """The first calls compile (or record a replay) with the GPU idle at its top clock: sampled,
    they outnumbered a long call's timed ones and gave a 32k row 1980 MHz and 125 W on an H200."""
    state = {"clock": 1980, "calls": 0}

    def call():
        state["calls"] += 1
        if state["calls"] == 1:
            time.sleep(0.3)  # compiling: nothing runs on the GPU
        else:
            state["clock"] = 1700
            time.sleep(0.02)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: state["clock"])
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device: 690_000)
    telemetry = bench.Telemetry(torch.device("cpu"))
    bench.time_ms(call, warmup=0, rep=200, device=torch.device("cpu"), telemetry=telemetry)
    assert len(telemetry.samples) >= 3 and {mhz for mhz, _ in telemetry.samples} == {1700}


def test_telemetry_without_nvml_is_a_clear_error(no_cuda, monkeypatch, capsys):
    assert bench.run(parse([*TINY, "--allow-cpu", "--telemetry"])) == 2
    assert "--telemetry needs a CUDA GPU" in capsys.readouterr().err

    def no_nvml(device):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")
    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    reason = bench.Telemetry.unavailable_reason(torch.device("cuda"))
    assert "NVML" in reason and "nvidia-ml-py" in reason


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        bench.settings_from_args(parse(["--rounds", "0"]), torch.device("cuda"))


def test_graph_mode_is_a_skipped_row_without_cuda(no_cuda, tmp_path):
    out = tmp_path / "b.json"
    argv = [*TINY, "--allow-cpu", "--causal", "off", "--providers", "sageflash", "--modes", "e2e,graph",
            "--json", str(out)]
    assert bench.run(parse(argv)) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["provider"], r["mode"], r["error"]) for r in rows] == [
        ("sdpa-flash", "e2e", None), ("sageflash", "e2e", None),  # the CPU's baseline, added
        ("sageflash", "graph", "skipped: graph mode needs a CUDA device")]
    assert rows[1]["vs_baseline"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])


def test_benchmark_script_writes_csv(no_cuda, tmp_path, capsys):
    script = load_script("bench_attention")
    path = tmp_path / "attention.csv"
    argv = [*TINY, "--allow-cpu", "--causal", "off", "--providers", "sdpa-flash", "--csv", str(path)]
    assert script.main(argv) == 0
    rows = list(csv.DictReader(path.open()))
    assert [(r["provider"], r["seq"], r["causal"]) for r in rows] == [("sdpa-flash", "128", "False")]
    assert "sdpa-flash" in capsys.readouterr().out


def test_varlen_benchmark_script_writes_csv(no_cuda, tmp_path, capsys):
    """benchmarks/bench_varlen.py's smoke run: every provider a row (torch-varlen skipped off CUDA),
    the ratios to the baseline it names, the CSV as printed."""
    script = load_script("bench_varlen")
    path = tmp_path / "varlen.csv"
    argv = ["--allow-cpu", "--lengths", "5,70,1", "--causal", "on", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "32", "--warmup", "1", "--rep", "1", "--csv", str(path)]
    assert script.main(argv) == 0
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    assert list(rows) == list(script.PROVIDERS)
    assert rows["torch-varlen"]["error"] == "skipped: not available here" and not rows["torch-varlen"]["ms"]
    for name in ("sageflash-varlen", "sageflash-varlen-host", "sageflash-loop", "sdpa-loop"):
        row = rows[name]
        assert (row["batch"], row["sequences"], row["tokens"], row["longest"], row["causal"]) == (
            "custom", "3", "76", "70", "True")
        assert float(row["vs_baseline"]) == pytest.approx(float(rows["sdpa-loop"]["ms"]) / float(row["ms"]))
        assert float(row["tops"]) == pytest.approx(4 * 2 * (25 + 4900 + 1) * 32 / 2 / float(row["ms"]) / 1e9)
    assert "sageflash-varlen" in capsys.readouterr().out
    q, k, v = (torch.randn(76, h, 32, dtype=torch.float16) for h in (2, 1, 1))  # the providers compute one thing
    outputs = [script.build(name, q, k, v, [5, 70, 1], True, "reference")() for name in script.PROVIDERS
               if name != "torch-varlen"]
    assert all(torch.equal(o, outputs[0]) for o in outputs[1:3])  # sageflash's three: bit for bit
    assert (outputs[3] - outputs[0]).abs().max() < 0.2  # SDPA: 8-bit attention's error (not causal: ~1)
    for bad in (["--batches", "nope"], ["--kv-heads", "0"], ["--heads", "4", "--kv-heads", "3"]):
        with pytest.raises(SystemExit):
            script.main(["--allow-cpu", *bad])


def test_plot_writes_png(cpu_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, report, _ = cpu_run
    fields = {f.name for f in dataclasses.fields(bench.Shape)}
    results = [bench.Result(bench.Shape(**{f: r[f] for f in fields}),
                            **{k: v for k, v in r.items() if k not in fields}) for r in report["results"]]
    bench.write_plot(str(tmp_path / "p.png"), results)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[name] = script  # registered first, as an import would: dataclasses look their module up
    spec.loader.exec_module(script)
    return script


def test_quant_benchmark_compares_a_baseline_module(no_cuda, capsys):
    """bench_quant's A/B plumbing on the CPU (Triton interpreter): a quant.py loaded as the
    baseline gives identical payloads, a changed payload is caught; no GPU is a clear exit 2."""
    script = load_script("bench_quant")
    assert script.main([]) == 2 and "CUDA GPU" in capsys.readouterr().err
    if not sageflash.op.interpreter_enabled():
        pytest.skip("the CPU comparison runs the kernels in the Triton interpreter")
    baseline = script.load_baseline(str(ROOT / "src" / "sageflash" / "kernels" / "quant.py"))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 70, 64, generator=gen).half() for _ in range(3))
    ours = script.run_pass(script.quant, q, k, v, "per_thread")
    theirs = script.run_pass(baseline, q, k, v, "per_thread")
    assert script.identical(ours, theirs)
    theirs[0][0, 0, 0, 0] += 1
    assert not script.identical(ours, theirs)
    assert script.compulsory_bytes(q, k, v) == 2 * (70 * 64 * 2) * 5 + 3 * 70 * 64 * 2


def test_sweep_candidates_name_their_launch_in_full():
    """Every sweep candidate is a valid launch whatever `launch_config` picks: one that named only
    its loads would inherit auto's register cap (a measured 6-40% difference at D=64)."""
    script = load_script("sweep_attention")
    from sageflash.kernels.attention import LaunchConfig

    for name, change in script.CANDIDATES.items():
        for padded, pv_accum, causal, arch in itertools.product((64, 128), ("fp32+fp16", "fp32+fp32"),
                                                                (False, True), (89, 90)):
            params = sageflash.params.resolve_params(None, causal, True, False, pv_accum, "per_thread",
                                                     head_dim=padded)
            launch = script.candidate(name, padded, params, 1 << 14, arch)
            assert isinstance(launch, LaunchConfig) and launch.keys in (64, 128) and launch.num_stages >= 2
            if change is not None:
                assert {"tma", "max_registers"} <= change.keys(), name


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph``, which holds addresses, not tensors."""

    def replay(self):
        pass


def test_a_captured_call_keeps_what_its_graph_reads_alive(monkeypatch):
    """`bench.captured`'s replay must hold the captured call: a CUDA graph reads the tensors that
    call holds at their captured addresses, and in the kernel mode nothing else holds the payloads
    (they were freed when the builder returned, leaving the graph to read reused memory)."""
    @contextlib.contextmanager
    def fake_capture(graph):
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    payload = torch.randn(64)
    alive = weakref.ref(payload)
    call = functools.partial(torch.mul, payload, 2.0)
    replay = bench.captured(call, torch.device("cuda"))
    del payload, call
    gc.collect()
    assert alive() is not None
    replay()


@pytest.mark.gpu
def test_a_captured_payload_outlives_its_builder():
    """On a GPU: the replay gives the captured call's result after every other reference is gone."""
    x = torch.randn(4096, device="cuda")
    alive = weakref.ref(x)
    replay = bench.captured(functools.partial(torch.mul, x, 3.0), x.device)
    expected = x * 3.0
    del x
    gc.collect()
    assert alive() is not None
    torch.testing.assert_close(replay(), expected)


@pytest.mark.gpu
def test_telemetry_reads_the_gpus_clock_and_power():
    device = torch.device("cuda")
    if reason := bench.Telemetry.unavailable_reason(device):
        pytest.skip(f"--telemetry {reason}")
    x = torch.randn(4096, 4096, device=device)
    with bench.Telemetry(device) as telemetry:
        for _ in range(200):
            x = torch.tanh(x @ x)
        torch.cuda.synchronize()
    assert len(telemetry.samples) >= 2
    assert all(200 <= mhz <= 4000 and 20 <= watts <= 2000 for mhz, watts in telemetry.samples)


@pytest.mark.gpu
def test_host_time_of_a_gpu_call_is_below_its_queued_work():
    """On a GPU: issuing a call whose kernels take ~10 ms costs the host far less (no launch waits)."""
    x = torch.randn(8192, 8192, device="cuda")
    fn = lambda: [x @ x for _ in range(4)]  # noqa: E731
    fn()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    fn()
    end.record()
    end.synchronize()
    assert 0 < bench.host_us(fn, x.device) < 0.5 * start.elapsed_time(end) * 1e3
