"""Random and structured masks for tests and benchmarks (benchmarks import them from here)."""

from __future__ import annotations

import math

import torch

from long_exposure import BlockLayout, MlpMask


def random_mlp_mask(n_tokens, n_neurons, tile_m, block_n, density, generator=None, capacity=None) -> MlpMask:
    shape = (math.ceil(n_tokens / tile_m), math.ceil(n_neurons / block_n))
    active = torch.rand(shape, generator=generator) < density
    return MlpMask.from_dense(active, tile_m, block_n, capacity=capacity)


def random_layout(batch, heads, seq_len, block, density, generator=None, keep_diagonal=True) -> BlockLayout:
    n = math.ceil(seq_len / block)
    active = (torch.rand(batch, heads, n, n, generator=generator) < density).tril()
    if keep_diagonal:
        active |= torch.eye(n, dtype=torch.bool)
    return BlockLayout.from_dense(active, block)


def local_sink_layout(heads, seq_len, block, window=2, sinks=1) -> BlockLayout:
    """A structured layout: the diagonal band of `window` blocks plus the first `sinks` columns."""
    n = math.ceil(seq_len / block)
    rows = torch.arange(n).unsqueeze(1)
    cols = torch.arange(n).unsqueeze(0)
    active = ((rows - cols >= 0) & (rows - cols < window)) | ((cols < sinks) & (cols <= rows))
    return BlockLayout.from_dense(active.expand(1, heads, n, n), block)
