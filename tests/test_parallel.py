"""Sequence parallelism (`sageflash.parallel`) in real process groups: gloo on the CPU (2, 3 and 4
spawned processes, reference backend and Triton's interpreter), NCCL on one and two GPUs.

Ulysses must give the single-device op's output and LSE bit for bit. Ring attention quantizes
each shard on its own, so it is checked against what it claims to compute: for every query
chunk, the op on each visible (query chunk, key chunk) pair merged by the LSEs in float64 here,
independently of which rank held which chunk; and against exact attention, as accurate as the op.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel_worker
import sageflash
from conftest import HAS_CUDA, ROOT, nmse
from helpers import PACKAGE_ROOT, exact_attention, exact_lse
from sageflash import parallel
from sageflash.parallel import agreement

INTERPRETER = not HAS_CUDA  # conftest sets TRITON_INTERPRET=1 without a GPU; spawned ranks inherit it

CASES = {
    2: [
        dict(name="ulysses", fn="ulysses", shape=(2, 4, 2, 96, 96, 64), dtype=torch.float16, seed=1),
        dict(name="ulysses_nhd_gqa_causal", fn="ulysses", shape=(1, 4, 1, 64, 128, 64), dtype=torch.bfloat16,
             seed=2, layout="NHD", knobs=dict(is_causal=True), mask="key_padding"),
        dict(name="ulysses_knobs_head_mask", fn="ulysses", shape=(2, 4, 4, 64, 64, 96), dtype=torch.float16,
             seed=3, mask="bool_per_head", v_offset=3.0,
             knobs=dict(pv_accum="fp32", smooth_v=True, granularity="per_warp", softmax_scale=0.07)),
        dict(name="ring_cross", fn="ring", shape=(2, 4, 2, 128, 192, 64), dtype=torch.float16, seed=4),
        dict(name="ring_causal", fn="ring", shape=(1, 4, 2, 256, 256, 64), dtype=torch.float16, seed=5,
             knobs=dict(is_causal=True)),
        dict(name="ring_zigzag_nhd_mask", fn="ring", shape=(1, 4, 2, 256, 256, 64), dtype=torch.bfloat16, seed=6,
             knobs=dict(is_causal=True), sharding="zigzag", layout="NHD", mask="bool_per_head"),
        dict(name="ring_knobs_alibi", fn="ring", shape=(1, 2, 1, 192, 192, 128), dtype=torch.float16, seed=7,
             mask="alibi_fp16", k_offset=5.0, v_offset=3.0,
             knobs=dict(pv_accum="fp32", smooth_v=True, granularity="per_warp", is_causal=True)),
        dict(name="gather_zigzag", fn="gather", shape=(1, 2, 1, 40, 40, 64), dtype=torch.float16, seed=8,
             sharding="zigzag", backward=True),
    ] + ([
        dict(name="ring_triton", fn="ring", shape=(1, 2, 1, 128, 128, 64), dtype=torch.float16, seed=9,
             knobs=dict(is_causal=True), sharding="zigzag", backend="triton"),
        dict(name="ulysses_triton", fn="ulysses", shape=(1, 2, 2, 64, 64, 64), dtype=torch.bfloat16, seed=10,
             knobs=dict(is_causal=True), backend="triton"),
    ] if INTERPRETER else []),
    3: [
        dict(name="ulysses", fn="ulysses", shape=(1, 6, 3, 96, 96, 64), dtype=torch.float16, seed=11,
             knobs=dict(is_causal=True)),
        dict(name="ring_causal_gqa", fn="ring", shape=(2, 6, 2, 120, 120, 64), dtype=torch.float16, seed=12,
             knobs=dict(is_causal=True, granularity="per_warp")),
        dict(name="ring_zigzag_cross", fn="ring", shape=(1, 2, 2, 120, 180, 64), dtype=torch.bfloat16, seed=13,
             sharding="zigzag", mask="additive_fp32_row"),
        dict(name="ring_rows_hidden_at_first", fn="ring", shape=(3, 2, 1, 72, 72, 64), dtype=torch.float16,
             seed=19, knobs=dict(is_causal=True), mask="key_padding"),  # batch 1: rank 2's own keys all hidden
        dict(name="gather", fn="gather", shape=(2, 2, 1, 30, 30, 64), dtype=torch.float16, seed=14),
        dict(name="gather_backward", fn="gather", shape=(2, 2, 1, 30, 30, 64), dtype=torch.bfloat16, seed=20,
             backward=True),
        # a shard the call refuses, on every rank alike (before any message, so nobody waits)
        dict(name="bad_q_heads", fn="ulysses", shape=(1, 4, 4, 48, 48, 64), dtype=torch.float16, seed=15,
             error="ValueError: ulysses_attention splits heads over the Ulysses group's 3 ranks: q has 4 heads"),
        dict(name="bad_kv_heads", fn="ulysses", shape=(1, 6, 2, 48, 48, 64), dtype=torch.float16, seed=16,
             error="ValueError: ulysses_attention splits heads over the Ulysses group's 3 ranks: k and v have 2 heads"),
        dict(name="bad_causal_cross", fn="ring", shape=(1, 2, 1, 48, 96, 64), dtype=torch.float16, seed=17,
             knobs=dict(is_causal=True),
             error="ValueError: causal ring attention needs q and k shards of the same length, got 16 and 32"),
        dict(name="bad_uneven_shards", fn="ring", shape=(1, 2, 1, 10, 10, 64), dtype=torch.float16, seed=24,
             shard_as="uneven", error="ValueError: ring_attention needs the same q on every rank of its group, got "
                                      "rank 0: ((1, 2, 4, 64), 'torch.float16', 'cpu'), rank 1: ((1, 2, 3, 64), "
                                      "'torch.float16', 'cpu'), rank 2: ((1, 2, 3, 64)"),
        dict(name="bad_mask_on_one_rank", fn="ulysses", shape=(1, 3, 3, 48, 48, 64), dtype=torch.float16, seed=25,
             mask="bool_sq_sk", bad_mask_rank=1,
             error={1: "ValueError: attn_mask must be broadcastable to [B, Hq, Sq, Sk] = [1, 3, 48, 48]",
                    "*": "ValueError: ulysses_attention: rank 1 refused its arguments (ValueError: attn_mask must "
                         "be broadcastable"}),
        dict(name="bad_override_on_one_rank", fn="ring", shape=(1, 2, 1, 48, 48, 64), dtype=torch.float16, seed=26,
             environment_of={2: {"GGML_SAGE_PV_ACCUM": "fp32+fp32"}},
             error="ValueError: ring_attention needs the same params on every rank of its group, got rank 0: "
                   "{'softmax_scale': 0.125, 'is_causal': False, 'smooth_k': True, 'smooth_v': False, "
                   "'pv_accum': 'fp32+fp16'"),
        dict(name="bad_type_on_one_rank", fn="ring", shape=(1, 2, 1, 48, 48, 64), dtype=torch.float16, seed=27,
             knobs_of={0: dict(smooth_k="yes")},
             error={0: "TypeError: smooth_k must be a bool",
                    "*": "ValueError: ring_attention: rank 0 refused its arguments (TypeError: smooth_k must be a "
                         "bool"}),
        dict(name="bad_debug_toggle_on_one_rank", fn="ulysses", shape=(1, 3, 3, 48, 48, 64), dtype=torch.float16,
             seed=28, environment_of={2: {"GGML_SAGE_DEBUG_QUANT": "1", "GGML_SAGE_SAMPLE_HEAD": "x"}},
             error={2: "ValueError: environment variable GGML_SAGE_SAMPLE_HEAD must be an integer >= 0, got 'x'",
                    "*": "ValueError: ulysses_attention: rank 2 refused its arguments (ValueError: environment "
                         "variable GGML_SAGE_SAMPLE_HEAD"}),
        dict(name="bad_sample_head_past_local_heads", fn="ulysses", shape=(1, 3, 3, 48, 48, 64),
             dtype=torch.float16, seed=30,  # each rank's op has one head: the op would refuse after an exchange
             environment_of={1: {"GGML_SAGE_DEBUG_QUANT": "1", "GGML_SAGE_SAMPLE_HEAD": "1"}},
             error={1: "ValueError: GGML_SAGE_SAMPLE_HEAD=1 is out of range: the call has 1 query heads",
                    "*": "ValueError: ulysses_attention: rank 1 refused its arguments (ValueError: "
                         "GGML_SAGE_SAMPLE_HEAD=1 is out of range"}),
        dict(name="bad_uneven_gather", fn="gather", shape=(1, 2, 1, 10, 10, 64), dtype=torch.float16, seed=36,
             shard_as="uneven", error="ValueError: gather_sequence needs the same x on every rank of its group, got "
                                      "rank 0: ((1, 2, 4, 64), 'torch.float16', 'cpu'), rank 1: ((1, 2, 3, 64)"),
        dict(name="bad_zigzag_gather_length", fn="gather", shape=(1, 2, 1, 9, 9, 64), dtype=torch.float16, seed=37,
             sharding="zigzag", shard_as="contiguous",
             error="ValueError: sharding='zigzag' holds two chunks per rank: x's local length along dim 2 must be "
                   "even, got 3"),
        dict(name="bad_zigzag_length", fn="ring", shape=(1, 2, 1, 51, 51, 64), dtype=torch.float16, seed=18,
             sharding="zigzag", shard_as="contiguous",
             error=("ValueError: sharding='zigzag' holds two chunks per rank: q's and k's local token counts "
                    "must be even, got 17 and 17")),
        dict(name="bad_mask_on_two_ranks_only", fn="ulysses", shape=(1, 3, 3, 48, 48, 64), dtype=torch.float16,
             seed=38, mask="bool_sq_sk", no_mask_on=0,  # each rank's own call is valid; together they are not
             error="ValueError: ulysses_attention needs the same attn_mask on every rank of its group, got rank 0: "
                   "None, rank 1: ((1, 1, 48, 48), 'torch.bool', 'cpu'), rank 2: ((1, 1, 48, 48), 'torch.bool', 'cpu')"),
        dict(name="bad_debug_toggles_differ", fn="ulysses", shape=(1, 3, 3, 48, 48, 64), dtype=torch.float16,
             seed=49, environment_of={0: {"GGML_SAGE_DEBUG_QUANT": "1"}},  # the op's debug path on one rank only
             error="ValueError: ulysses_attention needs the same debug toggles on every rank of its group, got "
                   "rank 0: ('GGML_SAGE_DEBUG_QUANT',), rank 1: (), rank 2: ()"),
        dict(name="bad_dump_path_on_one_rank", fn="ulysses", shape=(1, 3, 3, 48, 48, 64), dtype=torch.float16,
             seed=50, environment_of={0: {"GGML_SAGE_DUMP": "{out_dir}/dump"}, 2: {"GGML_SAGE_DUMP": "{out_dir}/dump"},
                                      1: {"GGML_SAGE_DUMP": "/proc/no-such-dir/dump"}},  # fails after the agreement
             error={1: "FileNotFoundError: ", "*": "ValueError: ulysses_attention: rank 1 failed in the op "
                                                   "(FileNotFoundError: "}),
        dict(name="bad_gather_backward_on_one_rank", fn="gather", shape=(1, 2, 1, 30, 30, 64), dtype=torch.float16,
             seed=51, backward=True, grad_only_on=1,  # its backward's all-reduce would wait for the others
             error="ValueError: gather_sequence needs the same autograd on every rank of its group, got rank 0: "
                   "False, rank 1: True, rank 2: False"),
        # after the refusals, in the same group: rank-local differences the ring takes (spellings of the
        # same knobs, a mask on one rank that keeps every key, no LSE on another)
        dict(name="ring_rank_local_differences", fn="ring", shape=(1, 2, 1, 96, 96, 64), dtype=torch.float16,
             seed=29, knobs=dict(is_causal=True, pv_accum="fp32+fp16"),
             knobs_of={1: dict(is_causal=1, pv_accum="FP32+FP16"), 2: dict(is_causal=True, pv_accum=2)},
             all_true_mask_on=1, environment_of={0: {"GGML_SAGE_SMOOTH_K": "true"}, 2: {"GGML_SAGE_SMOOTH_K": "1"}}),
        dict(name="ulysses_mask_shapes_that_broadcast_alike", fn="ulysses", shape=(1, 3, 3, 48, 48, 64),
             dtype=torch.float16, seed=52, mask="bool_sq_sk", mask_unsqueezed_on=1),
    ],
    4: [  # USP on grids of Ulysses groups of consecutive ranks: 2 x 2, 4 x 1 and 1 x 4
        dict(name="usp_2x2_zigzag_causal_nhd_mask", fn="usp", ulysses_size=2, shape=(1, 4, 2, 256, 256, 64),
             dtype=torch.float16, seed=41, knobs=dict(is_causal=True), sharding="zigzag", layout="NHD",
             mask="bool_per_head"),
        dict(name="usp_2x2_cross_kv_repeated", fn="usp", ulysses_size=2, shape=(2, 4, 1, 128, 192, 64),
             dtype=torch.bfloat16, seed=42, mask="key_padding"),
        dict(name="usp_4x1", fn="usp", ulysses_size=4, shape=(1, 8, 4, 128, 128, 64), dtype=torch.float16,
             seed=43, knobs=dict(is_causal=True, pv_accum="fp32+fp32")),
        dict(name="usp_1x4", fn="usp", ulysses_size=1, shape=(1, 2, 1, 128, 128, 64), dtype=torch.float16,
             seed=44, knobs=dict(is_causal=True), sharding="zigzag"),
        dict(name="bad_usp_heads", fn="usp", ulysses_size=4, shape=(1, 6, 2, 64, 64, 64), dtype=torch.float16,
             seed=45, error="ValueError: usp_attention splits heads over the Ulysses group's 4 ranks: q has 6 heads"),
        dict(name="bad_usp_override_in_one_ulysses_group", fn="usp", ulysses_size=2, shape=(1, 4, 2, 64, 64, 64),
             dtype=torch.float16, seed=47,  # each Ulysses group agrees within; only the ring groups see it
             environment_of={2: {"GGML_SAGE_GRANULARITY": "per_warp"}, 3: {"GGML_SAGE_GRANULARITY": "per_warp"}},
             error="ValueError: usp_attention needs the same params on every rank of its group"),
        dict(name="bad_usp_mask_on_one_rank", fn="usp", ulysses_size=2, shape=(1, 4, 2, 64, 64, 64),
             dtype=torch.float16, seed=46, mask="key_padding", bad_mask_rank=3,  # reaches all 4 in two steps
             error={3: "ValueError: attn_mask must be broadcastable to [B, Hq, Sq, Sk] = [1, 4, 32, 64], got "
                       "shape [1, 1, 1, 63]",
                    "*": "ValueError: usp_attention: rank 3 refused its arguments (ValueError: attn_mask must be "
                         "broadcastable"}),
        dict(name="bad_usp_groups_not_a_grid", fn="usp", ulysses_size=2, shape=(1, 4, 2, 64, 64, 64),
             dtype=torch.float16, seed=48, ring_over_world=True,  # a ring of all 4 ranks over Ulysses pairs
             error="ValueError: usp_attention needs the same (rank, size) in ring_group (ulysses_group and "
                   "ring_group must form a grid) on every rank of its group, got rank "),
    ],
}


def spawn(world_size: int, cases: list[dict], tmp_path, dist_backend: str = "gloo") -> dict:
    """Run ``cases`` in a group of ``world_size`` spawned processes; each case's per-rank results."""
    mp.start_processes(parallel_worker.run, args=(world_size, str(tmp_path / "rendezvous"), cases,
                                                  str(tmp_path), dist_backend),
                       nprocs=world_size, start_method="spawn")
    return {case["name"]: [torch.load(tmp_path / f"{case['name']}.{rank}.pt") for rank in range(world_size)]
            for case in cases}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """``results(world_size, case)``: the case's per-rank results; every case of a group size runs
    in one group, spawned on first use."""
    runs = {}

    def results(world_size: int, case: dict) -> list[dict]:
        if world_size not in runs:
            runs[world_size] = spawn(world_size, CASES[world_size], tmp_path_factory.mktemp(f"P{world_size}"))
        return runs[world_size][case["name"]]
    return results


