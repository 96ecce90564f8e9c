import math
import warnings
import zlib

import pytest
import torch

from long_exposure import BlockLayout, block_sparse_attention, ops, reference
from kernel_choice import kernel_choice
from masks import local_sink_layout, random_layout
from tolerance import assert_close_fp32, assert_within_twice_reference

# (batch, heads, seq, head_dim, block, prefix): ragged sequences, and one shorter than a block.
SHAPES = [(2, 2, 64, 16, 16, 0), (1, 3, 50, 8, 16, 0), (2, 2, 37, 16, 8, 5), (1, 1, 5, 4, 16, 2)]
LAYOUTS = ["random", "random_no_diagonal", "per_batch", "causal", "empty", "local_sink"]


def stable_seed(*parts) -> int:
    """A seed per test case that is the same in every run: hash() of a string changes per process."""
    return zlib.crc32(repr(parts).encode()) % 1000


def make_layout(kind, B, H, S, block, g):
    if kind == "random":
        return random_layout(1, H, S, block, 0.5, generator=g)
    if kind == "random_no_diagonal":
        return random_layout(1, H, S, block, 0.5, generator=g, keep_diagonal=False)
    if kind == "per_batch":
        return random_layout(B, H, S, block, 0.5, generator=g)
    if kind == "causal":
        return BlockLayout.causal(H, S, block)
    if kind == "empty":
        n = math.ceil(S / block)
        return BlockLayout.from_dense(torch.zeros(1, H, n, n, dtype=torch.bool), block)
    return local_sink_layout(H, S, block)


def make_inputs(shape, dtype, seed, requires_grad=True):
    B, H, S, D, block, P = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(dtype).requires_grad_(requires_grad)

    inputs = dict(q=rand(B, H, S, D), k=rand(B, H, S, D), v=rand(B, H, S, D),
                  prefix_k=rand(B, H, P, D) if P else None, prefix_v=rand(B, H, P, D) if P else None)
    return inputs, g


def run_op(inputs, layout, scale):
    return ops.attention_forward(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                 layout.counts, layout.indices, layout.block, scale)


def run_reference(inputs, layout, scale):
    return reference.block_sparse_attention(inputs["q"], inputs["k"], inputs["v"], layout.counts, layout.indices,
                                            layout.block, scale, inputs["prefix_k"], inputs["prefix_v"])


def grads(fn, inputs, layout, scale, dout):
    leaves = {k: v for k, v in inputs.items() if v is not None}
    for v in leaves.values():
        v.grad = None
    out, _ = fn(inputs, layout, scale)
    (out * dout).sum().backward()
    return {k: (v.grad if v.grad is not None else torch.zeros_like(v)).clone() for k, v in leaves.items()}


def cast(inputs, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(True) if v is not None else None) for k, v in inputs.items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_fp32_matches_reference(shape, kind):
    inputs, g = make_inputs(shape, torch.float32, seed=stable_seed(shape, kind))
    B, H, S, D, block, _ = shape
    layout = make_layout(kind, B, H, S, block, g)
    scale = 1.0 / math.sqrt(D)
    out, lse = run_op(inputs, layout, scale)
    ref_out, ref_lse = run_reference(inputs, layout, scale)
    assert_close_fp32(out, ref_out, "out")
    assert_close_fp32(lse, ref_lse, "lse")
    dout = torch.randn(out.shape, generator=g)
    ours, theirs = grads(run_op, inputs, layout, scale, dout), grads(run_reference, inputs, layout, scale, dout)
    for name in ours:
        assert_close_fp32(ours[name], theirs[name], f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("kind", ["random", "causal"])
def test_bf16_within_twice_reference_error(shape, kind):
    low, g = make_inputs(shape, torch.bfloat16, seed=11)
    B, H, S, D, block, _ = shape
    layout = make_layout(kind, B, H, S, block, g)
    scale = 1.0 / math.sqrt(D)
    high = cast(low, torch.float32)
    ref_out, ref_lse = run_reference(high, layout, scale)
    out, lse = run_op(low, layout, scale)
    low_out, low_lse = run_reference(cast(low, torch.bfloat16), layout, scale)
    assert_within_twice_reference(out, low_out, ref_out.detach(), "out")
    assert_within_twice_reference(lse, low_lse, ref_lse.detach(), "lse")
    dout = torch.randn(out.shape, generator=g).bfloat16()
    fp32 = grads(run_reference, high, layout, scale, dout.float())
    ours = grads(run_op, low, layout, scale, dout)
    theirs = grads(run_reference, cast(low, torch.bfloat16), layout, scale, dout)
    for name in fp32:
        assert_within_twice_reference(ours[name], theirs[name], fp32[name], f"grad {name}")


def test_causal_layout_is_dense_causal_attention():
    inputs, _ = make_inputs((2, 4, 45, 16, 16, 0), torch.float32, seed=1, requires_grad=False)
    layout = BlockLayout.causal(4, 45, 16)
    out = block_sparse_attention(inputs["q"], inputs["k"], inputs["v"], layout)
    sdpa = torch.nn.functional.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True)
    assert_close_fp32(out, sdpa, "out")


