"""``sageflash run``: the test-sageflash tool (SPEC §10).

Runs the op on a built-in case or a dump, times it against torch SDPA and compares it with exact
attention (``--compare flash``) or the official SageAttention output of a dump (``--compare sage``).
The report lines are parsed by scripts: `format_case`, `format_summary` and `parse_report` are
the one definition of that format.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from .. import dumps
from ..cases import CASES, DEFAULT_CASE
from ..op import sage_attn_sm89_fp16
from ..params import PVAccum, QKGranularity, SageParams, resolve_params
from ..reference.attention import hidden_by_mask, visible_keys

KNOB_FLAGS = ("granularity", "smooth_k", "smooth_v", "pv_accum")
REFERENCE_NAMES = {"flash": "flash", "sage": "sageattention"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_case_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", action="append", dest="cases", default=[], metavar="NAME",
                        help="a built-in case (repeatable; see --list)")
    parser.add_argument("--cases", action="append", dest="cases", default=[], metavar="A,B,C",
                        help="comma-separated built-in cases")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the case inputs, uniform in [-1, 1] (default 1234)")


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """The knob flags; each one given overrides the case's or the dump's value."""
    parser.add_argument("--granularity", choices=[m.value for m in QKGranularity])
    parser.add_argument("--smooth-k", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--smooth-v", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--pv-accum", choices=[m.value for m in PVAccum])


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run built-in cases or dumps, report timings and errors (the default)",
        description=(__doc__ or "").partition("\n")[0])
    add_case_flags(parser)
    parser.add_argument("--list", action="store_true", help="list the built-in cases and exit")
    parser.add_argument("--iters", type=positive_int, default=1,
                        help="timed calls after one warm-up call (default 1)")
    parser.add_argument("--verbose", action="store_true", help="print the worst element of each case")
    parser.add_argument("--load", action="append", default=[], metavar="PREFIX",
                        help="run on a dump's inputs and knobs (forces --iters 1)")
    add_knob_flags(parser)
    parser.add_argument("--compare", choices=tuple(REFERENCE_NAMES), default="flash",
                        help="flash: exact attention (torch SDPA); sage: the dump's official output")
    parser.set_defaults(func=main)


# --- inputs ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """One case to run: inputs, the knobs to call the op with, the official output and the
    call's attn_mask if any."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    knobs: dict
    official: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None


def case_names(args) -> list[str]:
    """``--case`` and ``--cases`` in the order given; the default case when none is."""
    names = [name.strip() for spec in args.cases for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r} (`sageflash run --list` shows the built-in cases)")
    return names or [DEFAULT_CASE]


def knobs_with_flags(params: SageParams, args) -> dict:
    """The op's keyword knobs: ``params`` with the knob flags given on the command line."""
    knobs = params.as_dict()
    for flag in KNOB_FLAGS:
        if getattr(args, flag, None) is not None:
            knobs[flag] = getattr(args, flag)
    return knobs


def case_workload(name: str, args, device: torch.device) -> Workload:
    case = CASES[name]
    q, k, v = case.inputs(args.seed, device=device)
    return Workload(name, q, k, v, knobs_with_flags(case.meta(args.seed).params, args))


def read_official(prefix: str, meta: dumps.DumpMeta) -> torch.Tensor:
    """The dump's official output; the legacy-layout warning goes to stderr, word for word."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = dumps.read_output(prefix, meta)
    for warning in caught:
        print(warning.message, file=sys.stderr)
    return output


def dump_workload(prefix: str, args, device: torch.device, with_official: bool) -> Workload:
    meta = dumps.read_meta(prefix)
    q, k, v = (dumps.read_tensor(prefix, meta, tag).to(device) for tag in ("q", "k", "v"))
    official = read_official(prefix, meta) if with_official else None
    attn_mask = dumps.read_mask(prefix, meta)
    return Workload(prefix, q, k, v, knobs_with_flags(meta.params, args), official,
                    None if attn_mask is None else attn_mask.to(device))


# --- measuring ------------------------------------------------------------------------------


def pick_backend() -> tuple[torch.device, str, str]:
    """(device, backend name, a line saying which backend runs where): the Triton kernels on a GPU
    that can run them, else the CPU reference."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), "reference", "backend: reference (CPU; no CUDA device)"
    from ..kernels import unsupported_reason

    device = torch.device("cuda", torch.cuda.current_device())
    reason = unsupported_reason(device)
    if reason is not None:
        return torch.device("cpu"), "reference", f"backend: reference (CPU; {reason})"
    return device, "triton", f"backend: triton ({device} {torch.cuda.get_device_name(device)})"


