"""Shared fixtures: where the official dumps are, the ``gpu`` marker, and Triton's interpreter.

Without a CUDA device the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors; the
variable must be set before Triton decorates the kernels, hence here, before any test imports.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def refdump_dir() -> Path | None:
    """``$SAGEFLASH_REFDUMPS``, else ``<repo>/refdumps`` (carried to GPU machines), else ``../shared/refdumps``."""
    candidates = [os.environ.get("SAGEFLASH_REFDUMPS"), ROOT / "refdumps", ROOT.parent / "shared" / "refdumps"]
    for path in candidates:
        if path and Path(path, "index.json").is_file():
            return Path(path).resolve()
    return None


def refdump_prefixes() -> list[str]:
    found = refdump_dir()
    return sorted(str(p.with_suffix("")) for p in found.glob("*.meta")) if found else []


def pytest_generate_tests(metafunc):
    if "refdump_prefix" in metafunc.fixturenames:
        prefixes = refdump_prefixes()
        metafunc.parametrize("refdump_prefix", prefixes or [None], indirect=True,  # via the fixture below
                             ids=[Path(p).name for p in prefixes] or ["no-refdumps"])


@pytest.fixture
def refdump_prefix(request):
    if request.param is None:
        pytest.skip("official dumps not found (../shared/refdumps or $SAGEFLASH_REFDUMPS)")
    return request.param


def gpu_ok() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability() >= (8, 9)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU of compute capability >= 8.9")
    for item in items:
        if "gpu" in item.keywords and not gpu_ok():
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned_cuda_allocator():
    """Fill the CUDA caching allocator with 0xFF (NaN for every float type) so unwritten outputs show."""
    if HAS_CUDA:
        torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    yield


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalized MSE: mean((a - b)^2) / mean(b^2), in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref) ** 2).mean().item() / (ref ** 2).mean().item()
