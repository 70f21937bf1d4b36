"""Ahead-of-time compilation of the attention kernel (and the quantizer's V tiles) for a given GPU
architecture, no GPU needed.

Lets CI (and a curious user) check what the tensor-core products lower to: ``wgmma`` on sm_90,
``mma.sync ... s8`` / ``e4m3`` on sm_89, and how much shared memory a launch needs. Arguments get
the specialisation a real launch of a typical shape gives them (16-byte aligned pointers, strides
and lengths divisible by 16): without it Triton cannot prove the loads wide enough to pipeline,
and the kernel compiled here would not be the one that runs.
"""

from __future__ import annotations

import inspect
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import groups
from ..params import PVAccum, QKGranularity
from . import quant
from .attention import _attention_kernel, launch_config
from .launch import PDL_MIN_CAPABILITY, TRITON_E4M3_CAST_MIN_CAPABILITY

LONG_SEQUENCE = 4096  # the launch compiled is the one of a call with this many keys

_POINTER_TYPES = {"Q8": "*i8", "K8": "*i8", "V8": "*fp8e4nv", "QS": "*fp32", "KS": "*fp32",
                  "VS": "*fp32", "VM": "*fp32", "LSE": "*fp32", "SEQS": "*i32", "TILES": "*i32"}
_FLOAT_ARGS = {"log2_scale"}
_MASK_ITEMSIZE = {"none": 0, "u8": 1, "fp16": 2, "bf16": 2, "fp32": 4}
# Integer arguments a typical launch passes as multiples of 16 (Triton specialises on that).
_DIVISIBLE_INTS = {"seq_q", "seq_k", "head_dim", "q_heads", "kv_heads", "q_groups", "k_groups"}
MMA_PATTERN = re.compile(r"(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)")
E4M3_CAST_PATTERN = re.compile(r"cvt[\w.]*\.e4m3x2[\w.]*")
GLOBAL_STORE_PATTERN = re.compile(r"st\.global[\w.]*")
_MMA_WARPS = re.compile(r"^#mma\d* = #ttg\.nvidia_mma<\{.*?warpsPerCTA = (\[[\d, ]+\])", re.MULTILINE)


def _signature(kernel, constants: dict, types: dict) -> tuple[dict, dict]:
    """Triton's signature of ``kernel`` (``types`` for the arguments they name, else
    `_POINTER_TYPES`, float or int32) and the divisibility attributes a typical launch gives."""
    signature, attrs = {}, {}
    for index, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name) or _POINTER_TYPES.get(name, "fp32" if name in _FLOAT_ARGS else "i32")
        if signature[name].startswith("*") or name.startswith("stride_") or name in _DIVISIBLE_INTS:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_attention(capability: int, *, head_dim: int = 128, pv_accum="fp32+fp32",
                      granularity="per_thread", is_causal: bool = False, out_dtype: str = "fp16",
                      mask: str = "none", varlen: bool = False):
    """Compile `_attention_kernel` for ``sm_<capability>`` (e.g. 89, 90); returns Triton's kernel.

    ``mask``: "none", or the Triton type of an attn_mask's elements: "u8" (a bool mask's bytes),
    "fp16", "bf16" or "fp32" (additive). ``varlen``: the kernel of a packed batch (`sequences`).
    """
    padded = groups.padded_head_dim(head_dim)
    pv_mode = PVAccum.parse(pv_accum, "pv_accum").code
    config = launch_config(padded, capability, pv_mode, is_causal, LONG_SEQUENCE, _MASK_ITEMSIZE[mask])
    pdl = capability >= PDL_MIN_CAPABILITY  # as `launch.dependent_launch` decides on a GPU
    constants = dict(D=padded, BLOCK_M=config.block_m, KEYS=config.keys,
                     PER_THREAD=QKGranularity.parse(granularity, "granularity") is QKGranularity.PER_THREAD,
                     IS_CAUSAL=is_causal, PV_MODE=pv_mode,
                     SMOOTH_V=False, WRITE_LSE=False, HAS_MASK=mask != "none", MASK_BOOL=mask == "u8",
                     USE_TMA=config.tma, VARLEN=varlen, PDL=pdl,
                     PTX_CAST=capability < TRITON_E4M3_CAST_MIN_CAPABILITY)
    descriptors = {"K8": f"tensordesc<i8[{config.keys}, {padded}]>",
                   "V8": f"tensordesc<fp8e4nv[{padded}, {groups.K_TILE}]>"} if config.tma else {}
    signature, attrs = _signature(_attention_kernel, constants, {
        **descriptors, "Out": f"*{out_dtype}", "Mask": f"*{out_dtype if mask == 'none' else mask}"})
    source = ASTSource(_attention_kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                   "maxnreg": config.max_registers,
                                   "launch_pdl": pdl})


