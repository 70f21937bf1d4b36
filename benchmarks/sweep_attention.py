"""Launch-configuration sweep of the Triton attention kernel: kernel-only TOPS of each candidate.

    python benchmarks/sweep_attention.py --head-dim 64,128 --seq 4k,16k --json sweep.json

For every (head dim, sequence, causal, pv_accum) it quantizes fresh random inputs once, runs each
candidate `LaunchConfig` on the same payloads, checks its output against the pointer-load launch
(NMSE, poisoned output first) and times it replayed from a CUDA graph with `triton.testing.do_bench`
(median, L2 flushed: GPU time only), beside cuDNN SDPA on the same inputs. Kernels are compiled
first in parallel worker processes (Triton's cache), so the timing loop does not wait on the compiler.
This is how `launch_config`'s table is chosen: see benchmarks/NOTES.md. With
``TRITON_OVERRIDE_ARCH=sm89`` on a Hopper GPU it compiles and times Ada's code path (the
``m*-k*-w*`` candidates), assembled for the Hopper device: a proxy for an Ada card's relative timings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import sys

import torch

from sageflash.bench import captured, parse_size
from sageflash.kernels.attention import LaunchConfig, attention_from_payloads, launch_config
from sageflash.kernels.launch import device_capability
from sageflash.params import resolve_params

# Candidates by name, as changes to launch_config's choice for the shape and knobs ("auto"); each
# names its loads, stages and register cap in full, so that it means the same whatever auto is.
CANDIDATES = {
    "auto": None,
    "ptr": dict(tma=False, max_registers=None),  # auto's stages
    "tma": dict(tma=True, max_registers=None),
    **{f"{loads}-s{stages}": dict(tma=loads == "tma", num_stages=stages, max_registers=None)
       for loads in ("ptr", "tma") for stages in (2, 3, 4)},
    "tma-m128w8": dict(tma=True, block_m=128, num_warps=8, max_registers=None),
    "tma-m128w8-s3": dict(tma=True, block_m=128, num_warps=8, num_stages=3, max_registers=None),
    # Register caps for more programs per SM (offline, sm_90: 254 registers and 107 KB of shared
    # memory hold D=128 to 2 per SM; <=168 and 2 stages fit 3, with 17-132 spill stores; D=64 has
    # 167 and 71 KB, 3 per SM; <=128 and 3 stages fit 4, with 2).
    "ptr-s2-r168": dict(tma=False, num_stages=2, max_registers=168),
    "ptr-s4-r168": dict(tma=False, num_stages=4, max_registers=168),  # D=64's short-sequence launch, capped
    "tma-s2-r168": dict(tma=True, num_stages=2, max_registers=168),
    "ptr-s3-r128": dict(tma=False, num_stages=3, max_registers=128),
    # More TMA stages under the cap: the loads issue further ahead (ncu, v17: at 2 stages a warp
    # waits on its next K tile every step). D=64 keeps 3 programs per SM with 3-4 stages; D=128
    # needs 64-key steps for that.
    "tma-s3-r168": dict(tma=True, num_stages=3, max_registers=168),
    "tma-s4-r168": dict(tma=True, num_stages=4, max_registers=168),
    "tma-s2-r128": dict(tma=True, num_stages=2, max_registers=128),  # 4 programs per SM at D=64
    "tma-s3-r128": dict(tma=True, num_stages=3, max_registers=128),
    "tma-k64-s3-r168": dict(tma=True, keys=64, num_stages=3, max_registers=168),
    "tma-k64-s4-r168": dict(tma=True, keys=64, num_stages=4, max_registers=168),
    # Tiles for the mma.sync path (Ada; on Hopper under TRITON_OVERRIDE_ARCH=sm89). Triton splits a
    # dot's warps along N when N > M, so a 64x128 score tile, or a P·V product with D > BLOCK_M,
    # spreads each row over 4 warps: the row max and P then cross warps through shared memory.
    **{f"m{rows}-k{keys}-w{warps}-s{stages}": dict(tma=False, block_m=rows, keys=keys, num_warps=warps,
                                                     num_stages=stages, max_registers=None)
       for rows, keys, warps in ((64, 128, 4), (64, 64, 4), (128, 64, 8), (128, 64, 4)) for stages in (2, 3, 4)},
    "m128-k64-w8-s3-r128": dict(tma=False, block_m=128, keys=64, num_warps=8, num_stages=3, max_registers=128),
    "m128-k64-w8-s2-r128": dict(tma=False, block_m=128, keys=64, num_warps=8, num_stages=2, max_registers=128),
}
BATCH, HEADS = 4, 32


def candidate(name: str, padded: int, params, seq: int, arch: int | None = None) -> LaunchConfig:
    """The candidate's launch; ``arch`` (major*10+minor) defaults to what the kernels compile for
    here (`device_capability`: the GPU's, or TRITON_OVERRIDE_ARCH's)."""
    arch = device_capability(torch.device("cuda")) if arch is None else arch
    base = launch_config(padded, arch, params.pv_accum.code, params.is_causal, seq)
    return base if CANDIDATES[name] is None else base._replace(**CANDIDATES[name])


def payloads(seq: int, head_dim: int, causal: bool, pv_accum: str, seed: int):
    from sageflash.kernels import quantize_qkv

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, seq, head_dim, generator=gen, dtype=torch.float16, device="cuda")
               for _ in range(3))
    params = resolve_params(None, causal, True, False, pv_accum, "per_thread", head_dim=head_dim)
    q8, qs, k8, ks, _, v8, vs, vm = quantize_qkv(q, k, v, granularity=params.granularity, smooth_k=True,
                                                  pv_accum=params.pv_accum, smooth_v=False,
                                                  v_kernel_order=True)
    return (q, k, v), (q8, qs, k8, ks, v8, vs, vm), params


def run_attention(args, params, seq, head_dim, config, out=None):
    return attention_from_payloads(*args, params=params, seq_q=seq, seq_k=seq, head_dim=head_dim,
                                   out_dtype=torch.float16, out=out, launch=config, v_kernel_order=True)


def compile_job(job) -> str:
    """Worker: one tiny launch per (config name, head dim, causal, pv_accum) fills Triton's cache."""
    name, head_dim, causal, pv_accum = job
    try:  # 256 tokens with the launch of long sequences (the specialisation is the same)
        _, args, params = payloads(256, head_dim, causal, pv_accum, 0)
        run_attention(args, params, 256, head_dim, candidate(name, args[2].shape[-1], params, 1 << 20))
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # reported, the sweep goes on
        return f"{job}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def nmse(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return float(((x - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-300))


