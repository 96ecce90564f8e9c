"""Cost of the predictors' inference ops against the dense layer they steer, on a GPU, in one
process: the MLP predictor (fused projection -> threshold -> tile OR-reduce) against a dense
fc1 + bias + ReLU + fc2 + bias forward+backward through cuBLAS (torch), and the attention block
scores against SDPA forward+backward, at OPT layer shapes with random weights.

    python bench/predictor_cost.py --model 1.3b
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from timing import graph_times_ms

from long_exposure.ops.predictors import attention_block_scores, mlp_predictor_mask_op

OPT_SHAPES = {"350m": (1024, 16, 4096), "1.3b": (2048, 32, 8192), "2.7b": (2560, 32, 10240)}


def cuda_ms(fn) -> float:
    """Median per-call time of fn replayed from a CUDA graph: the kernels' time, without the host's
    launch overhead (which a training step captured in a graph does not pay either)."""
    return statistics.median(graph_times_ms(fn, reps=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(OPT_SHAPES), default="1.3b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--kernels", nargs="+", default=["default"], choices=["default", "single"],
                        help="MLP predictor kernels: default (a thread block per 64-token pass of a tile), or "
                             "single (one thread block per tile)")
    args = parser.parse_args()
    d, heads, ffn = OPT_SHAPES[args.model]
    T = args.batch * args.seq
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(T, d, device=dev, dtype=dt, requires_grad=True)
    w1, b1 = torch.randn(ffn, d, device=dev, dtype=dt) * d**-0.5, torch.zeros(ffn, device=dev, dtype=dt)
    w2, b2 = torch.randn(d, ffn, device=dev, dtype=dt) * ffn**-0.5, torch.zeros(d, device=dev, dtype=dt)
    dy = torch.randn(T, d, device=dev, dtype=dt)

    def dense_mlp():
        y = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
        torch.autograd.grad(y, x, dy)  # not backward(): no accumulation kernel in the baseline

    mlp_ms = cuda_ms(dense_mlp)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, OPT-{args.model}: d={d}, ffn={ffn}, "
          f"{T} tokens, bf16")
    print(f"dense MLP fwd+bwd (cuBLAS): {mlp_ms:.3f} ms")
    print(f"{'predictor':<36}{'rank':>6}{'ms':>9}{'% of dense layer':>18}")
    for kernels in args.kernels:
        if kernels == "default":
            os.environ.pop("LONG_EXPOSURE_PREDICTOR_KERNEL", None)
        else:
            os.environ["LONG_EXPOSURE_PREDICTOR_KERNEL"] = kernels
        for tile_m, block_n in ((64, 128), (128, 128)):
            n_blocks = ffn // block_n
            for rank in args.rank:
                down = torch.randn(rank, d, device=dev, dtype=dt) * d**-0.5
                up = torch.randn(n_blocks, rank, device=dev, dtype=dt) * rank**-0.5
                bias = torch.zeros(n_blocks, device=dev, dtype=dt)
                ms = cuda_ms(lambda: mlp_predictor_mask_op(x.detach(), down, up, bias, 0.5, tile_m))
                name = f"MLP tile {tile_m}, block {block_n}" + ("" if kernels == "default" else f", {kernels}")
                print(f"{name:<36}{rank:>6}{ms:>9.3f}{100 * ms / mlp_ms:>17.2f}%")
    os.environ.pop("LONG_EXPOSURE_PREDICTOR_KERNEL", None)
    q, k, v = (torch.randn(args.batch, heads, args.seq, d // heads, device=dev, dtype=dt, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def dense_attention():
        torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout)

    attn_ms = cuda_ms(dense_attention)
    print(f"SDPA causal fwd+bwd: {attn_ms:.3f} ms")
    hidden = torch.randn(args.batch, args.seq, d, device=dev, dtype=dt)
    for block in (64, 128):
        for rank in (8, 16, 32):
            wq = torch.randn(heads, rank, d, device=dev, dtype=dt) * d**-0.5
            wk = torch.randn(heads, rank, d, device=dev, dtype=dt) * d**-0.5
            ms = cuda_ms(lambda: attention_block_scores(hidden, wq, wk, block))
            print(f"{f'attention scores, block {block}':<36}{rank:>6}{ms:>9.3f}{100 * ms / attn_ms:>17.2f}%")


if __name__ == "__main__":
    main()
