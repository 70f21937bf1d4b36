"""Exact float casts for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton 3.6's interpreter converts floats with its own bit manipulation (``_convert_float``), which
rounds fp32 -> e4m3 wrongly for about 15% of values: a mantissa carry is lost (0.4965 -> 0.25),
subnormals round twice and nothing saturates (482 -> NaN). Triton issue #8322, PRs #11897 and
#11667. On the GPU the same casts are ``cvt.rn.satfinite`` (round to nearest even, saturate to
±448), so interpreter runs of our kernels would disagree with both the GPU and the reference.
`install_exact_casts` swaps in torch's correctly rounded conversion, saturating e4m3 like the GPU.
It is only ever installed when the interpreter is on.
"""

from __future__ import annotations

import numpy as np
import torch

_FP8_E4M3_MAX = 448.0


def _torch_float_types():
    import triton.language as tl

    return {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
            tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}


def check_numpy() -> None:
    """Triton 3.6's interpreter int()s 1-element arrays (scalar kernel arguments in ``range``),
    which numpy 2.4 refuses; say so instead of failing deep inside a kernel."""
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        raise RuntimeError(f"TRITON_INTERPRET=1 needs numpy < 2.4 with Triton 3.6, found numpy "
                           f"{np.__version__}: pip install 'numpy<2.4'")


def install_exact_casts() -> None:
    """Replace the interpreter's float converter by torch's (idempotent)."""
    from triton.runtime import interpreter

    if getattr(interpreter._convert_float, "exact_casts", False):
        return
    inexact = interpreter._convert_float
    types = _torch_float_types()
    bit_views = {8: torch.uint8, 16: torch.int16, 32: torch.int32}

    def convert(data, input_dtype, output_dtype, rounding_mode):
        src, dst = types.get(input_dtype), types.get(output_dtype)
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode)
        if src is None or dst is None or rtz:
            return inexact(data, input_dtype, output_dtype, rounding_mode)
        bits = np.ascontiguousarray(data).view(f"uint{src.itemsize * 8}")
        x = torch.from_numpy(bits.astype(np.int64)).to(bit_views[src.itemsize * 8])
        x = x.view(src).to(torch.float32)
        if dst == torch.float8_e4m3fn:
            x = x.clamp(-_FP8_E4M3_MAX, _FP8_E4M3_MAX)  # satfinite, as cvt.rn.satfinite on the GPU
        out = x.to(dst).view(bit_views[dst.itemsize * 8]).numpy()
        return out.view(f"uint{dst.itemsize * 8}").reshape(data.shape)

    convert.exact_casts = True
    interpreter._convert_float = convert
