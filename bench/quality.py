"""The quality test of DESIGN.md section 7 on the corpus: a small ReLU OPT pretrained here on
addresses before 1950, fine-tuned on 1950-1999 once dense and once with Long Exposure (same
method, data, steps and seed), both adapters evaluated with the dense model on 2000 onward.
The Long Exposure adapter's held-out loss must stay within 1% of the dense one's.

    python bench/quality.py --eps 0.01 0.05 --out quality.md
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from report import Report

from long_exposure.config import LongExposureConfig
from long_exposure.data import load_addresses, split_by_year, token_blocks
from long_exposure.pipeline import quality_comparison
from long_exposure.pipeline import evaluate
from long_exposure.small_opt import build_small_opt, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--method", default="lora_qv")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.05], help="MLP mass-policy eps values")
    parser.add_argument("--coverage", type=float, default=0.95, help="attention coverage")
    parser.add_argument("--tile", type=int, default=32, help="tokens per MLP mask tile (the GPU default is 128)")
    parser.add_argument("--block", type=int, default=32, help="neurons per MLP block (the GPU default is 128)")
    parser.add_argument("--attn-block", type=int, default=32, help="tokens per attention block (the GPU default is 64)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = Report()
    say = report.say

    started = time.time()
    splits = split_by_year(load_addresses(args.corpus))
    base = build_small_opt(hidden=128, layers=4, heads=4, ffn=512, max_positions=args.seq)
    pretrain(base, token_blocks(splits["pretrain"], args.seq, max_blocks=20000), steps=args.pretrain_steps)
    finetune_blocks = token_blocks(splits["finetune"], args.seq, max_blocks=4000)
    eval_blocks = token_blocks(splits["evaluate"], args.seq, max_blocks=64)
    say(f"small OPT (hidden 128, 4 layers, ffn 512), {args.pretrain_steps} pretraining steps; base loss on 2000+: "
        f"{evaluate(base, eval_blocks):.4f}; {args.method}, {args.steps} fine-tuning steps of 8 x {args.seq} tokens; "
        f"{args.tile}-token tiles, {args.block}-neuron blocks, {args.attn_block}-token attention blocks")
    say("")
    say("| MLP policy | attention coverage | dense adapter loss | Long Exposure adapter loss | gap | mean MLP density "
        "| mean attention density | step s dense / LE (CPU) | within 1% |")
    say("|---" * 9 + "|")
    for eps in args.eps:
        config = LongExposureConfig(tile_m=args.tile, block_n=args.block, attn_block=args.attn_block, mlp_policy="mass", mlp_eps=eps,
                                    mlp_rank=32, attn_rank=8, attn_coverage=args.coverage, drift_every=50)
        torch.manual_seed(0)
        result = quality_comparison(copy.deepcopy(base), finetune_blocks, eval_blocks, config, method=args.method,
                                    steps=args.steps)
        mlp = sum(result.sparse.mlp_density.values()) / max(1, len(result.sparse.mlp_density))
        attn = sum(result.sparse.attn_density.values()) / max(1, len(result.sparse.attn_density))
        dense_s = sum(result.dense.step_seconds) / len(result.dense.step_seconds)
        sparse_s = sum(result.sparse.step_seconds) / len(result.sparse.step_seconds)
        say(f"| mass eps={eps} | {args.coverage} | {result.dense_loss:.4f} | {result.sparse_loss:.4f} | "
            f"{100 * result.gap:+.2f}% | {mlp:.3f} | {attn:.3f} | {dense_s:.2f} / {sparse_s:.2f} | "
            f"{'yes' if abs(result.gap) <= 0.01 else 'NO'} |")
        if result.sparse.drift_events:
            say(f"  drift events: {[(e.step, e.layer, e.part, round(e.measured, 3), e.action) for e in result.sparse.drift_events]}")
    say(f"\n({time.time() - started:.0f} s on {torch.get_num_threads()} CPU threads)")
    report.save(args.out)


if __name__ == "__main__":
    main()
