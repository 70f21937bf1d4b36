"""Replayed calls: the launches of one call recorded, then issued again for later calls of the same
pattern without the Python that chose them.

An eager 1k-token call is host-bound: on an H200 host the quantizer's and the attention's Python,
nine allocations and four launches took ≈220 of the call's ≈340 µs, against ≈190-230 µs of GPU
work (benchmarks/NOTES.md, v9). What a call launches (kernels, grids, scalars, the offsets of its
scratch buffers) depends only on its pattern: the inputs' shapes, strides, dtypes and 16-byte
alignment, which inputs share an address, and the knobs. `Replays` records the second call of a
pattern (every launch `Launcher` makes) into a `CallPlan`; a later call of that pattern allocates
one workspace for every scratch buffer and re-issues the compiled kernels with the new addresses
(Triton's launcher takes an address as an int): the whole eager 1k call then took 115-150 µs of
host time, against 265-290 µs without replays.

A plan holds only what the recording can prove: every tensor a kernel got is one of the call's
inputs (at its own address) or lives in a buffer the call allocated, which the kernels write before
they read it (the quantizer's payloads, scales and statistics). Anything else (an input read at
another offset, a launch outside `Launcher`) makes the pattern unplannable, and it keeps the
ordinary path.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple

import torch
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

MAX_PATTERNS = 256  # plans kept; past it the cache starts again
ALIGN = 256  # bytes between the scratch buffers in a workspace (TMA needs 16)
_SEEN_ONCE, _UNPLANNABLE = "seen once", "unplannable"
_local = threading.local()  # .launches: the list `Launcher` appends to while a call is recorded


class RecordedLaunch(NamedTuple):
    """One launch as `Launcher` issued it: its compiled kernel, grid and arguments, constexprs
    appended in signature order (what ``compiled[grid](*args)`` takes)."""

    compiled: Any
    grid: tuple
    args: tuple


def record(compiled, grid, args) -> None:
    """Called by `Launcher` for every launch; kept while a call is being recorded."""
    launches = getattr(_local, "launches", None)
    if launches is not None:
        launches.append(RecordedLaunch(compiled, tuple(grid) + (1,) * (3 - len(grid)), args))


class _Base(NamedTuple):
    """What Triton's launcher reads of a TMA descriptor's base tensor: its address (and dtype)."""

    address: int
    dtype: torch.dtype

    def data_ptr(self) -> int:
        return self.address


class _Descriptor(NamedTuple):
    """A recorded TMA descriptor: its fields, checked once by `TensorDescriptor` (at address 0),
    and its base's offset in the workspace."""

    offset: int  # bytes into the workspace
    fields: TensorDescriptor

    def at(self, workspace: int) -> TensorDescriptor:
        """The descriptor over this call's workspace, built without `TensorDescriptor`'s checks
        (≈4 µs of host time each): the offset keeps the recorded base's 16-byte alignment."""
        desc = object.__new__(TensorDescriptor)
        desc.__dict__.update(self.fields.__dict__, base=_Base(workspace + self.offset, self.fields.base.dtype))
        return desc


class _Launch(NamedTuple):
    run: Callable  # Triton's launcher of the compiled kernel
    function: int
    packed_metadata: Any
    grid: tuple
    args: tuple  # the recorded arguments, tensors and descriptors left out (None): filled in per call
    pointers: tuple  # (argument index, base index, byte offset): base = an input, or the workspace
    descriptors: tuple  # (argument index, _Descriptor)


