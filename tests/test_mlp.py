import math
import pytest
import torch

from long_exposure import MlpMask, neuron_block_mlp, ops, reference
from kernel_choice import kernel_choice
from masks import random_mlp_mask
from tolerance import assert_close_fp32, assert_within_twice_reference

# (tokens, d_model, d_ffn, tile_m, block_n): ragged tokens and ragged neuron blocks included.
SHAPES = [(64, 32, 128, 16, 32), (50, 24, 96, 16, 32), (37, 16, 72, 8, 16), (8, 8, 32, 16, 32)]


def make_inputs(shape, dtype, density, seed, bias=True, lora=True, requires_grad=True):
    T, d, F, tm, bn = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0, grad=False):
        t = (torch.randn(*size, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad and requires_grad)

    inputs = dict(
        x=rand(T, d, grad=True), w1=rand(F, d, scale=d**-0.5), b1=rand(F, scale=0.5, grad=True) if bias else None,
        w2=rand(d, F, scale=F**-0.5), b2=rand(d, scale=0.5, grad=True) if bias else None,
        lora1_u=rand(T, 4, grad=True) if lora else None, lora1_b=rand(F, 4, scale=0.3, grad=True) if lora else None,
        lora2_a=rand(3, F, scale=0.3, grad=True) if lora else None,
    )
    mask = random_mlp_mask(T, F, tm, bn, density, generator=g)
    return inputs, mask


def run_op(inputs, mask):
    y, h, v2 = ops.mlp_forward(
        inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask.counts, mask.indices,
        mask.tile_m, mask.block_n, inputs["lora1_u"], inputs["lora1_b"], inputs["lora2_a"],
    )
    return y, h, v2


def run_reference(inputs, mask):
    return reference.neuron_block_mlp(
        inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask.counts, mask.indices,
        mask.tile_m, mask.block_n, inputs["lora1_u"], inputs["lora1_b"], inputs["lora2_a"],
    )


def grads(fn, inputs, mask, dy, dv2):
    leaves = {k: v for k, v in inputs.items() if v is not None and v.requires_grad}
    for v in leaves.values():
        v.grad = None
    y, _, v2 = fn(inputs, mask)
    loss = (y * dy).sum() + ((v2 * dv2).sum() if v2.numel() else 0)
    loss.backward()
    return {k: v.grad.clone() for k, v in leaves.items()}


def cast(inputs, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None else None) for k, v in inputs.items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("bias,lora", [(True, True), (False, False), (True, False)])
def test_fp32_matches_reference(shape, density, bias, lora):
    inputs, mask = make_inputs(shape, torch.float32, density, seed=hash((shape, density)) % 1000, bias=bias, lora=lora)
    y, h, v2 = run_op(inputs, mask)
    ry, rh, rv2 = run_reference(inputs, mask)
    assert_close_fp32(y, ry, "y")
    assert_close_fp32(h, rh, "h")
    assert_close_fp32(v2, rv2, "lora2_v")
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g)
    dv2 = torch.randn(v2.shape, generator=g)
    ours, theirs = grads(run_op, inputs, mask, dy, dv2), grads(run_reference, inputs, mask, dy, dv2)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert_close_fp32(ours[name], theirs[name], f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_bf16_within_twice_reference_error(shape, density):
    # Every run sees the same bf16-representable values; only the arithmetic precision differs.
    low, mask = make_inputs(shape, torch.bfloat16, density, seed=7)
    high = cast(low, torch.float32)
    ry = run_reference(high, mask)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(ry[0].shape, generator=g).bfloat16()
    dv2 = torch.randn(ry[2].shape, generator=g).bfloat16()
    ours_out, ref_out = run_op(low, mask), run_reference(cast(low, torch.bfloat16), mask)
    for name, a, b, c in zip(("y", "h", "lora2_v"), ours_out, ref_out, ry):
        assert_within_twice_reference(a, b, c.detach(), name)
    fp32_grads = grads(run_reference, high, mask, dy.float(), dv2.float())
    ours = grads(run_op, low, mask, dy, dv2)
    theirs = grads(run_reference, cast(low, torch.bfloat16), mask, dy, dv2)
    for name in fp32_grads:
        assert_within_twice_reference(ours[name], theirs[name], fp32_grads[name], f"grad {name}")


def test_full_mask_is_the_dense_mlp():
    inputs, _ = make_inputs((40, 16, 64, 16, 32), torch.float32, 1.0, seed=3, lora=False)
    mask = MlpMask.full(40, 64, tile_m=16, block_n=32)
    x = inputs["x"]
    dense = torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(x, inputs["w1"], inputs["b1"])), inputs["w2"], inputs["b2"]
    )
    y, _ = neuron_block_mlp(x, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask)
    assert_close_fp32(y, dense, "y")