def main(argv=None) -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", default="64,128")
    parser.add_argument("--seq", default="4k,16k")
    parser.add_argument("--causal", choices=("on", "off", "both"), default="both")
    parser.add_argument("--pv-accum", default="fp32+fp16")
    parser.add_argument("--configs", default=",".join(CANDIDATES))
    parser.add_argument("--rep", type=float, default=100.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    head_dims = [parse_size(x) for x in args.head_dim.split(",")]
    seqs = [parse_size(x) for x in args.seq.split(",")]
    causals = {"on": [True], "off": [False], "both": [False, True]}[args.causal]
    pvs = args.pv_accum.split(",")
    names = args.configs.split(",")

    jobs = list(itertools.product(names, head_dims, causals, pvs))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=ctx) as pool:
        for problem in pool.map(compile_job, jobs):
            if problem:
                print("compile failed:", problem, flush=True)

    rows = []
    print(f"{'D':>4} {'S':>6} {'causal':>6} {'pv':>10} {'config':>12} {'ms':>8} {'TOPS':>7} {'vs cuDNN':>8} "
          f"{'NMSE':>9}")
    for head_dim, seq, causal, pv in itertools.product(head_dims, seqs, causals, pvs):
        inputs, pay, params = payloads(seq, head_dim, causal, pv, seed=seq + head_dim)
        flops = 4.0 * BATCH * HEADS * seq * seq * head_dim / (2 if causal else 1)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=causal)
        base_ms = triton.testing.do_bench(cudnn, rep=args.rep, return_mode="median")
        reference = run_attention(pay, params, seq, head_dim, candidate("ptr", pay[2].shape[-1], params, seq))
        for name in names:
            config = candidate(name, pay[2].shape[-1], params, seq)
            row = dict(head_dim=head_dim, seq=seq, causal=causal, pv_accum=pv, config=name, launch=config._asdict())
            try:
                out = torch.full_like(reference, float("nan"))
                run_attention(pay, params, seq, head_dim, config, out=out)
                row["nmse_vs_ptr"] = nmse(out, reference)
                # From a CUDA graph: at 1k a launch's host time (TMA descriptors) can exceed its GPU time.
                ms = triton.testing.do_bench(
                    captured(lambda: run_attention(pay, params, seq, head_dim, config), torch.device("cuda")),
                    rep=args.rep, return_mode="median")
                row.update(ms=ms, tops=flops / ms / 1e9, vs_cudnn=base_ms / ms)
                print(f"{head_dim:4d} {seq:6d} {str(causal):>6} {pv:>10} {name:>12} {ms:8.3f} {row['tops']:7.1f} "
                      f"{row['vs_cudnn']:8.2f} {row['nmse_vs_ptr']:9.1e}", flush=True)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"{head_dim:4d} {seq:6d} {str(causal):>6} {pv:>10} {name:>12} error {row['error']}", flush=True)
            rows.append(row)
        rows.append(dict(head_dim=head_dim, seq=seq, causal=causal, config="sdpa-cudnn", ms=base_ms,
                         tops=flops / base_ms / 1e9))
        print(f"{head_dim:4d} {seq:6d} {str(causal):>6} {'':>10} {'sdpa-cudnn':>12} {base_ms:8.3f} "
              f"{flops / base_ms / 1e9:7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "arch": device_capability(torch.device("cuda")),
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