class CallPlan:
    """The launches of one recorded call, to issue again for inputs of the same pattern."""

    def __init__(self, launches: list[_Launch], workspace_bytes: int):
        self.launches = launches
        self.workspace_bytes = workspace_bytes

    @classmethod
    def build(cls, recorded: list[RecordedLaunch], inputs: tuple) -> CallPlan | None:
        """The plan of ``recorded`` (a call's launches, as `record` kept them) over ``inputs``, or
        None when an argument is neither an input at its own address nor in a buffer the call
        allocated, or when nothing was launched through `Launcher` (the interpreter's path)."""
        if not recorded:
            return None
        addresses = [None if t is None else t.data_ptr() for t in inputs]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
        workspace = len(inputs)  # the base index of the workspace
        regions: dict[int, int] = {}  # the call's own buffers: storage address -> workspace offset
        size = 0

        def locate(tensor: torch.Tensor):
            nonlocal size
            address = tensor.data_ptr()
            if address in addresses:
                return addresses.index(address), 0
            storage = tensor.untyped_storage()
            if storage.data_ptr() in input_storages:
                return None  # an input read at another offset
            if storage.data_ptr() not in regions:
                regions[storage.data_ptr()] = size
                size += -(-storage.nbytes() // ALIGN) * ALIGN
            return workspace, regions[storage.data_ptr()] + address - storage.data_ptr()

        launches = []
        for launch in recorded:
            args, pointers, descriptors = list(launch.args), [], []
            for i, arg in enumerate(launch.args):
                if isinstance(arg, torch.Tensor):
                    where = locate(arg)
                    if where is None:
                        return None
                    pointers.append((i, *where))
                elif isinstance(arg, TensorDescriptor):
                    where = locate(arg.base)
                    if where is None or where[0] != workspace:
                        return None
                    fields = TensorDescriptor(_Base(0, arg.base.dtype), arg.shape, arg.strides, arg.block_shape,
                                              arg.padding)
                    descriptors.append((i, _Descriptor(where[1], fields)))
                else:
                    continue
                args[i] = None  # a plan keeps no tensor of the recorded call alive
            compiled = launch.compiled
            launches.append(_Launch(compiled.run, compiled.function, compiled.packed_metadata, launch.grid,
                                    tuple(args), tuple(pointers), tuple(descriptors)))
        return cls(launches, size)

    def replay(self, inputs: tuple, stream: int) -> None:
        """Issue the launches for ``inputs`` (the recorded call's pattern) on ``stream``."""
        device = next(t for t in inputs if t is not None).device
        workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=device)
        bases = [None if t is None else t.data_ptr() for t in inputs] + [workspace.data_ptr()]
        for launch in self.launches:
            args = list(launch.args)
            for i, base, offset in launch.pointers:
                args[i] = bases[base] + offset
            for i, desc in launch.descriptors:
                args[i] = desc.at(bases[-1])
            launch.run(*launch.grid, stream, launch.function, launch.packed_metadata, None, None, None, *args)


def pattern(inputs: tuple, *knobs_and_flags) -> tuple:
    """The key of a call: each input's shape, strides, dtype, device and address mod 16, which
    inputs share an address, and whatever else decides the launches (``knobs_and_flags``)."""
    addresses = [None if t is None else t.data_ptr() for t in inputs]
    return (knobs_and_flags, tuple([addresses.index(a) for a in addresses]),
            tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, a & 15)
                   for t, a in zip(inputs, addresses)]))


def launches_of(call: Callable[[], Any]) -> list[RecordedLaunch]:
    """Run ``call()`` and return every launch `Launcher` made in it, in order."""
    _local.launches = []
    try:
        call()
        return _local.launches
    finally:
        _local.launches = None


def _launch_hooks_set() -> bool:
    """Triton's launch hooks (profilers) see every launch: a replay would skip them."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


class Replays:
    """``replays(key, inputs, call, stream)`` runs ``call()`` (which launches through `Launcher`
    only) for ``inputs``: the first time per ``key`` (`pattern`) as it is, the second time
    recorded, after that replayed on ``stream``. Building a plan costs ≈130 µs of host time (a CI
    CPU), so a pattern seen once (shapes that never repeat) is not worth recording."""

    def __init__(self):
        self.plans: dict[tuple, CallPlan | str] = {}  # a plan, _SEEN_ONCE or _UNPLANNABLE

    def __call__(self, key: tuple, inputs: tuple, call: Callable[[], Any], stream: int) -> None:
        plan = self.plans.get(key)
        if isinstance(plan, CallPlan) and not _launch_hooks_set():
            plan.replay(inputs, stream)
            return
        if plan is None:
            if len(self.plans) >= MAX_PATTERNS:
                self.plans.clear()
            self.plans[key] = _SEEN_ONCE
        if plan != _SEEN_ONCE or _launch_hooks_set() or getattr(_local, "launches", None) is not None:
            call()
            return
        self.plans[key] = CallPlan.build(launches_of(call), inputs) or _UNPLANNABLE