def test_leading_dimensions_are_flattened_into_tokens():
    inputs, mask = make_inputs((24, 16, 64, 8, 32), torch.float32, 0.5, seed=4)
    x = inputs["x"]
    y3, v3 = neuron_block_mlp(x.reshape(2, 12, 16), inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask,
                              inputs["lora1_u"].reshape(2, 12, 4), inputs["lora1_b"], inputs["lora2_a"])
    y, _, v2 = run_op(inputs, mask)
    assert y3.shape == (2, 12, 16) and v3.shape == (2, 12, 3)
    assert_close_fp32(y3.reshape(24, 16), y, "y")
    assert_close_fp32(v3.reshape(24, 3), v2, "lora2_v")


def test_gradcheck_float64():
    inputs, mask = make_inputs((12, 6, 20, 4, 8), torch.float64, 0.6, seed=5)
    names = list(inputs)

    def fn(*args):
        y, _, v2 = ops.mlp_forward(
            args[0], args[1], args[2], args[3], args[4], mask.counts, mask.indices, mask.tile_m, mask.block_n,
            args[5], args[6], args[7],
        )
        return y, v2

    args = [inputs[n] for n in ("x", "w1", "b1", "w2", "b2", "lora1_u", "lora1_b", "lora2_a")]
    assert names  # inputs were built
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False])
def test_opcheck(lora):
    inputs, mask = make_inputs((20, 8, 48, 8, 16), torch.float32, 0.5, seed=6, lora=lora)
    args = (inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask.counts, mask.indices,
            mask.tile_m, mask.block_n, inputs["lora1_u"], inputs["lora1_b"], inputs["lora2_a"])
    torch.library.opcheck(ops.mlp_forward, args)
    y, h, v2 = ops.mlp_forward(*args)
    back = (torch.randn_like(y), torch.randn_like(v2) if lora else None, inputs["w1"], inputs["w2"], h, mask.counts, mask.indices, mask.tile_m, mask.block_n,
            *(t.detach() if t is not None else None for t in (inputs["lora1_u"], inputs["lora1_b"], inputs["lora2_a"])),
            True, True, lora, lora)
    torch.library.opcheck(ops.mlp_backward, back)


