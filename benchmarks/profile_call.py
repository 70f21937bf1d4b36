"""Where one `sage_attn_sm89_fp16` call spends its time: host (Python + launches) against GPU kernels.

    python benchmarks/profile_call.py --seq 1k,4k --head-dim 128

Host: the median wall time of each stage called back to back without synchronising (the GPU
queue absorbs the work, so this is the CPU cost alone), over many calls. GPU: `torch.profiler`'s
CUDA time of every kernel of one call. A call is host-bound when its host time exceeds its GPU
time. ``e2e, no replays`` is the same call with `sageflash.kernels.replay` off. ``--cprofile N``
also prints the N functions with the most own time over many eager calls (cProfile's overhead
inflates small Python functions; read it for proportions). ``--timeline`` (instead of the rest)
times calls as the bench does (L2 flushed before each), eagerly and replayed from a CUDA graph,
and splits each call's GPU span into kernel time and idle gaps, kernel by kernel: where an eager
call loses to its graph.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import sys
import time

import torch

import sageflash
from sageflash import kernels
from sageflash.bench import captured, parse_size
from sageflash.kernels import attention_from_payloads, quantize_qkv
from sageflash.op import check_call
from sageflash.params import apply_overrides, resolve_params

CALLS = 200


def host_us(fn, calls: int = CALLS) -> float:
    """Median host microseconds of ``fn`` over batches of calls, the GPU never waited for."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - start) / (calls // 5) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def cuda_events(warm_up, run) -> list:
    """`torch.profiler`'s CUDA kernel events of ``run()``, profiled after one ``warm_up()``."""
    from torch.profiler import ProfilerActivity, profile

    warm_up()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def gpu_kernels(fn) -> list[tuple[str, float]]:
    """(kernel name, CUDA microseconds) of one call of ``fn``."""
    return [(e.name[:60], e.device_time_total) for e in cuda_events(fn, fn)]


def call_timelines(fn, calls: int = 10) -> list[list[tuple[str, float, float]]]:
    """Each of ``calls`` calls of ``fn``, each after an L2 flush as in `triton.testing.do_bench`, as
    its kernels' (name, start µs, end µs); the flush kernels separate the calls."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def flushed_calls():
        for _ in range(calls):
            flush.zero_()
            fn()
    events = sorted((e.time_range.start, e.time_range.end, e.name) for e in cuda_events(fn, flushed_calls))
    timelines, current = [], None
    for start, end, name in events:
        if "fill" in name.lower():  # the flush
            current = []
            timelines.append(current)
        elif current is not None:
            current.append((name, start, end))
    return [t for t in timelines if t]


def print_timelines(label: str, fn) -> None:
    """Median span, kernel time and idle time of a call of ``fn``, and each kernel's median."""
    timelines = call_timelines(fn)
    spans = [t[-1][2] - t[0][1] for t in timelines]
    busy = [sum(end - start for _, start, end in t) for t in timelines]
    print(f"  {label:6s} span {statistics.median(spans):8.1f} us, kernels {statistics.median(busy):8.1f},"
          f" idle {statistics.median(s - b for s, b in zip(spans, busy)):6.1f} ({len(timelines)} calls)")
    for i in range(min(len(t) for t in timelines)):
        durations = [t[i][2] - t[i][1] for t in timelines]
        gaps = [t[i][1] - t[i - 1][2] for t in timelines] if i else [0.0]
        print(f"    {timelines[0][i][0][:56]:56s} {statistics.median(durations):8.1f} us"
              f"  gap before {statistics.median(gaps):6.1f}")


def without_replays(fn):
    """``fn`` with `sageflash.kernels.replay` off: every call takes the ordinary path."""
    ordinary = lambda key, inputs, call, stream: call()  # noqa: E731

    def run():
        replays, kernels._REPLAYS = kernels._REPLAYS, ordinary
        try:
            fn()
        finally:
            kernels._REPLAYS = replays
    return run


def print_profile(fn, top: int, calls: int = CALLS) -> None:
    """cProfile's ``top`` functions by own time over ``calls`` calls of ``fn``."""
    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="1k,4k")
    parser.add_argument("--head-dim", default="128")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="print the N functions with the most own time of the eager call")
    parser.add_argument("--timeline", action="store_true",
                        help="kernel time and idle gaps of eager calls against CUDA-graph replays")
    parser.add_argument("--pv-accum", default="fp32+fp16")
    args = parser.parse_args(argv)
    for head_dim in [parse_size(x) for x in args.head_dim.split(",")]:
        for seq in [parse_size(x) for x in args.seq.split(",")]:
            for causal in (False, True):
                q, k, v = (torch.randn(args.batch, args.heads, seq, head_dim, dtype=torch.float16, device="cuda")
                           for _ in range(3))
                params = resolve_params(None, causal, True, False, args.pv_accum, "per_thread", head_dim=head_dim)
                pay = quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=True,
                                   pv_accum=params.pv_accum, smooth_v=False, v_kernel_order=True)
                q8, qs, k8, ks, _, v8, vs, vm = pay
                call = functools.partial(sageflash.sage_attn_sm89_fp16, q, k, v, is_causal=causal,
                                         pv_accum=args.pv_accum)
                print(f"# B={args.batch} H={args.heads} S={seq} D={head_dim} causal={causal} {args.pv_accum}")
                if args.timeline:
                    print_timelines("eager", call)
                    print_timelines("graph", captured(call, q.device))
                    continue
                stages = {
                    "e2e call": call,
                    "e2e, no replays": without_replays(call),
                    "check_call": lambda: check_call(q, k, v, None, causal, True, False, args.pv_accum,
                                                     "per_thread", "HND", False, None, "auto"),
                    "apply_overrides": lambda: apply_overrides(params),  # eager calls: after check_call
                    "quantize_qkv": lambda: quantize_qkv(q, k, v, granularity=params.granularity,
                                                         smooth_k=True, pv_accum=params.pv_accum,
                                                         smooth_v=False, v_kernel_order=True),
                    "attention kernel": lambda: attention_from_payloads(
                        q8, qs, k8, ks, v8, vs, vm, params=params, seq_q=seq, seq_k=seq,
                        head_dim=head_dim, out_dtype=q.dtype, v_kernel_order=True),
                    "torch.empty x1": lambda: torch.empty(args.batch, args.heads, seq, head_dim,
                                                          dtype=torch.int8, device="cuda"),
                }
                for name, fn in stages.items():
                    print(f"  host {name:18s} {host_us(fn):8.1f} us", flush=True)
                total = 0.0
                for name, us in gpu_kernels(call):
                    total += us
                    print(f"  gpu  {name:60s} {us:8.1f} us")
                print(f"  gpu  total {total:8.1f} us", flush=True)
                if args.cprofile:
                    print_profile(call, args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
