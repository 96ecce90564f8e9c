"""The neuron-block MLP as torch.library custom ops with fake implementations and autograd."""

from __future__ import annotations

import warnings

import torch

from .. import _C, reference
from .._views import check_float, check_index, check_shape, viewer
from ._eager import eager_autograd, eager_or_op
from ..formats import MlpMask


def _check(x, w1, b1, w2, b2, counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a, x_name="x"):
    """Shapes, dtypes and devices; `x` is the forward's input, or dy in the backward (the same [T, d])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{x_name} must be a [tokens, d_model] tensor")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16) and not (
            x.dtype == torch.float16 and x.device.type == "cuda"):
        raise TypeError(f"{x_name} has dtype {x.dtype}, expected float32, float64 or bfloat16 (or float16 on CUDA)")
    tokens, d_model = x.shape
    for name, t in (("w1 (fc1 weight)", w1), ("b1 (fc1 bias)", b1), ("w2 (fc2 weight)", w2), ("b2 (fc2 bias)", b2),
                    ("lora1_u", lora1_u), ("lora1_b", lora1_b), ("lora2_a", lora2_a)):
        check_float(t, name, x)
    check_shape(w1, "w1 (fc1 weight)", (None, d_model))
    d_ffn = w1.shape[0]
    check_shape(w2, "w2 (fc2 weight)", (d_model, d_ffn))
    check_shape(b1, "b1 (fc1 bias)", (d_ffn,))
    check_shape(b2, "b2 (fc2 bias)", (d_model,))
    if (lora1_u is None) != (lora1_b is None):
        raise ValueError("lora1_u and lora1_b come together")
    if lora1_u is not None:
        check_shape(lora1_u, "lora1_u", (tokens, None))
        check_shape(lora1_b, "lora1_b", (d_ffn, lora1_u.shape[1]))
    check_shape(lora2_a, "lora2_a", (None, d_ffn))
    if tile_m <= 0 or block_n <= 0:
        raise ValueError(f"tile_m and block_n must be positive, got {tile_m} and {block_n}")
    check_index(counts, "mask counts", x, 1)
    check_index(indices, "mask indices", x, 2)
    n_tiles = -(-tokens // tile_m)
    check_shape(counts, "mask counts", (n_tiles,))
    check_shape(indices, "mask indices", (n_tiles, None))
    return tokens, d_model, d_ffn


_WARNED: set[tuple[str, str]] = set()


def _cuda_kernel_gap(x: torch.Tensor, tile_m: int, block_n: int, d_ffn: int) -> str | None:
    """Why the tensor-core kernels cannot take this call, or None when they can (mlp.h's limits;
    LoRA ranks are padded to them here)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"{x.dtype} (the kernels take bfloat16 and float16)"
    if tile_m % 64 or block_n % 64:
        return f"tile_m={tile_m}, block_n={block_n} (the kernels need multiples of 64)"
    if x.shape[1] % 8 or d_ffn % 8:
        return f"d_model={x.shape[1]}, d_ffn={d_ffn} (the kernels need multiples of 8)"
    return None


def _uses_reference(device: torch.device, op: str, gap: str | None) -> bool:
    """True where no kernel of this version takes the call (`gap` says why; None means one does):
    the op then runs its pure-PyTorch reference (exact, as fast and as memory-hungry as dense
    PyTorch), and says so once per reason."""
    if device.type == "cpu" or gap is None:
        return False
    if (op, gap) not in _WARNED:
        _WARNED.add((op, gap))
        warnings.warn(f"long_exposure::{op} has no {device.type.upper()} kernel for {gap}; running the "
                      "PyTorch reference (correct, not faster than dense)", RuntimeWarning, stacklevel=3)
    return True