def test_a_traced_call_runs_the_op_and_matches_the_eager_path():
    """Eager calls skip torch.library's dispatch (ops/mlp.py); a traced one goes through the op, its
    fake implementation and its registered autograd, and must give the same values and gradients."""
    inputs, mask = make_inputs((20, 8, 48, 8, 16), torch.float32, 0.5, seed=7, lora=False)
    x = inputs["x"].detach()

    def run(fn):
        xg = x.clone().requires_grad_()
        b1 = inputs["b1"].detach().clone().requires_grad_()
        y, _ = fn(xg, inputs["w1"].detach(), b1, inputs["w2"].detach(), inputs["b2"].detach(), mask)
        y.square().sum().backward()
        return y.detach(), xg.grad, b1.grad

    eager = run(neuron_block_mlp)
    traced = run(torch.compile(neuron_block_mlp, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


def test_inactive_neurons_get_no_bias_gradient():
    inputs, _ = make_inputs((32, 8, 64, 16, 32), torch.float32, 1.0, seed=8, lora=False)
    active = torch.tensor([[True, False], [True, False]])  # block 1 never active
    mask = MlpMask.from_dense(active, 16, 32)
    y, _ = neuron_block_mlp(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask)
    y.sum().backward()
    assert torch.all(inputs["b1"].grad[32:] == 0)
    assert torch.any(inputs["b1"].grad[:32] != 0)


# ---- bad input ------------------------------------------------------------------------------

def _valid():
    inputs, mask = make_inputs((32, 8, 64, 16, 32), torch.float32, 1.0, seed=9, lora=False, requires_grad=False)
    return inputs, mask


def _call(inputs, counts, indices, tile_m=16, block_n=32):
    return ops.mlp_forward(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], counts, indices,
                           tile_m, block_n, None, None, None)


def test_wrong_dtype_names_the_argument():
    inputs, mask = _valid()
    inputs["w2"] = inputs["w2"].double()
    with pytest.raises(TypeError, match=r"w2 \(fc2 weight\) has dtype torch.float64, expected torch.float32"):
        _call(inputs, mask.counts, mask.indices)
    inputs, mask = _valid()
    with pytest.raises(TypeError, match="mask counts has dtype torch.int64"):
        _call(inputs, mask.counts.long(), mask.indices)
    inputs, mask = _valid()
    inputs = {k: (v.half() if v is not None else None) for k, v in inputs.items()}
    with pytest.raises(TypeError, match="x has dtype torch.float16"):
        _call(inputs, mask.counts, mask.indices)


def test_wrong_shape_names_the_argument():
    inputs, mask = _valid()
    inputs["w2"] = inputs["w2"].t().contiguous()
    with pytest.raises(ValueError, match=r"w2 \(fc2 weight\) has shape \[64, 8\], expected \[8, 64\]"):
        _call(inputs, mask.counts, mask.indices)
    inputs, mask = _valid()
    with pytest.raises(ValueError, match=r"mask counts has shape \[2\], expected \[4\]"):
        _call(inputs, mask.counts, mask.indices, tile_m=8)


def test_bad_mask_contents_are_refused():
    inputs, mask = _valid()
    indices = mask.indices.clone()
    indices[0, 0] = 7
    with pytest.raises(ValueError, match="lists block 7"):
        _call(inputs, mask.counts, indices)
    counts = mask.counts.clone()
    counts[1] = 5
    with pytest.raises(ValueError, match="has count 5"):
        _call(inputs, counts, mask.indices)
    indices = mask.indices.flip(-1).contiguous()
    with pytest.raises(ValueError, match="not sorted"):
        _call(inputs, mask.counts, indices)


def test_wrong_device_is_refused():
    inputs, mask = _valid()
    with pytest.raises(ValueError, match="mask counts is on meta"):
        _call(inputs, mask.counts.to("meta"), mask.indices)


def test_trainable_frozen_weights_are_refused():
    inputs, mask = _valid()
    inputs["w1"].requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        neuron_block_mlp(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], mask)


def test_mask_count_matches_density():
    mask = random_mlp_mask(1000, 4096, 64, 128, 0.25, generator=torch.Generator().manual_seed(0))
    assert abs(mask.density(32).item() - 0.25) < 0.05
    assert math.isclose(MlpMask.full(100, 300, 64, 128).density(3).item(), 1.0)