def rank_positions(case: dict, rank: int, world_size: int) -> torch.Tensor:
    """The global positions of ``rank``'s tokens: its ring shard (`sequence_positions`), then its
    Ulysses group's piece of it (a Ulysses call: one ring shard; a ring call: Ulysses groups of one)."""
    ulysses_size = world_size if case["fn"] == "ulysses" else case.get("ulysses_size", 1)
    ring_shard = parallel.sequence_positions(case["shape"][3], rank // ulysses_size, world_size // ulysses_size,
                                             case.get("sharding", "contiguous"))
    return ring_shard.view(ulysses_size, -1)[rank % ulysses_size]


def assemble(case: dict, results: list[dict], world_size: int):
    """The whole sequence's output and LSE from the ranks' shards, by `rank_positions`."""
    seq_q = case["shape"][3]
    out = lse = None
    for rank, result in enumerate(results):
        assert "error" not in result, result["error"]
        positions = rank_positions(case, rank, world_size)
        if out is None:
            out = result["out"].new_full((*result["out"].shape[:2], seq_q, *result["out"].shape[3:]), math.nan)
            lse = None if result["lse"] is None else result["lse"].new_full((*result["lse"].shape[:2], seq_q), math.nan)
        out[:, :, positions] = result["out"]
        if lse is not None:
            lse[:, :, positions] = result["lse"]
    return out, lse