def _mlp_uses_reference(x: torch.Tensor, op: str, tile_m: int, block_n: int, d_ffn: int) -> bool:
    if x.device.type == "cpu":
        return False
    gap = _cuda_kernel_gap(x, tile_m, block_n, d_ffn) if x.device.type == "cuda" else f"device {x.device.type}"
    return _uses_reference(x.device, op, gap)


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """t contiguous and starting on a 16-byte boundary, as the kernels' 16-byte copies need."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.device.type != "cuda" or t.data_ptr() % 16 == 0 else t.clone()


def _pad_rank(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """Zero-pads a LoRA factor's rank dimension to a multiple of 8 (zeros add nothing)."""
    if t is None or t.shape[dim] % 8 == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, 8 - t.shape[dim] % 8]
    return torch.nn.functional.pad(t, pad)


def _forward_impl(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    counts: torch.Tensor, indices: torch.Tensor, tile_m: int, block_n: int,
    lora1_u: torch.Tensor | None, lora1_b: torch.Tensor | None, lora2_a: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, lora2_v); lora2_v is [tokens, 0] without lora2_a. See cpp/include/long_exposure/mlp.h."""
    tokens, d_model, d_ffn = _check(x, w1, b1, w2, b2, counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a)
    if _mlp_uses_reference(x, "mlp_forward", tile_m, block_n, d_ffn):
        y, h, lora2_v = reference.neuron_block_mlp(x, w1, b1, w2, b2, counts, indices, tile_m, block_n,
                                                   lora1_u, lora1_b, lora2_a)
        return y.contiguous(), h.contiguous(), lora2_v.clone()
    r2 = 0 if lora2_a is None else lora2_a.shape[0]
    if x.device.type == "cuda":
        lora1_u, lora1_b, lora2_a = _pad_rank(lora1_u, 1), _pad_rank(lora1_b, 1), _pad_rank(lora2_a, 0)
    args = [_aligned(t) for t in (x, w1, b1, w2, b2, counts, indices, lora1_u, lora1_b, lora2_a)]
    x, w1, b1, w2, b2, counts, indices, lora1_u, lora1_b, lora2_a = args
    y = x.new_empty(tokens, d_model)
    h = x.new_empty(tokens, d_ffn)
    lora2_v = x.new_empty(tokens, 0 if lora2_a is None else lora2_a.shape[0])
    view = viewer(x)
    _C.mlp_forward(
        view(x, "x"), view(w1, "w1"), view(b1, "b1"), view(w2, "w2"), view(b2, "b2"),
        view(counts, "mask counts"), view(indices, "mask indices"), tile_m, block_n,
        view(lora1_u, "lora1_u"), view(lora1_b, "lora1_b"), view(lora2_a, "lora2_a"),
        view(y, "y"), view(h, "h"), view(lora2_v, "lora2_v") if lora2_a is not None else None,
    )
    return y, h, (lora2_v if lora2_v.shape[1] == r2 else lora2_v[:, :r2].contiguous())


mlp_forward = torch.library.custom_op("long_exposure::mlp_forward", mutates_args=())(_forward_impl)


@mlp_forward.register_fake
def _(x, w1, b1, w2, b2, counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a):
    tokens, d_model, d_ffn = _check(x, w1, b1, w2, b2, counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a)
    r2 = 0 if lora2_a is None else lora2_a.shape[0]
    return x.new_empty(tokens, d_model), x.new_empty(tokens, d_ffn), x.new_empty(tokens, r2)


def _backward_impl(
    dy: torch.Tensor, dlora2_v: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
    h: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor, tile_m: int, block_n: int,
    lora1_u: torch.Tensor | None, lora1_b: torch.Tensor | None, lora2_a: torch.Tensor | None,
    need_db1: bool, need_db2: bool, need_dlora1: bool, need_dlora2_a: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, db1, db2, dlora1_u, dlora1_b, dlora2_a); gradients not asked for are empty tensors. The
    forward's input x is not an argument: no part of the backward reads it (mlp.h)."""
    tokens, d_model, d_ffn = _check(dy, w1, None, w2, None, counts, indices, tile_m, block_n, lora1_u, lora1_b,
                                    lora2_a, x_name="dy")
    check_float(h, "h", dy)
    check_shape(h, "h", (tokens, d_ffn))
    if _mlp_uses_reference(dy, "mlp_backward", tile_m, block_n, d_ffn):
        grads = reference.neuron_block_mlp_backward(dy, dlora2_v if lora2_a is not None else None, w1, w2, h,
                                                    counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a)
        wanted = (True, need_db1, need_db2, need_dlora1 and lora1_u is not None, need_dlora1 and lora1_u is not None,
                  need_dlora2_a and lora2_a is not None)
        return tuple(g.contiguous() if w and g is not None else dy.new_empty(0) for g, w in zip(grads, wanted))
    if dlora2_v is not None and dlora2_v.shape[1] == 0:
        dlora2_v = None
    r1 = 0 if lora1_u is None else lora1_u.shape[1]
    r2 = 0 if lora2_a is None else lora2_a.shape[0]
    on_cuda = dy.device.type == "cuda"
    if on_cuda:
        lora1_u, lora1_b = _pad_rank(lora1_u, 1), _pad_rank(lora1_b, 1)
        lora2_a, dlora2_v = _pad_rank(lora2_a, 0), _pad_rank(dlora2_v, 1)
    args = [_aligned(t) for t in (dy, dlora2_v, w1, w2, h, counts, indices, lora1_u, lora1_b, lora2_a)]
    dy, dlora2_v, w1, w2, h, counts, indices, lora1_u, lora1_b, lora2_a = args
    # Outputs may not alias each other, so each gradient not asked for is its own empty tensor.
    def empty():
        return dy.new_empty(0)

    dx = dy.new_empty(tokens, d_model)
    db1 = dy.new_empty(d_ffn) if need_db1 else empty()
    db2 = dy.new_empty(d_model) if need_db2 else empty()
    need_dlora1 = need_dlora1 and lora1_u is not None
    need_dlora2_a = need_dlora2_a and lora2_a is not None
    dlora1_u = dy.new_empty(lora1_u.shape) if need_dlora1 else empty()
    dlora1_b = dy.new_empty(lora1_b.shape) if need_dlora1 else empty()
    dlora2_a = dy.new_empty(lora2_a.shape) if need_dlora2_a else empty()
    if need_dlora2_a and dlora2_v is None:
        dlora2_a.zero_()
        need_dlora2_a = False
    # The kernels' scratch: dH for the whole batch, and fp32 sums for the bias gradients.
    dh_workspace = dy.new_empty(tokens, d_ffn) if on_cuda else None
    sum_workspace = dy.new_empty(d_ffn + d_model, dtype=torch.float32) if on_cuda else None
    view = viewer(dy)
    _C.mlp_backward(
        view(dy, "dy"), view(dlora2_v, "dlora2_v"), view(w1, "w1"), view(w2, "w2"), view(h, "h"),
        view(counts, "mask counts"), view(indices, "mask indices"), tile_m, block_n,
        view(lora1_u, "lora1_u"), view(lora1_b, "lora1_b"), view(lora2_a, "lora2_a"),
        view(dx, "dx"), view(db1, "db1") if need_db1 else None, view(db2, "db2") if need_db2 else None,
        view(dlora1_u, "dlora1_u") if need_dlora1 else None, view(dlora1_b, "dlora1_b") if need_dlora1 else None,
        view(dlora2_a, "dlora2_a") if need_dlora2_a else None,
        view(dh_workspace, "dh_workspace"), view(sum_workspace, "sum_workspace"),
    )
    if need_dlora1 and r1 != lora1_u.shape[1]:
        dlora1_u, dlora1_b = dlora1_u[:, :r1].contiguous(), dlora1_b[:, :r1].contiguous()
    if dlora2_a.shape[0] != r2 and dlora2_a.numel():
        dlora2_a = dlora2_a[:r2].contiguous()
    return dx, db1, db2, dlora1_u, dlora1_b, dlora2_a


