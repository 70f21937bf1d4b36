"""Sequence-parallel attention (`sageflash.parallel`) on the GPUs of one host, against the op on one GPU.

    python benchmarks/bench_parallel.py --world 2                          # -> benchmarks/data/parallel.csv
    python benchmarks/bench_parallel.py --world 4 --seq 32k,128k --methods ring-zigzag,usp --ulysses-size 2

Spawns ``--world`` processes: NCCL on cuda:0.. when there are that many GPUs, else gloo on the CPU
(a smoke run of the same code; its times say nothing about GPUs). Each process holds its shard of
the sequence (``[B, H, S/P, D]``). A method's time is the median over ``--rounds`` of the mean of
``--iters`` back-to-back calls, timed on every rank between barriers, of the slowest rank. The op
on the whole sequence runs on rank 0 alone, timed the same way (blank where it does not fit).
TOPS = 4·B·H·S²·D / time, halved when causal; speedup = one GPU's time / the group's;
efficiency = speedup / world size.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sageflash import bench, parallel, sage_attn_sm89_fp16

DEFAULT_CSV = Path(__file__).resolve().parent / "data" / "parallel.csv"
METHODS = ("ulysses", "ring", "ring-zigzag", "usp")  # usp: zigzag rings across Ulysses groups
GPU_SEQ = [16384, 65536]
CPU_SEQ = [256]  # the reference backend on CPU processes: a smoke run's length


def _yes_no(word: str) -> bool:
    if word not in ("yes", "no"):
        raise ValueError(f"expected yes or no, got {word!r}")
    return word == "yes"


@dataclasses.dataclass
class Row:
    method: str
    world: int
    shape: bench.Shape
    ms: float | None
    tops: float | None
    single_ms: float | None
    speedup: float | None
    efficiency: float | None
    error: str | None = None
    dist_backend: str = ""  # the group's torch.distributed backend (--dist-backend)

    def as_row(self) -> dict:
        """A flat dict (method, world, the shape's fields, the measurement), for the table and CSV."""
        return {"method": self.method, "world": self.world, **dataclasses.asdict(self.shape),
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)[3:]}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, iters: int, rounds: int, device: torch.device, in_step: bool = False) -> float:
    """This rank's median over ``rounds`` of the mean time of ``iters`` calls, after two untimed
    calls (Triton compiles, the op records its launches); ``in_step``: every round starts at a
    barrier of all ranks."""
    fn()
    fn()
    synchronize(device)
    means = []
    for _ in range(rounds):
        if in_step:
            dist.barrier()
            synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        means.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(means)