def keys_each_row_sees(seq_q: int, seq_k: int, is_causal: bool, device) -> torch.Tensor:
    """``[Sq, Sk]`` bool: key j is visible to query t (SPEC §7's causal alignment)."""
    return visible_keys(torch.arange(seq_q, device=device), seq_q, seq_k, is_causal)[:, :seq_k]


def flash_call(q, k, v, params: SageParams, dtype: torch.dtype, attn_mask=None):
    """A zero-argument torch SDPA call on the op's inputs in ``dtype``: GQA heads expanded,
    causal per SPEC §7 (top-left when Sq == Sk, else bottom-right), and ``attn_mask``."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.repeat_interleave(group, dim=1).to(dtype), v.repeat_interleave(group, dim=1).to(dtype)
    seq_q, seq_k = q.shape[2], k.shape[2]
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    if params.is_causal and (seq_q != seq_k or mask is not None):  # SDPA takes a mask or is_causal
        causal_keys = keys_each_row_sees(seq_q, seq_k, True, q.device)
        mask = causal_keys if mask is None else (
            mask & causal_keys if mask.dtype == torch.bool else mask.masked_fill(~causal_keys, -math.inf))
    causal = params.is_causal and mask is None
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  scale=params.softmax_scale)


def exact_attention(q, k, v, params: SageParams, attn_mask=None) -> torch.Tensor:
    """Exact attention in float32 ``[B, Hq, Sq, D0]``. A row with no visible key is 0, as in the op
    (SDPA gives NaN there, or averages V under float32's finfo.min, which the op counts as -inf:
    `hidden_by_mask`); a NaN from the inputs stays."""
    out = flash_call(q, k, v, params, torch.float32, attn_mask)()
    visible = keys_each_row_sees(q.shape[2], k.shape[2], params.is_causal, q.device)
    if attn_mask is not None:
        visible = visible & ~hidden_by_mask(attn_mask)
    return out.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device: torch.device):
    """(result of a warm-up call, average milliseconds of ``iters`` further calls)."""
    result = fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3 / iters


# --- reporting ------------------------------------------------------------------------------


@dataclasses.dataclass
class CaseReport:
    name: str
    shape: dict
    params: SageParams
    iterations: int
    sage_ms: float
    flash_ms: float
    reference: str
    max_diff: float
    rms_avg: float
    worst: tuple | None = None  # (batch, head, seq, dim, out, ref)
    attn_mask: str | None = None  # "<dtype> [sizes]" of a dump's mask

    @property
    def speedup(self) -> float:
        return self.flash_ms / self.sage_ms if self.sage_ms > 0 else math.inf


def diff_stats(out: torch.Tensor, ref: torch.Tensor):
    """(max |out - ref|, sqrt(mean((out - ref)^2)), worst element) over all elements, in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    error = (out - ref).abs()
    index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    worst = (*index, out[index].item(), ref[index].item())
    return error.max().item(), error.square().mean().sqrt().item(), worst


def format_case(report: CaseReport, verbose: bool = False) -> str:
    p, s = report.params, report.shape
    lines = [
        f"Case {report.name}",
        f"  shape: batch={s['batch']} seq_q={s['seq_q']} seq_k={s['seq_k']} nq={s['nq']} nk={s['nk']} "
        f"d={s['d']} causal={p.is_causal:d} smooth_k={p.smooth_k:d} smooth_v={p.smooth_v:d} pv={p.pv_accum}",
        *([f"  attn_mask: {report.attn_mask}"] if report.attn_mask else []),
        f"  granularity: {p.granularity}",
        f"  iterations: {report.iterations}",
        f"  timings (avg): sage {report.sage_ms:.3f} ms, flash {report.flash_ms:.3f} ms "
        f"(speedup {report.speedup:.2f}x)",
        f"  reference: {report.reference}",
        f"  diff ({report.reference}): max {report.max_diff:.3e} rms_avg {report.rms_avg:.3e}",
    ]
    if verbose and report.worst is not None:
        b, h, t, d, out, ref = report.worst
        lines.append(f"  worst: batch={b} head={h} seq={t} dim={d} out={out:.6e} ref={ref:.6e}")
    return "\n".join(lines)


