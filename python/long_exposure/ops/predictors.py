"""Predictor inference as torch.library custom ops with fake implementations (no autograd: the
predictors are trained with plain torch; these ops only run them). See
cpp/include/long_exposure/predictors.h for the contracts."""

from __future__ import annotations

import math

import torch

from .. import _C
from .._views import check_float, check_shape, current_stream, view
from ..formats import MlpMask
from ._eager import eager_or_op


def _check_predictor_input(tensor, name: str, ndim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != ndim:
        raise ValueError(f"{name} must be a [{layout}] tensor")
    if tensor.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected float32 or bfloat16")


def _check_mlp(x, down, up, bias, threshold, tile_m):
    _check_predictor_input(x, "x", 2, "tokens, d_model")
    for name, t in (("down", down), ("up", up), ("bias", bias)):
        if t is None:
            raise ValueError(f"{name} is required")
        check_float(t, name, x)
    tokens, d_model = x.shape
    check_shape(down, "down", (None, d_model))
    check_shape(up, "up", (None, down.shape[0]))
    n_blocks = up.shape[0]
    if n_blocks < 1:
        raise ValueError("up must have at least one row: a mask needs at least one block")
    check_shape(bias, "bias", (n_blocks,))
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan")
    if tile_m <= 0:
        raise ValueError(f"tile_m must be positive, got {tile_m}")
    return -(-tokens // tile_m), n_blocks


def _mlp_outputs(x, n_tiles, n_blocks):
    return (
        torch.empty(n_tiles, dtype=torch.int32, device=x.device),
        torch.empty(n_tiles, n_blocks, dtype=torch.int32, device=x.device),
        torch.empty(n_tiles, n_blocks, dtype=torch.float32, device=x.device),
    )


def _mlp_mask_impl(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, threshold: float, tile_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [n_tiles] int32, indices [n_tiles, n_blocks] int32, tile_max [n_tiles, n_blocks] fp32).

    Block b is active in a tile when the tile's largest logit x @ down^T @ up^T + bias for b exceeds
    `threshold`; a tile where none does keeps its best block.
    """
    n_tiles, n_blocks = _check_mlp(x, down, up, bias, threshold, tile_m)
    x, down, up, bias = (t.contiguous() for t in (x, down, up, bias))
    counts, indices, tile_max = _mlp_outputs(x, n_tiles, n_blocks)
    stream = current_stream(x.device)
    _C.mlp_predictor_mask(
        view(x, "x", stream), view(down, "down", stream), view(up, "up", stream), view(bias, "bias", stream),
        float(threshold), tile_m, view(counts, "counts", stream), view(indices, "indices", stream),
        view(tile_max, "tile_max", stream),
    )
    return counts, indices, tile_max


mlp_predictor_mask_op = torch.library.custom_op("long_exposure::mlp_predictor_mask", mutates_args=())(_mlp_mask_impl)


@mlp_predictor_mask_op.register_fake
def _(x, down, up, bias, threshold, tile_m):
    return _mlp_outputs(x, *_check_mlp(x, down, up, bias, threshold, tile_m))


def mlp_predictor_mask(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, threshold: float, tile_m: int,
    block_n: int,
) -> MlpMask:
    """The MLP mask the predictor gives for the tokens of `x` (leading dimensions are flattened
    into the token axis the mask tiles); up has one row per block of `block_n` neurons."""
    if block_n <= 0:
        raise ValueError(f"block_n must be positive, got {block_n}")
    counts, indices, _ = eager_or_op(_mlp_mask_impl, mlp_predictor_mask_op)(
        x.reshape(-1, x.shape[-1]), down, up, bias, float(threshold), int(tile_m))
    return MlpMask(counts, indices, int(tile_m), int(block_n))


def _check_attention(hidden, wq, wk, block):
    _check_predictor_input(hidden, "hidden", 3, "batch, seq, d_model")
    for name, t in (("wq", wq), ("wk", wk)):
        if t is None:
            raise ValueError(f"{name} is required")
        check_float(t, name, hidden)
    batch, seq, d_model = hidden.shape
    check_shape(wq, "wq", (None, None, d_model))
    heads, rank = wq.shape[0], wq.shape[1]
    if rank < 1:
        raise ValueError("wq must have rank at least 1 (its second dimension)")
    check_shape(wk, "wk", (heads, rank, d_model))
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    return batch, heads, -(-seq // block), d_model


def _block_scores_impl(hidden: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, block: int) -> torch.Tensor:
    """Causal block score maps [batch, heads, n, n] fp32 (n = ceil(seq / block)): row i is the
    softmax over key blocks j <= i of the heads' low-rank Q/K sketches of the block-mean hidden states."""
    batch, heads, n, d_model = _check_attention(hidden, wq, wk, block)
    hidden, wq, wk = (t.contiguous() for t in (hidden, wq, wk))
    pooled = torch.empty(batch, n, d_model, dtype=torch.float32, device=hidden.device)
    scores = torch.empty(batch, heads, n, n, dtype=torch.float32, device=hidden.device)
    stream = current_stream(hidden.device)
    workspace = None  # the partial sums of the CUDA kernel's split sketch product; the CPU needs none
    if hidden.is_cuda:
        rank = wq.shape[1]
        splits = _C.attention_sketch_splits(batch, n, heads, rank, d_model)
        workspace = torch.empty(splits, batch, n, 2, heads, rank, dtype=torch.float32, device=hidden.device)
    _C.attention_block_scores(
        view(hidden, "hidden", stream), view(wq, "wq", stream), view(wk, "wk", stream), block,
        view(pooled, "pooled", stream), view(scores, "scores", stream), view(workspace, "workspace", stream),
    )
    return scores


attention_block_scores_op = torch.library.custom_op(
    "long_exposure::attention_block_scores", mutates_args=())(_block_scores_impl)


def attention_block_scores(hidden: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, block: int) -> torch.Tensor:
    """Causal block score maps [batch, heads, n, n] fp32 (the op attention_block_scores_op)."""
    return eager_or_op(_block_scores_impl, attention_block_scores_op)(hidden, wq, wk, block)


@attention_block_scores_op.register_fake
def _(hidden, wq, wk, block):
    batch, heads, n, _ = _check_attention(hidden, wq, wk, block)
    return hidden.new_empty(batch, heads, n, n, dtype=torch.float32)
