"""Block-sparse causal attention as torch.library custom ops with fake implementations and autograd."""

from __future__ import annotations

import math

import torch

from .. import _C
from .._views import _DTYPE_CODES, check_float, check_index, check_shape, viewer
from ..formats import BlockLayout
from .. import reference
from ._eager import eager_autograd, eager_or_op
from .mlp import _uses_reference


def _check(q, k, v, prefix_k, prefix_v, counts, indices, block, scale):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must be a [batch, heads, seq, head_dim] tensor")
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16) and not (q.is_cuda and q.dtype == torch.float16):
        raise TypeError(f"q has dtype {q.dtype}, expected float32, float64 or bfloat16 (or float16 on CUDA)")
    B, H, S, D = q.shape
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        check_float(t, name, q)
    check_shape(k, "k", (B, H, S, D))
    check_shape(v, "v", (B, H, S, D))
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v come together")
    if prefix_k is not None:
        check_shape(prefix_k, "prefix_k", (B, H, None, D))
        check_shape(prefix_v, "prefix_v", (B, H, prefix_k.shape[2], D))
    if block <= 0:
        raise ValueError(f"layout block must be positive, got {block}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    check_index(counts, "layout counts", q, 3)
    check_index(indices, "layout indices", q, 4)
    if counts.shape[0] not in (1, B):
        raise ValueError(f"layout counts has batch {counts.shape[0]}, expected 1 or {B}")
    n_q = -(-S // block)
    check_shape(counts, "layout counts", (counts.shape[0], H, n_q))
    check_shape(indices, "layout indices", (counts.shape[0], H, n_q, None))
    return B, H, S, D


def _last_dim_contiguous(t):
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def _runs_reference(q, block, op):
    """True where no kernel takes this call: CUDA kernels cover bf16/fp16, head dims 64, 80, 128 and
    blocks 64, 128; other CUDA calls run the reference (with the once-only warning)."""
    if q.is_cuda and _C.attention_cuda_supports(_DTYPE_CODES[q.dtype], q.shape[-1], block):
        return False
    gap = (f"{q.dtype}, head dim {q.shape[-1]}, block {block} (the kernels take bfloat16/float16, head dims "
           "64, 80, 128 and blocks 64, 128)")
    return _uses_reference(q.device, op, gap)


def _aligned(t):
    """`t`, copied if needed so rows start on 16 bytes and no dimension is broadcast (stride 0): the
    CUDA kernels load 16-byte pieces by cp.async and TMA, whose maps take no stride of 0."""
    if t is None or not t.is_cuda:
        return _last_dim_contiguous(t)
    strides_ok = all(st % 8 == 0 and (st != 0 or n == 1) for st, n in zip(t.stride()[:-1], t.shape[:-1]))
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and strides_ok:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
    counts: torch.Tensor, indices: torch.Tensor, block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, S, D], lse [B, H, S] fp32). See cpp/include/long_exposure/attention.h."""
    B, H, S, D = _check(q, k, v, prefix_k, prefix_v, counts, indices, block, scale)
    if _runs_reference(q, block, "attention_forward"):
        out, lse = reference.block_sparse_attention(q, k, v, counts, indices, block, scale, prefix_k, prefix_v)
        return out.contiguous(), lse.contiguous()
    q, k, v, prefix_k, prefix_v = map(_aligned, (q, k, v, prefix_k, prefix_v))
    counts, indices = counts.contiguous(), indices.contiguous()
    # Laid out like q: q is usually a [B, S, H, D] projection seen as [B, H, S, D], and an output in
    # that memory order makes the caller's transpose back to [B, S, H * D] free (so for dq, dk, dv).
    out = torch.empty_like(q)
    lse = q.new_empty(B, H, S, dtype=torch.float32)
    view = viewer(q)
    _C.attention_forward(
        view(q, "q"), view(k, "k"), view(v, "v"), view(prefix_k, "prefix_k"), view(prefix_v, "prefix_v"),
        view(counts, "layout counts"), view(indices, "layout indices"), block, scale, view(out, "out"), view(lse, "lse"),
    )
    return out, lse


attention_forward = torch.library.custom_op("long_exposure::attention_forward", mutates_args=())(_forward_impl)


@attention_forward.register_fake
def _(q, k, v, prefix_k, prefix_v, counts, indices, block, scale):
    B, H, S, D = _check(q, k, v, prefix_k, prefix_v, counts, indices, block, scale)
    return torch.empty_like(q), q.new_empty(B, H, S, dtype=torch.float32)


def _backward_impl(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
    block: int, scale: float, need_dprefix: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are empty unless asked for."""
    B, H, S, D = _check(q, k, v, prefix_k, prefix_v, counts, indices, block, scale)
    check_float(dout, "dout", q)
    check_shape(dout, "dout", (B, H, S, D))
    check_float(out, "out", q)
    check_shape(out, "out", (B, H, S, D))
    check_shape(lse, "lse", (B, H, S))
    if _runs_reference(q, block, "attention_backward"):
        dq, dk, dv, dpk, dpv = reference.block_sparse_attention_backward(dout, q, k, v, out, lse, counts, indices,
                                                                         block, scale, prefix_k, prefix_v)
        has = need_dprefix and prefix_k is not None
        return (dq.contiguous(), dk.contiguous(), dv.contiguous(), dpk.contiguous() if has else q.new_empty(0),
                dpv.contiguous() if has else q.new_empty(0))
    dout, q, k, v, prefix_k, prefix_v, out = map(_aligned, (dout, q, k, v, prefix_k, prefix_v, out))
    counts, indices, lse = counts.contiguous(), indices.contiguous(), lse.contiguous()
    need_dprefix = need_dprefix and prefix_k is not None
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpk = q.new_empty(prefix_k.shape) if need_dprefix else q.new_empty(0)
    dpv = q.new_empty(prefix_v.shape) if need_dprefix else q.new_empty(0)
    workspaces = (None, None, None)
    if q.is_cuda:  # rowsum(dout * out), and the layout transposed on device (query blocks per key block)
        Lb, _, n_q = counts.shape
        workspaces = (q.new_empty(B, H, S, dtype=torch.float32), q.new_empty(Lb, H, n_q, dtype=torch.int32),
                      q.new_empty(Lb, H, n_q, n_q, dtype=torch.int32))
    view = viewer(q)
    _C.attention_backward(
        view(dout, "dout"), view(q, "q"), view(k, "k"), view(v, "v"), view(prefix_k, "prefix_k"),
        view(prefix_v, "prefix_v"), view(out, "out"), view(lse, "lse"), view(counts, "layout counts"),
        view(indices, "layout indices"), block, scale, view(dq, "dq"), view(dk, "dk"), view(dv, "dv"),
        view(dpk, "dprefix_k") if need_dprefix else None, view(dpv, "dprefix_v") if need_dprefix else None,
        *(view(w, name) for w, name in zip(workspaces, ("ws_delta", "ws_q_counts", "ws_q_indices"))),
    )
    return dq, dk, dv, dpk, dpv