@pytest.mark.parametrize("lora", [True, False])
def test_backward_op_equals_the_reference_backward(lora):
    inputs, mask = make_inputs((37, 16, 72, 8, 16), torch.float32, 0.5, seed=11, lora=lora, requires_grad=False)
    w1, w2 = inputs["w1"], inputs["w2"]
    _, h, v2 = run_op(inputs, mask)
    g = torch.Generator().manual_seed(12)
    dy, dv2 = torch.randn(37, 16, generator=g), torch.randn(v2.shape, generator=g)
    lora_args = (inputs["lora1_u"], inputs["lora1_b"], inputs["lora2_a"])
    ours = ops.mlp_backward(dy, dv2 if lora else None, w1, w2, h, mask.counts, mask.indices, 8, 16, *lora_args,
                            True, True, lora, lora)
    theirs = reference.neuron_block_mlp_backward(dy, dv2 if lora else None, w1, w2, h, mask.counts, mask.indices,
                                                 8, 16, *lora_args)
    for name, a, b in zip(("dx", "db1", "db2", "dlora1_u", "dlora1_b", "dlora2_a"), ours, theirs):
        if b is None:
            assert a.numel() == 0, name
        else:
            assert_close_fp32(a, b, name)


# (tokens, d_model, d_ffn, tile_m, block_n) for the tensor-core kernels: ragged tokens, a partial
# last neuron block (520 = 4 x 128 + 8), 128-token tiles split over two thread blocks, 64-blocks,
# 128-token tiles on one thread block of two warpgroups (wgmma).
# Ragged tokens and neurons; 64- and 128-token tiles; blocks of 64 to 384 neurons. The last two
# put a block's pieces across the wide engines' pairs of 128 columns (a pair may straddle two
# blocks, or end in padding), with output widths that are no multiple of 256.
CUDA_SHAPES = [(256, 128, 512, 64, 128), (200, 96, 520, 64, 128), (300, 64, 384, 128, 64), (64, 256, 256, 64, 64),
               (260, 128, 520, 128, 128), (200, 320, 776, 128, 256), (130, 384, 1160, 64, 384)]


def structured_mlp_mask(shape, pattern):
    T, _, F, tm, bn = shape
    n_tiles, n_blocks = -(-T // tm), -(-F // bn)
    tiles, blocks = torch.arange(n_tiles).unsqueeze(1), torch.arange(n_blocks).unsqueeze(0)
    active = {"stripes": (tiles + blocks) % 3 == 0, "first": blocks == 0, "empty_tiles": (tiles % 2 == 0) & (blocks >= 0),
              "last": blocks == n_blocks - 1}[pattern]
    return MlpMask.from_dense(active.expand(n_tiles, n_blocks), tm, bn)


def poison_cuda_cache():
    """Leaves NaN in memory the caching allocator hands out next, so an output element the kernels
    never write shows up as NaN instead of a plausible stale value."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


def active_entries(mask, tokens, d_ffn):
    """[tokens, d_ffn] bool: the (token, neuron) entries the mask's active pairs cover."""
    n_blocks = -(-d_ffn // mask.block_n)
    slots = torch.arange(mask.indices.shape[1], device=mask.indices.device)
    valid = slots.unsqueeze(0) < mask.counts.unsqueeze(1)
    pairs = torch.zeros(mask.counts.shape[0], n_blocks + 1, dtype=torch.bool, device=mask.indices.device)
    pairs.scatter_(1, torch.where(valid, mask.indices.long(), n_blocks), True)
    pairs = pairs[:, :n_blocks]
    return pairs.repeat_interleave(mask.tile_m, 0)[:tokens].repeat_interleave(mask.block_n, 1)[:, :d_ffn]


def check_cuda_kernel(shape, dtype, mask, lora_rank, bias, seed):
    inputs, _ = make_inputs(shape, dtype, 1.0, seed=seed, bias=bias, lora=lora_rank > 0)
    if lora_rank:
        g = torch.Generator().manual_seed(seed + 1)
        inputs["lora1_u"] = torch.randn(shape[0], lora_rank, generator=g).to(dtype).requires_grad_()
        inputs["lora1_b"] = (torch.randn(shape[2], lora_rank, generator=g) * 0.3).to(dtype).requires_grad_()
        inputs["lora2_a"] = (torch.randn(lora_rank + 3, shape[2], generator=g) * 0.3).to(dtype).requires_grad_()
    low = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if v is not None else None) for k, v in inputs.items()}
    high = cast(low, torch.float32)
    mask = mask.to("cuda")
    g = torch.Generator().manual_seed(seed + 2)
    dy = torch.randn(shape[0], shape[1], generator=g).to(dtype).cuda()
    dv2 = torch.randn(shape[0], lora_rank + 3 if lora_rank else 0, generator=g).to(dtype).cuda()

    poison_cuda_cache()
    ours_out = list(run_op(low, mask))
    torch.cuda.synchronize()
    ref_out, fp32_out = run_reference(cast(low, dtype), mask), run_reference(high, mask)
    # h is specified on the mask's active blocks only (mlp.h).
    active = active_entries(mask, shape[0], shape[2])
    ours_out[1] = torch.where(active, ours_out[1], torch.zeros((), dtype=dtype, device="cuda"))
    for name, a, b, c in zip(("y", "h", "lora2_v"), ours_out, ref_out, fp32_out):
        if c.numel() == 0:
            assert a.numel() == 0, name
            continue
        assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert_within_twice_reference(a, b, c.detach(), name, floor=1e-3 * (c.abs().max().item() + 1e-3))
    poison_cuda_cache()
    ours = grads(run_op, low, mask, dy, dv2)
    theirs = grads(run_reference, cast(low, dtype), mask, dy, dv2)
    fp32_grads = grads(run_reference, high, mask, dy.float(), dv2.float())
    assert ours.keys() == fp32_grads.keys()
    for name in fp32_grads:
        assert not ours[name].isnan().any(), f"grad {name} has unwritten (NaN) elements"
        scale = fp32_grads[name].abs().max().item() + 1e-3
        assert_within_twice_reference(ours[name], theirs[name], fp32_grads[name], f"grad {name}", floor=1e-3 * scale)


