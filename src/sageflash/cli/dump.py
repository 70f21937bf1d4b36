"""``sageflash dump``: write built-in cases as dumps (SPEC §9).

Each dump holds the case's inputs (q, k, v), the exact-attention reference (``.flash``, torch
SDPA in float32) and either this package's payloads and output (``.out``) or, with ``--official``,
the official SageAttention output (``.sage_quant``), LSE and payloads when its
``sageattn_qk_int8_pv_fp8_cuda`` can run here (``scripts/compare_sageattention.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from unittest import mock

import torch

from .. import __version__, debug, dumps
from ..op import select_backend
from ..params import SageParams, resolve_params
from .run import add_case_flags, add_knob_flags, case_names, case_workload, exact_attention, pick_backend

# The official V transpose stores token m of each group of 16 at position _V_STORED_AT[m] (its
# fp8 mma register layout); the dump format keeps natural order.
_V_STORED_AT = [(m // 8) * 2 + ((m // 2) % 4) * 4 + m % 2 for m in range(16)]
# The official quantizers that `sageattn_qk_int8_pv_fp8_cuda` calls, and the tags of what they return.
_OFFICIAL_QUANTIZERS = {
    "per_warp_int8_cuda": ("q_int8", "q_scale", "k_int8", "k_scale"),
    "per_thread_int8_triton": ("q_int8", "q_scale", "k_int8", "k_scale"),
    "per_channel_fp8": ("v_fp8", "v_scale", "v_mean"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("dump", help="write built-in cases as dumps (inputs, SDPA reference, payloads)",
                                   description=(__doc__ or "").partition("\n")[0])
    add_case_flags(parser)
    add_knob_flags(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dump-prefix", "--prefix", dest="prefix", metavar="PREFIX",
                       help="the dump's prefix (one case)")
    where.add_argument("--out-dir", default=".", help="write each case to <out-dir>/<case> (default .)")
    parser.add_argument("--official", action="store_true",
                        help="payloads and output from the official SageAttention instead of this package")
    parser.set_defaults(func=main)


class OfficialUnavailable(Exception):
    """The official SageAttention SM89 entry point cannot run here; the message says why."""


def load_official():
    """The official ``sageattention.core`` module, when its SM89 entry point can run here."""
    missing = []
    try:
        core = importlib.import_module("sageattention.core")
        if not hasattr(core, "sageattn_qk_int8_pv_fp8_cuda"):
            missing.append("the installed sageattention has no sageattn_qk_int8_pv_fp8_cuda")
    except ImportError as err:
        missing.append(f"the official sageattention package is not importable ({err})")
    if not torch.cuda.is_available():
        missing.append("no CUDA device")
    if missing:
        raise OfficialUnavailable("; ".join(missing))
    return core


def natural_token_order(v_fp8: torch.Tensor) -> torch.Tensor:
    """The official ``[..., D, ceil64(Sk)]`` V payload with its tokens back in natural order."""
    return v_fp8.unflatten(-1, (-1, 16))[..., _V_STORED_AT].flatten(-2)


def run_official(core, q, k, v, params: SageParams) -> dict[str, torch.Tensor]:
    """The official output, LSE and payloads by tag: what its quantizers returned, recorded on the way."""
    captured: dict[str, torch.Tensor] = {}

    def recorder(quantizer, tags):
        def record(*args, **kwargs):
            result = quantizer(*args, **kwargs)
            captured.update(zip(tags, result))
            km = inspect.signature(quantizer).bind_partial(*args, **kwargs).arguments.get("km")
            if km is not None:
                captured["k_mean"] = km.flatten(2)  # [B, Hk, 1, D] (keepdim) -> [B, Hk, D]
            return result
        return record

    with contextlib.ExitStack() as patches:
        for name, tags in _OFFICIAL_QUANTIZERS.items():
            if hasattr(core, name):
                patches.enter_context(mock.patch.object(core, name, recorder(getattr(core, name), tags)))
        out, lse = core.sageattn_qk_int8_pv_fp8_cuda(
            q, k, v, tensor_layout="HND", is_causal=params.is_causal, qk_quant_gran=str(params.granularity),
            sm_scale=params.softmax_scale, pv_accum_dtype=str(params.pv_accum), smooth_k=params.smooth_k,
            smooth_v=params.smooth_v, return_lse=True)
    if "v_fp8" in captured:
        captured["v_fp8"] = natural_token_order(captured["v_fp8"])
    tensors = {"sage_quant": out, "lse": lse, **captured}
    return {tag: t for tag, t in tensors.items() if t is not None}


def official_tags(meta, q, k, v, params: SageParams) -> tuple[dict, str]:
    """(official tensors that fit the dump format, provenance); says on stderr what is left out."""
    try:
        core = load_official()
    except OfficialUnavailable as why:
        print(f"sageattention: not used: {why}; writing q, k, v and the SDPA reference (.flash) only",
              file=sys.stderr)
        return {}, f"sageflash {__version__}: inputs and SDPA reference (official SageAttention unavailable)"
    kept = {}
    for tag, tensor in run_official(core, q, k, v, params).items():
        expected = meta.tag_layout(tag)[1]
        if tuple(tensor.shape) == tuple(expected):
            kept[tag] = tensor
        else:
            print(f"sageattention: not writing {tag}: shape {tuple(tensor.shape)}, the format says {expected}",
                  file=sys.stderr)
    version = getattr(importlib.import_module("sageattention"), "__version__", "(version unknown)")
    return kept, (f"official SageAttention {version} SM89 path (sageattn_qk_int8_pv_fp8_cuda) on "
                  f"{torch.cuda.get_device_name(q.device)}")


def dump_case(name: str, prefix: str, args, *, official: bool) -> list[str]:
    """Write case ``name`` (seed and knob flags from ``args``) at ``prefix``; returns the paths written."""
    device, backend, _ = pick_backend()
    work = case_workload(name, args, device)
    q, k, v = work.q, work.k, work.v
    params = resolve_params(**work.knobs, head_dim=q.shape[-1])
    meta = debug.meta_for(q, k, params, seed=args.seed, distribution="uniform")
    tensors = {"q": q, "k": k, "v": v, "flash": exact_attention(q, k, v, params)}
    if official:
        extra, meta.source = official_tags(meta, q, k, v, params)
    else:
        module = select_backend(backend, device)
        payloads = debug.quantize(module, q, k, v, params)
        extra = {**payloads.tags(), "out": debug.attend(module, payloads, q, k.shape[2], params)}
        meta.source = f"sageflash {__version__} ({backend} backend)"
    return dumps.write_dump(prefix, meta, {**tensors, **extra})


def main(args) -> int:
    names = case_names(args)
    if args.prefix and len(names) > 1:
        raise ValueError("--dump-prefix takes one case; use --out-dir for several")
    for name in names:
        prefix = args.prefix or os.path.join(args.out_dir, name)
        paths = dump_case(name, prefix, args, official=args.official)
        print(f"wrote {prefix}: {' '.join(p.removeprefix(prefix + '.').removesuffix('.bin') for p in paths)}")
    return 0
