"""Kernel launches that spend less host time than ``kernel[grid](...)``.

Triton's ``JITFunction.run`` binds and specialises every argument again on each call and reads
its knobs: on an H200 host that is ≈30 µs for a 46-argument kernel on top of the ≈20 µs the
launch itself takes (benchmarks/NOTES.md, v4) — at 1k tokens one attention call launches four
kernels and was host-bound (`replay` now skips even this path for repeated calls). `Launcher`
keeps the `CompiledKernel` of each argument pattern and launches it through Triton's API for
compiled kernels, ``compiled[grid](*args, stream=...)``.

The pattern (`launch_key`) is finer than Triton's specialisation, which looks at each tensor's
dtype and 16-byte alignment and at whether an int is 1, a multiple of 16 or within int32: tensors
by dtype and address mod 16, descriptors by their fields, every other argument by value, plus the
keyword arguments and the device. So a hit reuses exactly the kernel Triton would have picked;
a miss goes through ``kernel[grid](...)``, which compiles if needed. Every launch is also handed
to `replay.record`, which keeps it while a call is being recorded. Models with a few fixed
shapes hit after their first calls; a workload whose shapes never repeat misses every time, with
the cache bounded by `MAX_PATTERNS`. Under TRITON_INTERPRET=1 every call takes Triton's path.
"""

from __future__ import annotations

import functools
import operator

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from . import INTERPRETED, replay  # TRITON_INTERPRET as the kernels were decorated (a later change reaches neither)

MAX_PATTERNS = 256  # argument patterns kept per kernel; past it the cache starts again
MAX_GRID_BATCH = 65535  # CUDA's limit on grid axes y and z; every kernel puts the batch on z
MAX_GRID_HEADS = 65535  # ... and the heads on y: the quantizer those of Q, K and V together
PDL_MIN_CAPABILITY = 90  # griddepcontrol (programmatic dependent launch): Hopper and later
TRITON_E4M3_CAST_MIN_CAPABILITY = 90  # below, Triton 3.6 casts float32 to e4m3 in two roundings
PDL = True  # False: ordinary launches only (A/B runs; set it before the first call: replays keep their launches)


def device_capability(device: torch.device) -> int:
    """The architecture the kernels are compiled for on ``device`` (``major * 10 + minor``): Triton's
    ``TRITON_OVERRIDE_ARCH`` when set (``sm89`` on a Hopper GPU runs Ada's code path, mma.sync and
    pointer loads, assembled for the device: how the Ada launches are tested and timed without an
    Ada card), else the CUDA device's own; 0 off CUDA (the interpreter ignores launch details)."""
    if device.type != "cuda":
        return 0
    override = knobs.runtime.override_arch
    return int(override.removeprefix("sm")) if override else _hardware_capability(device)


@functools.lru_cache(maxsize=None)
def _hardware_capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def check_grid_batch(batch: int) -> None:
    """A ValueError for a batch past `MAX_GRID_BATCH` (a launch would fail with CUDA's "invalid
    argument"); the op itself splits such batches (`kernels.attention`)."""
    if batch > MAX_GRID_BATCH:
        raise ValueError(f"batch size {batch} is above {MAX_GRID_BATCH}, the most one launch's grid holds: "
                         f"call sage_attn_sm89_fp16, which splits the batch, or pass slices")


def dependent_launch(device: torch.device) -> bool:
    """Whether a call's kernels on ``device`` use programmatic dependent launch (PDL).

    A kernel launched with PDL starts once every program of the kernel before has passed its
    ``gdc_launch_dependents``: its programs take the SM slots that kernel's tail frees, do what
    needs nothing from it, then wait (``gdc_wait``) for it to finish and its writes to be visible.
    So work before a wait overlaps only the kernel directly before (which triggers after its own
    wait when that matters: the reduction, whose next kernel's Q tiles never wait), and may read
    only the call's inputs, complete before the call's first, ordinary launch started, and write
    only buffers nothing still running touches. The first launch of a call is an ordinary one; a
    later KV-head chunk's statistics follow the previous chunk's attention as a dependent launch
    that waits before it stores. Hopper and later, compiled kernels only (not the interpreter).
    """
    return PDL and not INTERPRETED and device_capability(device) >= PDL_MIN_CAPABILITY


