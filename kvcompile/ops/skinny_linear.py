"""`kvcompile::skinny_linear` and `kvcompile::skinny_gated_linear`: the products of a decode step's few rows as Triton
kernels that launch early.

A decode step's weight products each read one weight matrix for a handful of rows, so each is a short,
bandwidth-bound kernel whose launch and ramp-up are a visible share of its time. cuBLAS's kernels are
launched the ordinary way: each starts only once the kernel before it (a norm, an activation) has finished.
This kernel takes part in programmatic dependent launch (Hopper and later): it is launched while its producer
drains, waits on the device (`gdc_wait`) before reading anything, and lets its own consumer launch once its
weights are read. One program per `BLOCK_N` output columns streams those rows of the weight with every input
row in registers (no split-K, so no reduction kernel).

Measured on the H100 (8B shape, batch 8, each product after a norm-like kernel, in CUDA graphs; one-off
microbenchmark): q/k/v 22.2 -> 20.2 µs, o 16.7 -> 14.4, gate/up 43.3 -> 42.4, down 45.2 -> 43.5 against
cuBLAS. Without dependent launch the same kernel only matched cuBLAS.

A gated MLP's input side, `silu(x @ gate.T) * (x @ up.T)`, is one kernel (`kvcompile::skinny_gated_linear`):
each program streams its columns' rows of both weights and applies the activation and the product in its
epilogue, so the two products and the elementwise kernel after them become one launch. On the H100 (8B MLP,
a norm-like producer, then gate, up, silu * up and down, in CUDA graphs; one-off microbenchmark) the MLP took
128.8 µs separately and 124.8 µs fused at 8 rows (floor 117.8 µs), 127.3 and 124.0 µs at one row.

`kvcompile.backends.inductor` routes the products of a compiled CUDA decode step through these ops; they run
their kernels for at most `MAX_ROWS` rows on CUDA (outside `kernel_switch.reference_paths()`), PyTorch otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompile.ops import kernel_switch
from kvcompile.ops.dependent_launch import dependent_launch
from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["MAX_ROWS", "skinny_gated_linear", "skinny_gated_linear_triton", "skinny_linear", "skinny_linear_triton"]

MAX_ROWS = 16  # one tile of rows: a decode step's batch; more rows are a product cuBLAS serves well


if triton is not None:
    from kvcompile.ops.dependent_launch import let_dependents_launch, wait_for_producers

    @triton.jit
    def _product(X, W, offs_n, M, N, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """X @ W[offs_n].T as float32 [BLOCK_M, BLOCK_N], streaming those weight rows once (all M rows of X in
        registers)."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            x = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _skinny_linear_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_xk, stride_ym,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
        """Y[:, cols] = X @ W[cols].T (+ bias) for one block of `BLOCK_N` output columns, all M rows."""
        wait_for_producers(PDL)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = _product(X, W, offs_n, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        let_dependents_launch(PDL)  # every read is done
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=(offs_m < M)[:, None] & n_mask[None, :])

    @triton.jit
    def _skinny_gated_kernel(X, WG, WU, Y, M, N, K, stride_xm, stride_xk, stride_ym,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
        """Y[:, cols] = silu(X @ WG[cols].T) * (X @ WU[cols].T) for one block of `BLOCK_N` columns, rounded to
        Y's dtype after each step as the three separate ops would round."""
        wait_for_producers(PDL)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        gate = _product(X, WG, offs_n, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        up = _product(X, WU, offs_n, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        let_dependents_launch(PDL)  # every read is done
        dtype = Y.dtype.element_ty
        gate = gate.to(dtype).to(tl.float32)
        activation = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        out = activation * up.to(dtype).to(tl.float32)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(dtype),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _launch_shape(n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for `n` outputs: the best of a sweep on the H100 (bf16, 8 rows)
    for the 8B shape's products, 32 columns a program below 8,192 outputs (q/k/v, o, down) and 64 above (then
    gate/up, now in the gated kernel; the output head)."""
    return (64, 128, 4, 3) if n >= 8192 else (32, 256, 4, 4)


# The gated kernel's (BLOCK_N, BLOCK_K, num_warps, num_stages), its programs reading the rows of two weights:
# the best of a sweep of 32 shapes on the H100 (bf16, 8B MLP, 8 rows and 1 row alike).
_GATED_LAUNCH_SHAPE = (64, 256, 4, 4)


def skinny_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`F.linear(x, weight, bias)` through the Triton kernel: `x` [..., K] (K >= 1) with at most `MAX_ROWS`
    rows in all, `weight` [N, K] and `bias` [N] or None, both contiguous; the result has x's dtype."""
    if not _fits(x, weight, bias):
        raise ValueError(f"skinny_linear_triton takes at most {MAX_ROWS} rows, K >= 1 and a contiguous "
                         f"[N, {x.shape[-1]}] weight and [N] bias, got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}" + ("" if bias is None else f", bias {tuple(bias.shape)}"))
    n = weight.shape[0]
    return _launch(_skinny_linear_kernel, x, (weight, bias if bias is not None else weight), n, _launch_shape(n),
                   HAS_BIAS=bias is not None)


def skinny_gated_linear_triton(x: Tensor, gate_weight: Tensor, up_weight: Tensor) -> Tensor:
    """`F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)` (a gated MLP's input side) through one Triton
    kernel: `x` [..., K] with at most `MAX_ROWS` rows, two contiguous [N, K] weights; the result has x's
    dtype, rounded after each of the three steps as the separate ops round."""
    if not _gated_fits(x, gate_weight, up_weight):
        raise ValueError(f"skinny_gated_linear_triton takes at most {MAX_ROWS} rows, K >= 1 and two contiguous "
                         f"[N, {x.shape[-1]}] weights, got x {tuple(x.shape)}, weights {tuple(gate_weight.shape)} "
                         f"and {tuple(up_weight.shape)}")
    n = gate_weight.shape[0]
    return _launch(_skinny_gated_kernel, x, (gate_weight, up_weight), n, _GATED_LAUNCH_SHAPE)


def _launch(kernel, x: Tensor, weights: tuple, n: int, launch_shape: tuple, **constants) -> Tensor:
    """Run `kernel` (one of the two above) on the rows of `x`, its weight pointers `weights`, for `n` outputs,
    with `launch_shape` (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    require_triton("kvcompile's skinny products")
    *lead, k = x.shape
    rows = x.reshape(-1, k)
    out = torch.empty(rows.shape[0], n, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out.view(*lead, n)
    block_n, block_k, num_warps, num_stages = launch_shape
    block_k = block_k * 2 // x.element_size()  # the shapes are for 2-byte dtypes; float32 tiles keep their bytes
    pdl = dependent_launch(x)
    kernel[(triton.cdiv(n, block_n),)](
        rows, *weights, out, rows.shape[0], n, k, *rows.stride(), out.stride(0), BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=max(16, min(block_k, triton.next_power_of_2(k))),  # a dot's K is at least 16
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl, **constants)
    return out.view(*lead, n)


@torch.library.custom_op("kvcompile::skinny_linear", mutates_args=())
def skinny_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`F.linear(x, weight, bias)`; through `skinny_linear_triton` where `kernel_switch.kernels_for(x)` allows the
    kernels, the operands share x's dtype and fit the kernel (see there)."""
    same_dtype = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    if kernel_switch.kernels_for(x) and same_dtype and _fits(x, weight, bias):
        return skinny_linear_triton(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.custom_op("kvcompile::skinny_gated_linear", mutates_args=())
def skinny_gated_linear(x: Tensor, gate_weight: Tensor, up_weight: Tensor) -> Tensor:
    """`F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)` for two weights of one shape [N, K]; through
    `skinny_gated_linear_triton` where `kernel_switch.kernels_for(x)` allows the kernels, the weights have x's dtype
    and fit the kernel (see there)."""
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"skinny_gated_linear takes two weights of one shape, got {tuple(gate_weight.shape)} and "
                         f"{tuple(up_weight.shape)}")
    same_dtype = gate_weight.dtype == x.dtype == up_weight.dtype
    if kernel_switch.kernels_for(x) and same_dtype and _gated_fits(x, gate_weight, up_weight):
        return skinny_gated_linear_triton(x, gate_weight, up_weight)
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)


def _fits(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether the kernel takes these operands: at most `MAX_ROWS` rows, K >= 1, a contiguous [N, K] weight
    and a contiguous [N] bias or none."""
    k = x.shape[-1]
    rows_ok = k >= 1 and x.numel() // k <= MAX_ROWS
    weight_ok = weight.dim() == 2 and weight.shape[1] == k and weight.is_contiguous()
    bias_ok = bias is None or (tuple(bias.shape) == (weight.shape[0],) and bias.is_contiguous())
    return rows_ok and weight_ok and bias_ok


def _gated_fits(x: Tensor, gate_weight: Tensor, up_weight: Tensor) -> bool:
    """Whether the gated kernel takes these operands: `_fits` for each weight, and one shape for both."""
    return _fits(x, gate_weight, None) and _fits(x, up_weight, None) and gate_weight.shape == up_weight.shape


@skinny_linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@skinny_gated_linear.register_fake
def _(x, gate_weight, up_weight):
    return x.new_empty((*x.shape[:-1], gate_weight.shape[0]))
