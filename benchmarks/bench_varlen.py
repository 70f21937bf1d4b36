"""Packed variable-length batches (`sageflash.sage_attn_varlen`) against the alternatives a caller has.

    python benchmarks/bench_varlen.py                              # -> benchmarks/data/varlen.csv
    python benchmarks/bench_varlen.py --batches llm,mixed --causal on --heads 32 --kv-heads 8
    python benchmarks/bench_varlen.py --lengths 4096,77,1000 --causal off

Providers: ``sageflash-varlen`` (one packed call, its ``cu_seqlens`` on the GPU as video and LLM
callers pass them: one host read that waits for the queue), ``sageflash-varlen-host`` (the same
with ``cu_seqlens`` on the CPU: no wait), ``sageflash-loop`` (the op on each sequence, its outputs
concatenated: what a caller without varlen does),
``torch-varlen`` (``torch.nn.attention.varlen.varlen_attn``, torch's FlashAttention on packed
batches, when this torch has it; the baseline of the ratios then) and ``sdpa-loop`` (SDPA's flash
backend per sequence, the baseline otherwise). Batches (``--batches``): ``video`` (two prompts of
a video model: ~32k video tokens and their text, of different lengths), ``llm`` (64 prefill
sequences of 64-4096 tokens, seeded), ``mixed`` (one 16k sequence beside 256 of 128 tokens); or
``--lengths`` for one batch of its own. Times: `sageflash.bench.time_ms` (do_bench's median, L2 flushed) and
peak extra memory; TOPS = Σ 4·H·Sq·Sk·D / time over the sequences, halved when causal. Without a
GPU (``--allow-cpu``) a smoke run of tiny batches on the reference backend: its times say nothing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import random
import sys
from pathlib import Path

import torch

from sageflash import bench, sage_attn_sm89_fp16, sage_attn_varlen

DEFAULT_CSV = Path(__file__).resolve().parent / "data" / "varlen.csv"
BATCHES = {
    "video": [32760 + 77, 32760 + 226],
    "llm": [random.Random(0).randint(64, 4096) for _ in range(64)],
    "mixed": [16384] + [128] * 256,
}
CPU_BATCHES = {"smoke": [37, 130, 1, 64]}
PROVIDERS = ("sageflash-varlen", "sageflash-varlen-host", "sageflash-loop", "torch-varlen", "sdpa-loop")


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclasses.dataclass
class Row:
    batch: str
    sequences: int
    tokens: int
    longest: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    provider: str
    ms: float | None = None
    tops: float | None = None
    vs_baseline: float | None = None
    peak_extra_mib: float | None = None
    error: str | None = None


def flops(lengths: list[int], heads: int, head_dim: int, causal: bool) -> float:
    return sum(4 * heads * n * n * head_dim for n in lengths) / (2 if causal else 1)


def build(provider: str, q, k, v, lengths: list[int], causal: bool, backend: str):
    """A call of ``provider`` on the packed batch, or None where it cannot run here."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    bounds = list(itertools.pairwise(cu.tolist()))
    if provider.startswith("sageflash-varlen"):
        cu_where = cu if provider.endswith("-host") else cu.to(q.device)
        return lambda: sage_attn_varlen(q, k, v, cu_where, cu_where, is_causal=causal, backend=backend)
    if provider == "sageflash-loop":
        return lambda: torch.cat([sage_attn_sm89_fp16(q[None, s:e], k[None, s:e], v[None, s:e], is_causal=causal,
                                                      tensor_layout="NHD", backend=backend)[0] for s, e in bounds])
    if provider == "torch-varlen":
        varlen_attn = _torch_varlen()
        if varlen_attn is None or q.device.type != "cuda":
            return None
        cu_device, longest = cu.to(q.device), max(lengths)
        window = (-1, 0) if causal else (-1, -1)
        return lambda: varlen_attn(q, k, v, cu_device, cu_device, longest, longest, window_size=window,
                                   enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]

    def sdpa_loop():
        outs = []
        for s, e in bounds:
            qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal,
                                                                     enable_gqa=group > 1)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)
    return sdpa_loop


