"""``sageflash compare``: run the op on dumps and compare it with their official output.

Dumps are named by prefix, or by case under ``--tmp-dir`` (``<tmp-dir>/<case>``). A case whose dump
is missing is written first, as ``sageflash dump --official`` would (the official output only where
SageAttention runs), and removed afterwards unless ``--keep-dumps``. Each dump is compared with its
official output when it has one (``--reference auto``), else with exact attention. ``--ggml-bin``
runs an external binary with the ``sageflash run`` command line instead of this package; its
report is parsed. Used by ``scripts/compare_ggml_vs_sage.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

from .. import dumps
from ..cases import CASES
from .dump import dump_case
from .run import REPORT_FIELDS, dump_workload, format_case, parse_report, pick_backend, run_workload


def register(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="compare the op with the official output of dumps",
                                   description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("prefixes", nargs="*", metavar="PREFIX", help="dumps to compare")
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="compare the dump <tmp-dir>/<NAME>, writing it first if missing (repeatable)")
    parser.add_argument("--tmp-dir", help="where the --case dumps are (default: a new temporary folder)")
    parser.add_argument("--keep-dumps", action="store_true", help="keep the dumps this command writes")
    parser.add_argument("--ggml-bin", metavar="BIN", help="an external binary with the `sageflash run` CLI")
    parser.add_argument("--reference", choices=("auto", "sage", "flash"), default="auto",
                        help="auto: the official output when the dump has one, else flash")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the --case dumps written here")
    parser.set_defaults(func=main)


def pick_reference(prefix: str, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    if dumps.has_tag(prefix, "sage_quant") or dumps.has_tag(prefix, "sage"):
        return "sage"
    print(f"note: {prefix} has no official output (.sage_quant.bin); comparing with flash", file=sys.stderr)
    return "flash"


def external_report(binary: str, prefix: str, reference: str) -> str:
    """The report of ``binary --load prefix --compare reference``, echoed as it came."""
    proc = subprocess.run([binary, "--load", prefix, "--compare", reference], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise ValueError(f"{binary} --load {prefix} failed with exit code {proc.returncode}")
    return proc.stdout


def compare_one(prefix: str, args) -> dict:
    """Run and compare one dump; returns its parsed report record."""
    dumps.read_meta(prefix)  # a missing or bad dump is the error, before any note about it
    reference = pick_reference(prefix, args.reference)
    if args.ggml_bin:
        text = external_report(args.ggml_bin, prefix, reference)
    else:
        device, backend, _ = pick_backend()
        work = dump_workload(prefix, args, device, with_official=reference == "sage")
        text = format_case(run_workload(work, iters=1, reference=reference, backend=backend, device=device))
        print(text, flush=True)
    records = parse_report(text)
    if not records:
        raise ValueError(f"no report for {prefix} (expected the `sageflash run` report lines)")
    missing = [key for key in REPORT_FIELDS if key not in records[0]]
    if missing:
        raise ValueError(f"the report for {prefix} lacks {', '.join(missing)} "
                         "(expected the `sageflash run` report lines)")
    return records[0]


def missing_dirs(path: str) -> list[str]:
    """The folders of ``path`` that do not exist yet, innermost first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def main(args) -> int:
    if not args.prefixes and not args.case:
        raise ValueError("name at least one dump PREFIX or --case")
    unknown = [name for name in args.case if name not in CASES]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r} (`sageflash run --list` shows the built-in cases)")
    if not args.ggml_bin:
        print(pick_backend()[2], flush=True)
    made_dir = tempfile.mkdtemp(prefix="sageflash-") if args.case and not args.tmp_dir else None
    tmp_dir = args.tmp_dir or made_dir
    new_dirs = missing_dirs(tmp_dir) if args.case and args.tmp_dir else []  # made by the dumps
    written: list[str] = []
    try:
        targets = list(args.prefixes)
        for name in args.case:
            prefix = os.path.join(tmp_dir, name)
            if not os.path.isfile(f"{prefix}.meta"):
                written += dump_case(name, prefix, args, official=True)
            targets.append(prefix)
        records = [compare_one(prefix, args) for prefix in targets]
    finally:
        if args.keep_dumps and written:
            print(f"kept the dumps written under {tmp_dir}", file=sys.stderr)
        elif not args.keep_dumps:
            for path in written:
                os.remove(path)
            if made_dir:
                shutil.rmtree(made_dir, ignore_errors=True)
            for folder in new_dirs:  # innermost first; one that holds anything else stays
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
    print("Comparison")
    for r in records:
        print(f"  {r['name']}: rms_avg {r['rms_avg']:.3e} max {r['max_diff']:.3e} (vs {r['reference']}), "
              f"sage {r['sage_ms']:.3f} ms, flash {r['flash_ms']:.3f} ms (speedup {r['speedup']:.2f}x)")
    return 0
