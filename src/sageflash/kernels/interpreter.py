"""GPU float arithmetic for Triton's CPU interpreter (``TRITON_INTERPRET=1``): exact casts, fused FMA.

Triton 3.6's interpreter converts floats with its own bit manipulation (``_convert_float``), which
rounds fp32 -> e4m3 wrongly for about 15% of values: a mantissa carry is lost (0.4965 -> 0.25),
subnormals round twice and nothing saturates (482 -> NaN). Triton issue #8322, PRs #11897 and
#11667. On the GPU the same casts are ``cvt.rn.satfinite`` (round to nearest even, saturate to
±448), so interpreter runs of our kernels would disagree with both the GPU and the reference.
`install_gpu_arithmetic` swaps in torch's correctly rounded conversion, saturating e4m3 like the
GPU, and makes ``tl.fma`` on float32 fused (one rounding, as the GPU's FFMA): the interpreter
computes ``x * y + z`` with two, which breaks the quantizer's exact-residual division.
It also reduces with a combine function that names its numpy reduction (``numpy_reduction``) in
one numpy call: the interpreter otherwise calls a combine of ours element by element (12x slower
quantization). It is only ever installed when the interpreter is on.
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


def install_gpu_arithmetic() -> None:
    """Exact float casts and a fused float32 FMA in the interpreter (idempotent)."""
    _install_exact_casts()
    _install_fused_fma()
    _install_vectorised_reductions()


def fused_multiply_add(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 ``x * y + z`` rounded once: the product is exact in float64, the sum is rounded to
    odd there (its exact error from TwoSum), and round-to-odd at 53 bits then to nearest at 24
    equals one rounding to nearest. Infinities and NaNs come out as IEEE arithmetic gives them."""
    with np.errstate(invalid="ignore", over="ignore"):  # infinities (masked logits) pass through as is
        product, addend = x.astype(np.float64) * y.astype(np.float64), z.astype(np.float64)
        total = product + addend
        product_part = total - addend
        error = (product - product_part) + (addend - (total - product_part))
        inexact = np.isfinite(total) & (error != 0) & ((total.view(np.int64) & 1) == 0)
        total = np.where(inexact, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
        return total.astype(np.float32)


def _install_fused_fma() -> None:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_fma, "fused", False):
        return
    unfused = builder.create_fma

    def create_fma(self, x, y, z):
        if not all(h.data.dtype == np.float32 for h in (x, y, z)):
            return unfused(self, x, y, z)
        return interpreter.TensorHandle(fused_multiply_add(*np.broadcast_arrays(x.data, y.data, z.data)),
                                        z.dtype.scalar)

    create_fma.fused = True
    builder.create_fma = create_fma


def _install_vectorised_reductions() -> None:
    from triton.runtime import interpreter

    reduce_ops = interpreter.ReduceOps
    if getattr(reduce_ops.apply_impl, "vectorised", False):
        return
    element_by_element = reduce_ops.apply_impl

    def apply_impl(self, input):
        reduction = getattr(self.combine_fn, "numpy_reduction", None)
        if reduction is None:
            return element_by_element(self, input)
        return self.min_max(input[0], val_reduce_op=reduction)

    apply_impl.vectorised = True
    reduce_ops.apply_impl = apply_impl


def _install_exact_casts() -> None:
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
