"""``sageflash bench``: attention throughput of sageflash against torch SDPA and SageAttention.

TOPS = 4·B·H·S²·D / time, halved when causal (H = query heads), counted for every provider the
same way (`attention_flops`). Each (shape, provider, knobs, mode) is timed with
`triton.testing.do_bench` (CUDA events, 256 MB L2 flush before every run) after warm-up, at least
`MIN_TIMED_CALLS` times, in ``--rounds`` rounds that go round robin over the shape's runs, and
reports the median (`run_shape` says why); the peak extra GPU memory of one call is measured on top
of the inputs already allocated, and the host time of one call (`host_us`: a row whose host time
exceeds its GPU time is host-bound); ``--telemetry`` adds the SM clock and board power (`Telemetry`).

Modes: ``e2e`` is what a user sees (quantization included); ``kernel`` quantizes once outside the
timed region and times the attention kernel on the payloads, replayed from a CUDA graph on a GPU
(its GPU time: a short kernel's host time would otherwise show through), one launch over all
heads (an e2e call of `kernels.CHUNKED_FROM_BYTES` or more runs in KV-head chunks, so there
e2e − kernel is the quantization and the chunking); ``graph`` (opt-in) is
the e2e call captured once in a CUDA graph and replayed, what a caller that captures its step (CUDA graphs,
``torch.compile(mode="reduce-overhead")``) sees: no host time. Providers without a quantization
step (SDPA, the official SageAttention call) have one timing, labelled ``e2e``, run eagerly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .op import LAYOUTS, as_hnd, quantize_for_attention, sage_attn_sm89_fp16, select_backend
from .params import PVAccum, QKGranularity, resolve_params

MODES = ("e2e", "kernel", "graph")
DEFAULT_MODES = ("e2e", "kernel")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BASELINE = "sdpa-cudnn"
CPU_BASELINE = "sdpa-flash"  # torch's flash attention runs on the CPU too
MIB = 1 << 20
DESCRIPTION = (__doc__ or "").partition("\n")[0].replace("``", "")  # empty under python -OO

# Shape presets: explicit flags win, then --quick (or the tiny CPU shape when running on the CPU).
PRESETS = {
    "full": dict(batch=4, heads=32, head_dim=[64, 128], seq=[1024 << i for i in range(6)]),
    "quick": dict(batch=2, heads=8, head_dim=[64, 128], seq=[1024, 4096]),
    "cpu": dict(batch=1, heads=2, head_dim=[64], seq=[128]),
}


# ---------------------------------------------------------------------------------------------
# Shapes, knobs, results


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    causal: bool


def attention_flops(shape: Shape) -> float:
    """4·B·H·S²·D (Q·Kᵀ and P·V, 2 FLOPs per multiply-add), halved when causal; H = query heads."""
    flops = 4.0 * shape.batch * shape.heads * shape.seq * shape.seq * shape.head_dim
    return flops / 2 if shape.causal else flops


def tops(shape: Shape, ms: float) -> float:
    """Throughput in TOPS (10¹² operations per second) of one call taking ``ms`` milliseconds."""
    return attention_flops(shape) / (ms * 1e-3) / 1e12


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The sageflash knobs one run uses (also passed to the official SageAttention SM89 call)."""

    pv_accum: PVAccum
    granularity: QKGranularity
    smooth_k: bool
    smooth_v: bool = False  # only through GGML_SAGE_SMOOTH_V (with pv_accum fp32)

    @property
    def label(self) -> str:
        return (f"{self.pv_accum}/{self.granularity}" + ("" if self.smooth_k else "/no-smooth-k")
                + ("/smooth-v" if self.smooth_v else ""))


@dataclasses.dataclass
class Result:
    shape: Shape
    dtype: str
    provider: str
    config: str
    mode: str
    layout: str = "HND"  # of q, k, v and the output (`--layout`)
    ms: float | None = None
    tops: float | None = None
    vs_baseline: float | None = None  # baseline time / this time, same shape: > 1 is faster
    baseline: str | None = None  # the provider vs_baseline compares with
    peak_mib: float | None = None
    x_qkv: float | None = None  # peak extra memory / bytes of q + k + v
    host_us: float | None = None  # CPU time to issue one call (`host_us`); past ms·1000: host-bound
    sm_mhz: float | None = None  # with --telemetry: median SM clock while timed (`Telemetry`)
    watts: float | None = None  # with --telemetry: median board power while timed
    error: str | None = None

    def as_row(self) -> dict:
        """A flat dict: the shape's fields, then the measurement (for JSON and CSV)."""
        row = dataclasses.asdict(self.shape)
        row.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shape"})
        return row

    @property
    def label(self) -> str:
        return " ".join(filter(None, [self.provider, self.config, f"[{self.mode}]"]))


