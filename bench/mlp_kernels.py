"""The neuron-block MLP kernels against the dense layer through cuBLAS (torch), in one process:
fc1 + bias + ReLU + fc2 + bias, forward and backward to the input (frozen weights, as under PEFT),
over 8192 tokens at OPT layer shapes, with random per-tile masks at each block density d. The
issue's target is ours <= (d + 0.08) x dense.

    python bench/mlp_kernels.py --model 1.3b 2.7b
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from timing import graph_times_ms

from long_exposure import neuron_block_mlp, ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from masks import random_mlp_mask  # noqa: E402  (the tests' masks, so both exercise the same thing)

OPT_MLP = {"350m": (1024, 4096), "1.3b": (2048, 8192), "2.7b": (2560, 10240)}


def cuda_ms(fn, reps=30) -> float:
    """Median per-call time of fn replayed from a CUDA graph (both sides alike: kernel time only)."""
    return statistics.median(graph_times_ms(fn, reps=reps))


def dense_mlp(x, w1, b1, w2, b2):
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(OPT_MLP), nargs="+", default=["1.3b", "2.7b"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--density", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--tile-m", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("--kernels", nargs="+", default=["default", "mma"],
                        choices=["default", "mma", "cp-async", "tma-deep", "tma-128x256", "tma-128x128", "persistent-plain",
                                 "persistent-staged", "grid-order"],
                        help="default: what the device gets (wgmma fed by TMA on a Hopper, 128-token tiles on the persistent engine); mma: the portable "
                             "mma.sync kernels; cp-async: wgmma fed by the cp.async ring; tma-deep: "
                             "64-token tiles on one thread block per SM with a five-stage ring; tma-128x256: 128-token "
                             "tiles as one 128 x 256 product per thread block; tma-128x128: 128-token tiles as "
                             "128 x 128 products, two thread blocks per SM; persistent-plain: the persistent engine "
                             "with dH reading H's signs in its epilogue (not ahead, in its producer's warps); "
                             "persistent-staged: the default with every output stored through shared memory by TMA; "
                             "grid-order: the default with fc2's and dX's tiles in the grid's order, not heaviest "
                             "token row first")
    args = parser.parse_args()
    dev, dt, T = "cuda", torch.bfloat16, args.tokens
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {T} tokens, bf16, "
          f"tiles of {args.tile_m} tokens x blocks of {args.block_n} neurons, random masks")
    print("| model | kernels | density | dense ms | ours ms | ours fwd / bwd ms | TFLOP/s (useful) | ratio | target | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.model:
        d, F = OPT_MLP[model]
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(T, d, device=dev, dtype=dt, generator=g).requires_grad_()
        w1 = torch.randn(F, d, device=dev, dtype=dt, generator=g) * d**-0.5
        b1 = torch.randn(F, device=dev, dtype=dt, generator=g) * 0.1
        w2 = torch.randn(d, F, device=dev, dtype=dt, generator=g) * F**-0.5
        b2 = torch.randn(d, device=dev, dtype=dt, generator=g) * 0.1
        dy = torch.randn(T, d, device=dev, dtype=dt, generator=g)

        # autograd.grad, not backward(): accumulating into x.grad would add an elementwise kernel
        # to both times.
        def dense():
            torch.autograd.grad(dense_mlp(x, w1, b1, w2, b2), x, dy)

        dense_ms = cuda_ms(dense)
        flops = 8 * T * d * F  # two GEMMs forward, two to the input backward
        for kernels, density in [(k, dens) for k in args.kernels for dens in args.density]:
            os.environ.pop("LONG_EXPOSURE_MLP_KERNEL", None)
            os.environ.pop("LONG_EXPOSURE_MLP_TILE_ORDER", None)
            if kernels == "grid-order":
                os.environ["LONG_EXPOSURE_MLP_TILE_ORDER"] = "grid"
            elif kernels != "default":
                os.environ["LONG_EXPOSURE_MLP_KERNEL"] = kernels
            mask = random_mlp_mask(T, F, args.tile_m, args.block_n, density,
                                   generator=torch.Generator().manual_seed(1)).to(dev)
            real = mask.density(-(-F // args.block_n)).item()

            def ours():
                torch.autograd.grad(neuron_block_mlp(x, w1, b1, w2, b2, mask)[0], x, dy)

            def forward():
                return ops.mlp_forward(x.detach(), w1, b1, w2, b2, mask.counts, mask.indices, mask.tile_m,
                                       mask.block_n, None, None, None)

            _, h, _ = forward()

            def backward():
                ops.mlp_backward(dy, None, w1, w2, h, mask.counts, mask.indices, mask.tile_m,
                                 mask.block_n, None, None, None, False, False, False, False)

            ms, fwd_ms, bwd_ms = cuda_ms(ours), cuda_ms(forward), cuda_ms(backward)
            ratio, target = ms / dense_ms, real + 0.08
            print(f"| OPT-{model} ({d} x {F}) | {kernels} | {real:.3f} | {dense_ms:.3f} | {ms:.3f} | {fwd_ms:.3f} / {bwd_ms:.3f} "
                  f"| {real * flops / ms / 1e9:.0f} | {ratio:.3f} | {target:.2f} | {'met' if ratio <= target else 'missed'} |")
        print(f"| OPT-{model} dense (cuBLAS) | | 1.0 | {dense_ms:.3f} | | | {flops / dense_ms / 1e9:.0f} | | | |")


if __name__ == "__main__":
    main()