def chunk_pairs_merged(case: dict, world_size: int):
    """What ring attention claims to compute: per query chunk, the op on every visible (query
    chunk, key chunk) pair — the same chunk causal, an earlier one whole, a later one skipped
    when causal — merged by the pairs' LSEs in float64."""
    q, k, v, mask = parallel_worker.case_inputs(case)
    knobs = case.get("knobs", {})
    causal = knobs.get("is_causal", False)
    chunks = world_size * (2 if case.get("sharding") == "zigzag" else 1)
    q_len, k_len = q.shape[2] // chunks, k.shape[2] // chunks
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    outs, lses = [], []
    for a in range(chunks):
        rows = slice(a * q_len, (a + 1) * q_len)
        parts = []
        for b in range(a + 1 if causal else chunks):
            keys = slice(b * k_len, (b + 1) * k_len)
            parts.append(sageflash.sage_attn_sm89_fp16(
                q[:, :, rows], k[:, :, keys], v[:, :, keys], **dict(knobs, is_causal=causal and a == b),
                return_lse=True, attn_mask=None if mask is None else mask[:, :, rows, keys],
                backend=case.get("backend", "reference")))
        lse = torch.logsumexp(torch.stack([part_lse.double() for _, part_lse in parts]), dim=0)
        weights = [torch.exp(part_lse.double() - lse).nan_to_num(0.0)[..., None] for _, part_lse in parts]
        outs.append(sum(w * part_out.double() for w, (part_out, _) in zip(weights, parts)).to(q.dtype))
        lses.append(lse.float())
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def cases_of(fn: str | None):
    """The cases calling ``fn`` that run, or (None) those the call refuses."""
    return [pytest.param(size, case, id=f"P{size}-{case['name']}")
            for size, cases in CASES.items() for case in cases
            if (("error" in case) if fn is None else (case["fn"] == fn and "error" not in case))]