def test_prefix_matches_sdpa_with_prefix_mask():
    inputs, _ = make_inputs((1, 2, 20, 8, 8, 4), torch.float32, seed=2, requires_grad=False)
    layout = BlockLayout.causal(2, 20, 8)
    out = block_sparse_attention(inputs["q"], inputs["k"], inputs["v"], layout,
                                 prefix_k=inputs["prefix_k"], prefix_v=inputs["prefix_v"])
    k = torch.cat([inputs["prefix_k"], inputs["k"]], 2)
    v = torch.cat([inputs["prefix_v"], inputs["v"]], 2)
    mask = torch.cat([torch.ones(20, 4, dtype=torch.bool), torch.ones(20, 20, dtype=torch.bool).tril()], 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(inputs["q"], k, v, attn_mask=mask)
    assert_close_fp32(out, sdpa, "out")


def test_strided_inputs_as_attention_modules_make_them():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 24, 3, 2, 8, generator=g)  # [batch, seq, (q,k,v), heads, head_dim]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    layout = random_layout(1, 2, 24, 8, 0.5, generator=g)
    out = block_sparse_attention(q, k, v, layout)
    ref, _ = reference.block_sparse_attention(q, k, v, layout.counts, layout.indices, 8, 8**-0.5)
    assert_close_fp32(out, ref, "out")


def test_rows_with_nothing_to_attend_are_zero_with_no_gradient():
    inputs, g = make_inputs((1, 2, 16, 4, 8, 0), torch.float32, seed=4)
    layout = make_layout("empty", 1, 2, 16, 8, g)
    out, lse = run_op(inputs, layout, 0.5)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert torch.all(inputs["q"].grad == 0) and torch.all(inputs["k"].grad == 0)


def test_gradcheck_float64():
    inputs, g = make_inputs((1, 2, 11, 4, 4, 2), torch.float64, seed=5)
    layout = random_layout(1, 2, 11, 4, 0.6, generator=g)

    def fn(q, k, v, pk, pv):
        return ops.attention_forward(q, k, v, pk, pv, layout.counts, layout.indices, layout.block, 0.5)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")), atol=1e-5)


def test_a_traced_call_runs_the_op_and_matches_the_eager_path():
    """As in test_mlp.py: the traced path (op, fake implementation, registered autograd) gives
    the eager path's values and gradients, with q laid out as a [B, S, H, D] projection."""
    g = torch.Generator().manual_seed(31)
    qkv = torch.randn(2, 40, 3, 2, 8, generator=g)
    layout = random_layout(1, 2, 40, 8, 0.5, generator=g)

    def run(fn):
        leaf = qkv.clone().requires_grad_()
        q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))
        out = fn(q, k, v, layout)
        out.square().sum().backward()
        return out.detach(), leaf.grad

    eager = run(block_sparse_attention)
    traced = run(torch.compile(block_sparse_attention, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prefix", [0, 3])
def test_opcheck(prefix):
    inputs, g = make_inputs((2, 2, 19, 8, 8, prefix), torch.float32, seed=6)
    layout = random_layout(2, 2, 19, 8, 0.5, generator=g)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], layout.counts,
            layout.indices, layout.block, 0.3)
    torch.library.opcheck(ops.attention_forward, args)
    out, lse = ops.attention_forward(*args)
    detached = [t.detach() if t is not None else None for t in args[:5]]
    back = (torch.randn_like(out), *detached, out.detach(), lse, layout.counts, layout.indices, layout.block, 0.3,
            bool(prefix))
    torch.library.opcheck(ops.attention_backward, back)