def format_summary(reports: list[CaseReport]) -> str:
    fastest = max(reports, key=lambda r: r.speedup)
    worst = max(reports, key=lambda r: (math.isnan(r.rms_avg), r.rms_avg))  # a NaN case is the worst
    return "\n".join(["Summary",
                      f"  best speedup: {fastest.speedup:.2f}x ({fastest.name})",
                      f"  worst rms diff: {worst.rms_avg:.3e} ({worst.name})"])


_REPORT_LINES = {
    "name": re.compile(r"^Case (?P<name>.+)$"),
    "timings": re.compile(r"^  timings \(avg\): sage (?P<sage_ms>\S+) ms, flash (?P<flash_ms>\S+) ms "
                          r"\(speedup (?P<speedup>\S+)x\)$"),
    "reference": re.compile(r"^  reference: (?P<reference>\S+)$"),
    "diff": re.compile(r"^  diff \(\S+\): max (?P<max_diff>\S+) rms_avg (?P<rms_avg>\S+)$"),
}


REPORT_FIELDS = tuple(field for pattern in _REPORT_LINES.values() for field in pattern.groupindex)


def parse_report(text: str) -> list[dict]:
    """The per-case records of a report: name, sage_ms, flash_ms, speedup, reference, max_diff, rms_avg."""
    records: list[dict] = []
    for line in text.splitlines():
        for pattern in _REPORT_LINES.values():
            match = pattern.match(line)
            if not match:
                continue
            fields = match.groupdict()
            if "name" in fields:
                records.append({})
            if records:
                records[-1].update({key: value if key in ("name", "reference") else float(value)
                                    for key, value in fields.items()})
    return records


# --- the command ----------------------------------------------------------------------------


def run_workload(work: Workload, *, iters: int, reference: str, backend: str,
                 device: torch.device) -> CaseReport:
    """Time the op and torch SDPA on ``work`` and compare the op with ``reference`` (flash|sage)."""
    q, k, v, mask = work.q, work.k, work.v, work.attn_mask
    params = resolve_params(**work.knobs, head_dim=q.shape[-1])
    out, sage_ms = timed(lambda: sage_attn_sm89_fp16(q, k, v, **work.knobs, attn_mask=mask, backend=backend),
                         iters, device)
    _, flash_ms = timed(flash_call(q, k, v, params, q.dtype, mask), iters, device)
    ref = work.official if reference == "sage" else exact_attention(q, k, v, params, mask)
    max_diff, rms_avg, worst = diff_stats(out, ref)
    shape = dict(batch=q.shape[0], seq_q=q.shape[2], seq_k=k.shape[2], nq=q.shape[1], nk=k.shape[1],
                 d=q.shape[3])
    mask_line = None if mask is None else f"{str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}"
    return CaseReport(work.name, shape, params, iters, sage_ms, flash_ms, REFERENCE_NAMES[reference],
                      max_diff, rms_avg, worst, mask_line)


def workloads(args, device: torch.device) -> list[Workload]:
    if args.compare == "sage" and not args.load:
        raise ValueError("--compare sage needs --load PREFIX (the official output comes from a dump)")
    if args.load and args.cases:
        raise ValueError("--load and --case/--cases cannot be combined")
    if args.load:
        return [dump_workload(prefix, args, device, args.compare == "sage") for prefix in args.load]
    return [case_workload(name, args, device) for name in case_names(args)]


def main(args) -> int:
    if args.list:
        print("\n".join(CASES))
        return 0
    device, backend, backend_line = pick_backend()
    work = workloads(args, device)
    iters = 1 if args.load else args.iters
    print(backend_line, flush=True)
    reports = []
    for item in work:
        reports.append(run_workload(item, iters=iters, reference=args.compare, backend=backend, device=device))
        print(format_case(reports[-1], args.verbose), flush=True)
    print(format_summary(reports))
    return 0