def compile_v_quantizer(capability: int, *, head_dim: int = 128, varlen: bool = False):
    """Compile the quantization kernel's V tiles (`quant._quantize_kernel` with V only, in the
    attention kernel's token order; ``varlen``: a packed batch's) for ``sm_<capability>``; returns
    Triton's kernel."""
    pdl = capability >= PDL_MIN_CAPABILITY
    q_shape, k_shape = quant._GROUP_SHAPES[True]
    constants = dict(D=groups.padded_head_dim(head_dim), PER_THREAD=True, DO_Q=False, DO_K=False, DO_V=True,
                     SMOOTH_K=False, SMOOTH_V=False, Q_GROUP_SHAPE=q_shape, K_GROUP_SHAPE=k_shape,
                     V_KERNEL_ORDER=True, VARLEN=varlen, PDL=pdl,
                     PTX_CAST=capability < TRITON_E4M3_CAST_MIN_CAPABILITY)
    inputs = {name: "*fp16" for name in ("Q", "K", "V", "KM")}
    scales = {name: "*fp32" for name in ("VMEAN", "INV", "PRESCALE")}
    signature, attrs = _signature(quant._quantize_kernel, constants, {**inputs, **scales})
    source = ASTSource(quant._quantize_kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": quant.QUANT_WARPS, "launch_pdl": pdl, "enable_fp_fusion": False})


def mma_instructions(ptx: str) -> set[str]:
    """The distinct tensor-core instructions of a PTX listing."""
    return set(MMA_PATTERN.findall(ptx))


def mma_warp_grids(ttgir: str) -> list[list[int]]:
    """How each tensor-core layout of a TTGIR listing spreads its warps, ``[along M, along N]``.
    Split along N, a row of scores is spread over warps: its max and its P then cross warps
    through shared memory in every key block."""
    return [json.loads(grid) for grid in _MMA_WARPS.findall(ttgir)]


def main(argv: list[str] | None = None) -> int:
    """``python -m sageflash.kernels.compile``: print the tensor-core instructions as JSON lines
    (with ``--v-quantizer``, the V quantizer's global stores).

    Needs ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
    """
    import argparse
    import itertools

    parser = argparse.ArgumentParser(description=(main.__doc__ or "").partition("\n")[0])
    parser.add_argument("--capability", type=int, nargs="+", default=[89, 90])
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(groups.HEAD_DIMS))
    parser.add_argument("--pv-accum", nargs="+", default=[m.value for m in PVAccum])
    parser.add_argument("--mask", nargs="+", default=["none"], choices=["none", "u8", "fp16", "bf16", "fp32"],
                        help="attn_mask element types to compile for (u8: a bool mask)")
    parser.add_argument("--v-quantizer", action="store_true",
                        help="compile the quantizer's V tiles instead: print their global stores")
    parser.add_argument("--varlen", action="store_true", help="the kernels of packed batches (sage_attn_varlen)")
    args = parser.parse_args(argv)
    if args.v_quantizer:
        for capability, head_dim in itertools.product(args.capability, args.head_dim):
            kernel = compile_v_quantizer(capability, head_dim=head_dim, varlen=args.varlen)
            print(json.dumps({"capability": capability, "head_dim": head_dim,
                              "global_stores": sorted(set(GLOBAL_STORE_PATTERN.findall(kernel.asm["ptx"])))}))
        return 0
    for capability in args.capability:
        for head_dim in args.head_dim:
            for pv_accum, mask in itertools.product(args.pv_accum, args.mask):
                kernel = compile_attention(capability, head_dim=head_dim, pv_accum=pv_accum, is_causal=True,
                                           mask=mask, varlen=args.varlen)
                print(json.dumps({"capability": capability, "head_dim": head_dim, "pv_accum": pv_accum,
                                  "mask": mask, "mma": sorted(mma_instructions(kernel.asm["ptx"])),
                                  "mma_warps": mma_warp_grids(kernel.asm["ttgir"]),
                                  "e4m3_casts": sorted(set(E4M3_CAST_PATTERN.findall(kernel.asm["ptx"]))),
                                  "shared_bytes": kernel.metadata.shared,
                                  "waits_for_earlier_launch": "griddepcontrol.wait" in kernel.asm["ptx"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
