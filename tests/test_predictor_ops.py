"""The predictor-inference ops (MLP predictor masks, attention block scores) against reference.py,
and their CUDA kernels against the CPU ones."""

import math

import pytest
import torch

from long_exposure import _C, ops, reference
from long_exposure._views import view
from kernel_choice import kernel_choice
from tolerance import assert_close_fp32, assert_within_twice_reference

# (tokens, d_model, rank, n_blocks, tile_m): ragged token counts, more blocks than a warp has
# lanes, and tiles longer than one 32-token pass of the CUDA kernel included.
MLP_SHAPES = [(64, 32, 8, 6, 16), (50, 24, 16, 40, 16), (37, 16, 4, 33, 8), (5, 8, 3, 2, 16), (130, 40, 12, 7, 64),
              (100, 20, 5, 9, 37)]
# (batch, seq, d_model, heads, rank, block): ragged sequences, one block, more blocks than lanes.
ATTENTION_SHAPES = [(2, 64, 32, 4, 8, 16), (1, 45, 24, 3, 5, 8), (3, 7, 16, 2, 4, 16), (2, 300, 16, 2, 6, 8)]


def mlp_inputs(shape, dtype=torch.float32, seed=0):
    tokens, d_model, rank, n_blocks, _ = shape
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, d_model, generator=g).to(dtype),
        (torch.randn(rank, d_model, generator=g) * d_model**-0.5).to(dtype),
        (torch.randn(n_blocks, rank, generator=g) * rank**-0.5).to(dtype),
        (torch.randn(n_blocks, generator=g) * 0.5).to(dtype),
    )


def attention_inputs(shape, dtype=torch.float32, seed=0):
    batch, seq, d_model, heads, rank, _ = shape
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, seq, d_model, generator=g).to(dtype),
        (torch.randn(heads, rank, d_model, generator=g) * d_model**-0.5).to(dtype),
        (torch.randn(heads, rank, d_model, generator=g) * d_model**-0.5).to(dtype),
    )


