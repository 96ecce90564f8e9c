"""The token cross-entropy of a language model's logits as torch.library custom ops with fake
implementations and autograd, and the causal-LM loss built on it (the loss Long Exposure's OPT
models use in place of HF's; see cpp/include/long_exposure/cross_entropy.h for why)."""

from __future__ import annotations

import torch

from .. import _C
from .._views import viewer
from ._eager import eager_autograd, eager_or_op

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(logits: torch.Tensor) -> bool:
    """True where a kernel takes these logits (device and dtype)."""
    if logits.is_cuda:
        return logits.dtype in _CUDA_DTYPES
    return logits.is_cpu and logits.dtype in _CPU_DTYPES


def _check(logits, labels):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a [tokens, vocab] tensor")
    if not supports(logits):
        raise TypeError(f"logits on {logits.device} with dtype {logits.dtype} are not supported: the kernels take "
                        "float32, float64 or bfloat16 on the CPU and float32, bfloat16 or float16 on CUDA")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 or int32 tensor")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels has shape {list(labels.shape)}, expected [{logits.shape[0]}]")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device}, expected {logits.device} like the logits")


def _rows_contiguous(logits):
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _forward_impl(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, lse [N] fp32): each row's lse - logits[row, label], 0 on ignored rows."""
    _check(logits, labels)
    logits = _rows_contiguous(logits)
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    lse = torch.empty_like(loss)
    view = viewer(logits)
    _C.cross_entropy_forward(view(logits, "logits"), view(labels, "labels"), int(ignore_index),
                             view(lse, "lse"), view(loss, "loss"))
    return loss, lse


cross_entropy_forward = torch.library.custom_op("long_exposure::cross_entropy_forward", mutates_args=())(_forward_impl)


@cross_entropy_forward.register_fake
def _(logits, labels, ignore_index):
    _check(logits, labels)
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


def _backward_impl(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    """grad_logits [N, V] in the logits' dtype: (softmax - onehot(label)) * grad_loss per row."""
    _check(logits, labels)
    logits = _rows_contiguous(logits)
    grad_loss = grad_loss.float()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    view = viewer(logits)
    _C.cross_entropy_backward(view(logits, "logits"), view(labels, "labels"), view(lse, "lse"),
                              view(grad_loss, "grad_loss"), int(ignore_index), view(grad, "grad_logits"))
    return grad


cross_entropy_backward = torch.library.custom_op("long_exposure::cross_entropy_backward", mutates_args=())(_backward_impl)


@cross_entropy_backward.register_fake
def _(logits, labels, lse, grad_loss, ignore_index):
    _check(logits, labels)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse = output
    # The logits themselves are kept, not a copy: the model returns them to the caller anyway.
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward_with(backward, ctx, grad_loss):
    logits, labels, lse = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None
    return backward(logits, labels, lse, grad_loss, ctx.ignore_index), None, None


cross_entropy_forward.register_autograd(
    lambda ctx, grad_loss, _grad_lse: _backward_with(cross_entropy_backward, ctx, grad_loss),
    setup_context=_setup_context)

# Eager calls skip torch.library's dispatch (ops/_eager.py).
_EagerCrossEntropy = eager_autograd("_EagerCrossEntropy", _forward_impl, _setup_context,
                                    lambda ctx, grad_loss, _grad_lse: _backward_with(_backward_impl, ctx, grad_loss))


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [N] fp32 of [N, V] logits (0 where the label is ignore_index), with autograd."""
    forward = eager_or_op(_EagerCrossEntropy.apply, cross_entropy_forward)
    loss, _ = forward(logits, labels, int(ignore_index))
    return loss


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs) -> torch.Tensor:
    """HF's ForCausalLMLoss (same arguments, same result within fp32 rounding) over
    token_cross_entropy: the loss at position t scores the label at t + 1, positions labelled
    ignore_index count for nothing, and the sum is divided by num_items_in_batch when given (a
    Trainer's gradient accumulation) or else by the number of counted positions."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    loss = token_cross_entropy(logits, shift_labels, ignore_index).sum()
    if num_items_in_batch is None:
        # On the device: a count read back to the host would stall the stream and break graph capture.
        return loss / (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
