"""The quantization pass (`sageflash.kernels.quantize_qkv`) alone: GPU time, host time, bandwidth.

    python benchmarks/bench_quant.py --head-dim 64,128 --seq 1k,4k,16k --csv quant.csv
    python benchmarks/bench_quant.py --baseline old_quant.py   # A/B against another quant.py
    python benchmarks/bench_quant.py --dtype bf16

Per shape and granularity, Q, K and V are quantized as the op does (smooth_k on, fp32+fp16's V
scale, V's tokens in the kernel's order). ``graph_us`` replays the pass from a CUDA graph (GPU
time only), ``eager_us`` calls it (host time included when the host is slower); both are
`triton.testing.do_bench` medians with the L2 flushed. ``GB/s`` counts the pass's compulsory
traffic: Q, K and V read twice where statistics are needed (K and V) and once for Q, the payloads
written once. With ``--baseline PATH`` (a quant.py, e.g. from ``git show
REV:src/sageflash/kernels/quant.py``) each shape also runs that module, checks its payloads are
bit-identical and reports the time ratio new / baseline.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import sys

import torch

from sageflash.bench import DTYPES, captured, parse_size
from sageflash.kernels import quant

BATCH, HEADS = 4, 32


def load_baseline(path: str):
    """``path`` imported as a module of `sageflash.kernels` (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location("sageflash.kernels._baseline_quant", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sageflash.kernels"
    spec.loader.exec_module(module)
    return module


def run_pass(module, q, k, v, granularity):
    """The pass as the op runs it: V's payload in the attention kernel's token order."""
    return module.quantize_qkv(q, k, v, granularity=granularity, smooth_k=True, pv_accum="fp32+fp16",
                               v_kernel_order=True)


def identical(a, b) -> bool:
    """Payload tuples equal bit for bit (fp8 compared as bytes; None only against None)."""
    as_bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    return all((x is None) == (y is None) and (x is None or torch.equal(as_bits(x), as_bits(y)))
               for x, y in zip(a, b))


def compulsory_bytes(q, k, v) -> int:
    """Inputs: Q once, K and V twice (statistics, then quantization); payloads: one byte each."""
    elements = q.numel() + k.numel() + v.numel()
    return q.element_size() * (q.numel() + 2 * k.numel() + 2 * v.numel()) + elements


def main(argv: list[str] | None = None) -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", default="64,128", help="comma list")
    parser.add_argument("--seq", default="1k,4k,16k", help="comma list, e.g. 1k,4k")
    parser.add_argument("--granularity", default="per_thread,per_warp", help="comma list")
    parser.add_argument("--dtype", default="fp16", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--baseline", metavar="PATH", help="another quant.py to compare against")
    parser.add_argument("--rep", type=float, default=200.0, help="timed budget per measurement, ms")
    parser.add_argument("--csv", metavar="PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant needs a CUDA GPU", file=sys.stderr)
        return 2
    baseline = load_baseline(args.baseline) if args.baseline else None
    time_us = lambda fn: triton.testing.do_bench(fn, rep=args.rep, return_mode="median") * 1e3  # noqa: E731

    rows = []
    print(f"{'dtype':>5} {'D':>4} {'S':>6} {'granularity':>11} {'graph_us':>9} {'eager_us':>9} {'GB/s':>7}"
          + (f" {'base_us':>8} {'new/base':>8} {'identical':>9}" if baseline else ""))
    for dtype, head_dim, seq, granularity in itertools.product(
            args.dtype.split(","), [parse_size(x) for x in args.head_dim.split(",")],
            [parse_size(x) for x in args.seq.split(",")], args.granularity.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(seq + head_dim)
        q, k, v = (torch.randn(BATCH, HEADS, seq, head_dim, device="cuda", dtype=DTYPES[dtype], generator=gen)
                   for _ in range(3))
        row = dict(dtype=dtype, head_dim=head_dim, seq=seq, granularity=granularity,
                   graph_us=time_us(captured(lambda: run_pass(quant, q, k, v, granularity), q.device)),
                   eager_us=time_us(lambda: run_pass(quant, q, k, v, granularity)))
        row["gb_per_s"] = compulsory_bytes(q, k, v) / row["graph_us"] / 1e3
        line = (f"{dtype:>5} {head_dim:4d} {seq:6d} {granularity:>11} {row['graph_us']:9.1f} {row['eager_us']:9.1f} "
                f"{row['gb_per_s']:7.0f}")
        if baseline:
            other = lambda: run_pass(baseline, q, k, v, granularity)  # noqa: E731
            row["identical"] = identical(run_pass(quant, q, k, v, granularity), other())
            row["baseline_graph_us"] = time_us(captured(other, q.device))
            line += (f" {row['baseline_graph_us']:8.1f} {row['graph_us'] / row['baseline_graph_us']:8.3f} "
                     f"{row['identical']!s:>9}")
        print(line, flush=True)
        rows.append(row)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
