"""Torch tensors to core TensorViews, after the checks that give Python users clear errors.

The core re-checks shapes and mask contents (C++ callers skip this file); what only Python can
know well (torch dtypes, devices, autograd state) is checked here.
"""

from __future__ import annotations

import torch

from . import _C

_DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int32: 4,
    torch.int64: 5,
}


# torch.cuda.current_stream builds a Stream object on every call (microseconds of host time, paid
# by every view of every op call); the raw handle is all the core needs.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on `device` (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    if _raw_stream is not None and device.index is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def view(tensor: torch.Tensor | None, name: str, stream: int | None = None):
    """The core's view of `tensor` (None stays None). The caller keeps the tensor alive until the
    core call returns: never pass a temporary (view(t.cpu(), ...)), whose memory is freed at once.

    `stream` spares the per-tensor stream lookup when a caller passes many views of one device.
    """
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    code = _DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {tensor.dtype}, which the core does not handle")
    if tensor.is_cuda:
        device, index = 1, tensor.get_device()
        stream = current_stream(tensor.device) if stream is None else stream
    elif tensor.is_cpu:
        device, index, stream = 0, 0, 0
    else:
        raise ValueError(f"{name} is on {tensor.device}; Long Exposure runs on the CPU and CUDA")
    return _C.TensorView(
        tensor.data_ptr(), code, list(tensor.shape), list(tensor.stride()), device, index, stream
    )


def viewer(like: torch.Tensor):
    """view() for the tensors of one op call on `like`'s device, with the stream looked up once."""
    stream = current_stream(like.device)
    return lambda tensor, name: view(tensor, name, stream)


def _check_tensor(tensor, name: str, like: torch.Tensor, dtype: torch.dtype, dtype_note: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected {dtype}{dtype_note}")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device}, expected {like.device} like the input")


def check_float(tensor: torch.Tensor | None, name: str, like: torch.Tensor) -> None:
    """`tensor` has the dtype and device of `like` (the op's first input)."""
    if tensor is not None:
        _check_tensor(tensor, name, like, like.dtype, " like the input")


def check_index(tensor: torch.Tensor, name: str, like: torch.Tensor, ndim: int) -> None:
    """`tensor` is an int32 block list on the device of `like`."""
    _check_tensor(tensor, name, like, torch.int32, "")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} has {tensor.dim()} dimensions, expected {ndim}")


def check_shape(tensor: torch.Tensor | None, name: str, expected: tuple) -> None:
    """`expected` holds sizes, with None for any size."""
    if tensor is None:
        return
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {list(shape)}, expected [{want}]")

