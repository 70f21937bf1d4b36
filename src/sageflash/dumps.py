"""The dump format (SPEC §9): ``<prefix>.meta`` (``key value`` lines) plus ``<prefix>.<tag>.bin``.

One reader and one writer for every tool: the CLI's ``--load``, ``GGML_SAGE_DUMP``, the compare
scripts and the tests.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch

from . import groups
from .params import PVAccum, QKGranularity, SageParams, check_softmax_scale

LEGACY_WARNING = ("warning: {prefix} missing .sage_quant.bin; converting legacy layout "
                  "(expect ~0.39 RMS vs float refs if not regenerated)")

_SIZE_KEYS = ("head_dim", "seq_q", "seq_k", "num_q_heads", "num_k_heads", "batch")
_KEYS = (*_SIZE_KEYS, "is_causal", "smooth_k", "smooth_v", "pv_accum", "granularity")
_DEFAULTED_KNOBS = ("smooth_v", "pv_accum", "granularity")  # SPEC §9: may be missing (DumpMeta's defaults)
_OPTIONAL_KEYS = ("dtype", "softmax_scale", "seed", "distribution", "source", "mask_dtype", "mask_shape")
_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
# The call's attn_mask (`ATTN_MASK`; an extension of SPEC §9's tags): bool (one byte per flag) or additive.
ATTN_MASK = "attn_mask"
MASK_DTYPES = {"bool": torch.bool, "f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


class DumpError(ValueError):
    """A dump that cannot be read: missing file, wrong size, unknown key."""


@dataclasses.dataclass
class DumpMeta:
    """The ``.meta`` of a dump: shapes, knobs and provenance."""

    head_dim: int
    seq_q: int
    seq_k: int
    num_q_heads: int
    num_k_heads: int
    batch: int
    is_causal: bool = False
    smooth_k: bool = True
    smooth_v: bool = False
    pv_accum: str = "fp32+fp16"
    granularity: str = "per_warp"
    dtype: str = "f16"
    softmax_scale: float | None = None
    seed: int | None = None
    distribution: str | None = None
    source: str | None = None
    mask_dtype: str | None = None  # with mask_shape: the call had an attn_mask, in the `ATTN_MASK` tag
    mask_shape: tuple[int, int, int, int] | None = None  # each 1 (broadcast) or [B, Hq, Sq, Sk]'s size

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def params(self) -> SageParams:
        scale = self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5
        return SageParams(scale, self.is_causal, self.smooth_k, self.smooth_v,
                          PVAccum.parse(self.pv_accum, "pv_accum"),
                          QKGranularity.parse(self.granularity, "granularity"))

    def tag_layout(self, tag: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, C-order shape) of ``<prefix>.<tag>.bin``."""
        b, hq, hk, sq, sk, d0 = (self.batch, self.num_q_heads, self.num_k_heads, self.seq_q,
                                 self.seq_k, self.head_dim)
        d = groups.padded_head_dim(d0)
        per_thread = QKGranularity.parse(self.granularity, "granularity") is QKGranularity.PER_THREAD
        layouts = {
            "q": (self.torch_dtype, (b, hq, sq, d0)),
            "k": (self.torch_dtype, (b, hk, sk, d0)),
            "v": (self.torch_dtype, (b, hk, sk, d0)),
            "q_pad": (self.torch_dtype, (b, hq, sq, d)),  # the inputs zero-padded to the kernel head dim
            "k_pad": (self.torch_dtype, (b, hk, sk, d)),
            "v_pad": (self.torch_dtype, (b, hk, sk, d)),
            "sage_quant": (torch.float32, (b, hq, sq, d0)),
            "flash": (torch.float32, (b, hq, sq, d0)),
            "out": (torch.float32, (b, hq, sq, d0)),
            "lse": (torch.float32, (b, hq, sq)),
            "q_int8": (torch.int8, (b, hq, sq, d)),
            "k_int8": (torch.int8, (b, hk, sk, d)),
            "q_scale": (torch.float32, (b, hq, groups.q_num_groups(sq, per_thread))),
            "k_scale": (torch.float32, (b, hk, groups.k_num_groups(sk, per_thread))),
            "k_mean": (torch.float32, (b, hk, d)),
            "v_fp8": (torch.float8_e4m3fn, (b, hk, d, groups.ceil_to(sk, groups.K_TILE))),
            "v_scale": (torch.float32, (b, hk, d)),
            "v_mean": (torch.float32, (b, hk, d)),
            "sage": (torch.float32, (d0, sq, hq, b)),
        }
        if self.mask_shape is not None:
            layouts[ATTN_MASK] = (MASK_DTYPES[self.mask_dtype], self.mask_shape)
        if tag not in layouts:
            unmasked = "; this dump has no attn_mask" if tag == ATTN_MASK else ""
            raise DumpError(f"unknown dump tag {tag!r}{unmasked}; known: {', '.join(layouts)}")
        return layouts[tag]

    def to_text(self) -> str:
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "mask_shape":
                value = ",".join(map(str, value))
            lines.append(f"{f.name} {int(value) if isinstance(value, bool) else value}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, origin: str = "<meta>") -> "DumpMeta":
        raw: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            key, _, value = line.strip().partition(" ")
            if key not in _KEYS and key not in _OPTIONAL_KEYS:
                raise DumpError(f"{origin}:{number}: unknown key {key!r}")
            if key in raw:
                raise DumpError(f"{origin}:{number}: key {key!r} given twice")
            raw[key] = value.strip()
        missing = [k for k in _KEYS if k not in raw and k not in _DEFAULTED_KNOBS]
        if missing:
            raise DumpError(f"{origin}: missing keys {', '.join(missing)}")
        try:
            sizes = {k: int(raw[k]) for k in _SIZE_KEYS}
            if bad := [k for k, size in sizes.items() if size < 1]:
                raise DumpError(f"{origin}: {', '.join(bad)} must be positive, got "
                                f"{', '.join(raw[k] for k in bad)}")
            meta = cls(**sizes)
            for key in ("is_causal", "smooth_k", "smooth_v"):
                if key in raw:
                    if raw[key] not in ("0", "1"):
                        raise DumpError(f"{origin}: {key} must be 0 or 1, got {raw[key]!r}")
                    setattr(meta, key, raw[key] == "1")
            for key, knob in (("pv_accum", PVAccum), ("granularity", QKGranularity)):
                if key in raw:  # a name, or ggml's code: kept as the name
                    setattr(meta, key, knob.parse(raw[key], key).value)
            for key in ("distribution", "source"):
                if key in raw:
                    setattr(meta, key, raw[key])
            if "dtype" in raw:
                if raw["dtype"] not in _DTYPES:
                    raise DumpError(f"{origin}: dtype must be f16 or bf16, got {raw['dtype']!r}")
                meta.dtype = raw["dtype"]
            if "softmax_scale" in raw:
                meta.softmax_scale = check_softmax_scale(float(raw["softmax_scale"]))
            if "seed" in raw:
                meta.seed = int(raw["seed"])
            if "mask_dtype" in raw or "mask_shape" in raw:
                meta.mask_dtype, meta.mask_shape = _parse_mask(raw, meta)
            meta.params  # validates pv_accum / granularity
            groups.padded_head_dim(meta.head_dim, "head_dim")
        except DumpError:
            raise
        except ValueError as err:
            raise DumpError(f"{origin}: {err}") from None
        return meta


def _parse_mask(raw: dict, meta: DumpMeta) -> tuple[str, tuple[int, ...]]:
    """``mask_dtype`` and ``mask_shape`` (both or neither): a dtype name and four sizes, each 1 or
    the call's ``[B, Hq, Sq, Sk]`` size there (a ValueError otherwise, `from_text` names the file)."""
    if "mask_dtype" not in raw or "mask_shape" not in raw:
        raise ValueError("mask_dtype and mask_shape must be given together")
    if raw["mask_dtype"] not in MASK_DTYPES:
        raise ValueError(f"mask_dtype must be one of {', '.join(MASK_DTYPES)}, got {raw['mask_dtype']!r}")
    full = (meta.batch, meta.num_q_heads, meta.seq_q, meta.seq_k)
    shape = tuple(int(size) for size in raw["mask_shape"].split(","))
    if len(shape) != 4 or any(size not in (1, target) for size, target in zip(shape, full)):
        raise ValueError(f"mask_shape must be four sizes broadcastable to [B, Hq, Sq, Sk] = "
                        f"{','.join(map(str, full))}, got {raw['mask_shape']!r}")
    return raw["mask_dtype"], shape


def tag_path(prefix: str, tag: str) -> str:
    return f"{prefix}.{tag}.bin"


def read_meta(prefix: str) -> DumpMeta:
    path = f"{prefix}.meta"
    if not os.path.isfile(path):
        raise DumpError(f"missing dump metadata {path}")
    with open(path, encoding="utf-8") as fh:
        return DumpMeta.from_text(fh.read(), path)


def has_tag(prefix: str, tag: str) -> bool:
    return os.path.isfile(tag_path(prefix, tag))


def read_tensor(prefix: str, meta: DumpMeta, tag: str) -> torch.Tensor:
    """Read ``<prefix>.<tag>.bin`` as a CPU tensor of the tag's dtype and shape."""
    dtype, shape = meta.tag_layout(tag)
    path = tag_path(prefix, tag)
    if not os.path.isfile(path):
        raise DumpError(f"missing dump file {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    expected = int(np.prod(shape)) * dtype.itemsize
    if raw.size != expected:
        raise DumpError(f"{path}: {raw.size} bytes, expected {expected} for {tuple(shape)} "
                        f"{str(dtype).removeprefix('torch.')}")
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def read_mask(prefix: str, meta: DumpMeta) -> torch.Tensor | None:
    """The call's ``attn_mask`` (broadcastable to ``[B, Hq, Sq, Sk]``), or None when it had none."""
    if meta.mask_shape is None:
        return None
    if meta.mask_dtype != "bool":
        return read_tensor(prefix, meta, ATTN_MASK)
    flags = read_tensor(prefix, meta, ATTN_MASK).view(torch.uint8)
    if flags.numel() and flags.max() > 1:
        raise DumpError(f"{tag_path(prefix, ATTN_MASK)}: a bool mask holds bytes 0 and 1 only, "
                        f"found {flags.max().item()}")
    return flags.view(torch.bool)


def read_output(prefix: str, meta: DumpMeta) -> torch.Tensor:
    """The official output ``[B,Hq,Sq,D0]``; a legacy ``.sage.bin`` is converted with a warning."""
    if has_tag(prefix, "sage_quant"):
        return read_tensor(prefix, meta, "sage_quant")
    if has_tag(prefix, "sage"):
        warnings.warn(LEGACY_WARNING.format(prefix=prefix), stacklevel=2)
        return read_tensor(prefix, meta, "sage").permute(3, 2, 1, 0).contiguous()
    raise DumpError(f"missing dump file {tag_path(prefix, 'sage_quant')} (and no legacy .sage.bin)")


def write_dump(prefix: str, meta: DumpMeta, tensors: dict) -> list[str]:
    """Write one ``.bin`` per tag, then ``<prefix>.meta``; returns the paths written. The meta
    goes last, and an older one first: a write that fails leaves no dump that looks loadable."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    if os.path.exists(f"{prefix}.meta"):
        os.remove(f"{prefix}.meta")
    for tag, tensor in tensors.items():
        write_tensor(prefix, meta, tag, tensor)
    with open(f"{prefix}.meta", "w", encoding="utf-8") as fh:
        fh.write(meta.to_text())
    return [f"{prefix}.meta", *(tag_path(prefix, tag) for tag in tensors)]


def write_tensor(prefix: str, meta: DumpMeta, tag: str, tensor: torch.Tensor) -> None:
    """Write one tag, checking the tensor against the tag's dtype and shape."""
    dtype, shape = meta.tag_layout(tag)
    if tuple(tensor.shape) != tuple(shape):
        raise DumpError(f"tag {tag!r}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    # A fresh C-order copy: .contiguous() keeps any stride of a size-1 dim (a broadcast mask's 0),
    # which the byte view refuses.
    packed = torch.empty(shape, dtype=dtype).copy_(tensor.detach())
    packed.view(torch.uint8).numpy().tofile(tag_path(prefix, tag))