# ---------------------------------------------------------------------------------------------
# Providers: build(q, k, v, causal, knobs, mode, layout) does the untimed work and returns the timed
# call; q, k, v come in ``layout`` ("HND" [B, H, S, D] or "NHD" [B, S, H, D]), as a caller holds them.


class ProviderSkipped(RuntimeError):
    """The provider cannot run here at all (e.g. not installed); its rows say why."""


def _sageflash_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "reference"


def captured(fn: Callable, device: torch.device) -> Callable:
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as capture requires);
    returns a call that replays it and gives the captured output. The replay holds ``fn``: the graph
    reads the tensors ``fn`` holds at their captured addresses (the kernel mode's payloads, which
    nothing else keeps), so they must live as long as it does."""
    if device.type != "cuda":
        raise ProviderSkipped("skipped: graph mode needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    replay.captured_call = fn
    return replay


def _build_sageflash(q, k, v, causal, knobs: Knobs, mode, layout):
    backend = _sageflash_backend(q.device)
    if mode in ("e2e", "graph"):
        call = functools.partial(sage_attn_sm89_fp16, q, k, v, is_causal=causal,
                                 smooth_k=knobs.smooth_k, pv_accum=knobs.pv_accum,
                                 granularity=knobs.granularity, tensor_layout=layout, backend=backend)
        return captured(call, q.device) if mode == "graph" else call
    params = resolve_params(None, causal, knobs.smooth_k, False, knobs.pv_accum, knobs.granularity,
                            head_dim=q.shape[-1])
    module = select_backend(backend, q.device)
    q_hnd, k_hnd, v_hnd = (as_hnd(x, layout) for x in (q, k, v))
    (q_int8, q_scale, k_int8, k_scale, _, v_fp8, v_scale, v_mean), order = quantize_for_attention(
        module, q_hnd, k_hnd, v_hnd, params)  # untimed
    attend = functools.partial(module.attention_from_payloads,
                               q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean, params=params,
                               seq_q=q_hnd.shape[2], seq_k=k_hnd.shape[2], head_dim=q.shape[-1],
                               out_dtype=q.dtype, out=as_hnd(torch.empty_like(q), layout), **order)
    return captured(attend, q.device) if q.device.type == "cuda" else attend


def _sdpa_builder(backend_name: str, cuda_only: bool = False):
    """A torch SDPA provider pinned to one backend, given NHD inputs as their ``[B, H, S, D]`` views
    (which its flash and cuDNN kernels read in place); ``cuda_only``: skipped off CUDA (cuDNN),
    where torch would raise "No viable backend" on the first call."""
    def build(q, k, v, causal, knobs, mode, layout):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if cuda_only and not q.is_cuda:
            raise ProviderSkipped(f"skipped: SDPA's {backend_name} backend needs CUDA tensors")
        q, k, v = (as_hnd(x, layout) for x in (q, k, v))
        backend = getattr(SDPBackend, backend_name)
        gqa = q.shape[1] != k.shape[1]

        def call():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                        enable_gqa=gqa)
        return call
    return build


@functools.cache
def _import_sageattention():
    """The official ``sageattention`` module, or ProviderSkipped saying why it is unavailable."""
    try:
        return importlib.import_module("sageattention")
    except Exception as exc:  # an ImportError, or a broken CUDA extension
        raise ProviderSkipped(f"skipped: sageattention not importable ({type(exc).__name__}: {exc})") from None


def _official(q):
    module = _import_sageattention()
    if not q.is_cuda:
        raise ProviderSkipped("skipped: the official SageAttention needs CUDA tensors")
    return module


# What SageAttention 2.2.0's ``sageattn`` runs on each arch (its core.py): kernel, P·V accumulation
# and Q/K granularity, so that its rows say what they compare (sm90's fp32+fp32 against our default).
SAGEATTN_KERNELS = {(8, 0): "sm80:fp16-pv/fp32/per_thread", (8, 6): "triton:fp16-pv/per_block",
                    (8, 9): "sm89:fp32+fp16/per_thread", (9, 0): "sm90:fp32+fp32/per_thread",
                    (12, 0): "sm89:fp32+fp16/per_warp"}


def _sageattention_config() -> str:
    """The `SAGEATTN_KERNELS` entry of the current GPU ("" without one, where the row is skipped)."""
    if not torch.cuda.is_available():
        return ""
    return SAGEATTN_KERNELS.get(torch.cuda.get_device_capability(), "")


def _build_sageattention(q, k, v, causal, knobs, mode, layout):
    """``sageattn``: the official entry point, which picks the kernel for the GPU's arch."""
    return functools.partial(_official(q).sageattn, q, k, v, tensor_layout=layout, is_causal=causal)