def threshold_in_gap(tile_max, quantile, margin):
    """A threshold near the `quantile` of the tile maxima, at least `margin` from every one of them,
    so that implementations whose maxima differ by less than `margin` must give the same mask."""
    values = tile_max.flatten().double().sort().values
    k, reach = int(quantile * (len(values) - 1)), max(8, len(values) // 8)
    lo, hi = max(0, k - reach), min(len(values) - 1, k + reach)
    gaps = values[lo + 1 : hi + 1] - values[lo:hi]
    i = lo + int(gaps.argmax())
    assert gaps[i - lo] > 2 * margin, "the test data has no clear gap near this quantile"
    return float(values[i] + values[i + 1]) / 2


def assert_same_clear_decisions(counts, indices, expected, threshold, margin):
    """The op's lists equal `expected` = (counts, indices, tile_max) on every tile whose list a
    difference below `margin` in the maxima cannot change: no maximum that close to the threshold
    and, where the tile keeps only its best block, a runner-up further behind than that. At least
    half the tiles must qualify, so the comparison is never empty."""
    expected_counts, expected_indices, expected_max = expected
    unclear = ((expected_max - threshold).abs() <= margin).any(1)
    if expected_max.shape[1] > 1:
        top2 = expected_max.topk(2, dim=1).values
        unclear |= ~(expected_max > threshold).any(1) & (top2[:, 0] - top2[:, 1] <= margin)
    clear = ~unclear
    assert clear.float().mean() >= 0.5, "the test data leaves too few tiles clear of ties"
    assert torch.equal(counts.cpu()[clear], expected_counts[clear])
    assert torch.equal(indices.cpu()[clear], expected_indices[clear])


def assert_mask_is_cut_from_tile_max(counts, indices, tile_max, threshold):
    """The mask is exactly what the reference selection makes of the op's own maxima."""
    expected_counts, expected_indices = reference.mlp_mask_from_tile_max(tile_max.cpu(), threshold)
    assert torch.equal(counts.cpu(), expected_counts)
    assert torch.equal(indices.cpu(), expected_indices)


# ---- MLP predictor mask -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", MLP_SHAPES)
@pytest.mark.parametrize("quantile", [0.2, 0.6, 0.9])
def test_mlp_fp32_matches_reference(shape, quantile):
    x, down, up, bias = mlp_inputs(shape, seed=shape[0])
    tile_m = shape[-1]
    expected_max = reference.mlp_predictor_tile_max(x, down, up, bias, tile_m)
    threshold = threshold_in_gap(expected_max, quantile, margin=1e-4)
    counts, indices, tile_max = ops.mlp_predictor_mask_op(x, down, up, bias, threshold, tile_m)
    assert_close_fp32(tile_max, expected_max, "tile_max")
    assert_mask_is_cut_from_tile_max(counts, indices, tile_max, threshold)
    expected = reference.mlp_predictor_mask(x, down, up, bias, threshold, tile_m)
    assert_same_clear_decisions(counts, indices, expected, threshold, margin=1e-4)


@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_mlp_bf16_within_twice_reference_error(shape):
    # Every run sees the same bf16-representable values; only the arithmetic precision differs.
    low = mlp_inputs(shape, torch.bfloat16, seed=shape[0])
    high = [t.float() for t in low]
    tile_m = shape[-1]
    fp32_max = reference.mlp_predictor_tile_max(*high, tile_m)
    bf16_max = reference.mlp_predictor_tile_max(*low, tile_m)
    threshold = threshold_in_gap(bf16_max, 0.6, margin=1e-2)
    counts, indices, tile_max = ops.mlp_predictor_mask_op(*low, threshold, tile_m)
    assert tile_max.dtype == torch.float32
    assert_within_twice_reference(tile_max, bf16_max, fp32_max, "tile_max")
    # z is rounded to bf16 as the reference rounds it: the op is far closer to the bf16 reference
    # than the bf16 reference is to fp32.
    assert (tile_max - bf16_max).abs().mean() <= 0.1 * (bf16_max - fp32_max).abs().mean()
    assert_mask_is_cut_from_tile_max(counts, indices, tile_max, threshold)
    assert_same_clear_decisions(counts, indices, reference.mlp_predictor_mask(*low, threshold, tile_m), threshold,
                                margin=1e-2)


@pytest.mark.parametrize("shape", MLP_SHAPES[:3])
def test_mlp_threshold_above_every_logit_keeps_each_tiles_best_block(shape):
    x, down, up, bias = mlp_inputs(shape, seed=1)
    tile_m, n_blocks = shape[-1], shape[3]
    expected_max = reference.mlp_predictor_tile_max(x, down, up, bias, tile_m)
    for threshold in (float(expected_max.max()) + 1.0, math.inf):
        counts, indices, _ = ops.mlp_predictor_mask_op(x, down, up, bias, threshold, tile_m)
        assert torch.all(counts == 1)
        assert torch.equal(indices[:, 0], expected_max.argmax(1).int())
        assert torch.all(indices[:, 1:] == -1)
    assert indices.shape == (math.ceil(shape[0] / tile_m), n_blocks)


@pytest.mark.parametrize("shape", MLP_SHAPES[:3])
def test_mlp_threshold_below_every_logit_activates_every_block(shape):
    x, down, up, bias = mlp_inputs(shape, seed=2)
    tile_m, n_blocks = shape[-1], shape[3]
    expected_max = reference.mlp_predictor_tile_max(x, down, up, bias, tile_m)
    for threshold in (float(expected_max.min()) - 1.0, -math.inf):
        counts, indices, _ = ops.mlp_predictor_mask_op(x, down, up, bias, threshold, tile_m)
        assert torch.all(counts == n_blocks)
        assert torch.equal(indices, torch.arange(n_blocks, dtype=torch.int32).expand_as(indices))


def test_mlp_tie_for_the_best_block_keeps_the_lowest():
    x, down, up, _ = mlp_inputs((20, 8, 4, 6, 8))
    up = torch.zeros_like(up)  # every logit is its bias
    bias = torch.tensor([0.0, 1.0, 3.0, -2.0, 3.0, 1.0])
    counts, indices, tile_max = ops.mlp_predictor_mask_op(x, down, up, bias, 5.0, 8)
    assert torch.equal(tile_max, bias.expand(3, 6))
    assert torch.all(counts == 1) and torch.all(indices[:, 0] == 2)
    counts, indices, _ = ops.mlp_predictor_mask_op(x, down, up, bias, 1.0, 8)  # 1.0 itself is not above 1.0
    assert torch.all(counts == 2) and torch.equal(indices[:, :2], torch.tensor([[2, 4]] * 3, dtype=torch.int32))


def test_mlp_threshold_is_compared_in_fp32():
    x, down, up, _ = mlp_inputs((8, 8, 4, 3, 8))
    bias = torch.tensor([0.1, 0.2, 0.3])
    # 0.1 in double lies below fp32(0.1): a double comparison would call block 0 active.
    counts, indices, _ = ops.mlp_predictor_mask_op(x, down, torch.zeros_like(up), bias, 0.1, 8)
    assert counts.tolist() == [2] and indices.tolist() == [[1, 2, -1]]


def test_mlp_predictor_mask_flattens_leading_dimensions_into_an_mlp_mask():
    tokens, d_model, rank, block_n, tile_m = 24, 16, 4, 8, 8
    d_ffn = 36  # five blocks of 8 neurons, the last one ragged
    x, down, up, bias = mlp_inputs((tokens, d_model, rank, 5, tile_m), seed=3)
    mask = ops.mlp_predictor_mask(x.reshape(2, 12, d_model), down, up, bias, 0.3, tile_m, block_n)
    counts, indices, _ = ops.mlp_predictor_mask_op(x, down, up, bias, 0.3, tile_m)
    assert (mask.tile_m, mask.block_n) == (tile_m, block_n)
    assert torch.equal(mask.counts, counts) and torch.equal(mask.indices, indices)
    # The mask is one the MLP operator takes as it is.
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(d_ffn, d_model, generator=g), torch.randn(d_model, d_ffn, generator=g)
    y, _ = ops.neuron_block_mlp(x, w1, None, w2, None, mask)
    expected, _, _ = reference.neuron_block_mlp(x, w1, None, w2, None, mask.counts, mask.indices, tile_m, block_n)
    assert_close_fp32(y, expected, "y")


def test_mlp_no_tokens_gives_an_empty_mask():
    x, down, up, bias = mlp_inputs((0, 8, 4, 3, 16))
    counts, indices, tile_max = ops.mlp_predictor_mask_op(x, down, up, bias, 0.0, 16)
    assert counts.shape == (0,) and indices.shape == (0, 3) and tile_max.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_opcheck(dtype):
    x, down, up, bias = mlp_inputs((37, 16, 4, 9, 8), dtype)
    torch.library.opcheck(ops.mlp_predictor_mask_op, (x, down, up, bias, 0.2, 8))


# ---- attention block scores ---------------------------------------------------------------------

def assert_causal_rows(scores):
    n = scores.shape[-1]
    above = ~torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    assert torch.all(scores[..., above] == 0)
    assert_close_fp32(scores.sum(-1), torch.ones(scores.shape[:-1], device=scores.device), "row sums")


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_fp32_matches_reference(shape):
    hidden, wq, wk = attention_inputs(shape, seed=shape[1])
    scores = ops.attention_block_scores(hidden, wq, wk, shape[-1])
    assert scores.shape == (shape[0], shape[3], math.ceil(shape[1] / shape[-1]), math.ceil(shape[1] / shape[-1]))
    assert_close_fp32(scores, reference.attention_block_scores(hidden, wq, wk, shape[-1]), "scores")
    assert_causal_rows(scores)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_bf16_within_twice_reference_error(shape):
    low = attention_inputs(shape, torch.bfloat16, seed=shape[1])
    block = shape[-1]
    fp32_scores = reference.attention_block_scores(*(t.float() for t in low), block)
    scores = ops.attention_block_scores(*low, block)
    assert_within_twice_reference(scores, reference.attention_block_scores(*low, block), fp32_scores, "scores")
    # bf16 inputs are only widened: the scores are those of the same values in fp32.
    assert_close_fp32(scores, fp32_scores, "scores")


def test_attention_block_means_ignore_the_missing_tokens_of_a_ragged_block():
    # Every token of block i holds i (the two tokens of the short last block too), so the block
    # means and the scores 9 * i * j are known exactly; a mean over the full block size would
    # halve the last one.
    hidden = torch.arange(5.0).repeat_interleave(4)[:18].reshape(1, 18, 1).expand(1, 18, 3).contiguous()
    w = torch.ones(1, 1, 3)
    scores = ops.attention_block_scores(hidden, w, w, 4)
    logits = torch.tensor([[9.0 * i * j for j in range(5)] for i in range(5)])
    expected = torch.softmax(logits.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf), -1)
    assert_close_fp32(scores[0, 0], expected, "scores")