mlp_backward = torch.library.custom_op("long_exposure::mlp_backward", mutates_args=())(_backward_impl)


@mlp_backward.register_fake
def _(dy, dlora2_v, w1, w2, h, counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a,
      need_db1, need_db2, need_dlora1, need_dlora2_a):
    tokens, d_model, d_ffn = _check(dy, w1, None, w2, None, counts, indices, tile_m, block_n, lora1_u, lora1_b,
                                    lora2_a, x_name="dy")
    has1, has2 = need_dlora1 and lora1_u is not None, need_dlora2_a and lora2_a is not None
    return (
        dy.new_empty(tokens, d_model),
        dy.new_empty(d_ffn if need_db1 else 0),
        dy.new_empty(d_model if need_db2 else 0),
        dy.new_empty(lora1_u.shape if has1 else 0),
        dy.new_empty(lora1_b.shape if has1 else 0),
        dy.new_empty(lora2_a.shape if has2 else 0),
    )


def _setup_context(ctx, inputs, output):
    _, w1, b1, w2, b2, counts, indices, tile_m, block_n, lora1_u, lora1_b, lora2_a = inputs
    _, h, _ = output
    # Not x: the backward never reads it, and keeping it would hold a [T, d] activation per layer.
    ctx.save_for_backward(w1, w2, h, counts, indices, lora1_u, lora1_b, lora2_a)
    ctx.tile_m, ctx.block_n = tile_m, block_n
    # h is kept for the backward pass only; gradients do not flow back through it.
    ctx.mark_non_differentiable(h)
    # Otherwise autograd hands the backward a zero gradient for h, a [T, d_ffn] fill per layer
    # (40 us at OPT-1.3B with 8192 tokens), and one for an unused lora2_v.
    ctx.set_materialize_grads(False)