attention_backward = torch.library.custom_op("long_exposure::attention_backward", mutates_args=())(_backward_impl)


@attention_backward.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, counts, indices, block, scale, need_dprefix):
    B, H, S, D = _check(q, k, v, prefix_k, prefix_v, counts, indices, block, scale)
    has = need_dprefix and prefix_k is not None
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        q.new_empty(prefix_k.shape) if has else q.new_empty(0),
        q.new_empty(prefix_v.shape) if has else q.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, counts, indices, block, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, counts, indices)
    ctx.block, ctx.scale = block, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _backward_with(backward, ctx, dout):
    """The gradients of attention_forward's inputs, with `backward` the op (traced) or its implementation (eager)."""
    q, k, v, prefix_k, prefix_v, out, lse, counts, indices = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = backward(
        dout, q, k, v, prefix_k, prefix_v, out, lse, counts, indices, ctx.block, ctx.scale, bool(needs[3] or needs[4])
    )
    return (
        dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
        dpk if needs[3] else None, dpv if needs[4] else None, None, None, None, None,
    )


def _backward(ctx, dout, _dlse):
    return _backward_with(attention_backward, ctx, dout)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# Eager calls skip torch.library's dispatch (ops/_eager.py).
_EagerAttention = eager_autograd("_EagerAttention", _forward_impl, _setup_context,
                                 lambda ctx, dout, _dlse: _backward_with(_backward_impl, ctx, dout))


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None = None,
    prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of [B, H, S, D] q, k, v over the layout's active key blocks, plus prefix keys.

    `scale` defaults to 1/sqrt(head_dim).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    forward = eager_or_op(_EagerAttention.apply, attention_forward)
    out, _ = forward(q, k, v, prefix_k, prefix_v, layout.counts, layout.indices, layout.block, float(scale))
    return out
