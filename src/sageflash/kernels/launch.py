"""Kernel launches that spend less host time than ``kernel[grid](...)``.

Triton's ``JITFunction.run`` binds and specialises every argument again on each call and reads
its knobs: on an H200 host that is ≈30 µs for a 46-argument kernel on top of the ≈20 µs the
launch itself takes (benchmarks/NOTES.md, v4) — at 1k tokens one attention call launches four
kernels and is host-bound. `Launcher` keeps the `CompiledKernel` of each specialisation and
launches it through Triton's API for compiled kernels, ``compiled[grid](*args, stream=...)``.

Its cache key is at least as fine as Triton's own specialisation (per tensor the dtype and
whether the address is 16-byte aligned; per int whether it is 1, a multiple of 16, within int32;
floats, bools and None by kind; descriptors by dtype, block shape and padding; the keyword
arguments by value; the device), so a hit reuses exactly the kernel Triton would have picked and
a miss goes through ``kernel[grid](...)``, which compiles if needed. Under TRITON_INTERPRET=1
every call takes that path.
"""

from __future__ import annotations

import torch
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from ..op import interpreter_enabled

INT32 = range(-(2 ** 31), 2 ** 31)


def _specialisation(arg):
    """What Triton may specialise a kernel on for ``arg``, or at least as much."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or arg is None or isinstance(arg, float):
        return type(arg)
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, arg in INT32
    if isinstance(arg, TensorDescriptor):
        return "descriptor", arg.base.dtype, tuple(arg.block_shape), arg.padding
    raise TypeError(f"unsupported kernel argument type {type(arg).__name__}")


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs_and_options)`` launches ``kernel`` like
    ``kernel[grid](*args, **constexprs_and_options)``: runtime arguments by position, constexprs
    and launch options (num_warps, ...) by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}

    def __call__(self, grid, *args, **meta):
        if interpreter_enabled():
            self.kernel[grid](*args, **meta)
            return
        device = driver.active.get_current_device()
        key = (device, tuple(map(_specialisation, args)), tuple(meta.items()))
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **meta)  # Triton's path: binds, compiles, launches
            if compiled is not None:
                self.compiled[key] = compiled
            return
        constexprs = tuple(meta[name] for name in self.kernel.arg_names[len(args):])
        compiled[grid](*args, *constexprs, stream=driver.active.get_current_stream(device))
