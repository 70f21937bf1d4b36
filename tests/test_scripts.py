"""``scripts/compare_sageattention.py`` and ``scripts/compare_ggml_vs_sage.py`` (SPEC §10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, refdump_dir
from helpers import PACKAGE_ROOT, exact_attention, no_env_overrides, random_qkv  # noqa: F401 (a fixture)
from sageflash import dumps, reference
from sageflash.cli import compare, main
from sageflash.cli.dump import run_official
from sageflash.params import resolve_params

CASE = "b1_causal_seq128_d64"
pytestmark = pytest.mark.usefixtures("no_env_overrides")


def script(name: str, *argv: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run ``python scripts/<name> *argv`` from the repository root, without GGML_SAGE_* toggles."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGML_SAGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, f"scripts/{name}", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_compare_sageattention_writes_inputs_and_flash_and_says_what_is_missing(tmp_path):
    prefix = str(tmp_path / "dump")
    proc = script("compare_sageattention.py", "--case", CASE, "--dump-prefix", prefix, "--pv-accum", "fp32",
                  "--smooth-v", "--granularity", "per_thread", "--no-smooth-k", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    if not torch.cuda.is_available():
        assert "sageattention: not used:" in proc.stderr and "no CUDA device" in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.flash.bin", "dump.k.bin", "dump.meta",
                                                             "dump.q.bin", "dump.v.bin"]
    meta = dumps.read_meta(prefix)
    assert (meta.pv_accum, meta.smooth_v, meta.granularity, meta.smooth_k, meta.seed) == \
        ("fp32", True, "per_thread", False, 7)
    q, k, v = (dumps.read_tensor(prefix, meta, tag) for tag in ("q", "k", "v"))
    expected_q = (torch.rand(1, 12, 128, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1).half()
    assert torch.equal(q, expected_q)  # the case's inputs: uniform in [-1, 1] from the seed
    torch.testing.assert_close(dumps.read_tensor(prefix, meta, "flash"),
                               exact_attention(q, k, v, is_causal=True).float(), atol=2e-6, rtol=0)


def test_compare_ggml_vs_sage_reads_dumps_and_writes_missing_ones(tmp_path):
    official = refdump_dir()
    if official is None:
        pytest.skip("official dumps not found")
    for path in official.glob(f"{CASE}.*"):
        os.symlink(path, tmp_path / path.name)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = script("compare_ggml_vs_sage.py", "--case", CASE, "--case", f"{CASE}_thread", "--tmp-dir",
                  str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"^  \S+/(\S+): (rms_avg .*)$", proc.stdout, re.MULTILINE))
    rms, vs = re.match(r"rms_avg (\S+) max \S+ \(vs (\S+)\), sage \S+ ms, flash \S+ ms", rows[CASE]).groups()
    assert vs == "sageattention" and float(rms) <= 1e-3
    assert "(vs flash)" in rows[f"{CASE}_thread"]  # written here: no official output without SageAttention
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the dump it wrote is gone again


def test_compare_keeps_dumps_on_request_and_runs_an_external_binary(tmp_path, capsys):
    assert main(["compare", "--case", CASE, "--tmp-dir", str(tmp_path), "--keep-dumps", "--seed", "3"]) == 0
    prefix = str(tmp_path / CASE)
    assert dumps.read_meta(prefix).seed == 3
    in_process = capsys.readouterr().out

    binary = tmp_path / "test-sageflash"
    binary.write_text(f"#!/bin/sh\nPYTHONPATH='{PACKAGE_ROOT}' exec '{sys.executable}' -m sageflash \"$@\"\n")
    binary.chmod(0o755)
    assert main(["compare", prefix, "--ggml-bin", str(binary)]) == 0
    external = capsys.readouterr().out
    diff = re.compile(r"diff \(flash\): .*")
    assert diff.search(external).group(0) == diff.search(in_process).group(0)  # same dump, same op


def test_official_payloads_are_recorded_and_v_put_back_in_token_order():
    """`run_official` against a stand-in for ``sageattention.core`` that stores V the kernel's way."""
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, seq_q=100, head_dim=64, seed=21)
    params = resolve_params(head_dim=64, granularity="per_warp")
    natural_v = reference.quantize_v(v, pv_accum=params.pv_accum, smooth_v=False)

    def per_channel_fp8(v, tensor_layout="HND", scale_max=448.0, smooth_v=True):
        stored = torch.empty_like(natural_v[0])  # token m of each 16 sits at 0,1,4,5,8,9,12,13,2,3,...
        order = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
        stored.unflatten(-1, (-1, 16))[..., order] = natural_v[0].unflatten(-1, (-1, 16))
        return stored, natural_v[1], None

    def per_warp_int8_cuda(q, k, km=None, BLKQ=128, WARPQ=32, BLKK=64, tensor_layout="HND"):
        return reference.quantize_qk(q, k, granularity="per_warp", smooth_k=km is not None, km=km[:, :, 0])[:4]

    def sageattn_qk_int8_pv_fp8_cuda(q, k, v, **kwargs):
        core.per_warp_int8_cuda(q, k, k.mean(dim=2, keepdim=True), tensor_layout="HND")
        core.per_channel_fp8(v, tensor_layout="HND", scale_max=2.25, smooth_v=False)
        return reference.attention(q, k, v, params, return_lse=True)

    core = types.SimpleNamespace(per_warp_int8_cuda=per_warp_int8_cuda, per_channel_fp8=per_channel_fp8,
                                 sageattn_qk_int8_pv_fp8_cuda=sageattn_qk_int8_pv_fp8_cuda)
    tensors = run_official(core, q, k, v, params)
    assert sorted(tensors) == ["k_int8", "k_mean", "k_scale", "lse", "q_int8", "q_scale", "sage_quant",
                               "v_fp8", "v_scale"]
    assert torch.equal(tensors["v_fp8"].view(torch.uint8), natural_v[0].view(torch.uint8))
    assert torch.equal(tensors["k_mean"], k.mean(dim=2))
    assert torch.equal(tensors["q_int8"], reference.quantize_qk(q, k, granularity="per_warp", smooth_k=True)[0])
    assert core.per_channel_fp8 is per_channel_fp8  # the recording wrappers are gone again