@pytest.mark.parametrize("world_size, case", cases_of("ulysses"))
def test_ulysses_is_the_op_bit_for_bit(group_results, world_size, case):
    results = group_results(world_size, case)
    out, lse = assemble(case, results, world_size)
    q, k, v, mask = parallel_worker.case_inputs(case)
    expected, expected_lse = sageflash.sage_attn_sm89_fp16(
        q, k, v, **case.get("knobs", {}), return_lse=True, attn_mask=mask, backend=case.get("backend", "reference"))
    assert torch.equal(out, expected)
    assert torch.equal(lse, expected_lse)


@pytest.mark.parametrize("world_size, case", cases_of("ring"))
def test_ring_is_the_chunk_pairs_merged(group_results, world_size, case):
    results = group_results(world_size, case)
    out, lse = assemble(case, results, world_size)
    expected, expected_lse = chunk_pairs_merged(case, world_size)
    torch.testing.assert_close(out, expected)  # the dtype's tolerance: one rounding apart
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)

    q, k, v, mask = parallel_worker.case_inputs(case)
    knobs = case.get("knobs", {})
    exact = exact_attention(q, k, v, knobs.get("softmax_scale"), knobs.get("is_causal", False), mask)
    single = sageflash.sage_attn_sm89_fp16(q, k, v, **knobs, attn_mask=mask, backend="reference")
    assert nmse(out, exact) < 1.5 * nmse(single, exact)  # as accurate as one device
    exact_log = exact_lse(q, k, knobs.get("softmax_scale"), knobs.get("is_causal", False), mask)
    torch.testing.assert_close(lse.double(), exact_log, rtol=0, atol=2e-2)


