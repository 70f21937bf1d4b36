"""The kernels compile for Ada (sm_89) and Hopper (sm_90) without a GPU, onto the tensor cores.

Compiled in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EXPECTED = {  # (capability, pv_accum) -> fragments the Q·Kᵀ and P·V instructions must show
    (90, "fp32"): ("wgmma.mma_async", ".s32.s8.s8", ".f32.e4m3.e4m3"),
    (90, "fp32+fp32"): ("wgmma.mma_async", ".s32.s8.s8", ".f32.e4m3.e4m3"),
    (90, "fp32+fp16"): ("wgmma.mma_async", ".s32.s8.s8", ".f16.e4m3.e4m3"),
    (89, "fp32"): ("mma.sync.aligned.m16n8k32", ".s32.s8.s8.s32", ".f32.e4m3.e4m3.f32"),
    (89, "fp32+fp32"): ("mma.sync.aligned.m16n8k32", ".s32.s8.s8.s32", ".f32.e4m3.e4m3.f32"),
    (89, "fp32+fp16"): ("mma.sync.aligned.m16n8k32", ".s32.s8.s8.s32", ".f16.e4m3.e4m3.f16"),
}


# Consumer Blackwell (sm_120) takes Ada's launches (`attention.MMA_SYNC_ARCHS`): the same products.
EXPECTED.update({(120, pv_accum): EXPECTED[89, pv_accum] for pv_accum in ("fp32", "fp32+fp32", "fp32+fp16")})
# The most shared memory one block may have: Ada and consumer Blackwell 99 KiB, Hopper 227.
SHARED_BYTES = {89: 101376, 90: 232448, 120: 101376}


def compile_rows(*args: str) -> list[dict]:
    """The JSON lines of ``python -m sageflash.kernels.compile *args``."""
    # Neither the interpreter nor another arch's code path (TRITON_OVERRIDE_ARCH): each row is
    # compiled for the capability it names.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_OVERRIDE_ARCH")}
    run = subprocess.run([sys.executable, "-m", "sageflash.kernels.compile", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.fixture(scope="module")
def compiled_rows():
    return compile_rows("--capability", "89", "90", "120", "--head-dim", "64", "128")


@pytest.fixture(scope="module")
def compiled(compiled_rows):
    return {(r["capability"], r["pv_accum"], r["head_dim"]): set(r["mma"]) for r in compiled_rows}


def assert_tensor_cores(found, capability, pv_accum):
    family, qk, pv = EXPECTED[capability, pv_accum]
    assert all(i.startswith(family) for i in found), found
    assert any(qk in i for i in found), f"no int8 Q·Kᵀ product in {found}"
    assert any(pv in i for i in found), f"no fp8 P·V product in {found}"
    assert len(found) == 2, found  # nothing upcast to an fp16 mma behind our back


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("capability,pv_accum", EXPECTED)
def test_products_lower_to_tensor_cores(compiled, capability, pv_accum, head_dim):
    assert_tensor_cores(compiled[capability, pv_accum, head_dim], capability, pv_accum)


def test_each_row_of_scores_stays_in_one_warp(compiled_rows):
    """The tensor-core layouts of both products split the tile's warps along its rows only: split
    along N (what Triton does to a dot with N > M), a row's max and its P cross warps through shared
    memory in every key block, which made Ada's kernel 1.3-2.5x slower (benchmarks/NOTES.md v19)."""
    for row in compiled_rows:
        assert row["mma_warps"], row
        assert all(along_n == 1 for _, along_n in row["mma_warps"]), row


def test_p_rounds_once_to_e4m3(compiled_rows):
    """P becomes fp8 in one rounding to nearest even from float32 on both archs: Triton's own cast
    below sm_90 goes through fp16 (truncated first), which `quant.to_e4m3` replaces there."""
    for row in compiled_rows:
        assert row["e4m3_casts"] == ["cvt.rn.satfinite.e4m3x2.f32"], row


def test_hopper_kernels_wait_for_the_launch_before(compiled_rows):
    """From sm_90 the attention kernel is a dependent launch (PDL) and waits for the quantizer in
    the kernel; Ada has no griddepcontrol, so nothing is emitted there."""
    assert {(r["capability"], r["waits_for_earlier_launch"]) for r in compiled_rows} == {
        (89, False), (90, True), (120, True)}


def test_every_head_dim_and_mask_fits_each_archs_shared_memory():
    """Each padded head dim with each attn_mask element type (a mask's tile is pipelined with K's
    and V's) on the tensor cores, within the arch's shared memory: Ada's 128-row tile with a
    float32 mask needed 115,200 bytes in 3 stages (OutOfResources on every call), and sm_120 had
    Hopper's launches, sized for 227 KiB."""
    rows = compile_rows("--capability", "89", "90", "120", "--head-dim", "64", "128", "256",
                        "--pv-accum", "fp32+fp16", "--mask", "u8", "fp16", "fp32")
    assert {(r["capability"], r["head_dim"], r["mask"]) for r in rows} == {
        (c, d, m) for c in (89, 90, 120) for d in (64, 128, 256) for m in ("u8", "fp16", "fp32")}
    for row in rows:
        assert_tensor_cores(set(row["mma"]), row["capability"], "fp32+fp16")
        assert row["shared_bytes"] <= SHARED_BYTES[row["capability"]], row


def test_v_payload_is_stored_16_bytes_at_a_time():
    """The quantizer writes V's transposed fp8 payload in 16-byte stores on both archs. Stored with
    its tokens permuted into the kernel's order, each thread wrote one byte per store (8x the
    partial-sector writes; the pass at D=256 took 1.27-1.46x as long, benchmarks/NOTES.md v20)."""
    rows = compile_rows("--v-quantizer", "--head-dim", "64", "128", "256")
    assert {(r["capability"], r["head_dim"]) for r in rows} == {(c, d) for c in (89, 90) for d in (64, 128, 256)}
    for row in rows:
        assert row["global_stores"] == ["st.global.v4.b32"], row


def test_packed_batch_kernels_keep_their_pipelines():
    """The attention kernel of a packed batch (`sage_attn_varlen`) lowers to the same tensor cores
    and pipelines as many stages as the op's, within each arch's shared memory: its sequences' V
    columns come from a table, and only `tl.multiple_of` tells the compiler they are aligned
    (without it Ada's K and V loads were not pipelined: 40,992 bytes against 49,184 at D=128)."""
    args = ("--capability", "89", "90", "120", "--head-dim", "64", "128", "256", "--pv-accum", "fp32+fp16", "fp32")
    packed = {(r["capability"], r["head_dim"], r["pv_accum"]): r for r in compile_rows("--varlen", *args)}
    plain = {(r["capability"], r["head_dim"], r["pv_accum"]): r for r in compile_rows(*args)}
    assert packed.keys() == plain.keys() and len(packed) == 18
    for key, row in packed.items():
        assert_tensor_cores(set(row["mma"]), row["capability"], row["pv_accum"])
        assert row["shared_bytes"] == plain[key]["shared_bytes"] <= SHARED_BYTES[row["capability"]], row
        assert row["mma_warps"] == plain[key]["mma_warps"], row


def test_packed_v_payload_is_stored_16_bytes_at_a_time():
    rows = compile_rows("--v-quantizer", "--varlen", "--head-dim", "64", "128")
    assert len(rows) == 4 and all(row["global_stores"] == ["st.global.v4.b32"] for row in rows), rows