def _build_sageattention_sm89(q, k, v, causal, knobs: Knobs, mode, layout):
    """``sageattn_qk_int8_pv_fp8_cuda``: the official SM89 kernel with sageflash's knobs."""
    module = _official(q)
    if not hasattr(module, "sageattn_qk_int8_pv_fp8_cuda"):
        raise ProviderSkipped(f"skipped: sageattention {_version('sageattention')} has no "
                              "sageattn_qk_int8_pv_fp8_cuda (SageAttention 2)")
    return functools.partial(module.sageattn_qk_int8_pv_fp8_cuda, q, k, v, tensor_layout=layout,
                             is_causal=causal, qk_quant_gran=str(knobs.granularity),
                             pv_accum_dtype=str(knobs.pv_accum), smooth_k=knobs.smooth_k, smooth_v=knobs.smooth_v)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    build: Callable
    modes: tuple[str, ...] = ("e2e",)
    uses_knobs: bool = False
    config: Callable[[], str] = str  # the config column of a provider without knobs ("")

    def config_label(self, knobs: Knobs | None) -> str:
        return knobs.label if knobs else self.config()

    def run_modes(self, requested: list[str]) -> list[str]:
        """The requested modes it has; a provider with one timing runs it whatever was asked."""
        return [m for m in requested if m in self.modes] or list(self.modes[:1])


PROVIDERS = {p.name: p for p in [
    Provider("sageflash", _build_sageflash, MODES, uses_knobs=True),
    Provider("sdpa-flash", _sdpa_builder("FLASH_ATTENTION")),
    Provider("sdpa-cudnn", _sdpa_builder("CUDNN_ATTENTION", cuda_only=True)),
    Provider("sageattention", _build_sageattention, config=_sageattention_config),
    Provider("sageattention-sm89", _build_sageattention_sm89, uses_knobs=True),
]}
DEFAULT_PROVIDERS = ["sageflash", "sdpa-flash", "sdpa-cudnn", "sageattention", "sageattention-sm89"]


# ---------------------------------------------------------------------------------------------
# Timing and memory


MIN_TIMED_CALLS = 5  # per round, however long a call (a 100 ms call in a 33 ms budget had one sample)
HOST_CALLS = 5  # calls issued back to back to time the host's share of a call (`host_us`)


def time_ms(fn: Callable, warmup: float, rep: float, device: torch.device,
            telemetry: Telemetry | None = None) -> float:
    """Median milliseconds of ``fn``; ``warmup``/``rep`` are time budgets in ms, as in do_bench,
    raised so that at least one warm-up call and `MIN_TIMED_CALLS` timed calls run. ``telemetry``
    samples the warm-up and timed calls only, not the first calls (a compile leaves the GPU idle)."""
    call_ms = _one_call_ms(fn, device)
    # do_bench divides the budget by its own estimate of a flushed call, which `_one_call_ms`
    # measures the same way: one call's worth of margin keeps MIN_TIMED_CALLS where it was raised.
    warmup, rep = max(warmup, call_ms), max(rep, (MIN_TIMED_CALLS + 1) * call_ms)
    with telemetry or contextlib.nullcontext():
        return _timed_median_ms(fn, warmup, rep, call_ms, device)


