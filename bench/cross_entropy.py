"""The causal-LM loss forward+backward on a GPU, in one process: HF's ForCausalLMLoss (the logits
cast to fp32, log_softmax) against Long Exposure's causal_lm_loss (the logits read in their own
dtype), at OPT's vocabulary, with the effective bandwidth of each.

    python bench/cross_entropy.py --tokens 8192
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import cuda_times_ms
from transformers.loss.loss_utils import ForCausalLMLoss

from long_exposure.ops.cross_entropy import causal_lm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, vocab {args.vocab}, {args.dtype}")
    print("| tokens | HF loss fwd+bwd ms | Long Exposure ms | ratio | Long Exposure GB/s (3 passes over the logits) |")
    print("|---|---|---|---|---|")
    for n in args.tokens:
        logits = torch.randn(1, n, args.vocab, device="cuda", dtype=dtype).requires_grad_(True)
        labels = torch.randint(0, args.vocab, (1, n), device="cuda")

        def step(loss_fn):
            logits.grad = None
            loss_fn(logits, labels, args.vocab).backward()

        times = {name: statistics.median(cuda_times_ms(lambda f=fn: step(f), reps=20, warmup=3))
                 for name, fn in (("hf", ForCausalLMLoss), ("le", causal_lm_loss))}
        # forward reads the logits, backward reads them and writes the gradient
        gbps = 3 * logits.numel() * logits.element_size() / times["le"] / 1e6
        print(f"| {n} | {times['hf']:.3f} | {times['le']:.3f} | {times['le'] / times['hf']:.3f} | {gbps:.0f} |")


if __name__ == "__main__":
    main()