# ---- bad input ------------------------------------------------------------------------------

def _valid():
    inputs, g = make_inputs((1, 2, 16, 8, 8, 0), torch.float32, seed=7, requires_grad=False)
    return inputs, BlockLayout.causal(2, 16, 8)


def test_wrong_dtype_and_shape_name_the_argument():
    inputs, layout = _valid()
    with pytest.raises(TypeError, match="v has dtype torch.float64"):
        ops.attention_forward(inputs["q"], inputs["k"], inputs["v"].double(), None, None, layout.counts,
                              layout.indices, 8, 0.5)
    with pytest.raises(ValueError, match=r"k has shape \[1, 2, 8, 8\], expected \[1, 2, 16, 8\]"):
        ops.attention_forward(inputs["q"], inputs["k"][:, :, :8], inputs["v"], None, None, layout.counts,
                              layout.indices, 8, 0.5)
    with pytest.raises(ValueError, match=r"layout counts has shape \[1, 2, 2\], expected \[1, 2, 4\]"):
        ops.attention_forward(inputs["q"], inputs["k"], inputs["v"], None, None, layout.counts, layout.indices, 4, 0.5)
    with pytest.raises(ValueError, match="prefix_k and prefix_v come together"):
        ops.attention_forward(inputs["q"], inputs["k"], inputs["v"], inputs["k"], None, layout.counts,
                              layout.indices, 8, 0.5)
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.attention_forward(inputs["q"], inputs["k"], inputs["v"], None, None, layout.counts, layout.indices, 8, 0.0)


def test_bad_layout_contents_are_refused():
    inputs, layout = _valid()
    indices = layout.indices.clone()
    indices[0, 0, 1, 1] = 9
    with pytest.raises(ValueError, match="lists block 9"):
        ops.attention_forward(inputs["q"], inputs["k"], inputs["v"], None, None, layout.counts, indices, 8, 0.5)
    with pytest.raises(TypeError, match="layout indices has dtype torch.int64"):
        ops.attention_forward(inputs["q"], inputs["k"], inputs["v"], None, None, layout.counts,
                              layout.indices.long(), 8, 0.5)


@pytest.mark.parametrize("kind", ["random", "random_no_diagonal", "empty"])
def test_backward_op_equals_the_reference_backward(kind):
    inputs, g = make_inputs((2, 2, 37, 8, 8, 3 if kind != "empty" else 0), torch.float32, seed=14, requires_grad=False)
    layout = make_layout(kind, 2, 2, 37, 8, g)
    out, lse = run_op(inputs, layout, 0.4)
    dout = torch.randn(out.shape, generator=g)
    args = (inputs["q"], inputs["k"], inputs["v"])
    ours = ops.attention_backward(dout, *args, inputs["prefix_k"], inputs["prefix_v"], out, lse, layout.counts,
                                  layout.indices, 8, 0.4, True)
    theirs = reference.block_sparse_attention_backward(dout, *args, out, lse, layout.counts, layout.indices, 8, 0.4,
                                                       inputs["prefix_k"], inputs["prefix_v"])
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), ours, theirs):
        if b is None:
            assert a.numel() == 0, name
        else:
            assert_close_fp32(a, b, name)


