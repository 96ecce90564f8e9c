"""fused_projections against the plain composition of F.linear and LoRA, forward and backward."""

import pytest
import torch

from long_exposure.ops.projections import fused_projections
from tolerance import assert_close_fp32, assert_within_twice_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def reference_projections(x, projections):
    """What peft's LoRA Linear computes (without dropout): x W^T + b + scale (x A^T) B^T."""
    outputs = []
    for w, b, lora in projections:
        y = torch.nn.functional.linear(x, w, b)
        if lora is not None:
            a, bt, scale = lora
            y = y + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), bt)
        outputs.append(y)
    return outputs


def make_projections(spec, d, dtype, device, seed):
    """spec: per projection (out features, LoRA rank or 0, bias?, bias trains?)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    projections = []
    for out, rank, has_bias, bias_trains in spec:
        w = rand(out, d, scale=d**-0.5)
        b = rand(out, scale=0.1, grad=bias_trains) if has_bias else None
        lora = (rand(rank, d, scale=d**-0.5, grad=True), rand(out, rank, scale=rank**-0.5, grad=True), 2.0) if rank else None
        projections.append((w, b, lora))
    return projections


def trainables(projections):
    out = []
    for _, b, lora in projections:
        if b is not None and b.requires_grad:
            out.append(b)
        if lora is not None:
            out += list(lora[:2])
    return out


def run(fn, x, projections, grads):
    for t in [x, *trainables(projections)]:
        t.grad = None
    outputs = fn(x, projections)
    torch.autograd.backward(outputs, grads)
    return [y.detach() for y in outputs], [t.grad for t in [x, *trainables(projections)]]


def cast(projections, dtype):
    def c(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

    return [(c(w), c(b), None if lora is None else (c(lora[0]), c(lora[1]), lora[2])) for w, b, lora in projections]


SPECS = {
    "q,k,v with LoRA on q and v": [(48, 4, True, False), (48, 0, True, False), (48, 4, True, False)],
    "one, LoRA": [(40, 8, True, False)],
    "no LoRA, biases train (BitFit)": [(24, 0, True, True), (40, 0, True, True)],
    "no biases, ragged outs": [(17, 3, False, False), (33, 0, False, False), (5, 2, False, False)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 19, 128])
@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
def test_fused_projections_match_the_plain_composition(device, tokens, spec):
    d = 32
    projections = make_projections(SPECS[spec], d, torch.float32, device, seed=tokens)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, tokens, d, generator=g).to(device).requires_grad_()
    grads = [torch.randn(2, tokens, out, generator=g).to(device) for out, *_ in SPECS[spec]]
    expected, expected_grads = run(reference_projections, x, projections, grads)
    outputs, out_grads = run(fused_projections, x, projections, grads)
    for i, (y, e) in enumerate(zip(outputs, expected)):
        assert y.shape == e.shape
        assert_close_fp32(y, e, f"output {i}")
    for i, (gr, e) in enumerate(zip(out_grads, expected_grads)):
        assert_close_fp32(gr, e, "dx" if i == 0 else f"trainable {i}")


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),  # float16 matmuls are a CUDA case
])
def test_fused_projections_in_low_precision_stay_within_twice_the_reference_error(device, dtype):
    spec = SPECS["q,k,v with LoRA on q and v"]
    d = 64
    fp32 = make_projections([(96, 8, True, True), *spec[1:]], d, torch.float32, device, seed=3)
    low = cast(fp32, dtype)
    g = torch.Generator().manual_seed(9)
    x32 = torch.randn(3, 40, d, generator=g).to(device).requires_grad_()
    x = x32.detach().to(dtype).requires_grad_()
    grads32 = [torch.randn(3, 40, p[0].shape[0], generator=g).to(device) for p in fp32]
    grads = [t.to(dtype) for t in grads32]
    exact, exact_grads = run(reference_projections, x32, fp32, grads32)
    plain, plain_grads = run(reference_projections, x, low, grads)
    ours, our_grads = run(fused_projections, x, low, grads)
    for i in range(len(ours)):
        assert ours[i].dtype == dtype
        assert_within_twice_reference(ours[i], plain[i], exact[i], f"output {i}")
    for i in range(len(our_grads)):
        assert_within_twice_reference(our_grads[i], plain_grads[i], exact_grads[i], f"gradient {i}")


def test_weights_that_train_are_refused():
    w = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen weights"):
        fused_projections(torch.randn(3, 4), [(w, None, None)])


@pytest.mark.parametrize("lora", [False, True])
def test_the_input_is_kept_for_the_backward_only_where_a_lora_factor_needs_it(lora):
    projections = make_projections([(24, 4 if lora else 0, True, True), (40, 0, True, False)], 32, torch.float32,
                                   "cpu", seed=1)
    x = torch.randn(2, 19, 32, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = fused_projections(x, projections)
    assert (x.data_ptr() in kept) == lora
    sum(y.sum() for y in outputs).backward()
    assert x.grad is not None and projections[0][1].grad is not None


def test_fused_projections_trace_under_torch_compile():
    projections = make_projections(SPECS["q,k,v with LoRA on q and v"], 32, torch.float32, "cpu", seed=5)
    x = torch.randn(2, 19, 32, requires_grad=True)
    grads = [torch.randn(2, 19, 48) for _ in range(3)]
    expected, expected_grads = run(fused_projections, x, projections, grads)
    traced = torch.compile(fused_projections, backend="aot_eager", fullgraph=True)
    outputs, out_grads = run(traced, x, projections, grads)
    for i, (y, e) in enumerate(zip(outputs, expected)):
        assert_close_fp32(y, e, f"traced output {i}")
    for i, (g, e) in enumerate(zip(out_grads, expected_grads)):
        assert_close_fp32(g, e, f"traced gradient {i}")