mlp_kernel = kernel_choice("LONG_EXPOSURE_MLP_KERNEL", alternatives=("mma", "cp-async", "tma-deep", "tma-128x256", "tma-128x128",
                                                                   "persistent-plain", "persistent-staged"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_within_twice_reference_error(shape, density, dtype, mlp_kernel):
    g = torch.Generator().manual_seed(5)
    mask = random_mlp_mask(shape[0], shape[2], shape[3], shape[4], density, generator=g)
    check_cuda_kernel(shape, dtype, mask, lora_rank=16, bias=True, seed=hash((shape, density)) % 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["stripes", "first", "empty_tiles", "last"])
@pytest.mark.parametrize("lora_rank,bias", [(0, False), (4, True), (8, False)])
@pytest.mark.parametrize("shape", [CUDA_SHAPES[1], CUDA_SHAPES[4]])  # 64- and 128-token tiles
def test_cuda_kernels_on_structured_masks(pattern, lora_rank, bias, shape, mlp_kernel):
    check_cuda_kernel(shape, torch.bfloat16, structured_mlp_mask(shape, pattern), lora_rank, bias, seed=21)


@pytest.mark.gpu
def test_cuda_kernel_at_model_scale(mlp_kernel):
    # Long K loops (d_model 2048, 16 blocks per tile) accumulate the most rounding.
    shape = (512, 2048, 2048, 64, 128)
    mask = random_mlp_mask(shape[0], shape[2], 64, 128, 0.5, generator=torch.Generator().manual_seed(6))
    check_cuda_kernel(shape, torch.bfloat16, mask, lora_rank=16, bias=True, seed=31)


def outputs_under(variable, shape, density, seed, monkeypatch):
    """outputs(value): every output and gradient of one MLP call (H on active entries only) with the
    environment variable set to value (None: unset), for comparing the bits across its values."""
    mask = random_mlp_mask(shape[0], shape[2], shape[3], shape[4], density, generator=torch.Generator().manual_seed(seed))
    inputs, _ = make_inputs(shape, torch.bfloat16, 1.0, seed=seed + 1)
    inputs = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if v is not None else None) for k, v in inputs.items()}
    g = torch.Generator().manual_seed(seed + 2)
    dy = torch.randn(shape[0], shape[1], generator=g).bfloat16().cuda()
    dv2 = torch.randn(shape[0], 3, generator=g).bfloat16().cuda()
    counts = mask.counts
    mask = mask.to("cuda")

    def outputs(value):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, str(value))
        y, h, v2 = run_op(inputs, mask)
        h = torch.where(active_entries(mask, shape[0], shape[2]), h, torch.zeros((), dtype=h.dtype, device="cuda"))
        return dict(y=y, h=h, v2=v2, **grads(run_op, inputs, mask, dy, dv2))

    outputs.counts = counts
    return outputs


