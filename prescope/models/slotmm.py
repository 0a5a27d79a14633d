"""Expert projections over a pool of slots on a CUDA device: one Triton kernel per projection, reading each
block's slot from a table, so any number of slots (and any slot ids) run in one launch.

transformers' grouped matrix product (`torch._grouped_mm`) refuses more than 1024 groups on CUDA, and a
slot pool holds up to L·E experts (6,144 for Qwen3-30B-A3B). Here the (token, k) pairs are sorted by slot
and each slot's run of rows is padded to a multiple of `BLOCK_M` (`align`, torch operations of fixed
shapes with no host synchronisation, so they sit in a CUDA graph); every program of the kernel computes a
`BLOCK_M × BLOCK_N` tile of one block with its slot's weights, accumulating in float32; blocks past the
last run, and pairs computed elsewhere (slot id S), exit at once.

Letters: M (token, k) pairs, S slots, BM rows per block, Mp padded rows, T tokens, D in, F out features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64


@dataclass(frozen=True)
class SlotPlan:
    """Where each pair goes: padded row of each pair [M], pair of each padded row [Mp] (-1: padding) and
    slot of each block [Mp / BM] (-1: nothing to compute)."""

    row_of_pair: torch.Tensor
    pair_of_row: torch.Tensor
    block_slot: torch.Tensor


def align(slots: torch.Tensor, num_slots: int, block_m: int = BLOCK_M) -> SlotPlan:
    """Sort pairs by slot (`slots [M]`, S = sentinel) and pad each slot's run to whole blocks."""
    M = slots.numel()
    device = slots.device
    ordered, perm = torch.sort(slots)  # [M]
    rank_all = torch.arange(M, device=device)
    start = torch.ones(M, dtype=torch.bool, device=device)
    start[1:] = ordered[1:] != ordered[:-1]
    run = torch.cumsum(start, 0) - 1  # [M] run (slot) index of each sorted pair
    first = torch.full((M,), M, dtype=torch.int64, device=device).scatter_reduce_(0, run, rank_all, "amin")
    rank = rank_all - first[run]  # [M] position inside its run
    length = torch.zeros(M, dtype=torch.int64, device=device).scatter_add_(0, run, torch.ones_like(run))
    padded = (length + block_m - 1) // block_m * block_m  # [M] per run
    ends = torch.cumsum(padded, 0)  # [M]
    dest = ends[run] - padded[run] + rank  # [M] padded row of each sorted pair
    most = M + min(M, num_slots + 1) * (block_m - 1)  # every run padded by at most BM − 1 rows
    rows = (most + block_m - 1) // block_m * block_m  # [Mp], a bound fixed by M and S alone
    pair_of_row = torch.full((rows,), -1, dtype=torch.int64, device=device).scatter_(0, dest, perm)
    row_of_pair = torch.empty(M, dtype=torch.int64, device=device).scatter_(0, perm, dest)
    run_slot = torch.full((M,), num_slots, dtype=torch.int64, device=device).scatter_(0, run, ordered)
    block_start = torch.arange(0, rows, block_m, device=device)  # [Mp / BM]
    block_run = torch.searchsorted(ends, block_start, right=True)  # the run each block falls in (M: none)
    slot = run_slot[block_run.clamp(max=M - 1)]
    block_slot = torch.where((block_run < M) & (slot < num_slots), slot, -1)
    return SlotPlan(row_of_pair, pair_of_row, block_slot)


def row_slots(plan: SlotPlan, block_m: int = BLOCK_M) -> torch.Tensor:
    """[Mp] the slot of each padded row (-1 where its block computes nothing)."""
    return plan.block_slot[:, None].expand(-1, block_m).reshape(-1)


def slot_matmul(x: torch.Tensor, source: torch.Tensor, weight: torch.Tensor, plan: SlotPlan,
                transposed: bool) -> torch.Tensor:
    """[Mp, F]: padded row r is `x[source[r]] @ W[s]ᵀ` (or `@ W[s]` when `transposed`) with s its block's slot;
    `source [Mp]` is the row of `x` each padded row reads (-1: padding, left unwritten with its block)."""
    import triton

    features = weight.shape[2] if transposed else weight.shape[1]
    depth = x.shape[1]
    out = torch.empty((source.numel(), features), dtype=x.dtype, device=x.device)  # [Mp, F]
    stride_f, stride_d = (weight.stride(2), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(2))
    grid = (plan.block_slot.numel(), triton.cdiv(features, BLOCK_N))
    _slot_matmul_kernel[grid](x, source, weight, out, plan.block_slot, features, depth,
                              x.stride(0), x.stride(1), weight.stride(0), stride_f, stride_d,
                              out.stride(0), out.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, source_ptr, w_ptr, out_ptr, block_slot_ptr, F: tl.constexpr, D: tl.constexpr, stride_xm, stride_xd,
               stride_ws, stride_wf,
               stride_wd, stride_om, stride_of, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        block, tile = tl.program_id(0), tl.program_id(1)
        slot = tl.load(block_slot_ptr + block)
        if slot < 0:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] padded rows
        src = tl.load(source_ptr + rows)
        valid = src >= 0
        src = tl.where(valid, src, 0)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w = w_ptr + slot.to(tl.int64) * stride_ws
        for d0 in range(0, D, BLOCK_K):
            ds = d0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + src[:, None].to(tl.int64) * stride_xm + ds[None, :] * stride_xd,
                        mask=valid[:, None] & (ds[None, :] < D), other=0.0)  # [BM, BK]
            b = tl.load(w + ds[:, None] * stride_wd + cols[None, :] * stride_wf,
                        mask=(ds[:, None] < D) & (cols[None, :] < F), other=0.0)  # [BK, BN]
            acc += tl.dot(a, b)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_of,
                 acc.to(out_ptr.dtype.element_ty), mask=cols[None, :] < F)

    return kernel


class _Lazy:
    """The kernel compiled on first use (importing Triton costs time, and the CPU never needs it)."""

    def __init__(self):
        self.fn = None

    def __getitem__(self, grid):
        if self.fn is None:
            self.fn = _kernel()
        return self.fn[grid]


_slot_matmul_kernel = _Lazy()
