"""Where one `sage_attn_sm89_fp16` call spends its time: host (Python + launches) against GPU kernels.

    python benchmarks/profile_call.py --seq 1k,4k --head-dim 128

Host: the median wall time of each stage called back to back without synchronising (the GPU
queue absorbs the work, so this is the CPU cost alone), over many calls. GPU: `torch.profiler`'s
CUDA time of every kernel of one call. A call is host-bound when its host time exceeds its GPU
time. ``e2e, no replays`` is the same call with `sageflash.kernels.replay` off. ``--cprofile N``
also prints the N functions with the most own time over many eager calls (cProfile's overhead
inflates small Python functions; read it for proportions).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch

import sageflash
from sageflash import kernels
from sageflash.bench import parse_size
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


def gpu_kernels(fn) -> list[tuple[str, float]]:
    """(kernel name, CUDA microseconds) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name[:60], e.device_time_total) for e in events]


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
    args = parser.parse_args(argv)
    for head_dim in [parse_size(x) for x in args.head_dim.split(",")]:
        for seq in [parse_size(x) for x in args.seq.split(",")]:
            for causal in (False, True):
                q, k, v = (torch.randn(args.batch, args.heads, seq, head_dim, dtype=torch.float16, device="cuda")
                           for _ in range(3))
                params = resolve_params(None, causal, True, False, "fp32+fp16", "per_thread", head_dim=head_dim)
                pay = quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=True,
                                   pv_accum=params.pv_accum, smooth_v=False)
                q8, qs, k8, ks, _, v8, vs, vm = pay
                stages = {
                    "e2e call": lambda: sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal),
                    "e2e, no replays": without_replays(
                        lambda: sageflash.sage_attn_sm89_fp16(q, k, v, is_causal=causal)),
                    "check_call": lambda: check_call(q, k, v, None, causal, True, False, "fp32+fp16",
                                                     "per_thread", "HND", False, None, "auto"),
                    "apply_overrides": lambda: apply_overrides(params),  # eager calls: after check_call
                    "quantize_qkv": lambda: quantize_qkv(q, k, v, granularity=params.granularity,
                                                         smooth_k=True, pv_accum=params.pv_accum,
                                                         smooth_v=False),
                    "attention kernel": lambda: attention_from_payloads(
                        q8, qs, k8, ks, v8, vs, vm, params=params, seq_q=seq, seq_k=seq,
                        head_dim=head_dim, out_dtype=q.dtype),
                    "torch.empty x1": lambda: torch.empty(args.batch, args.heads, seq, head_dim,
                                                          dtype=torch.int8, device="cuda"),
                }
                print(f"# B={args.batch} H={args.heads} S={seq} D={head_dim} causal={causal}")
                for name, fn in stages.items():
                    print(f"  host {name:18s} {host_us(fn):8.1f} us", flush=True)
                total = 0.0
                for name, us in gpu_kernels(stages["e2e call"]):
                    total += us
                    print(f"  gpu  {name:60s} {us:8.1f} us")
                print(f"  gpu  total {total:8.1f} us", flush=True)
                if args.cprofile:
                    print_profile(stages["e2e call"], args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