def test_an_external_binarys_incomplete_report_is_a_one_line_error(tmp_path, capsys):
    """A binary whose report lacks lines (here the timings and the reference) is named with what
    is missing, exit code 2, no traceback."""
    prefix = str(tmp_path / CASE)
    assert main(["dump", "--case", CASE, "--dump-prefix", prefix]) == 0
    binary = tmp_path / "partial"
    binary.write_text("#!/bin/sh\necho 'Case X'\necho '  diff (flash): max 1.0e-03 rms_avg 1.0e-04'\n")
    binary.chmod(0o755)
    capsys.readouterr()
    assert main(["compare", prefix, "--ggml-bin", str(binary)]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the note that the dump has no official output
    assert last.startswith("sageflash: error:") and "lacks sage_ms, flash_ms, speedup, reference" in last
    assert "Traceback" not in err


def test_compare_removes_the_folders_its_dumps_needed(tmp_path, monkeypatch):
    """``--tmp-dir`` folders that did not exist are removed with the dumps written there."""
    assert main(["compare", "--case", CASE, "--tmp-dir", str(tmp_path / "new dir" / "sub")]) == 0
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    assert main(["compare", "--case", CASE, "--tmp-dir", str(tmp_path / "kept" / "sub")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []

    def stray_file_then_dump(*args, **kwargs):  # something else lands in the new folder meanwhile
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "notes.txt").write_text("mine")
        return dump_as_before(*args, **kwargs)
    dump_as_before = compare.dump_case
    monkeypatch.setattr(compare, "dump_case", stray_file_then_dump)
    assert main(["compare", "--case", CASE, "--tmp-dir", str(tmp_path / "new")]) == 0
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["notes.txt"]  # only what compare wrote went