@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.6, 1.0])  # 1.0: every tile of fc1's and dH's grids active
def test_cuda_tile_groups_leave_every_output_unchanged(density, mlp_kernel, monkeypatch):
    """fc1 and dH launch token tiles in groups (LONG_EXPOSURE_MLP_TILE_GROUP); every group size,
    including ones that leave the last group short or exceed the tile count, computes the same bits."""
    outputs = outputs_under("LONG_EXPOSURE_MLP_TILE_GROUP", (1000, 256, 1024, 128, 128), density, 8, monkeypatch)
    expected = outputs(1)  # 8 token tiles, the last ragged
    for group in (None, 2, 3, 8, 50):
        for name, t in outputs(group).items():
            assert torch.equal(t, expected[name]), f"{name} differs with tile group {group}"


@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.3, 0.6])
def test_cuda_heavy_rows_first_leaves_every_output_unchanged(density, monkeypatch):
    """The persistent engine walks fc2's and dX's tiles heaviest token row first, snaking over its
    thread blocks; the grid's order (LONG_EXPOSURE_MLP_TILE_ORDER=grid) computes the same bits. 32
    ragged token rows of 5 tiles each outnumber an H100's or H200's 132 SMs, so blocks take two passes."""
    outputs = outputs_under("LONG_EXPOSURE_MLP_TILE_ORDER", (4000, 1024, 1024, 128, 128), density, 11, monkeypatch)
    assert outputs.counts.unique().numel() > 2, "rows of different weights, or there is nothing to rank"
    expected = outputs("grid")
    for name, t in outputs(None).items():
        assert not t.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert torch.equal(t, expected[name]), f"{name} differs between the ranked and the grid order"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tile_m", [(torch.float32, 64), (torch.bfloat16, 16)])
def test_cuda_calls_the_kernels_cannot_take_run_the_reference(dtype, tile_m):
    shape = (50, 24, 96, tile_m, 32)
    inputs, mask = make_inputs(shape, dtype, 0.4, seed=13)
    cuda_inputs = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if v is not None else None)
                   for k, v in inputs.items()}
    g = torch.Generator().manual_seed(3)
    dy, dv2 = torch.randn(50, 24, generator=g).to(dtype), torch.randn(50, 3, generator=g).to(dtype)
    cpu = grads(run_op if dtype == torch.float32 else run_reference, inputs, mask, dy, dv2)
    ops.mlp._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="no CUDA kernel for"):
        gpu = grads(run_op, cuda_inputs, mask.to("cuda"), dy.cuda(), dv2.cuda())
    for name in cpu:
        tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
        assert_close_fp32(gpu[name].cpu().float(), cpu[name].float(), f"grad {name}", **tol)


@pytest.mark.gpu
def test_cuda_kernel_contract_errors_are_value_errors():
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w1, w2 = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16), torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    mask = MlpMask.full(64, 128, tile_m=32, block_n=64).to("cuda")
    y, h = torch.empty_like(x), torch.empty(64, 128, device="cuda", dtype=torch.bfloat16)
    from long_exposure import _C
    from long_exposure._views import view
    with pytest.raises(ValueError, match="tile_m to be a multiple of 64"):
        _C.mlp_forward(view(x, "x"), view(w1, "w1"), None, view(w2, "w2"), None, view(mask.counts, "c"),
                       view(mask.indices, "i"), 32, 64, None, None, None, view(y, "y"), view(h, "h"), None)