@pytest.mark.gpu
def test_cuda_fp32_runs_the_reference():
    inputs, g = make_inputs((1, 2, 40, 8, 8, 2), torch.float32, seed=15)
    layout = random_layout(1, 2, 40, 8, 0.5, generator=g)
    dout = torch.randn(1, 2, 40, 8, generator=g)
    cpu = grads(run_op, inputs, layout, 0.3, dout)
    cuda_inputs = {k: (v.detach().cuda().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    gpu = grads(run_op, cuda_inputs, layout.to("cuda"), 0.3, dout.cuda())
    for name in cpu:
        assert_close_fp32(gpu[name].cpu(), cpu[name], f"grad {name}", atol=1e-4, rtol=1e-3)


# ---- CUDA kernels ---------------------------------------------------------------------------

# (batch, heads, seq, head_dim, block, prefix): ragged sequences, prefixes that are not a multiple
# of the block, a sequence shorter than one block, and OPT-2.7B's head dim 80.
CUDA_SHAPES = [(2, 3, 256, 64, 64, 0), (1, 2, 300, 64, 64, 17), (2, 2, 200, 128, 128, 0),
               (1, 2, 384, 128, 64, 70), (2, 2, 190, 80, 64, 5), (1, 1, 40, 64, 64, 0),
               (1, 2, 520, 64, 128, 130), (1, 2, 300, 80, 128, 40)]
CUDA_LAYOUTS = ["random", "random_no_diagonal", "per_batch", "causal", "empty", "local_sink"]
# Sequences of many key tiles per query block, where the pipelined kernels' steady state runs.
LONG_SHAPES = [(1, 2, 2048, 64, 64, 0), (1, 2, 1024, 128, 128, 70), (1, 2, 2048, 80, 64, 0)]
attention_kernel = kernel_choice("LONG_EXPOSURE_ATTENTION_KERNEL")


def to_cuda(inputs):
    return {k: (v.detach().cuda().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}


def assert_lse_within_twice_reference(lse, low_lse, ref_lse, name):
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{name}: rows with nothing to attend differ"
    keep = ~empty
    assert_within_twice_reference(lse[keep], low_lse[keep], ref_lse[keep], name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("kind", CUDA_LAYOUTS)
def test_cuda_kernels_within_twice_reference_error(dtype, shape, kind, attention_kernel):
    check_cuda_kernels(dtype, shape, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", LONG_SHAPES)
@pytest.mark.parametrize("kind", ["random", "causal"])
def test_cuda_kernels_on_long_sequences(shape, kind, attention_kernel):
    check_cuda_kernels(torch.bfloat16, shape, kind)


def check_cuda_kernels(dtype, shape, kind):
    B, H, S, D, block, P = shape
    low, g = make_inputs(shape, dtype, seed=stable_seed(shape, kind))
    layout = make_layout(kind, B, H, S, block, g)
    dout = torch.randn(B, H, S, D, generator=g).to(dtype).cuda()
    low, layout = to_cuda(low), layout.to("cuda")
    high = cast(low, torch.float32)
    scale = 1.0 / math.sqrt(D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the kernel runs, not the reference
        out, lse = run_op(low, layout, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = run_reference(high, layout, scale)
    low_out, low_lse = run_reference(cast(low, dtype), layout, scale)
    assert_within_twice_reference(out, low_out, ref_out.detach(), "out")
    assert_lse_within_twice_reference(lse, low_lse, ref_lse.detach(), "lse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ours = grads(run_op, low, layout, scale, dout)
    fp32 = grads(run_reference, high, layout, scale, dout.float())
    theirs = grads(run_reference, cast(low, dtype), layout, scale, dout)
    for name in fp32:
        assert_within_twice_reference(ours[name], theirs[name], fp32[name], f"grad {name}")


def _poisoned_cuda_outputs(inputs, layout, scale, dout):
    """Every output of the CUDA kernels, called through _C on outputs and workspaces filled with NaN
    (and garbage block lists), so that an element the kernels forget to write fails the test."""
    from long_exposure import _C
    from long_exposure._views import view

    q, k, v, pk, pv = (inputs[n] if inputs[n] is None else inputs[n].detach()
                       for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    B, H, S, D = q.shape
    nan = float("nan")
    out, lse = torch.full_like(q, nan), q.new_full((B, H, S), nan, dtype=torch.float32)
    counts, indices = layout.counts, layout.indices
    _C.attention_forward(view(q, "q"), view(k, "k"), view(v, "v"), view(pk, "pk"), view(pv, "pv"),
                         view(counts, "c"), view(indices, "i"), layout.block, scale, view(out, "out"),
                         view(lse, "lse"))
    dq, dk, dv = (torch.full_like(q, nan) for _ in range(3))
    dpk = torch.full_like(pk, nan) if pk is not None else None
    dpv = torch.full_like(pv, nan) if pv is not None else None
    Lb, _, n_q = counts.shape
    ws = (q.new_full((B, H, S), nan, dtype=torch.float32), torch.full_like(counts, 12345),
          torch.full((Lb, H, n_q, n_q), 12345, dtype=torch.int32, device=q.device))
    _C.attention_backward(view(dout, "dout"), view(q, "q"), view(k, "k"), view(v, "v"), view(pk, "pk"),
                          view(pv, "pv"), view(out, "out"), view(lse, "lse"), view(counts, "c"), view(indices, "i"),
                          layout.block, scale, view(dq, "dq"), view(dk, "dk"), view(dv, "dv"),
                          view(dpk, "dpk"), view(dpv, "dpv"), *(view(w, "ws") for w in ws))
    return dict(out=out, lse=lse, q=dq, k=dk, v=dv, prefix_k=dpk, prefix_v=dpv)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [CUDA_SHAPES[1], CUDA_SHAPES[2], CUDA_SHAPES[4], CUDA_SHAPES[6]])
@pytest.mark.parametrize("kind", ["random", "empty", "per_batch"])
def test_cuda_kernels_write_every_output(shape, kind, attention_kernel):
    B, H, S, D, block, P = shape
    inputs, g = make_inputs(shape, torch.bfloat16, seed=21, requires_grad=False)
    layout = make_layout(kind, B, H, S, block, g).to("cuda")
    inputs = to_cuda(inputs)
    dout = torch.randn(B, H, S, D, generator=g).bfloat16().cuda()
    poisoned = _poisoned_cuda_outputs(inputs, layout, 0.125, dout)
    for name, t in poisoned.items():
        if t is not None:
            assert not torch.isnan(t).any(), f"{name} has unwritten elements"
    out, lse = run_op(inputs, layout, 0.125)
    assert torch.equal(poisoned["out"], out) and torch.equal(poisoned["lse"], lse)
    ours = grads(run_op, inputs, layout, 0.125, dout)
    for name, t in ours.items():
        assert torch.equal(poisoned[name], t), f"grad {name} differs between calls"


@pytest.mark.gpu
def test_cuda_kernels_take_strided_and_misaligned_inputs(attention_kernel):
    g = torch.Generator().manual_seed(22)
    qkv = torch.randn(2, 130, 3, 2, 64, generator=g).bfloat16().cuda()  # [batch, seq, (q,k,v), heads, dim]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    layout = random_layout(1, 2, 130, 64, 0.5, generator=g).to("cuda")
    dense = {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous(), "prefix_k": None, "prefix_v": None}
    expected, _ = run_op(dense, layout, 0.125)
    strided, _ = run_op({**dense, "q": q, "k": k, "v": v}, layout, 0.125)
    torch.testing.assert_close(strided, expected, atol=0, rtol=0)
    flat = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = flat[1:].view(q.shape).copy_(q)  # starts 2 bytes past an allocation
    misaligned, _ = run_op({**dense, "q": shifted}, layout, 0.125)
    torch.testing.assert_close(misaligned, expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_kernels_take_a_prefix_broadcast_over_the_batch(attention_kernel):
    inputs, g = make_inputs((3, 2, 200, 64, 64, 20), torch.bfloat16, seed=23, requires_grad=False)
    inputs = to_cuda(inputs)
    layout = make_layout("random", 3, 2, 200, 64, g).to("cuda")
    one_k, one_v = (inputs[name][:1].detach() for name in ("prefix_k", "prefix_v"))
    broadcast = {**inputs, "prefix_k": one_k.expand(3, -1, -1, -1), "prefix_v": one_v.expand(3, -1, -1, -1)}
    copied = {**inputs, "prefix_k": one_k.repeat(3, 1, 1, 1), "prefix_v": one_v.repeat(3, 1, 1, 1)}
    expected, expected_lse = run_op(copied, layout, 0.125)
    out, lse = run_op(broadcast, layout, 0.125)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "local_sink"])
def test_cuda_launch_order_leaves_every_output_unchanged(kind, attention_kernel, monkeypatch):
    """The grids launch block ranks in groups (LONG_EXPOSURE_ATTENTION_RANK_GROUP); every group size,
    including ones that leave the last group short or exceed the rank count, computes the same bits."""
    shape = (2, 3, 700, 64, 64, 30)  # 11 query blocks, 12 key-block ranks with the prefix
    B, H, S, D, block, P = shape
    inputs, g = make_inputs(shape, torch.bfloat16, seed=24, requires_grad=False)
    layout = make_layout(kind, B, H, S, block, g).to("cuda")
    inputs = to_cuda(inputs)
    dout = torch.randn(B, H, S, D, generator=g).bfloat16().cuda()

    def outputs(group):
        monkeypatch.setenv("LONG_EXPOSURE_ATTENTION_RANK_GROUP", str(group))
        out, lse = run_op(inputs, layout, 0.125)
        return dict(out=out, lse=lse, **grads(run_op, inputs, layout, 0.125, dout))

    expected = outputs(8)
    for group in (1, 3, 5, 12, 100):
        for name, t in outputs(group).items():
            assert torch.equal(t, expected[name]), f"{name} differs with rank group {group}"


@pytest.mark.gpu
def test_cuda_dependent_launch_gives_the_same_bits_eager_and_captured(monkeypatch):
    """Programmatic dependent launch (the default; LONG_EXPOSURE_ATTENTION_PDL=0 turns it off) lets
    dK/dV launch before dQ ends; it must wait for dQ's delta."""
    shape = (2, 4, 1024, 64, 64, 0)
    B, H, S, D, block, P = shape
    inputs, g = make_inputs(shape, torch.bfloat16, seed=25, requires_grad=False)
    layout = make_layout("local_sink", B, H, S, block, g).to("cuda")
    inputs = to_cuda(inputs)
    dout = torch.randn(B, H, S, D, generator=g).bfloat16().cuda()
    monkeypatch.setenv("LONG_EXPOSURE_ATTENTION_PDL", "0")
    expected = grads(run_op, inputs, layout, 0.125, dout)
    monkeypatch.setenv("LONG_EXPOSURE_ATTENTION_PDL", "1")
    eager = grads(run_op, inputs, layout, 0.125, dout)
    leaves = [inputs[n] for n in ("q", "k", "v")]

    def step():
        out = run_op(inputs, layout, 0.125)[0]
        return torch.autograd.grad(out, leaves, dout)

    step()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, t in zip(("q", "k", "v"), captured):
        assert torch.equal(eager[name], expected[name]), f"grad {name} differs eagerly"
        assert torch.equal(t, expected[name]), f"grad {name} differs when captured"


@pytest.mark.gpu
def test_cuda_grid_limit_is_refused_with_its_reason():
    q = torch.zeros(65536, 1, 64, 64, dtype=torch.bfloat16, device="cuda")
    layout = random_layout(1, 1, 64, 64, 1.0, generator=torch.Generator().manual_seed(0)).to("cuda")
    with pytest.raises(ValueError, match="at most 65535 heads times batch rows"):
        ops.attention_forward(q, q, q, None, None, layout.counts, layout.indices, 64, 0.125)


@pytest.mark.gpu
def test_cuda_unsupported_configurations_run_the_reference():
    inputs, g = make_inputs((1, 2, 40, 32, 16, 0), torch.bfloat16, seed=23)
    layout = random_layout(1, 2, 40, 16, 0.5, generator=g)
    cuda_inputs = to_cuda(inputs)
    out, _ = run_op(cuda_inputs, layout.to("cuda"), 0.3)
    ref, _ = run_reference(cuda_inputs, layout.to("cuda"), 0.3)
    torch.testing.assert_close(out, ref)