@pytest.mark.parametrize("world_size, case", cases_of("usp"))
def test_usp_is_the_ring_over_its_ring_shards(group_results, world_size, case):
    """Heads are independent: USP gives each head what ring attention over the ring group's
    shards gives it (the chunk pairs of ``P / P_u`` ranks, merged)."""
    out, lse = assemble(case, group_results(world_size, case), world_size)
    expected, expected_lse = chunk_pairs_merged(case, world_size // case["ulysses_size"])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world_size, case", cases_of(None))
def test_bad_shards_are_named_on_every_rank(group_results, world_size, case):
    """Every rank raises (none is left waiting in a collective), the rank at fault with its own
    error, its peers saying which rank refused or what differs."""
    expected = case["error"] if isinstance(case["error"], dict) else {"*": case["error"]}
    for rank, result in enumerate(group_results(world_size, case)):
        assert result.get("error", "").startswith(expected.get(rank, expected["*"])), (rank, result)


@pytest.mark.parametrize("world_size, case", cases_of("gather"))
def test_gather_sequence_puts_the_shards_back(group_results, world_size, case):
    """And its backward gives each shard the sum of every rank's gradient of its tokens."""
    results = group_results(world_size, case)
    whole = parallel_worker.case_inputs(case)[0]
    assert all(torch.equal(r["out"], whole) for r in results)
    if case.get("backward"):
        summed = sum(parallel_worker.gather_weights(case, rank).float() for rank in range(world_size))
        for rank, result in enumerate(results):
            positions = parallel.sequence_positions(whole.shape[2], rank, world_size, case.get("sharding", "contiguous"))
            # the gradient, summed by the all-reduce in the dtype (rounded per addition, in its order)
            torch.testing.assert_close(result["lse"].float(), summed[:, :, positions], rtol=2e-2, atol=2e-2)


# --- in one process ---------------------------------------------------------------------------


def test_zigzag_gives_rank_r_chunks_r_and_2p_minus_1_minus_r():
    assert parallel.sequence_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert parallel.sequence_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert parallel.sequence_positions(9, 2, 3).tolist() == [6, 7, 8]
    x = torch.arange(24.0).view(1, 1, 12, 2)
    assert parallel.shard_sequence(x, 1, 3, sharding="zigzag")[0, 0, :, 0].tolist() == [4, 6, 16, 18]
    assert parallel.shard_sequence(x, 1, 2).data_ptr() == x[:, :, 6:].data_ptr()  # contiguous: a view


@pytest.mark.parametrize("args, message", [
    ((10, 0, 3), "seq_len must be a multiple of 3, got 10"),
    ((12, 0, 4, "zigzag"), "seq_len must be a multiple of 8, got 12"),
    ((12, 3, 3), "rank must be in [0, world_size) = [0, 3), got 3"),
    ((12, 0, 3, "strided"), "sharding must be one of 'contiguous', 'zigzag', got 'strided'"),
])
def test_sequence_positions_rejects(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parallel.sequence_positions(*args)


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized here")
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    for call in (parallel.ring_attention, parallel.ulysses_attention):
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            call(q, q, q)


# A one-rank ring's LSE against the op's: the ring's merge adds smooth_k's term to an LSE already
# rounded to float32 (the op adds it before), so they may differ by float32 roundings (of the LSE
# and of the term: an absolute part for LSEs near 0).
ONE_RANK_LSE_RTOL, ONE_RANK_LSE_ATOL = 1e-6, 1e-6


@pytest.fixture
def one_rank_group(tmp_path):
    """The default process group of this process alone: ``join(backend)`` ("gloo" on first use)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized here")

    def join(backend: str = "gloo") -> None:
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield join
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if INTERPRETER else []))
def test_one_rank_is_the_op(one_rank_group, sharding, layout, backend):
    """One rank: Ulysses is the op, ring attention over one chunk too (the same payloads, bit for
    bit on either backend); over zigzag's two chunks it is the chunk pairs merged."""
    one_rank_group()
    q, k, v = (x.transpose(1, 2) if layout == "NHD" else x
               for x in parallel_worker.case_inputs(dict(shape=(2, 4, 2, 64, 64, 64), dtype=torch.float16, seed=21))[:3])
    knobs = dict(is_causal=True, tensor_layout=layout, return_lse=True, backend=backend)
    expected = sageflash.sage_attn_sm89_fp16(q, k, v, **knobs)
    ulysses = parallel.ulysses_attention(q, k, v, **knobs)
    ring = parallel.ring_attention(q, k, v, sharding=sharding, **knobs)
    for got in (ulysses, ring):
        assert got[0].is_contiguous() and got[0].shape == q.shape
    assert torch.equal(ulysses[0], expected[0]) and torch.equal(ulysses[1], expected[1])
    if sharding == "contiguous":  # the LSE's smooth_k term is added by the merge: float32 rounding apart
        assert torch.equal(ring[0], expected[0])
        torch.testing.assert_close(ring[1], expected[1], rtol=ONE_RANK_LSE_RTOL, atol=ONE_RANK_LSE_ATOL)
    else:
        case = dict(shape=(2, 4, 2, 64, 64, 64), dtype=torch.float16, seed=21, knobs=dict(is_causal=True),
                    sharding="zigzag", backend=backend)
        merged, merged_lse = chunk_pairs_merged(case, 1)
        as_hnd = (lambda x: x.transpose(1, 2)) if layout == "NHD" else (lambda x: x)
        torch.testing.assert_close(as_hnd(ring[0]), merged)
        torch.testing.assert_close(ring[1], merged_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_one_rank_ulysses_exchanges_nothing(one_rank_group, monkeypatch, layout):
    """A Ulysses group of one rank holds every head already: Ulysses is the op and USP the ring,
    with no all-to-all (its copies of q, k, v and the output cost 0.78-0.86x the op's speed at
    16k tokens on one GPU, NOTES v25) and no agreement."""
    one_rank_group()

    def no_exchange(*args, **kwargs):
        raise AssertionError("a group of one rank exchanged something")
    monkeypatch.setattr(dist, "all_to_all_single", no_exchange)
    monkeypatch.setattr(agreement, "_all_digests", no_exchange)  # nor agrees with nobody
    q, k, v = (x.transpose(1, 2) if layout == "NHD" else x
               for x in parallel_worker.case_inputs(dict(shape=(2, 4, 2, 64, 64, 64), dtype=torch.float16, seed=39))[:3])
    knobs = dict(is_causal=True, tensor_layout=layout, return_lse=True, backend="reference")
    expected = sageflash.sage_attn_sm89_fp16(q, k, v, **knobs)
    ring = parallel.ring_attention(q, k, v, **knobs)
    for got in (parallel.ulysses_attention(q, k, v, **knobs),
                parallel.usp_attention(q, k, v, ulysses_group=None, ring_group=None, **knobs)):
        assert got[0].is_contiguous() and got[0].shape == q.shape
        assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], ring[1])  # USP's LSE is the ring's (smooth_k's term added by its merge)


def test_ring_says_once_that_it_ignores_the_debug_toggles(one_rank_group, monkeypatch, caplog):
    """The ring's pairs call the backend directly: a toggle set for it would do nothing, silently."""
    one_rank_group()
    monkeypatch.setattr(sageflash.params, "_said_once", set())
    monkeypatch.setenv("GGML_SAGE_DEBUG_QUANT", "1")
    q, k, v = parallel_worker.case_inputs(dict(shape=(1, 2, 1, 32, 32, 64), dtype=torch.float16, seed=40))[:3]
    with caplog.at_level(logging.WARNING, logger="sageflash"):
        for _ in range(2):
            parallel.ring_attention(q, k, v, backend="reference")
    messages = [r.getMessage() for r in caplog.records if "debug toggles" in r.getMessage()]
    assert messages == ["ring attention runs its chunk pairs without the debug toggles (GGML_SAGE_DEBUG_QUANT "
                        "set): to dump or trace a call, run sageflash.sage_attn_sm89_fp16 on one device"]


@pytest.mark.parametrize("call, kwargs, error, message", [
    ("ring", dict(sharding="strided"), ValueError, "sharding must be one of 'contiguous', 'zigzag'"),
    ("ring", dict(group="world"), TypeError, "group must be a torch.distributed.ProcessGroup or None, got str"),
    ("ring", dict(attn_mask=torch.ones(32, 48, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable to [B, Hq, Sq, Sk] = [1, 2, 32, 32], got shape [32, 48]"),
    ("ulysses", dict(attn_mask=torch.ones(2, 32, 16, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable to [B, Hq, Sq, Sk] = [1, 2, 32, 32], got shape [2, 32, 16]"),
    ("ulysses", dict(pv_accum="fp16"), ValueError, "pv_accum must be one of"),
    ("ring", dict(backend="cuda"), ValueError, "backend must be one of auto, reference, triton"),
])
def test_bad_arguments_are_named(one_rank_group, call, kwargs, error, message):
    one_rank_group()
    q = torch.randn(1, 2, 32, 64, dtype=torch.float16)
    fn = parallel.ring_attention if call == "ring" else parallel.ulysses_attention
    with pytest.raises(error, match=re.escape(message)):
        fn(q, q, q, **kwargs)


def test_ring_sends_half_the_bytes_of_fp16_k_and_v():
    """The ring's message is K's and V's 8-bit payloads with their scales and means."""
    from sageflash import reference
    from sageflash.parallel import ring

    q, k, v = parallel_worker.case_inputs(dict(shape=(1, 8, 8, 1024, 1024, 128), dtype=torch.float16, seed=22))[:3]
    params = sageflash.resolve_params(head_dim=128, pv_accum="fp32", smooth_v=True)
    _, packed, _ = ring._quantize_chunks(reference, q, k, v, params, chunks=2)
    fp16_bytes = (k.numel() + v.numel()) * 2
    assert fp16_bytes / 2 < packed.buffer.numel() < 0.51 * fp16_bytes


# --- on GPUs --------------------------------------------------------------------------------


GPU_CASES = [
    dict(name="ulysses", fn="ulysses", shape=(1, 8, 2, 2048, 2048, 128), dtype=torch.float16, seed=31,
         knobs=dict(is_causal=True), backend="auto"),
    # chunks of 1024 keys or more over two ranks: K and V read through TMA descriptors on Hopper
    dict(name="ring_zigzag", fn="ring", shape=(2, 8, 2, 4096, 4096, 128), dtype=torch.bfloat16, seed=32,
         knobs=dict(is_causal=True), sharding="zigzag", layout="NHD", backend="auto"),
    dict(name="ring_d256", fn="ring", shape=(1, 4, 2, 2048, 2048, 256), dtype=torch.float16, seed=35,
         knobs=dict(is_causal=True, pv_accum="fp32+fp32"), backend="auto"),
    dict(name="ring_mask_d64", fn="ring", shape=(1, 4, 4, 1000, 1536, 64), dtype=torch.float16, seed=33,
         mask="key_padding", knobs=dict(pv_accum="fp32", smooth_v=True), backend="auto"),
]


def check_gpu_case(case: dict, out, lse, world_size: int) -> None:
    if case["fn"] == "usp":
        expected, expected_lse = chunk_pairs_merged(case, world_size // case["ulysses_size"])
        torch.testing.assert_close(out.cpu(), expected.cpu())
        torch.testing.assert_close(lse.cpu(), expected_lse.cpu(), rtol=1e-5, atol=1e-5)
    elif case["fn"] == "ulysses":
        q, k, v, mask = parallel_worker.case_inputs(case)
        expected = sageflash.sage_attn_sm89_fp16(q, k, v, **case["knobs"], return_lse=True, attn_mask=mask)
        assert torch.equal(out.cpu(), expected[0].cpu()) and torch.equal(lse.cpu(), expected[1].cpu())
    else:
        expected, expected_lse = chunk_pairs_merged(case, world_size)
        torch.testing.assert_close(out.cpu(), expected.cpu())
        torch.testing.assert_close(lse.cpu(), expected_lse.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c["name"])
def test_gpu_one_rank(one_rank_group, case):
    """The Triton backend through both paths in a one-GPU NCCL group (no peer to send to)."""
    one_rank_group("nccl")
    case = dict(case, device="cuda")
    out, lse = parallel_worker.rank_call(case, 0, 1)
    if case["fn"] == "ring" and case.get("sharding") != "zigzag":
        q, k, v, mask = parallel_worker.case_inputs(case)  # one chunk: the op itself
        expected = sageflash.sage_attn_sm89_fp16(q, k, v, **case["knobs"], return_lse=True, attn_mask=mask)
        assert torch.equal(out, expected[0])
        torch.testing.assert_close(lse, expected[1], rtol=ONE_RANK_LSE_RTOL, atol=ONE_RANK_LSE_ATOL)
    else:
        check_gpu_case(case, out, lse, 1)


@pytest.mark.gpu
def test_gpu_digests_of_an_nccl_group(one_rank_group):
    """On an NCCL-only group the digests travel as CUDA tensors on the agreement's own stream (a
    group of one rank skips the agreement, so the calls above do not reach this)."""
    one_rank_group("nccl")
    device = torch.device("cuda", torch.cuda.current_device())
    assert agreement._digest_device(None, device) == device
    assert agreement._all_digests(None, -(2 ** 62) - 5, device) == [-(2 ** 62) - 5]


@pytest.mark.gpu
def test_gpu_two_ranks_over_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    cases = GPU_CASES + [  # USP: Ulysses over both GPUs, rings of one; then rings over both
        dict(name=f"usp_{size}x{2 // size}", fn="usp", ulysses_size=size, shape=(1, 8, 2, 2048, 2048, 128),
             dtype=torch.float16, seed=34, knobs=dict(is_causal=True), sharding="zigzag", backend="auto")
        for size in (2, 1)]
    results = spawn(2, cases, tmp_path, "nccl")
    for case in cases:
        out, lse = assemble(case, results[case["name"]], 2)
        check_gpu_case(dict(case, device="cuda"), out, lse, 2)


@pytest.mark.parametrize("name", ["ulysses_attention", "ring_attention", "usp_attention"])
def test_backward_raises_instead_of_dropping_gradients(one_rank_group, name):
    """The collectives record no autograd: without a raising backward, training through a call
    would leave q, k and v without gradients, silently."""
    one_rank_group()
    q, k, v = (x.requires_grad_() for x in parallel_worker.case_inputs(
        dict(shape=(1, 2, 1, 32, 32, 64), dtype=torch.float16, seed=23))[:3])
    call = getattr(parallel, name)
    groups = dict(ulysses_group=None, ring_group=None) if name == "usp_attention" else {}
    out, lse = call(q, k, v, return_lse=True, backend="reference", **groups)
    expected = sageflash.sage_attn_sm89_fp16(q.detach(), k.detach(), v.detach(), return_lse=True, backend="reference")
    assert torch.equal(out.detach(), expected[0])
    torch.testing.assert_close(lse.detach(), expected[1], rtol=ONE_RANK_LSE_RTOL, atol=ONE_RANK_LSE_ATOL)
    for result in (out, lse):
        result.mul_(1)  # in-place ops on the outputs stay allowed, as on the op's
        with pytest.raises(NotImplementedError, match=f"sageflash.parallel.{name} has no backward"):
            result.float().sum().backward()
    with torch.no_grad():
        assert not call(q, k, v, backend="reference", **groups).requires_grad


def test_bench_parallel_runs_every_method(tmp_path):
    """`benchmarks/bench_parallel.py` end to end (gloo on the CPU here: a smoke run, its times
    mean nothing): a table row and a CSV row per method and shape, each with a time and the op's
    single-device time to compare with."""
    csv_path = tmp_path / "parallel.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_parallel.py"), "--world", "2",
                           "--seq", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--causal", "yes",
                           "--methods", "ulysses,ring,ring-zigzag,usp", "--ulysses-size", "2", "--iters", "1",
                           "--rounds", "1", "--csv", str(csv_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["method"] for row in rows] == ["ulysses", "ring", "ring-zigzag", "usp"]
    for row in rows:
        assert not row["error"] and float(row["ms"]) > 0 and float(row["single_ms"]) > 0, row
        assert float(row["speedup"]) == pytest.approx(float(row["single_ms"]) / float(row["ms"]))
        assert f"| {row['method']} | 2 | 1 | 4 | 2 | 64 | 64 | yes |" in proc.stdout


def test_usp_groups_need_a_divisor_of_the_ranks(one_rank_group):
    one_rank_group()
    for size in (2, 0, True, 1.0):
        with pytest.raises(ValueError, match="ulysses_size must be a positive divisor of the 1 ranks"):
            parallel.usp_groups(size)
    ulysses, ring = parallel.usp_groups(1)
    assert dist.get_process_group_ranks(ulysses) == dist.get_process_group_ranks(ring) == [0]


def test_a_group_initialised_without_a_backend(one_rank_group):
    """torch picks the backend ("undefined" by name; its config says cpu:gloo here): the agreement
    reads the config, not the name, and keeps its digest on the CPU."""
    one_rank_group(None)
    assert agreement._digest_device(None, torch.device("cpu")) == torch.device("cpu")
    q, k, v = parallel_worker.case_inputs(dict(shape=(1, 2, 1, 32, 32, 64), dtype=torch.float16, seed=24))[:3]
    expected = sageflash.sage_attn_sm89_fp16(q, k, v, backend="reference")
    for call in (parallel.ring_attention, parallel.ulysses_attention):
        assert torch.equal(call(q, k, v, backend="reference"), expected)