def _backward_with(backward, ctx, dy, dlora2_v):
    """The gradients of mlp_forward's inputs, with `backward` the op (traced) or its implementation (eager)."""
    w1, w2, h, counts, indices, lora1_u, lora1_b, lora2_a = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None:  # only lora2_v reached the loss
        dy = h.new_zeros(h.shape[0], w2.shape[0])
    if needs[1] or needs[3]:
        raise RuntimeError("fc1/fc2 weights are frozen under Long Exposure: set requires_grad=False on w1 and w2")
    dx, db1, db2, dlora1_u, dlora1_b, dlora2_a = backward(
        dy, dlora2_v if lora2_a is not None else None, w1, w2, h, counts, indices, ctx.tile_m, ctx.block_n,
        lora1_u, lora1_b, lora2_a, bool(needs[2]), bool(needs[4]), bool(needs[9] or needs[10]), bool(needs[11]),
    )
    return (
        dx if needs[0] else None, None, db1 if needs[2] else None, None, db2 if needs[4] else None,
        None, None, None, None,
        dlora1_u if needs[9] else None, dlora1_b if needs[10] else None, dlora2_a if needs[11] else None,
    )


def _backward(ctx, dy, _dh, dlora2_v):
    return _backward_with(mlp_backward, ctx, dy, dlora2_v)


mlp_forward.register_autograd(_backward, setup_context=_setup_context)


# Eager calls skip torch.library's dispatch (ops/_eager.py).
_EagerMlp = eager_autograd("_EagerMlp", _forward_impl, _setup_context,
                           lambda ctx, dy, _dh, dlora2_v: _backward_with(_backward_impl, ctx, dy, dlora2_v))


def neuron_block_mlp(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None, mask: MlpMask, lora1_u: torch.Tensor | None = None,
    lora1_b: torch.Tensor | None = None, lora2_a: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = fc2(relu(fc1(x))) over the mask's active (token tile, neuron block) pairs.

    x may have any leading dimensions; they are flattened into the token axis the mask tiles.
    Returns (y, lora2_v) with lora2_v = h @ lora2_a^T ([..., 0] without lora2_a).
    """
    if torch.is_grad_enabled() and (fc1_weight.requires_grad or fc2_weight.requires_grad):
        raise ValueError("fc1/fc2 weights are frozen under Long Exposure: set requires_grad=False on them")
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    u1 = lora1_u.reshape(flat.shape[0], -1) if lora1_u is not None else None
    forward = eager_or_op(_EagerMlp.apply, mlp_forward)
    y, _, lora2_v = forward(
        flat, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mask.counts, mask.indices, mask.tile_m, mask.block_n,
        u1, lora1_b, lora2_a,
    )
    return y.reshape(*lead, -1), lora2_v.reshape(*lead, -1)
