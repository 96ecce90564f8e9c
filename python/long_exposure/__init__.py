"""Long Exposure: faster parameter-efficient fine-tuning through the activation sparsity of the frozen model."""

from __future__ import annotations

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only a broken install gets here
    raise ImportError(
        "long_exposure's compiled core (long_exposure._C) is missing or does not load; "
        "reinstall with `pip install .` from the source tree"
    ) from error

from . import ops, reference
from .formats import BlockLayout, MlpMask, transpose_block_lists
from .ops import block_sparse_attention, neuron_block_mlp

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Version, whether CUDA kernels are compiled in and for which architectures, and OpenMP."""
    info = dict(_C.build_info())
    info["cuda_architectures"] = [a for a in info["cuda_architectures"].split(",") if a]
    return info


__all__ = [
    "BlockLayout",
    "MlpMask",
    "block_sparse_attention",
    "build_info",
    "neuron_block_mlp",
    "ops",
    "reference",
    "transpose_block_lists",
]