def e4m3_cast_in_ptx(device: torch.device) -> bool:
    """Whether the kernels on ``device`` round float32 to fp8 e4m3 through `quant.to_e4m3`'s own
    ``cvt.rn.satfinite.e4m3x2.f32``. Below sm_90 Triton 3.6 casts through fp16, truncating first
    (``cvt.rz.f16.f32``, then to e4m3): ≈0.15% of V's and P's codes came out one step off SPEC's
    single rounding to nearest even (the GPU tests on Ada's code path, NOTES v19). Hopper's cast is
    that instruction already; the interpreter's is exact (`interpreter`)."""
    return (device.type == "cuda" and not INTERPRETED
            and device_capability(device) < TRITON_E4M3_CAST_MIN_CAPABILITY)


@triton.jit
def wait_for_earlier_launch(PDL: tl.constexpr):
    """In a kernel: with PDL, block until the kernel launched before has finished and its writes
    are visible (a no-op in a kernel launched without the attribute); nothing without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def let_next_launch_start(PDL: tl.constexpr):
    """In a kernel: with PDL, let the next kernel's programs start once every program of this one
    has reached here (the next kernel waits before it reads what this one writes)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


def _descriptor_key(desc: TensorDescriptor) -> tuple:
    return (desc.base.dtype, desc.base.data_ptr() & 15, tuple(desc.shape), tuple(desc.strides),
            tuple(desc.block_shape), desc.padding)


def _pick(positions: list[int]):
    """``args -> tuple of args[i] for i in positions`` at C speed (itemgetter, which returns a bare
    item for one position)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


def _key_function(types: tuple):
    """`launch_key` for one tuple of argument types: scalars by value, picked in one call; tensors
    by dtype and address mod 16; descriptors by their fields."""
    tensors = _pick([i for i, t in enumerate(types) if issubclass(t, torch.Tensor)])
    descriptors = _pick([i for i, t in enumerate(types) if issubclass(t, TensorDescriptor)])
    scalars = _pick([i for i, t in enumerate(types) if not issubclass(t, (torch.Tensor, TensorDescriptor))])
    return lambda args: (scalars(args), tuple([(a.dtype, a.data_ptr() & 15) for a in tensors(args)]),
                         tuple([_descriptor_key(d) for d in descriptors(args)]))


_KEY_FUNCTIONS = {}  # argument types -> key function (a few per kernel)


def launch_key(args) -> tuple:
    """The argument pattern of a launch: the arguments' types (``True == 1``, yet Triton compiles
    them apart), then tensors by dtype and address mod 16, descriptors by their fields and
    anything else (ints, floats, bools, None) by value. This runs on every launch: the types are
    read by ``map`` and the scalars picked by one itemgetter, so only tensors cost a Python step
    (≈6 µs for the attention kernel's 36 arguments on a CI CPU, against 12 with a test per
    argument)."""
    types = tuple(map(type, args))
    key_of = _KEY_FUNCTIONS.get(types)
    if key_of is None:
        if len(_KEY_FUNCTIONS) >= MAX_PATTERNS:
            _KEY_FUNCTIONS.clear()
        key_of = _KEY_FUNCTIONS[types] = _key_function(types)
    return types, key_of(args)


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs_and_options)`` launches ``kernel`` like
    ``kernel[grid](*args, **constexprs_and_options)``: runtime arguments by position, constexprs
    and launch options (num_warps, ...) by keyword; ``grid`` a 3-tuple (a compiled kernel's launch
    takes three sizes)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}
        # Fixed when the kernel was decorated (TRITON_INTERPRET is read then), so checked once.
        self.interpreted = INTERPRETED

    def __call__(self, grid, *args, **meta):
        if self.interpreted:
            self.kernel[grid](*args, **meta)
            return
        device = driver.active.get_current_device()
        key = (device, knobs.runtime.override_arch, launch_key(args), tuple(meta.items()))
        compiled = self.compiled.get(key)
        constexprs = tuple(meta[name] for name in self.kernel.arg_names[len(args):])
        if compiled is None:
            compiled = self.kernel[grid](*args, **meta)  # Triton's path: binds, compiles, launches
            if len(self.compiled) >= MAX_PATTERNS:
                self.compiled.clear()
            self.compiled[key] = compiled
        else:
            compiled[grid](*args, *constexprs, stream=driver.active.get_current_stream(device))
        replay.record(compiled, grid, (*args, *constexprs))