def run(args, device: torch.device) -> list[Row]:
    batches = {**BATCHES, **CPU_BATCHES, "custom": args.lengths}
    rows = []
    for name, causal in itertools.product(args.batches, args.causal):
        lengths = batches[name]
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(sum(lengths), args.heads, args.head_dim, device=device, generator=gen, dtype=torch.float16)
        k, v = (torch.randn(sum(lengths), args.kv_heads, args.head_dim, device=device, generator=gen,
                            dtype=torch.float16) for _ in range(2))
        shape_rows = []
        for provider in args.providers:
            row = Row(name, len(lengths), sum(lengths), max(lengths), args.heads, args.kv_heads, args.head_dim,
                      causal, provider)
            fn = build(provider, q, k, v, lengths, causal, "auto" if device.type == "cuda" else "reference")
            if fn is None:
                row.error = "skipped: not available here"
            else:
                try:
                    row.ms = bench.time_ms(fn, args.warmup, args.rep, device)
                    row.tops = flops(lengths, args.heads, args.head_dim, causal) / row.ms / 1e9
                    peak = bench.peak_extra_bytes(fn, device)
                    row.peak_extra_mib = None if peak is None else peak / bench.MIB
                except Exception as err:  # a provider that fails is a row, the run goes on
                    row.error = bench.short_error(err)
            shape_rows.append(row)
        timed = {r.provider: r.ms for r in shape_rows if r.ms}
        baseline = timed.get("torch-varlen") or timed.get("sdpa-loop")
        for row in shape_rows:
            row.vs_baseline = baseline / row.ms if baseline and row.ms else None
            print(format_row(row), flush=True)
        rows += shape_rows
    return rows


def format_row(row: Row) -> str:
    def cell(value, spec):
        return "-" if value is None else format(value, spec)
    what = (f"{row.batch:>7} N={row.sequences:<4} T={row.tokens:<7} max={row.longest:<6} "
            f"{'causal' if row.causal else 'full':6} {row.provider:17}")
    if row.error:
        return f"{what} {row.error}"
    return (f"{what} {cell(row.ms, '9.3f')} ms {cell(row.tops, '7.1f')} TOPS x{cell(row.vs_baseline, '.2f')} "
            f"peak {cell(row.peak_extra_mib, '.0f')} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--batches", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, of {', '.join([*BATCHES, *CPU_BATCHES])} (default: all but smoke; "
                             "without a GPU: smoke)")
    parser.add_argument("--lengths", type=lambda s: [int(n) for n in s.split(",")], default=None,
                        help="comma-separated sequence lengths: one batch of them instead of --batches")
    parser.add_argument("--providers", type=lambda s: s.split(","), default=list(PROVIDERS),
                        help=f"comma-separated, of {', '.join(PROVIDERS)} (default: all)")
    parser.add_argument("--causal", choices=["on", "off", "both"], default="both")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--kv-heads", type=int, default=None, help="a divisor of --heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=25.0, help="ms, as do_bench's")
    parser.add_argument("--rep", type=float, default=100.0, help="ms, as do_bench's")
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU: a smoke run on the reference backend")
    args = parser.parse_args(argv)
    if unknown := set(args.providers) - set(PROVIDERS):
        parser.error(f"--providers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PROVIDERS)}")
    if unknown := set(args.batches or []) - set(BATCHES) - set(CPU_BATCHES):
        parser.error(f"--batches: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BATCHES)}")
    if args.lengths is not None and (args.batches or min(args.lengths) < 1):
        parser.error("--lengths: positive lengths, instead of --batches")
    args.kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if min(args.heads, args.head_dim, args.kv_heads) < 1 or args.heads % args.kv_heads:
        parser.error("--heads, --kv-heads, --head-dim: positive, --kv-heads a divisor of --heads")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.allow_cpu:
        print("bench_varlen: no CUDA device (pass --allow-cpu for a smoke run)", file=sys.stderr)
        return 2
    args.batches = (["custom"] if args.lengths else args.batches
                    or (list(BATCHES) if device.type == "cuda" else list(CPU_BATCHES)))
    args.causal = {"on": [True], "off": [False], "both": [False, True]}[args.causal]
    rows = run(args, device)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
