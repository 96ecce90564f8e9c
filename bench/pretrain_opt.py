"""A ReLU OPT at a real layer shape pretrained here on the corpus, with its trained predictors, so
that bench/e2e.py can time Long Exposure with masks from real predictors instead of a stated
density profile (DESIGN.md section 8: no checkpoint can be downloaded; random weights give the
predictors nothing real to find).

The model has the byte vocabulary of long_exposure.data (257 tokens) and the layer shape of
e2e.OPT_SHAPES (350m keeps the real model's post-LayerNorm and 512-wide embedding projection);
it is pretrained on addresses before 1950 (bf16 autocast on a GPU), evaluated on 2000 onward, and
its predictors are calibrated and trained on 1950-1999 with the LongExposureConfig() defaults
or the --eps and --coverage given.

    python bench/pretrain_opt.py --shape 350m --steps 3000 --seconds 120 --out runs/opt-350m-sotu
    python bench/pretrain_opt.py --shape tiny --seq 64 --batch 4 --steps 20 --predictor-steps 20 \\
        --calibration-sequences 16 --out /tmp/pt_tiny          # a CPU smoke test

OUT/model is the checkpoint in the original neuron order (bf16 safetensors); OUT/predictors
holds the predictors and, in their neuron_orders, the permutation of each layer's MLP neurons
they were trained for, the way `long-exposure finetune --predictors` expects. Load the pair as

    from transformers import OPTForCausalLM
    from long_exposure.permutation import permute_model
    from long_exposure.predictors import PredictorSet

    model = OPTForCausalLM.from_pretrained("OUT/model")
    predictors = PredictorSet.load("OUT/predictors", model=model)
    permute_model(model, predictors.neuron_orders)  # function-preserving; the predictors' order

then move both where they run (model.to("cuda", torch.bfloat16), predictors.to("cuda",
torch.bfloat16)). OUT/report.md repeats what this prints; OUT/pretrain.json holds the numbers.
Positions past --seq are untrained: to time longer sequences with real masks, pretrain at that
--seq.

Calibration runs on --device in fp32. The neuron permutation's balanced k-means runs on the host
(about 0.25 s a layer at the 350m shape, 1.3 s at 1.3B's, on a 2-core host); --no-permute skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from e2e import OPT_SHAPES
from report import Report

from long_exposure.cli import UsageError, staged_output
from long_exposure.config import LongExposureConfig
from long_exposure.data import ByteTokenizer, load_addresses, split_by_year, token_blocks
from long_exposure.pipeline import calibrate_and_train_predictors, evaluate
from long_exposure.small_opt import pretrain

SHAPES = {**OPT_SHAPES, "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=256)}
# Real OPT was trained at 3e-4 (350m) and below; these runs are short but their batches are small,
# and a post-LayerNorm 350m diverges sooner than the pre-LayerNorm shapes.
DEFAULT_LR = {"tiny": 3e-3, "350m": 3e-4, "1.3b": 2e-4, "2.7b": 2e-4}


def build_model(shape: str, seq: int, seed: int, device: torch.device):
    from transformers import OPTConfig, OPTForCausalLM

    dims = {"word_embed_proj_dim": SHAPES[shape]["hidden_size"], "do_layer_norm_before": True, **SHAPES[shape]}
    tokens = ByteTokenizer()
    config = OPTConfig(vocab_size=tokens.vocab_size, max_position_embeddings=max(2048, seq),
                       activation_function="relu", dropout=0.0, attention_dropout=0.0,
                       pad_token_id=tokens.separator, bos_token_id=tokens.separator, eos_token_id=tokens.separator,
                       **dims)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it trains: a 2.7b is slow to initialise on the host
        model = OPTForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["350m", "1.3b", "2.7b", "tiny"], default="350m")
    parser.add_argument("--corpus", default=None,
                        help="sotu.jsonl.gz or its folder (default: where long_exposure.data finds it)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default by shape: {DEFAULT_LR})")
    parser.add_argument("--seconds", type=float, default=None, help="wall-clock cap on pretraining")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-sequences", type=int, default=64)
    parser.add_argument("--predictor-steps", type=int, default=300)
    parser.add_argument("--eps", type=float, default=None, help="MLP mass-policy eps (default: LongExposureConfig's); "
                        "bench/RESULTS.md's quality test passed up to 0.2 with the permutation")
    parser.add_argument("--coverage", type=float, default=None, help="attention coverage (default: LongExposureConfig's); "
                        "the quality test passed down to 0.8")
    parser.add_argument("--no-permute", dest="permute", action="store_false",
                        help="keep the MLP neurons in their order (skips the permutation's balanced k-means)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    args = parser.parse_args()
    device = torch.device(args.device)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.shape]
    report = Report()
    say = report.say

    started = time.time()
    splits = split_by_year(load_addresses(args.corpus))
    train_blocks = token_blocks(splits["pretrain"], args.seq)
    eval_blocks = token_blocks(splits["evaluate"], args.seq, max_blocks=128)
    calibration_blocks = token_blocks(splits["finetune"], args.seq, max_blocks=args.calibration_sequences)
    try:
        with staged_output(args.out) as out:
            model = build_model(args.shape, args.seq, args.seed, device)
            n_params = sum(p.numel() for p in model.parameters())
            precision = "bf16 autocast" if device.type == "cuda" else "fp32"
            say(f"OPT-{args.shape} layer shape {SHAPES[args.shape]}, byte vocabulary, {n_params / 1e6:.1f} M "
                f"parameters, on {device} ({precision}); {len(train_blocks)} pretraining sequences of {args.seq} "
                f"tokens, batch {args.batch}, lr {lr:g}")
            pretraining = time.perf_counter()
            try:
                losses = pretrain(model, train_blocks, args.steps, args.batch, lr, args.seed, seconds=args.seconds)
            except ValueError as error:  # diverged
                raise SystemExit(f"pretrain_opt.py: {error} (--lr)") from None
            seconds, stopped = time.perf_counter() - pretraining, len(losses) < args.steps
            if stopped:
                say(f"stopped by --seconds {args.seconds:g} after {len(losses)} of {args.steps} steps")
            tail = losses[-min(20, len(losses)):]
            with autocast(device):
                held_out = evaluate(model, eval_blocks)
            say(f"pretraining: {len(losses)} steps in {seconds:.0f} s "
                f"({seconds / max(1, len(losses)) * 1000:.0f} ms/step); loss {losses[0]:.4f} at the first step, "
                f"{sum(tail) / len(tail):.4f} over the last {len(tail)}; held-out loss on 2000 onward "
                f"({len(eval_blocks)} sequences): {held_out:.4f}")

            # Rounded to bf16 once: the checkpoint holds these weights and the predictors are fit to them.
            model = model.to("cpu", torch.bfloat16)
            model.save_pretrained(out / "model")  # before calibration permutes it: the original neuron order
            model = model.to(device, torch.float32)  # the predictors train in fp32 on the model's activations
            for p in model.parameters():
                p.requires_grad_(False)
            calibrating = time.time()
            chosen = {"mlp_eps": args.eps, "attn_coverage": args.coverage}
            config = LongExposureConfig(**{k: v for k, v in chosen.items() if v is not None})
            predictors, reports = calibrate_and_train_predictors(model, calibration_blocks, config,
                                                                 steps=args.predictor_steps, permute=args.permute)
            predictors.save(out / "predictors")
            say(f"predictors: {len(calibration_blocks)} calibration sequences from 1950-1999, {args.predictor_steps} "
                f"steps, {'neurons permuted' if args.permute else 'neurons not permuted'}, on {device} "
                f"in {time.time() - calibrating:.0f} s; "
                f"tile_m {config.tile_m}, block_n {config.block_n}, attn_block {config.attn_block}, "
                f"mlp_eps {config.mlp_eps}, attn_coverage {config.attn_coverage}, target_recall {config.target_recall}")
            say("")
            say("| layer | exposer MLP density | predicted MLP density | recall | precision | mass recall "
                "| exposer attn density | predicted attn density | attn mass covered |")
            say("|---" * 9 + "|")
            for r in reports:
                say(f"| {r.layer} | {r.mlp.exposer_density:.3f} | {r.mlp.density:.3f} | {r.mlp.recall:.3f} | "
                    f"{r.mlp.precision:.3f} | {r.mlp.mass_recall:.4f} | {r.attn_exposer_density:.3f} | "
                    f"{r.attn_density:.3f} | {r.attn_covered:.4f} |")
            say(f"\n({time.time() - started:.0f} s in all)")
            summary = {"shape": args.shape, "layer_shape": SHAPES[args.shape], "seq": args.seq, "batch": args.batch,
                       "lr": lr, "steps": len(losses), "steps_asked": args.steps, "stopped_by_seconds": stopped,
                       "pretrain_seconds": seconds, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
                       "held_out_loss": held_out, "permuted": args.permute, "long_exposure": config.to_dict(),
                       "predictors": [{"layer": r.layer, **r.mlp.__dict__,
                                       "attn_exposer_density": r.attn_exposer_density, "attn_density": r.attn_density,
                                       "attn_covered": r.attn_covered} for r in reports]}
            (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
            report.save(out / "report.md")
    except UsageError as error:
        raise SystemExit(f"pretrain_opt.py: error: {error}") from None
    print(f"wrote {args.out}/model, predictors, report.md and pretrain.json")


if __name__ == "__main__":
    main()
