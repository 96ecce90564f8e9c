"""`python -m long_exposure`: report the build, then run both sparse operators forward and
backward at a small OPT-like shape and several block densities, checking each against the
pure-PyTorch reference and timing it against the dense reference on the same machine."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import BlockLayout, MlpMask, build_info, ops, reference


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _mlp_row(tokens, d_model, d_ffn, density, repeats, g):
    x = torch.randn(tokens, d_model, generator=g, requires_grad=True)
    w1, w2 = torch.randn(d_ffn, d_model, generator=g) * d_model**-0.5, torch.randn(d_model, d_ffn, generator=g) * d_ffn**-0.5
    b1, b2 = torch.randn(d_ffn, generator=g).requires_grad_(), torch.randn(d_model, generator=g).requires_grad_()
    n_blocks = math.ceil(d_ffn / 128)
    mask = MlpMask.from_dense(torch.rand(math.ceil(tokens / 64), n_blocks, generator=g) < density, 64, 128)
    dy = torch.randn(tokens, d_model, generator=g)

    def run(fn):
        def step():
            x.grad = b1.grad = b2.grad = None
            y = fn(x, w1, b1, w2, b2, mask.counts, mask.indices, 64, 128, None, None, None)[0]
            y.backward(dy)
            return y.detach(), x.grad.clone()
        return step

    y, dx = run(ops.mlp_forward)()
    ry, rdx = run(reference.neuron_block_mlp)()
    error = max((y - ry).abs().max().item(), (dx - rdx).abs().max().item())

    def dense():
        x.grad = None
        torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2).backward(dy)

    return mask.density(n_blocks).item(), error, _time(run(ops.mlp_forward), repeats), _time(dense, repeats)


def _attention_row(batch, heads, seq, head_dim, density, repeats, g):
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=g, requires_grad=True) for _ in range(3))
    n = math.ceil(seq / 64)
    active = (torch.rand(1, heads, n, n, generator=g) < density).tril() | torch.eye(n, dtype=torch.bool)
    layout = BlockLayout.from_dense(active, 64)
    dout = torch.randn(batch, heads, seq, head_dim, generator=g)
    scale = head_dim**-0.5

    def run(fn):
        def step():
            for t in (q, k, v):
                t.grad = None
            out = fn(q, k, v, None, None, layout.counts, layout.indices, 64, scale)[0] if fn is ops.attention_forward \
                else fn(q, k, v, layout.counts, layout.indices, 64, scale)[0]
            out.backward(dout)
            return out.detach(), q.grad.clone()
        return step

    out, dq = run(ops.attention_forward)()
    rout, rdq = run(reference.block_sparse_attention)()
    error = max((out - rout).abs().max().item(), (dq - rdq).abs().max().item())

    def dense():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

    return layout.density().item(), error, _time(run(ops.attention_forward), repeats), _time(dense, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m long_exposure", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per row (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = build_info()
    print(f"long_exposure {info['version']}: CUDA kernels {'for sm_' + ', sm_'.join(info['cuda_architectures']) if info['cuda'] else 'not built'}, "
          f"OpenMP {'on' if info['openmp'] else 'off'}, {torch.get_num_threads()} CPU threads")
    print("CPU operators against the reference (max abs error over output and input gradient, fp32),")
    print("timed forward+backward against the dense PyTorch operator in this process:\n")
    g = torch.Generator().manual_seed(args.seed)
    header = f"{'operator':<34}{'density':>8}{'max error':>11}{'sparse ms':>11}{'dense ms':>10}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for density in (1.0, 0.5, 0.25):
        d, err, ms, dense_ms = _mlp_row(1024, 256, 1024, density, args.repeats, g)
        worst = max(worst, err)
        print(f"{'MLP 1024 tok, 256 -> 1024':<34}{d:>8.2f}{err:>11.1e}{ms:>11.1f}{dense_ms:>10.1f}{ms / dense_ms:>7.2f}")
        sys.stdout.flush()
    for density in (1.0, 0.5, 0.25):
        d, err, ms, dense_ms = _attention_row(2, 4, 512, 64, density, args.repeats, g)
        worst = max(worst, err)
        print(f"{'attention 2x4 heads, 512 tok, d64':<34}{d:>8.2f}{err:>11.1e}{ms:>11.1f}{dense_ms:>10.1f}{ms / dense_ms:>7.2f}")
        sys.stdout.flush()
    ok = worst < 1e-3
    print(f"\n{'OK' if ok else 'FAILED'}: largest difference from the reference {worst:.1e} (limit 1e-3).")
    print("The CPU path is the exact reference implementation; speed is the CUDA kernels' job.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
