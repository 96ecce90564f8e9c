"""Exposer, neuron permutation and predictors on a small ReLU OPT pretrained here on the corpus
(years before 1950), calibrated on 1950-1999 and reported on held-out 1950-1999 text and on
2000 onward. Prints per-layer tables: density and output error of each policy, the density the
permutation saves, and the predictors' recall, precision, density and mass recall.

    python bench/exposer_report.py --steps 600 --out exposer_report.md
"""

from __future__ import annotations

import argparse
import time

import torch
from report import Report

from long_exposure.config import LongExposureConfig
from long_exposure.data import load_addresses, split_by_year, token_blocks
from long_exposure.exposer import AttentionMassPolicy, Exposer, MlpMassPolicy, MlpThresholdPolicy
from long_exposure.permutation import activation_profiles, balanced_order, permute_model
from long_exposure.predictors import PredictorSet, model_fingerprint
from long_exposure.pipeline import evaluate
from long_exposure.small_opt import build_small_opt, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=None, help="path of sotu.jsonl.gz (default: ../shared/data)")
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--attn-block", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    report = Report()
    say = report.say

    splits = split_by_year(load_addresses(args.corpus))
    started = time.time()
    model = build_small_opt(hidden=args.hidden, layers=args.layers, heads=4, ffn=args.ffn, max_positions=args.seq)
    losses = pretrain(model, token_blocks(splits["pretrain"], args.seq, max_blocks=20000), steps=args.steps)
    for p in model.parameters():
        p.requires_grad_(False)
    batches = list(token_blocks(splits["finetune"], args.seq, max_blocks=96).split(8))
    calibration, held_out = batches[:8], batches[8:]
    modern = list(token_blocks(splits["evaluate"], args.seq, max_blocks=32).split(8))
    say(f"small OPT: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, {args.steps} pretraining steps "
        f"(final loss {losses[-1]:.3f}, loss on 2000+ {evaluate(model, torch.cat(modern)):.3f}); "
        f"tile {args.tile} tokens, neuron block {args.block}, attention block {args.attn_block}, seq {args.seq}")

    policies = {f"mass eps={e}": MlpMassPolicy(e) for e in (0.01, 0.05, 0.2)}
    policies["threshold 10%/5%"] = MlpThresholdPolicy()
    exposer = Exposer(model, args.tile, args.block, args.attn_block, mlp_policies=policies,
                      attn_policy=AttentionMassPolicy(0.95))

    def policy_table(title, reports):
        say(f"\n{title}\n")
        say("| layer | " + " | ".join(f"{n}: density / fc2 error" for n in policies) + " | attention 0.95: density / error |")
        say("|---" * (len(policies) + 2) + "|")
        for r in reports:
            cells = [f"{r.mlp_density[n]:.3f} / {r.mlp_error[n]:.4f}" for n in policies]
            say(f"| {r.layer} | " + " | ".join(cells) + f" | {r.attn_density:.3f} / {r.attn_error:.4f} |")

    before = exposer.report(held_out)
    policy_table("Exposer policies on held-out 1950-1999 text, natural neuron order", before)
    captures = [exposer.capture(batch) for batch in calibration]
    orders = [balanced_order(activation_profiles([c[i].pre_activation for c in captures], args.tile), args.block)
              for i in range(args.layers)]
    with torch.no_grad():
        reference_logits = model(input_ids=held_out[0]).logits
        permute_model(model, orders)
        drift = (model(input_ids=held_out[0]).logits - reference_logits).abs().max().item()
    after = exposer.report(held_out)
    policy_table(f"After the neuron permutation (largest logit change {drift:.2e})", after)
    say("\nDensity saved by the permutation (before -> after, summed over layers)\n")
    for name in policies:
        b, a = sum(r.mlp_density[name] for r in before), sum(r.mlp_density[name] for r in after)
        say(f"- {name}: {b / args.layers:.3f} -> {a / args.layers:.3f} mean density ({100 * (b - a) / b:.1f}% fewer blocks)")

    for policy, eps in (("mass", 0.05), ("mass", 0.2), ("threshold", 0.0)):
        config = LongExposureConfig(tile_m=args.tile, block_n=args.block, attn_block=args.attn_block, mlp_policy=policy,
                                    mlp_eps=eps, mlp_rank=32, attn_rank=8, attn_coverage=0.95)
        torch.manual_seed(0)
        predictors = PredictorSet(config, model_fingerprint(model))
        reports = predictors.fit(model, calibration, held_out, steps=300)
        modern_reports = predictors.evaluate(model, modern)
        label = f"{policy} eps={eps}" if policy == "mass" else "threshold 10%/5%"
        say(f"\nPredictors (permuted model), exposer policy {label}, target mass recall {config.target_recall}\n")
        say("| layer | exposer density | predicted density | recall | precision | mass recall | mass recall 2000+ "
            "| attention density | attention mass covered |")
        say("|---" * 9 + "|")
        for r, m in zip(reports, modern_reports):
            say(f"| {r.layer} | {r.mlp.exposer_density:.3f} | {r.mlp.density:.3f} | {r.mlp.recall:.4f} | "
                f"{r.mlp.precision:.4f} | {r.mlp.mass_recall:.4f} | {m.mlp.mass_recall:.4f} | {r.attn_density:.3f} | "
                f"{r.attn_covered:.4f} |")
    say(f"\n({time.time() - started:.0f} s on {torch.get_num_threads()} CPU threads)")
    report.save(args.out)


if __name__ == "__main__":
    main()