def group_ms(fn, iters: int, rounds: int, device: torch.device) -> float:
    """The slowest rank's `median_ms`, the ranks in step."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, median_ms(fn, iters, rounds, device, in_step=True))
    return max(everyone)


def single_gpu_ms(args, shape: bench.Shape, device: torch.device) -> float | None:
    """The op on the whole sequence, timed on this device alone; None where it does not fit (or the
    op refuses the shape)."""
    try:  # on rank 0 alone: a refusal here is a blank, not a reason for the group to stop
        q = torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, dtype=torch.float16, device=device)
        k, v = (torch.randn(shape.batch, shape.kv_heads, shape.seq, shape.head_dim, dtype=torch.float16,
                            device=device) for _ in range(2))
        call = functools.partial(sage_attn_sm89_fp16, q, k, v, is_causal=shape.causal)
        return median_ms(call, args.iters, args.rounds, device)
    except (ValueError, TypeError, torch.OutOfMemoryError):
        return None


def method_call(method: str, q, k, v, causal: bool, groups):
    if method == "ulysses":
        return functools.partial(parallel.ulysses_attention, q, k, v, is_causal=causal)
    if method == "usp":
        return functools.partial(parallel.usp_attention, q, k, v, is_causal=causal, sharding="zigzag",
                                 ulysses_group=groups[0], ring_group=groups[1])
    sharding = "zigzag" if method == "ring-zigzag" else "contiguous"
    return functools.partial(parallel.ring_attention, q, k, v, is_causal=causal, sharding=sharding)


def worker(rank: int, args, rendezvous: str, result_path: str) -> None:
    world = args.world
    device = torch.device(f"cuda:{rank}") if args.nccl else torch.device("cpu")
    if args.nccl:
        torch.cuda.set_device(device)
    dist.init_process_group(args.dist_backend, init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    groups = parallel.usp_groups(args.ulysses_size) if "usp" in args.methods else None
    rows = []
    try:
        torch.manual_seed(rank)
        for seq, causal in ((s, c) for s in args.seq for c in args.causal):
            shape = bench.Shape(args.batch, args.heads, args.kv_heads, seq, args.head_dim, causal)
            single = single_gpu_ms(args, shape, device) if rank == 0 else None
            q = torch.randn(args.batch, args.heads, seq // world, args.head_dim, dtype=torch.float16, device=device)
            k, v = (torch.randn(args.batch, args.kv_heads, seq // world, args.head_dim, dtype=torch.float16,
                                device=device) for _ in range(2))
            for method in args.methods:
                ms, error = None, None
                try:
                    ms = group_ms(method_call(method, q, k, v, causal, groups), args.iters, args.rounds, device)
                except (ValueError, torch.OutOfMemoryError) as exc:  # the same refusal on every rank
                    error = bench.short_error(exc)
                speedup = None if ms is None or single is None else single / ms
                rows.append(Row(method, world, shape, ms, None if ms is None else bench.tops(shape, ms), single,
                                speedup, None if speedup is None else speedup / world, error, args.dist_backend))
        if rank == 0:
            torch.save([row.as_row() for row in rows], result_path)
    finally:
        dist.destroy_process_group()


def print_table(rows: list[dict]) -> None:
    print("| method | P | B | H | Hk | S | D | causal | ms | TOPS | one GPU ms | speedup | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["method"], row["world"], row["batch"], row["heads"], row["kv_heads"], row["seq"],
                 row["head_dim"], "yes" if row["causal"] else "no"]
        if row["error"]:
            cells += [row["error"], "", "", "", ""]
        else:
            cells += ["-" if row[name] is None else format(row[name], spec) for name, spec in
                      (("ms", ".3f"), ("tops", ".1f"), ("single_ms", ".3f"), ("speedup", ".2f"), ("efficiency", ".2f"))]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=max(2, torch.cuda.device_count()), help="processes (GPUs)")
    parser.add_argument("--seq", type=bench._list_of(bench.parse_size, "lengths"), default=None,
                        help=f"whole-sequence lengths, comma list (k = 1024; default {GPU_SEQ} on GPUs, "
                             f"{CPU_SEQ} on the CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", type=bench._list_of(_yes_no, "yes/no"), default=[False, True],
                        help="comma list of yes/no")
    parser.add_argument("--methods", type=bench._list_of(bench._choice(METHODS), "methods"),
                        default=["ulysses", "ring", "ring-zigzag"], help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--ulysses-size", type=int, default=2, help="usp: ranks per Ulysses group")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--dist-backend", default=None,
                        help="torch.distributed backend of the group (default: nccl on GPUs, gloo on the CPU); "
                             "'cpu:gloo,cuda:nccl' keeps the calls' agreement in host memory")
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    args.nccl = torch.cuda.device_count() >= args.world
    args.dist_backend = args.dist_backend or ("nccl" if args.nccl else "gloo")
    args.seq = args.seq or (GPU_SEQ if args.nccl else CPU_SEQ)
    if args.world < 1 or args.ulysses_size < 1:
        parser.error("--world and --ulysses-size must be at least 1")
    chunks = args.world * (2 if {"ring-zigzag", "usp"} & set(args.methods) else 1)
    if any(s % chunks for s in args.seq):
        parser.error(f"every --seq must be a multiple of {chunks} (the chunks the methods cut it into)")
    if "usp" in args.methods and args.world % args.ulysses_size:
        parser.error(f"--ulysses-size {args.ulysses_size} must divide --world {args.world}")
    with tempfile.TemporaryDirectory() as scratch:
        result_path = str(Path(scratch, "rows.pt"))
        mp.start_processes(worker, args=(args, str(Path(scratch, "rendezvous")), result_path),
                           nprocs=args.world, start_method="spawn")
        rows = torch.load(result_path)
    where = f"{args.world} x {torch.cuda.get_device_name(0)} ({args.dist_backend})" if args.nccl else \
        f"{args.world} CPU processes (gloo: a smoke run, not a GPU measurement)"
    print(f"sageflash.parallel on {where}; fp16, knobs at their defaults")
    print_table(rows)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