def _timed_median_ms(fn: Callable, warmup: float, rep: float, call_ms: float, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    for _ in range(int(warmup / call_ms)):
        fn()
    times = []
    for _ in range(int(rep / call_ms)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _one_call_ms(fn: Callable, device: torch.device) -> float:
    """The time of one call after a first (which compiles, or records a replay), timed as
    do_bench estimates a call: on a GPU with its L2 flush (a 0.1 ms share of a short call)."""
    fn()
    if device.type == "cuda":
        flush = _l2_flush()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        flush()
        fn()
        end.record()
        end.synchronize()
        return max(start.elapsed_time(end), 1e-6)
    start = time.perf_counter()
    fn()
    return max((time.perf_counter() - start) * 1e3, 1e-6)


def _l2_flush() -> Callable[[], None]:
    """do_bench's L2 flush: zeroing the 256 MB buffer its driver keeps for that."""
    from triton.runtime import driver
    return functools.partial(driver.active.clear_cache, driver.active.get_empty_cache_for_benchmark())


def host_us(fn: Callable, device: torch.device) -> float | None:
    """Median microseconds the CPU takes to issue one call of ``fn`` (Python, checks, allocations,
    launches) over `HOST_CALLS` calls issued back to back into an idle GPU queue, so that no launch
    waits for the GPU. When it exceeds the row's GPU time the row is host-bound: its time follows
    the CPU, not the kernels. None off CUDA, where a call is all host time."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    times = []
    for _ in range(HOST_CALLS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def timer_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"triton.testing.do_bench median (CUDA events, L2 flushed before each run), "
                f">= {MIN_TIMED_CALLS} timed calls per round")
    return f"time.perf_counter median (CPU, no cache flush), >= {MIN_TIMED_CALLS} timed calls per round"


def peak_extra_bytes(fn: Callable, device: torch.device) -> int | None:
    """Peak GPU memory one call of ``fn`` allocates beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


class Telemetry:
    """The GPU's SM clock (MHz) and board power (W) while a run is timed: NVML readings
    (`torch.cuda.clock_rate` / `power_draw`, which need nvidia-ml-py) every `SAMPLE_S` from a
    thread, one more at the end. An H200 under sustained tensor work holds its 700 W cap by
    lowering its clock, from 1980 MHz to 1500-1800 depending on the kernel (cuDNN's fp16 kernel
    lower than sageflash's, NOTES v22), so the clock says how much of a ratio is the power cap.
    NVML averages each reading over its own period (1/6 s to 1 s): a row timed for less mostly
    shows the runs before it."""

    SAMPLE_S = 0.05

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        """Why the clock and power cannot be read on ``device``, or None when they can."""
        if device.type != "cuda":
            return "needs a CUDA GPU"
        try:
            torch.cuda.clock_rate(device)
            torch.cuda.power_draw(device)
        except Exception as exc:  # no nvidia-ml-py, or NVML refused (e.g. a virtualised GPU)
            return f"cannot read the GPU's clock and power through NVML ({short_error(exc)})"
        return None

    def read(self) -> tuple[float, float]:
        return float(torch.cuda.clock_rate(self.device)), torch.cuda.power_draw(self.device) / 1e3

    def _sample_until_stopped(self):
        while not self._stop.wait(self.SAMPLE_S):
            self.samples.append(self.read())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.samples.append(self.read())


def short_error(exc: BaseException) -> str:
    if isinstance(exc, ProviderSkipped):
        return str(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int
    heads: int
    kv_heads: int
    head_dims: list[int]
    seqs: list[int]
    causals: list[bool]
    providers: list[str]  # the baseline first, so every later row of a shape can be compared to it
    modes: list[str]
    knobs: list[Knobs]
    baseline: str
    dtype: str
    warmup: float
    rep: float  # timed budget per run, shared by its rounds
    rounds: int
    seed: int
    telemetry: bool = False  # sample the SM clock and board power while timing (`Telemetry`)
    layout: str = "HND"  # of the inputs: "HND" [B, H, S, D] or "NHD" [B, S, H, D] (`--layout`)

    @property
    def config_width(self) -> int:
        """The table's config column: wide enough for every run's label."""
        return max([CONFIG_WIDTH, *(len(p.config_label(knobs)) for p, knobs, _ in self.runs())])

    def runs(self):
        """(provider, knobs or None, mode) in run order."""
        for name in self.providers:
            provider = PROVIDERS[name]
            for knobs in (self.knobs if provider.uses_knobs else [None]):
                for mode in provider.run_modes(self.modes):
                    yield provider, knobs, mode


def make_inputs(settings: Settings, seq: int, head_dim: int, device: torch.device):
    """Fresh standard-normal q [B,H,S,D], k and v [B,Hk,S,D] (or [B,S,H,D] and [B,S,Hk,D] with
    ``layout="NHD"``, contiguous either way) from a seeded generator on ``device``."""
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    dtype = DTYPES[settings.dtype]
    shapes = [(settings.batch, h, seq, head_dim) if settings.layout == "HND" else (settings.batch, seq, h, head_dim)
              for h in (settings.heads, settings.kv_heads, settings.kv_heads)]
    return tuple(torch.randn(s, generator=gen, dtype=dtype, device=device) for s in shapes)


def time_run(provider: Provider, knobs: Knobs | None, mode: str, inputs, shape: Shape, settings: Settings,
             device: torch.device, first_round: bool,
             telemetry: Telemetry | None = None) -> tuple[float, int | None, float | None]:
    """One round of one (provider, knobs, mode) on one shape: median ms, then in the first round
    the peak extra bytes (e2e only: the graph and kernel modes replay a CUDA graph, which
    allocates nothing, so the memory of a call is the e2e row's) and the host µs (`host_us`)."""
    q, k, v = inputs
    fn = provider.build(q, k, v, shape.causal, knobs, mode, settings.layout)
    ms = time_ms(fn, settings.warmup, settings.rep / settings.rounds, device, telemetry)
    if not first_round:
        return ms, None, None
    return ms, peak_extra_bytes(fn, device) if mode == "e2e" else None, host_us(fn, device)


def blank_rows(shape: Shape, settings: Settings, error: str | None = None) -> list[Result]:
    """One unmeasured row per run of ``shape``, in run order (with ``error``, each says why)."""
    return [Result(shape, settings.dtype, provider.name, provider.config_label(knobs), mode, settings.layout,
                   baseline=settings.baseline, error=error) for provider, knobs, mode in settings.runs()]


def run_shape(shape: Shape, inputs, settings: Settings, device: torch.device) -> list[Result]:
    """Every run of one shape, timed in `Settings.rounds` interleaved rounds; a row's time is the
    median of its rounds and any failure becomes its error.

    Round robin, not one run after another: under sustained tensor work an H200 reaches its 700 W
    cap and its SM clock drops from 1980 to 1500-1900 MHz (benchmarks/NOTES.md v8), so a run timed
    right after a long one measured up to 15% slower than the same work timed first."""
    runs = list(settings.runs())
    results = blank_rows(shape, settings)
    samples = [[] for _ in runs]
    readings = [[] for _ in runs]  # (MHz, W) with --telemetry
    for round_index in range(settings.rounds):
        for (provider, knobs, mode), result, times, read in zip(runs, results, samples, readings):
            if result.error is not None:
                continue
            telemetry = Telemetry(device) if settings.telemetry else None
            try:
                ms, peak, host = time_run(provider, knobs, mode, inputs, shape, settings, device,
                                          first_round=round_index == 0, telemetry=telemetry)
            except Exception as exc:
                result.error = short_error(exc)
            if result.error is not None:  # out of the except block: its traceback held the call's tensors
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # after an OOM, give the next provider a clean pool
                continue
            times.append(ms)
            if telemetry is not None:
                read += telemetry.samples
            if host is not None:
                result.host_us = host
            if peak is not None:
                result.peak_mib = peak / MIB
                result.x_qkv = peak / sum(t.numel() * t.element_size() for t in inputs)
    # The baseline is the baseline provider's first row (its first knobs and mode); if that failed,
    # no row of the shape gets a ratio (never one against another of its rows).
    baseline, baseline_times = next((r, t) for r, t in zip(results, samples) if r.provider == settings.baseline)
    baseline_ms = None if baseline.error is not None else statistics.median(baseline_times)
    for result, times, read in zip(results, samples, readings):
        if result.error is None:
            result.ms = statistics.median(times)
            if read:
                result.sm_mhz, result.watts = (statistics.median(values) for values in zip(*read))
            result.tops = tops(shape, result.ms)
            if baseline_ms is not None:
                result.vs_baseline = baseline_ms / result.ms
    return results


def run_benchmarks(settings: Settings, device: torch.device, on_result: Callable[[Result], None]) -> None:
    """Every shape x run; calls ``on_result`` for each row as its shape completes."""
    for head_dim, seq in itertools.product(settings.head_dims, settings.seqs):
        try:
            inputs, error = make_inputs(settings, seq, head_dim, device), None
        except Exception as exc:  # e.g. out of memory: every run of the shape says so, the next shapes run
            inputs, error = None, f"inputs: {short_error(exc)}"
        if error is not None and device.type == "cuda":
            torch.cuda.empty_cache()
        for causal in settings.causals:
            shape = Shape(settings.batch, settings.heads, settings.kv_heads, seq, head_dim, causal)
            rows = run_shape(shape, inputs, settings, device) if error is None else blank_rows(shape, settings, error)
            for result in rows:
                on_result(result)
        del inputs


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


CONFIG_WIDTH = 22  # the config column's least width (`Settings.config_width` widens it)


def table_columns(baseline: str, telemetry: bool = False, config_width: int = CONFIG_WIDTH):
    """(header, width, cell) for every column of the stdout table; the clock and power with ``telemetry``."""
    return [
        ("B", 3, lambda r: str(r.shape.batch)),
        ("H", 4, lambda r: str(r.shape.heads)),
        ("Hkv", 4, lambda r: str(r.shape.kv_heads)),
        ("S", 6, lambda r: str(r.shape.seq)),
        ("D", 4, lambda r: str(r.shape.head_dim)),
        ("causal", 6, lambda r: "yes" if r.shape.causal else "no"),
        ("provider", 18, lambda r: r.provider),
        ("config", config_width, lambda r: r.config),
        ("mode", 6, lambda r: r.mode),
        ("ms", 9, lambda r: _fmt(r.ms, ".4g")),
        ("host µs", 7, lambda r: _fmt(r.host_us, ".0f")),
        ("TOPS", 9, lambda r: _fmt(r.tops, ".4g")),
        (f"vs {baseline}", max(6, len(baseline) + 3), lambda r: _fmt(r.vs_baseline, ".2f")),
        ("peak MiB", 9, lambda r: _fmt(r.peak_mib, ".1f")),
        ("xQKV", 6, lambda r: _fmt(r.x_qkv, ".2f")),
        *([("MHz", 5, lambda r: _fmt(r.sm_mhz, ".0f")), ("W", 4, lambda r: _fmt(r.watts, ".0f"))]
          if telemetry else []),
    ]


_MEASURED_FROM = 9  # columns from "ms" on: replaced by the error text on a failed row


def format_header(baseline: str, telemetry: bool = False, config_width: int = CONFIG_WIDTH) -> str:
    return "  ".join(f"{h:>{w}}" for h, w, _ in table_columns(baseline, telemetry, config_width)).rstrip()


def format_row(result: Result, baseline: str, telemetry: bool = False, config_width: int = CONFIG_WIDTH) -> str:
    columns = table_columns(baseline, telemetry, config_width)
    cells = [f"{cell(result):>{w}}" for _, w, cell in columns[:_MEASURED_FROM]]
    if result.error is not None:
        return "  ".join([*cells, result.error])
    cells += [f"{cell(result):>{w}}" for _, w, cell in columns[_MEASURED_FROM:]]
    return "  ".join(cells)


def environment(device: torch.device, settings: Settings) -> dict:
    """What the numbers were measured on and with (the JSON ``meta``)."""
    meta = {"device": f"cpu ({platform.machine()})", "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _version("triton"), "sageflash": __version__,
            "sageattention": _version("sageattention"), "timer": timer_description(device),
            "flops": "4*B*H*S^2*D, halved when causal (H = query heads)"}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        meta.update(device=torch.cuda.get_device_name(device), capability=f"sm_{major}{minor}")
        from .kernels.launch import device_capability
        compiled_for = device_capability(device)
        if compiled_for != major * 10 + minor:  # TRITON_OVERRIDE_ARCH: another arch's code path
            meta["kernels_compiled_for"] = f"sm_{compiled_for}"
    meta["ggml_sage_env"] = {name: value for name, value in os.environ.items() if name.startswith("GGML_SAGE_")}
    settings_dict = dataclasses.asdict(settings)
    settings_dict["knobs"] = [k.label for k in settings.knobs]
    meta["settings"] = settings_dict
    return meta


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def preamble(meta: dict, baseline: str) -> str:
    settings = meta["settings"]
    device = meta["device"] + (f" ({meta['capability']})" if "capability" in meta else "")
    overrides = " ".join(f"{name}={value}" for name, value in meta["ggml_sage_env"].items())
    return "\n".join([
        f"# sageflash bench on {device}: torch {meta['torch']}, triton {meta['triton']}, "
        f"sageflash {meta['sageflash']}, {settings['dtype']}, {settings['layout']} "
        f"{LAYOUTS[settings['layout']]}",
        f"# timer: {meta['timer']}; warmup {settings['warmup']:g} ms, rep {settings['rep']:g} ms "
        f"in {settings['rounds']} interleaved rounds (median)",
        f"# TOPS = {meta['flops']}; vs {baseline} = its time / this time on the same shape",
        *([f"# set in the environment (sageflash reads them): {overrides}"] if overrides else []),
    ])


def write_json(path: str, meta: dict, results: list[Result]) -> None:
    _parent(path)
    Path(path).write_text(json.dumps({"meta": meta, "results": [r.as_row() for r in results]}, indent=2) + "\n")


def write_csv(path: str, results: list[Result]) -> None:
    _parent(path)
    fields = [*(f.name for f in dataclasses.fields(Shape)),
              *(f.name for f in dataclasses.fields(Result) if f.name != "shape")]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.as_row() for r in results)


def write_plot(path: str, results: list[Result]) -> None:
    """TOPS against S, one panel per (D, causal), one line per provider/config/mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.tops is not None]
    panels = sorted({(r.shape.head_dim, r.shape.causal) for r in measured})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (head_dim, causal) in zip(axes[0], panels):
        lines: dict[str, list] = {}
        for r in measured:
            if (r.shape.head_dim, r.shape.causal) == (head_dim, causal):
                lines.setdefault(r.label, []).append((r.shape.seq, r.tops))
        for label, points in lines.items():
            seqs, values = zip(*sorted(points))
            ax.plot(seqs, values, marker="o", label=label)
        ticks = sorted({r.shape.seq for r in measured})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in ticks])
        ax.set_ylim(bottom=0)
        ax.set(title=f"D={head_dim}" + (", causal" if causal else ""), xlabel="S", ylabel="TOPS")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    _parent(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parent(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """A positive count, with an optional k suffix (×1024): ``4k`` -> 4096."""
    word = text.strip().lower()
    scale = 1024 if word.endswith("k") else 1
    try:
        value = int(word.removesuffix("k")) * scale
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, optionally with a k suffix "
                                         f"(1k = 1024), got {text!r}")
    return value


def _list_of(convert: Callable, what: str):
    """An argparse type for comma lists; repeat the flag to append (``action="append"``)."""
    def parse(text: str) -> list:
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {text!r}")
        try:
            return [convert(item.strip()) for item in items]
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = what
    return parse


def _choice(choices) -> Callable:
    def convert(word: str) -> str:
        if word not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {word!r}")
        return word
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    shapes = parser.add_argument_group("shapes (defaults: B=4 H=32 D=64,128 S=1k..32k; --quick: B=2 "
                                       "H=8 S=1k,4k; on the CPU: B=1 H=2 D=64 S=128)")
    shapes.add_argument("--batch", type=parse_size, help="batch size B")
    shapes.add_argument("--heads", type=parse_size, help="query heads H")
    shapes.add_argument("--kv-heads", type=parse_size, help="key/value heads (GQA; default: H)")
    shapes.add_argument("--head-dim", action="append", type=_list_of(parse_size, "head dims"),
                        help="head dims D, comma list or repeated")
    shapes.add_argument("--seq", action="append", type=_list_of(parse_size, "sequence lengths"),
                        help="sequence lengths S (Sq = Sk), comma list or repeated, e.g. 1k,4k,16k")
    shapes.add_argument("--causal", choices=("on", "off", "both"), default="both")
    shapes.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    shapes.add_argument("--layout", choices=tuple(LAYOUTS), default="HND",
                        help="q, k, v and the output as [B, H, S, D] (HND, ggml's; default) or [B, S, H, D] "
                             "(NHD: flash-attn's and diffusers'), read in place by every provider")
    shapes.add_argument("--quick", action="store_true", help="a small preset for a smoke run")

    runs = parser.add_argument_group("providers")
    runs.add_argument("--providers", action="append", type=_list_of(_choice(PROVIDERS), "providers"),
                      help=f"comma list of {', '.join(PROVIDERS)} (default: all)")
    runs.add_argument("--baseline", choices=tuple(PROVIDERS),
                      help=f"the provider every row is compared to, always timed (first); its first knobs "
                           f"and mode when it has several (default: {BASELINE}; on the CPU {CPU_BASELINE})")
    runs.add_argument("--modes", action="append", type=_list_of(_choice(MODES), "modes"),
                      help="e2e (quantization included), kernel (the attention on ready payloads: GPU time), "
                           "graph (e2e replayed from a CUDA graph: no host time); default: e2e,kernel")
    runs.add_argument("--pv-accum", action="append",
                      type=_list_of(lambda w: PVAccum.parse(w, "--pv-accum"), "pv_accum values"),
                      help="sageflash P·V accumulation, comma list (default: fp32+fp16)")
    runs.add_argument("--granularity", action="append",
                      type=_list_of(lambda w: QKGranularity.parse(w, "--granularity"), "granularities"),
                      help="sageflash Q/K scale groups, comma list (default: per_thread)")
    runs.add_argument("--smooth-k", action=argparse.BooleanOptionalAction, default=True,
                      help="subtract K's mean before int8 (default: on)")

    timing = parser.add_argument_group("timing and output")
    timing.add_argument("--warmup", type=float, default=25.0, help="warm-up budget in ms (default 25)")
    timing.add_argument("--rep", type=float, default=100.0, help="timed budget in ms (default 100)")
    timing.add_argument("--rounds", type=int, default=3,
                        help="time a shape's runs round robin this many times, each with rep/rounds ms, and "
                             "report the median: spreads a power-capped GPU's clock drops over every "
                             "provider (default 3)")
    timing.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    timing.add_argument("--telemetry", action="store_true",
                        help="also report each row's median SM clock (MHz) and board power (W), read through "
                             "NVML (needs nvidia-ml-py): how far a power cap lowered the clock")
    timing.add_argument("--json", metavar="PATH", help="write meta + rows as JSON")
    timing.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    timing.add_argument("--plot", metavar="PATH.png", help="plot TOPS against S (needs matplotlib)")
    timing.add_argument("--allow-cpu", action="store_true",
                        help="without a CUDA GPU, run a tiny CPU smoke benchmark (reference backend)")
    return parser


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark attention throughput (TOPS)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def _flatten(lists: list[list] | None) -> list | None:
    return None if lists is None else list(dict.fromkeys(itertools.chain.from_iterable(lists)))


def settings_from_args(args: argparse.Namespace, device: torch.device) -> Settings:
    """Fill unset shape flags from the preset; ValueError on an inconsistent combination."""
    preset = PRESETS["cpu" if device.type == "cpu" else "quick" if args.quick else "full"]
    head_dims, seqs = _flatten(args.head_dim), _flatten(args.seq)
    heads = args.heads or preset["heads"]
    kv_heads = args.kv_heads or heads
    if heads % kv_heads:
        preset_heads = "" if args.heads else ", the preset's"
        raise ValueError(f"--heads ({heads}{preset_heads}) must be a multiple of --kv-heads ({kv_heads})")
    if not (0 <= args.warmup < math.inf and 0 < args.rep < math.inf):
        raise ValueError(f"--warmup must be >= 0 and --rep > 0 (finite ms), got {args.warmup:g} and {args.rep:g}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    # The baseline is always timed, first: SDPA's flash backend on the CPU, where cuDNN cannot run.
    baseline = args.baseline or (CPU_BASELINE if device.type == "cpu" else BASELINE)
    providers = list(dict.fromkeys([baseline, *(_flatten(args.providers) or DEFAULT_PROVIDERS)]))
    knobs = list(dict.fromkeys(resolved_knobs(pv, gran, args.smooth_k) for pv, gran in itertools.product(
        _flatten(args.pv_accum) or [PVAccum.FP32_FP16], _flatten(args.granularity) or [QKGranularity.PER_THREAD])))
    causals = {"on": [True], "off": [False], "both": [False, True]}[args.causal]
    return Settings(batch=args.batch or preset["batch"], heads=heads, kv_heads=kv_heads,
                    head_dims=head_dims or preset["head_dim"], seqs=seqs or preset["seq"],
                    causals=causals, providers=providers, modes=_flatten(args.modes) or list(DEFAULT_MODES),
                    knobs=knobs, baseline=baseline, dtype=args.dtype, warmup=args.warmup, rep=args.rep,
                    rounds=args.rounds, seed=args.seed, telemetry=args.telemetry, layout=args.layout)


def resolved_knobs(pv_accum, granularity, smooth_k: bool) -> Knobs:
    """The knobs a run really uses, after the ``GGML_SAGE_*`` overrides, so the labels tell the truth."""
    params = resolve_params(None, False, smooth_k, False, pv_accum, granularity)
    return Knobs(params.pv_accum, params.granularity, params.smooth_k, params.smooth_v)


def pick_device(allow_cpu: bool) -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if allow_cpu else None


def _fail(message: str) -> int:
    print(f"sageflash bench: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: 0 when at least one row was measured, 1 when none, 2 on bad usage."""
    device = pick_device(args.allow_cpu)
    if device is None:
        return _fail("needs a CUDA GPU (none found); --allow-cpu runs a tiny CPU smoke benchmark instead")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before a long run, used at its end)
        except ImportError:
            return _fail("--plot needs matplotlib: pip install matplotlib (or 'sageflash[plot]')")
    if args.telemetry and (reason := Telemetry.unavailable_reason(device)):
        return _fail(f"--telemetry {reason}")
    try:
        settings = settings_from_args(args, device)
    except ValueError as exc:
        return _fail(str(exc))

    for path in filter(None, (args.json, args.csv, args.plot)):  # checked before a long run, not after it
        if reason := unwritable(path):
            return _fail(f"cannot write {path}: {reason}")

    meta = environment(device, settings)
    print(preamble(meta, settings.baseline))
    print(format_header(settings.baseline, settings.telemetry, settings.config_width), flush=True)
    results = []

    def report(result: Result) -> None:
        results.append(result)
        print(format_row(result, settings.baseline, settings.telemetry, settings.config_width), flush=True)
    interrupted = False
    try:
        run_benchmarks(settings, device, report)
    except KeyboardInterrupt:  # keep what was measured: the shapes completed so far
        interrupted = True
        print(f"# interrupted: writing the {len(results)} rows of the shapes completed", file=sys.stderr)
    try:
        if args.json:
            write_json(args.json, meta, results)
        if args.csv:
            write_csv(args.csv, results)
        if args.plot:
            write_plot(args.plot, results)
    except OSError as exc:
        return _fail(str(exc))
    if interrupted:
        return 130
    return 0 if any(r.ms is not None for r in results) else 1


def unwritable(path: str) -> str | None:
    """Why an output file cannot be written at ``path`` (its folder is created), or None."""
    target = Path(path)
    if target.is_dir():
        return "it is a directory"
    existed = target.exists()
    try:  # opened, not asked (os.access says yes to root, and nothing of a file system it cannot write)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    if not existed:
        target.unlink()
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m sageflash.bench``: the same as ``sageflash bench``."""
    parser = add_arguments(argparse.ArgumentParser(prog="sageflash bench", description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
