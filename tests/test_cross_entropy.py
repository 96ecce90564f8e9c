"""The token cross-entropy (ops/cross_entropy.py) against HF's way of computing it: the logits cast
to fp32, log_softmax, the gradient cast back. Forward and backward, across dtypes, vocabularies
that do and do not fill whole 16-byte loads, strided rows, ignored labels; and the causal-LM loss
against transformers' own."""

import pickle

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from long_exposure import reference
from long_exposure.ops.cross_entropy import causal_lm_loss, supports, token_cross_entropy
from tolerance import assert_close_fp32, assert_within_twice_reference

CASES = [
    ("cpu", torch.float32), ("cpu", torch.float64), ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
]
LOW = (torch.bfloat16, torch.float16)


def make_logits(n, vocab, dtype, device, seed, pad=0):
    """[n, vocab] logits with spread-out values (a few large ones, as trained models give); with pad,
    a column slice of a wider tensor, so rows are strided and not 16-byte aligned."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, vocab + pad, generator=g) * 3
    full[:, : max(1, vocab // 50)] += 8
    return full.to(device, dtype)[:, pad: pad + vocab]


def make_labels(n, vocab, device, seed, ignored=0.25, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return labels.to(device, dtype)


def loss_and_grad(fn, logits, labels, weights):
    x = logits.detach().requires_grad_(True)
    loss = fn(x, labels)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("n,vocab,pad", [(1, 1, 0), (7, 50, 0), (33, 1001, 0), (64, 2048, 3), (16, 50272, 0), (5, 4097, 8)])
def test_token_cross_entropy_matches_the_fp32_computation(device, dtype, n, vocab, pad):
    logits = make_logits(n, vocab, dtype, device, seed=n + vocab, pad=pad)
    labels = make_labels(n, vocab, device, seed=vocab)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(device)
    ours = loss_and_grad(token_cross_entropy, logits, labels, weights)
    exact = loss_and_grad(reference.token_cross_entropy, logits.double(), labels, weights.double())
    # HF's path: the same logits cast to fp32, and its gradient back in the logits' dtype.
    hf = loss_and_grad(reference.token_cross_entropy, logits, labels, weights)
    assert ours[1].dtype == dtype and ours[1].shape == logits.shape
    for name, mine, theirs, truth in zip(("loss", "grad"), ours, hf, exact):
        if dtype in LOW or name == "grad" and dtype != torch.float64:
            assert_within_twice_reference(mine, theirs, truth, name, floor=1e-5)
        else:
            assert_close_fp32(mine.double(), truth, name, atol=1e-5, rtol=1e-5)
    ignored = labels == -100
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()


@pytest.mark.parametrize("device,dtype", CASES)
def test_int32_labels_and_an_expanded_gradient_give_the_same_result(device, dtype):
    logits = make_logits(24, 333, dtype, device, seed=5)
    labels = make_labels(24, 333, device, seed=5)
    a = loss_and_grad(token_cross_entropy, logits, labels, torch.ones(24, device=device))
    b = loss_and_grad(lambda x, y: token_cross_entropy(x, y.int()), logits, labels, torch.ones(24, device=device))
    # .sum().backward() hands the op a stride-0 gradient.
    x = logits.detach().requires_grad_(True)
    token_cross_entropy(x, labels).sum().backward()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[1], x.grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("with_items", [False, True])
@pytest.mark.parametrize("given_shift", [False, True])
def test_causal_lm_loss_matches_transformers(device, with_items, given_shift):
    B, S, V = 3, 40, 515
    logits = make_logits(B * S, V, torch.bfloat16, device, seed=11).reshape(B, S, V)
    labels = make_labels(B * S, V, device, seed=11).reshape(B, S)
    kwargs = {}
    if with_items:
        kwargs["num_items_in_batch"] = torch.tensor(57, device=device)
    if given_shift:
        kwargs["shift_labels"] = torch.roll(labels, -1, dims=1)

    def run(fn):
        x = logits.detach().requires_grad_(True)
        loss = fn(x, labels, V, **kwargs)
        loss.backward()
        return loss.detach(), x.grad

    ours, theirs = run(causal_lm_loss), run(ForCausalLMLoss)
    assert_close_fp32(ours[0], theirs[0], "loss", atol=1e-5, rtol=1e-5)
    assert_close_fp32(ours[1].float(), theirs[1].float(), "grad", atol=1e-6, rtol=1e-2)


def test_bad_input_is_refused_with_a_clear_error():
    logits = make_logits(4, 10, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_cross_entropy(logits, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"labels has shape \[3\]"):
        token_cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="int64 or int32"):
        token_cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="tokens, vocab"):
        token_cross_entropy(logits.reshape(2, 2, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="not supported"):
        token_cross_entropy(logits.half(), torch.zeros(4, dtype=torch.long))
    assert not supports(logits.half()) and supports(logits)


@pytest.mark.gpu
def test_a_label_outside_the_vocabulary_gives_nan_on_cuda_without_a_sync():
    logits = make_logits(4, 64, torch.bfloat16, "cuda", seed=0).requires_grad_(True)
    loss = token_cross_entropy(logits, torch.tensor([0, 64, -100, 3], device="cuda"))
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert (logits.grad[1] == 0).all()


@pytest.mark.gpu
def test_the_loss_replays_in_a_cuda_graph():
    logits = make_logits(64, 50272, torch.bfloat16, "cuda", seed=2).requires_grad_(True)
    labels = make_labels(64, 50272, "cuda", seed=2)

    def step():
        logits.grad = None
        loss = causal_lm_loss(logits.unsqueeze(0), labels.unsqueeze(0), 50272)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step().clone()
    torch.cuda.current_stream().wait_stream(stream)
    eager_grad = logits.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(logits.grad, eager_grad)


def test_the_fused_loss_pickles_and_hands_logits_no_kernel_takes_to_its_fallback():
    from long_exposure.models.opt import _FusedCausalLMLoss

    loss = pickle.loads(pickle.dumps(_FusedCausalLMLoss(ForCausalLMLoss)))
    assert loss.fallback is ForCausalLMLoss
    logits = make_logits(8, 30, torch.float16, "cpu", seed=1).reshape(1, 8, 30)  # fp16 on the CPU: no kernel
    labels = make_labels(8, 30, "cpu", seed=1, ignored=0).reshape(1, 8)
    assert torch.equal(loss(logits, labels, 30), ForCausalLMLoss(logits, labels, 30))
    fused = loss(logits.float(), labels, 30)
    assert fused.item() == pytest.approx(ForCausalLMLoss(logits.float(), labels, 30).item(), abs=1e-5)