def test_attention_no_tokens_gives_empty_maps():
    hidden, wq, wk = attention_inputs((2, 0, 8, 3, 4, 16))
    assert ops.attention_block_scores(hidden, wq, wk, 16).shape == (2, 3, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_opcheck(dtype):
    hidden, wq, wk = attention_inputs((2, 45, 16, 3, 4, 8), dtype)
    torch.library.opcheck(ops.attention_block_scores_op, (hidden, wq, wk, 8))


# ---- bad input ----------------------------------------------------------------------------------

def test_mlp_wrong_dtype_names_the_argument():
    x, down, up, bias = mlp_inputs((16, 8, 4, 3, 8))
    with pytest.raises(TypeError, match="x has dtype torch.float64, expected float32 or bfloat16"):
        ops.mlp_predictor_mask_op(x.double(), down, up, bias, 0.0, 8)
    with pytest.raises(TypeError, match="down has dtype torch.bfloat16, expected torch.float32"):
        ops.mlp_predictor_mask_op(x, down.bfloat16(), up, bias, 0.0, 8)
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        ops.mlp_predictor_mask_op(x, down, up, bias.double(), 0.0, 8)


def test_mlp_wrong_shape_names_the_argument():
    x, down, up, bias = mlp_inputs((16, 8, 4, 3, 8))
    with pytest.raises(ValueError, match=r"down has shape \[4, 7\], expected \[\*, 8\]"):
        ops.mlp_predictor_mask_op(x, down[:, :7], up, bias, 0.0, 8)
    with pytest.raises(ValueError, match=r"up has shape \[3, 5\], expected \[\*, 4\]"):
        ops.mlp_predictor_mask_op(x, down, torch.zeros(3, 5), bias, 0.0, 8)
    with pytest.raises(ValueError, match=r"bias has shape \[4\], expected \[3\]"):
        ops.mlp_predictor_mask_op(x, down, up, torch.zeros(4), 0.0, 8)
    with pytest.raises(ValueError, match=r"x must be a \[tokens, d_model\] tensor"):
        ops.mlp_predictor_mask_op(x.reshape(2, 8, 8), down, up, bias, 0.0, 8)
    with pytest.raises(ValueError, match="at least one row"):
        ops.mlp_predictor_mask_op(x, down, up[:0], bias[:0], 0.0, 8)


def test_mlp_bad_tile_and_threshold_are_refused():
    x, down, up, bias = mlp_inputs((16, 8, 4, 3, 8))
    with pytest.raises(ValueError, match="tile_m must be positive, got 0"):
        ops.mlp_predictor_mask_op(x, down, up, bias, 0.0, 0)
    with pytest.raises(ValueError, match="threshold must be a number"):
        ops.mlp_predictor_mask_op(x, down, up, bias, math.nan, 8)
    with pytest.raises(ValueError, match="block_n must be positive"):
        ops.mlp_predictor_mask(x, down, up, bias, 0.0, 8, 0)


def test_mlp_core_names_a_bad_output_argument():
    # The core checks again what Python checked, for C++ callers; its errors reach Python as ValueError.
    x, down, up, bias = mlp_inputs((16, 8, 4, 3, 8))
    counts, indices, tile_max = torch.empty(2, dtype=torch.int32), torch.empty(2, 4, dtype=torch.int32), torch.empty(2, 3)
    with pytest.raises(ValueError, match=r"indices has shape \[2, 4\], expected \[2, 3\]"):
        _C.mlp_predictor_mask(view(x, "x"), view(down, "down"), view(up, "up"), view(bias, "bias"), 0.0, 8,
                              view(counts, "counts"), view(indices, "indices"), view(tile_max, "tile_max"))


def test_attention_core_checks_a_workspace_even_where_it_ignores_it():
    hidden, wq, wk = attention_inputs((2, 16, 8, 2, 4, 8))
    pooled, scores = torch.empty(2, 2, 8), torch.empty(2, 2, 2, 2)
    args = [view(hidden, "hidden"), view(wq, "wq"), view(wk, "wk"), 8, view(pooled, "pooled"), view(scores, "scores")]
    workspace = torch.empty(3, 2, 2, 2, 2, 4)
    _C.attention_block_scores(*args, view(workspace, "workspace"))
    assert_close_fp32(scores, reference.attention_block_scores(hidden, wq, wk, 8), "scores")
    wrong = torch.empty(3, 2, 2, 2, 2, 5)
    with pytest.raises(ValueError, match=r"workspace has shape \[3, 2, 2, 2, 2, 5\], expected \[3, 2, 2, 2, 2, 4\]"):
        _C.attention_block_scores(*args, view(wrong, "workspace"))
    with pytest.raises(ValueError, match="splits >= 1"):
        _C.attention_block_scores(*args, view(workspace[:0], "workspace"))


def test_attention_wrong_dtype_names_the_argument():
    hidden, wq, wk = attention_inputs((2, 16, 8, 2, 4, 8))
    with pytest.raises(TypeError, match="hidden has dtype torch.float16, expected float32 or bfloat16"):
        ops.attention_block_scores(hidden.half(), wq, wk, 8)
    with pytest.raises(TypeError, match="wk has dtype torch.bfloat16, expected torch.float32"):
        ops.attention_block_scores(hidden, wq, wk.bfloat16(), 8)


def test_attention_wrong_shape_names_the_argument():
    hidden, wq, wk = attention_inputs((2, 16, 8, 2, 4, 8))
    with pytest.raises(ValueError, match=r"wk has shape \[2, 3, 8\], expected \[2, 4, 8\]"):
        ops.attention_block_scores(hidden, wq, wk[:, :3], 8)
    with pytest.raises(ValueError, match=r"wq has shape \[2, 4, 7\], expected \[\*, \*, 8\]"):
        ops.attention_block_scores(hidden, wq[..., :7], wk, 8)
    with pytest.raises(ValueError, match=r"hidden must be a \[batch, seq, d_model\] tensor"):
        ops.attention_block_scores(hidden[0], wq, wk, 8)
    with pytest.raises(ValueError, match="rank at least 1"):
        ops.attention_block_scores(hidden, wq[:, :0], wk[:, :0], 8)
    with pytest.raises(ValueError, match="block must be positive, got 0"):
        ops.attention_block_scores(hidden, wq, wk, 0)


# ---- CUDA against the CPU -----------------------------------------------------------------------

# The MLP predictor as it runs by default (tiles of several 64-token passes spread over a thread
# block per pass), and with one thread block per tile ("single").
predictor_kernel = kernel_choice("LONG_EXPOSURE_PREDICTOR_KERNEL", alternatives=("single",))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MLP_SHAPES + [(300, 96, 256, 70, 128), (300, 256, 100, 40, 70), (1000, 512, 64, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_cuda_matches_cpu(shape, dtype, predictor_kernel):
    # Rank 256 needs more than the default 48 KiB of shared memory. In bf16, d_model a multiple of 8
    # and rank <= 128 take the tensor-core projection (64-token passes, here across tile edges).
    inputs = mlp_inputs(shape, dtype, seed=shape[0])
    tile_m = shape[-1]
    _, _, cpu_max = ops.mlp_predictor_mask_op(*inputs, 0.0, tile_m)
    # The wider bf16 margin leaves room for a z that rounds the other way on the device.
    margin = 1e-4 if dtype == torch.float32 else 2e-2
    thresholds = [float(cpu_max.min()) - 1, float(cpu_max.max()) + 1, threshold_in_gap(cpu_max, 0.5, margin)]
    for threshold in thresholds:
        counts, indices, tile_max = ops.mlp_predictor_mask_op(*(t.cuda() for t in inputs), threshold, tile_m)
        if dtype == torch.float32:
            assert_close_fp32(tile_max.cpu(), cpu_max, "tile_max")
        else:
            fp32_max = reference.mlp_predictor_tile_max(*(t.float() for t in inputs), tile_m)
            bf16_max = reference.mlp_predictor_tile_max(*inputs, tile_m)
            assert_within_twice_reference(tile_max.cpu(), bf16_max, fp32_max, "tile_max")
        assert_mask_is_cut_from_tile_max(counts, indices, tile_max, threshold)
        assert_same_clear_decisions(counts, indices, ops.mlp_predictor_mask_op(*inputs, threshold, tile_m), threshold,
                                    margin)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ATTENTION_SHAPES + [(2, 1024, 64, 3, 128, 16), (2, 1024, 256, 8, 16, 64),
                                                      (3, 1000, 300, 7, 5, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cuda_matches_cpu(shape, dtype):
    # (2, 1024, 64, 3, 128, 16) keeps 64 blocks x rank 128 of sketches: more than the default shared
    # memory. (2, 1024, 256, 8, 16, 64) is a realistic predictor at small width. (3, 1000, 300, 7, 5,
    # 24) is ragged for every tile of the sketch product: 126 pooled rows and 70 sketch columns
    # (tiles of 64), d_model 300 in 3 slices of 112 (K steps of 16), a short last token block.
    inputs = attention_inputs(shape, dtype, seed=shape[1])
    scores = ops.attention_block_scores(*(t.cuda() for t in inputs), shape[-1])
    assert_close_fp32(scores.cpu(), ops.attention_block_scores(*inputs, shape[-1]), "scores")
    assert_causal_rows(scores)


@pytest.mark.gpu
def test_attention_cuda_scores_do_not_depend_on_the_split_count():
    # One slice of d_model, three of 16 (the shortest), and seven of which four are empty.
    shape = (2, 100, 40, 3, 5, 16)
    hidden, wq, wk = (t.cuda() for t in attention_inputs(shape, seed=7))
    batch, seq, d_model, heads, rank, block = shape
    n = math.ceil(seq / block)
    expected = ops.attention_block_scores(hidden.cpu(), wq.cpu(), wk.cpu(), block)
    pooled = torch.empty(batch, n, d_model, device="cuda")
    scores = torch.empty(batch, heads, n, n, device="cuda")
    for splits in (1, 3, 7):
        workspace = torch.full((splits, batch, n, 2, heads, rank), math.nan, device="cuda")
        _C.attention_block_scores(view(hidden, "hidden"), view(wq, "wq"), view(wk, "wk"), block,
                                  view(pooled, "pooled"), view(scores, "scores"), view(workspace, "workspace"))
        assert_close_fp32(scores.cpu(), expected, f"scores with {splits} splits")
    with pytest.raises(ValueError, match="workspace is required on CUDA"):
        _C.attention_block_scores(view(hidden, "hidden"), view(wq, "wq"), view(wk, "wk"), block,
                                  view(pooled, "pooled"), view(scores, "scores"))


@pytest.mark.gpu
@pytest.mark.parametrize("tile_m", [64, 128, 200])
def test_cuda_mlp_split_passes_give_the_same_masks(monkeypatch, tile_m):
    # bf16 with d_model a multiple of 8 and rank <= 128: the tensor-core kernel, whose passes the
    # split spreads over thread blocks. Maxima are exact in any order, so the results are equal.
    inputs = [t.cuda() for t in mlp_inputs((1000, 256, 64, 70, tile_m), torch.bfloat16, seed=3)]
    monkeypatch.delenv("LONG_EXPOSURE_PREDICTOR_KERNEL", raising=False)
    _, _, maxima = ops.mlp_predictor_mask_op(*inputs, 0.0, tile_m)
    for threshold in (float(maxima.min()) - 1, float(maxima.median()), float(maxima.max()) + 1):
        monkeypatch.setenv("LONG_EXPOSURE_PREDICTOR_KERNEL", "single")
        one_block = ops.mlp_predictor_mask_op(*inputs, threshold, tile_m)
        monkeypatch.delenv("LONG_EXPOSURE_PREDICTOR_KERNEL", raising=False)
        split = ops.mlp_predictor_mask_op(*inputs, threshold, tile_m)
        for a, b in zip(one_block, split):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_ops_run_on_the_current_stream_and_in_a_cuda_graph(predictor_kernel):
    mlp = [t.cuda() for t in mlp_inputs((130, 40, 12, 7, 64))]
    mlp_bf16 = [t.cuda() for t in mlp_inputs((300, 64, 16, 40, 128), torch.bfloat16)]  # the tensor-core kernel
    attention = [t.cuda() for t in attention_inputs((2, 300, 16, 2, 6, 8))]

    def step():
        return (*ops.mlp_predictor_mask_op(*mlp, 0.1, 64), *ops.mlp_predictor_mask_op(*mlp_bf16, 0.1, 128),
                ops.attention_block_scores(*attention, 8))

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = step()  # also the warm-up before capture
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in captured:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b, c in zip(expected, on_side, captured):
        assert torch.equal(a, b) and torch.equal(a, c)
