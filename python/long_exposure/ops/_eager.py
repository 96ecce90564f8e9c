"""Eager calls of the ops without torch.library's Python dispatch.

A custom op called from Python goes through torch.library's dispatch, and with autograd through
its autograd wrapper: about 100 us of host time per call and direction on the H200's host, paid
per layer per step, more than the kernels take at 512 tokens (bench/RESULTS.md). Eager calls
therefore run the same implementations directly (through an autograd.Function where gradients
flow), and traced calls (torch.compile) keep the ops, whose schemas and fake implementations the
tracer needs.
"""

from __future__ import annotations

import torch


def eager_or_op(impl, op):
    """The implementation itself for an eager call, the op where a trace needs it."""
    return op if torch.compiler.is_compiling() else impl


def eager_autograd(name: str, forward_impl, setup_context, backward):
    """An autograd.Function class running forward_impl(*inputs), with the op's setup_context and
    backward(ctx, *output_grads), which must call the backward implementation, not its op."""

    def forward(ctx, *inputs):
        outputs = forward_impl(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})
