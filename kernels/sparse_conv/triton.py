"""Submanifold 3x3x3 sparse convolution as a Triton implicit-GEMM kernel (the CUDA fast path).

Same function and contract as ``reference.submanifold_conv3d``; the neighbour map of ``reference.build_neighbours``
(``[N, 27]``, column ``k = i*9 + j*3 + kz``, -1 = missing). Nothing is materialised: each program owns a tile of
``BLOCK_M`` output rows x ``BLOCK_N`` output channels and, for each of the 27 offsets, gathers the neighbour rows
of its tile straight from ``feats`` (masked where the neighbour is missing) and multiplies them by the weight
slice ``W[:, k, :]`` read in place from the official ``[Co, 3, 3, 3, Ci]`` layout. Accumulation is fp32 for every
input dtype; the bias is added in fp32; the result is cast to the input dtype once.

Why it beats the reference: the reference writes and re-reads a ``[chunk, 27, Ci]`` gathered copy (27x the
input bytes through HBM) before its GEMM; here the gather goes to registers/shared memory only. On surfaces most
of the 27 neighbours are missing, and rows are sorted along the grid, so a whole tile often lacks an offset:
that offset is skipped (one scalar test), so the work follows the real neighbour count, not 27.

fp32 inputs use tf32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` is on (the same switch
that governs the reference's cuBLAS GEMM), else exact fp32 products.

Importing this module imports triton: only the dispatcher imports it, and only when the backend is chosen.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

from .reference import check_conv_args


def _configs():
    cfgs = []
    for bm, bn, bk, warps, stages in (
        (128, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (64, 64, 32, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 3),
        (64, 32, 16, 4, 2),
        (32, 32, 16, 2, 2),
    ):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


# The autotune choice per key is kept in Triton's cache dir (TRITON_CACHE_DIR, beside the compiled kernels): a new
# process takes it from there instead of timing every config again (H100: the first 1024_cascade generation of a
# process 20.1 -> 12.9 s, bench/RESULTS.md session 9). Triton < 3.2 has no such option and times them per process.
_KEEP_CHOICES = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _prune(configs, named_args, **kwargs):
    """Drop tiles much wider than the channels (Ci=8 with BLOCK_K=64 would be 7/8 padding)."""
    ci, co = named_args["CI"], named_args["CO"]
    kmax, nmax = max(16, triton.next_power_of_2(ci)), max(32, triton.next_power_of_2(co))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= kmax and c.kwargs["BLOCK_N"] <= nmax]
    return kept or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["CI", "CO", "IS_FP32"],
    prune_configs_by={"early_config_prune": _prune},
    # Autotuning launches the kernel several times on the real output: harmless, it is written, never accumulated.
    **_KEEP_CHOICES,
)
@triton.jit(do_not_specialize=["N"])  # N varies per level; CI/CO divisibility does matter
def _subm_conv_kernel(
    feats_ptr,  # [N, CI] contiguous
    nbr_ptr,  # [N, 27] int32 (or int64) contiguous
    w_ptr,  # [CO, 27, CI] contiguous (official layout viewed flat)
    bias_ptr,  # [CO] or dummy
    out_ptr,  # [N, CO] contiguous
    N,
    CI,
    CO,
    HAS_BIAS: tl.constexpr,
    IS_FP32: tl.constexpr,
    USE_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < CO
    rows64 = rows.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_col = cols.to(tl.int64)[None, :] * (27 * CI)  # [1, BN]
    for k in range(27):  # literal: jit code may not read module globals
        nb = tl.load(nbr_ptr + rows64 * 27 + k, mask=row_ok, other=-1).to(tl.int64)
        # Whole tile without this neighbour (common on surfaces with sorted rows): skip its K loop.
        if tl.max(nb, axis=0) >= 0:
            valid = nb >= 0
            a_row = tl.where(valid, nb, 0) * CI  # [BM]
            for c0 in range(0, CI, BLOCK_K):
                cidx = c0 + ks
                c_ok = cidx < CI
                a = tl.load(feats_ptr + a_row[:, None] + cidx[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_ptr + w_col + k * CI + cidx[:, None], mask=c_ok[:, None] & col_ok[None, :], other=0.0)
                if IS_FP32:
                    if USE_TF32:
                        acc = tl.dot(a, b, acc, input_precision="tf32")
                    else:
                        acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows64[:, None] * CO + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests): CPU tensors allowed


def _check_device(feats: torch.Tensor) -> None:
    if feats.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"submanifold_conv3d (triton): tensors must be on a CUDA device; got {feats.device}")


def _on_device(feats: torch.Tensor):
    return torch.cuda.device(feats.device) if feats.device.type == "cuda" else contextlib.nullcontext()


def submanifold_conv3d(
    feats: torch.Tensor,
    neighbours: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan=None,
) -> torch.Tensor:
    """Triton submanifold 3x3x3 convolution; same arguments and result as ``reference.submanifold_conv3d``.

    feats:      [N, Ci] fp32 / fp16 / bf16 on CUDA
    neighbours: [N, 27] int32 (or int64) from ``build_neighbours``, -1 = missing; or rows r0:r1 of it ([M, 27]:
                those output rows only)
    weight:     [Co, 3, 3, 3, Ci], same dtype as feats
    bias:       [Co] (any float dtype, added in fp32) or None
    plan:       None, or a ``plan.TilePlan`` of ``neighbours``: run the planned kernel (same sums; its tiles skip
                the offsets none of their rows has)
    returns     [M, Co] in feats.dtype, fp32 accumulation.
    """
    n, ci, co = check_conv_args(feats, neighbours, weight)
    if feats.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"submanifold_conv3d (triton): feats dtype must be one of {SUPPORTED_DTYPES}; got {feats.dtype}")
    if plan is not None:
        plan.check(n)
    _check_device(feats)
    out = torch.empty(n, co, dtype=feats.dtype, device=feats.device)
    if n == 0 or co == 0:
        return out
    if ci == 0:
        return out.copy_(bias.to(out.dtype).expand(n, co)) if bias is not None else out.zero_()
    feats, weight = feats.contiguous(), weight.contiguous()
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else out  # dummy pointer, never read
    is_fp32 = feats.dtype == torch.float32
    flags = dict(HAS_BIAS=has_bias, IS_FP32=is_fp32, USE_TF32=bool(is_fp32 and torch.backends.cuda.matmul.allow_tf32))
    with _on_device(feats):
        if plan is None:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(co, meta["BLOCK_N"]))  # noqa: E731
            _subm_conv_kernel[grid](feats, neighbours.contiguous(), weight, b, out, n, ci, co, **flags)
        else:
            bm = plan.block_m
            grid = lambda meta: (triton.cdiv(n, bm), triton.cdiv(co, meta["BLOCK_N"]))  # noqa: E731
            _subm_conv_tiled_kernel[grid](
                feats, plan.rows, plan.nbr, plan.taps, plan.counts, weight, b, out, n, ci, co, **flags,
                ALL_TAPS=_INTERPRETED, BLOCK_M=bm,
            )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- planned (tiled) kernel
def _tiled_configs():
    cfgs = []
    for bn, bk, warps, stages in (
        (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (256, 64, 8, 3), (64, 32, 4, 4),
        (32, 32, 4, 2),
    ):  # fmt: skip
        cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


@triton.jit
def _tap_chunk(acc, it, pid_m, pos64, pos_ok, col_ok, w_col, feats_ptr, nbr_ptr, taps_ptr, w_ptr,
               CI: tl.constexpr, IS_FP32: tl.constexpr, USE_TF32: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc += gathered rows of the tile's ``it // KCH``-th needed offset, K chunk ``it % KCH``, times its weights."""
    i = it // ((CI + BLOCK_K - 1) // BLOCK_K)
    c0 = (it - i * ((CI + BLOCK_K - 1) // BLOCK_K)) * BLOCK_K
    k = tl.load(taps_ptr + pid_m * 27 + i)
    nb = tl.load(nbr_ptr + pos64 * 27 + k, mask=pos_ok, other=-1)
    valid = nb >= 0
    a_row = tl.where(valid, nb, 0).to(tl.int64) * CI
    cidx = c0 + tl.arange(0, BLOCK_K)
    c_ok = cidx < CI
    a = tl.load(feats_ptr + a_row[:, None] + cidx[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
    b = tl.load(w_ptr + w_col + k * CI + cidx[:, None], mask=c_ok[:, None] & col_ok[None, :], other=0.0)
    if IS_FP32:
        if USE_TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.autotune(
    configs=_tiled_configs(),
    key=["CI", "CO", "IS_FP32", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune},
    **_KEEP_CHOICES,
)
@triton.jit(do_not_specialize=["N"])
def _subm_conv_tiled_kernel(
    feats_ptr,  # [N, CI] contiguous, original row order
    rows_ptr,  # [N] int32: sorted position -> original row
    nbr_ptr,  # [N, 27] int32, sorted order, original row numbers (-1 missing)
    taps_ptr,  # [T, 27] int32: per tile its needed offsets first
    counts_ptr,  # [T] int32
    w_ptr,  # [CO, 27, CI]
    bias_ptr,
    out_ptr,  # [N, CO], original row order
    N,
    CI: tl.constexpr,
    CO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_FP32: tl.constexpr,
    USE_TF32: tl.constexpr,
    ALL_TAPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_ok = pos < N
    pos64 = pos.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CO
    w_col = cols.to(tl.int64)[None, :] * (27 * CI)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (needed offset, K chunk), so the compiler can pipeline the gathers across offsets.
    if ALL_TAPS:  # Triton's CPU interpreter cannot loop to a loaded bound; offsets past the count are absent: zeros
        for it in range(27 * ((CI + BLOCK_K - 1) // BLOCK_K)):
            acc = _tap_chunk(acc, it, pid_m, pos64, pos_ok, col_ok, w_col, feats_ptr, nbr_ptr, taps_ptr, w_ptr,
                             CI, IS_FP32, USE_TF32, BLOCK_K)  # fmt: skip
    else:
        for it in range(tl.load(counts_ptr + pid_m) * ((CI + BLOCK_K - 1) // BLOCK_K)):
            acc = _tap_chunk(acc, it, pid_m, pos64, pos_ok, col_ok, w_col, feats_ptr, nbr_ptr, taps_ptr, w_ptr,
                             CI, IS_FP32, USE_TF32, BLOCK_K)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows = tl.load(rows_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    out_ptrs = out_ptr + rows[:, None] * CO + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pos_ok[:, None] & col_ok[None, :])
