"""The `long-exposure` command: calibrate, train-predictors, finetune, evaluate, bench.

With no model and no data every subcommand runs on the embedded default (a small OPT the package
builds and pretrains on text it generates itself). Outputs are written to a staging folder and
moved into place only when the command succeeds, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# ---- inputs -----------------------------------------------------------------------------------

def load_texts(path: str) -> list[str]:
    """Texts of a .txt file (one text) or a .jsonl / .jsonl.gz file of {"text": ...} records."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"dataset {path} does not exist")
    if file.suffix == ".txt":
        text = file.read_text(encoding="utf-8", errors="replace")
        texts = [text] if text.strip() else []
    elif file.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if file.name.endswith(".gz") else open
        texts = []
        with opener(file, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise UsageError(f"{path}: line {number} is not a JSON object with a \"text\" field ({error})")
    else:
        raise UsageError(f"dataset {path}: expected a .txt, .jsonl or .jsonl.gz file")
    if not any(t.strip() for t in texts):
        raise UsageError(f"dataset {path} holds no text")
    return texts


class Tokens:
    """Turns texts into [n, seq] token blocks with the model's tokenizer (bytes for small models)."""

    def __init__(self, model_dir: str | None, vocab_size: int):
        self.tokenizer = None
        if model_dir is not None and any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "vocab.json")):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        elif vocab_size < 257:
            raise UsageError(f"the model has no tokenizer files and a vocabulary of {vocab_size} (< 257 byte tokens)")

    def blocks(self, texts: list[str], seq: int, max_blocks: int | None = None) -> torch.Tensor:
        from .data import token_blocks

        if self.tokenizer is None:
            try:
                return token_blocks(texts, seq, max_blocks=max_blocks)
            except ValueError as error:
                raise UsageError(str(error)) from error
        ids = []
        for text in texts:
            ids += self.tokenizer(text)["input_ids"]
            if max_blocks and len(ids) >= (max_blocks + 1) * seq:
                break
        n = len(ids) // seq if not max_blocks else min(len(ids) // seq, max_blocks)
        if n == 0:
            raise UsageError(f"the dataset holds {len(ids)} tokens, fewer than one sequence of {seq}")
        return torch.tensor(ids[: n * seq]).view(n, seq)


def load_model(model_dir: str | None, seed: int, quiet: bool, device: torch.device = torch.device("cpu")):
    """(model, tokens, texts for the embedded default or None), the model on `device`: in fp32 on
    the host, in bf16 on a GPU, where the CUDA kernels take bf16 and fp16 only."""
    model, tokens, texts = _load_host_model(model_dir, seed, quiet)
    if device.type == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    return model, tokens, texts


def _load_host_model(model_dir: str | None, seed: int, quiet: bool):
    if model_dir is None:
        from .data import token_blocks
        from .embedded import embedded_texts
        from .small_opt import build_small_opt, pretrain

        texts = embedded_texts(seed)
        model = build_small_opt(seed=seed, hidden=96, layers=3, heads=4, ffn=384, max_positions=128)
        say(quiet, "embedded default: a 3-layer ReLU OPT (hidden 96) pretrained here on generated text")
        pretrain(model, token_blocks(texts["pretrain"], 128), steps=150, batch_size=16, seed=seed, progress=not quiet)
        return model, Tokens(None, model.config.vocab_size), texts
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a model directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "opt":
        raise UsageError(f"{model_dir} holds a {config.get('model_type')!r} model; Long Exposure supports OPT models")
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(model_dir)
    model.config._attn_implementation = "sdpa"
    return model, Tokens(model_dir, model.config.vocab_size), None


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


@contextmanager
def staged_output(out: str):
    """A staging folder beside `out`, renamed to `out` when the block succeeds, removed otherwise."""
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"output folder {out} exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Mask geometry by device: small tiles suit the host's exact operators and the small models they
# are tried on; the CUDA kernels need tiles and blocks in multiples of 64 (LongExposureConfig's
# defaults).
HOST_GEOMETRY = {"tile": 32, "block": 32, "attn_block": 32}


def resolve_device(args) -> None:
    """Checks --device and fills in the mask geometry the user left to it."""
    from .config import LongExposureConfig

    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: Long Exposure runs on cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", index)
    args.device = device
    if hasattr(args, "tile"):
        gpu = LongExposureConfig()
        defaults = HOST_GEOMETRY if device.type == "cpu" else {"tile": gpu.tile_m, "block": gpu.block_n,
                                                               "attn_block": gpu.attn_block}
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)


def config_from(args):
    from .config import LongExposureConfig

    try:
        return LongExposureConfig(tile_m=args.tile, block_n=args.block, attn_block=args.attn_block,
                                  mlp_policy=args.policy, mlp_eps=args.eps, attn_coverage=args.coverage,
                                  mlp_rank=args.mlp_rank, attn_rank=args.attn_rank, drift_every=args.drift_every)
    except ValueError as error:
        raise UsageError(str(error)) from error


def training_blocks(args, model, tokens, texts):
    seq = args.seq
    limit = model.config.max_position_embeddings
    if seq > limit:
        raise UsageError(f"--seq {seq} is longer than the model's {limit} positions")
    train_texts = texts["finetune"] if texts is not None and args.data is None else load_texts(args.data) if args.data else None
    if train_texts is None:
        raise UsageError("--data is required with --model")
    blocks = tokens.blocks(train_texts, seq, max_blocks=args.max_sequences)
    if args.eval_data:
        eval_blocks = tokens.blocks(load_texts(args.eval_data), seq, max_blocks=256)
    elif texts is not None and args.data is None:
        eval_blocks = tokens.blocks(texts["evaluate"], seq, max_blocks=256)
    else:
        n_eval = max(1, len(blocks) // 10)
        if len(blocks) < 2:
            raise UsageError("the dataset is too short to hold out evaluation sequences; give --eval-data")
        blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
    return blocks, eval_blocks


# ---- reports ----------------------------------------------------------------------------------

def table(title: str, header: list[str], rows: list[list], quiet: bool) -> None:
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title)
    for name in header:
        out.add_column(name, justify="right")
    for row in rows:
        out.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(out)


def plot_densities(path: Path, mlp: dict, attn: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(set(mlp) | set(attn))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.4
    ax.bar([i - width / 2 for i in layers], [mlp.get(i, 0) for i in layers], width, label="MLP")
    ax.bar([i + width / 2 for i in layers], [attn.get(i, 0) for i in layers], width, label="attention")
    ax.set_xlabel("layer")
    ax.set_ylabel("block density")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(path: Path, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- subcommands ------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    from .exposer import AttentionMassPolicy, Exposer, MlpMassPolicy, MlpThresholdPolicy

    model, tokens, texts = load_model(args.model, args.seed, args.quiet, args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks, _ = training_blocks(args, model, tokens, texts)
    policies = {"threshold": MlpThresholdPolicy(), f"mass {args.eps:g}": MlpMassPolicy(args.eps)}
    exposer = Exposer(model, args.tile, args.block, args.attn_block, mlp_policies=policies,
                      attn_policy=AttentionMassPolicy(args.coverage))
    with staged_output(args.out) as out:
        reports = exposer.report(list(blocks[: args.batch_size * 4].split(args.batch_size)))
        rows = [[r.layer, *[v for n in policies for v in (r.mlp_density[n], r.mlp_error[n])], r.attn_density, r.attn_error]
                for r in reports]
        header = ["layer", *[f"{n} {k}" for n in policies for k in ("density", "fc2 error")], "attn density", "attn error"]
        table("Exposer: density and relative output error per layer", header, rows, args.quiet)
        (out / "calibration.json").write_text(json.dumps([r.__dict__ for r in reports], indent=2))
        plot_densities(out / "density.png", {r.layer: r.mlp_density[f"mass {args.eps:g}"] for r in reports},
                       {r.layer: r.attn_density for r in reports}, "exposer densities")
    say(args.quiet, f"wrote {args.out}/calibration.json and density.png")
    return 0


def _fit_predictors(args, model, blocks, quiet):
    from .pipeline import calibrate_and_train_predictors

    config = config_from(args)
    predictors, reports = calibrate_and_train_predictors(model, blocks[: args.calibration_sequences], config,
                                                         batch_size=args.batch_size, progress=not quiet)
    rows = [[r.layer, r.mlp.exposer_density, r.mlp.density, r.mlp.recall, r.mlp.precision, r.mlp.mass_recall,
             r.attn_density, r.attn_covered] for r in reports]
    table("Predictors on held-out calibration text", ["layer", "exposer density", "MLP density", "recall", "precision",
                                                      "mass recall", "attn density", "attn mass covered"], rows, quiet)
    return predictors, reports


def cmd_train_predictors(args) -> int:
    model, tokens, texts = load_model(args.model, args.seed, args.quiet, args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks, _ = training_blocks(args, model, tokens, texts)
    with staged_output(args.out) as out:
        predictors, _ = _fit_predictors(args, model, blocks, args.quiet)
        predictors.save(out / "predictors")
    say(args.quiet, f"wrote {args.out}/predictors")
    return 0


def cmd_finetune(args) -> int:
    import copy

    from .models.opt import convert, restore
    from .permutation import permute_model
    from .pipeline import apply_method, evaluate, finetune, unpermute
    from .predictors import DriftMonitor, PredictorSet

    started = time.time()
    model, tokens, texts = load_model(args.model, args.seed, args.quiet, args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks, eval_blocks = training_blocks(args, model, tokens, texts)
    with staged_output(args.out) as out:
        if args.predictors:
            try:
                predictors = PredictorSet.load(args.predictors, model=model, config=config_from(args))
            except (ValueError, FileNotFoundError) as error:
                raise UsageError(str(error)) from error
            predictors = predictors.to(args.device)
            permute_model(model, predictors.neuron_orders)  # the order the predictors were made in
        else:
            predictors, _ = _fit_predictors(args, model, blocks, args.quiet)
        base_loss = evaluate(model, eval_blocks, args.batch_size)
        curves, results, losses = {}, {}, {}
        runs = ["dense", "long exposure"] if args.compare_dense else ["long exposure"]
        for run in runs:
            tuned = apply_method(copy.deepcopy(model), args.method, args.rank)
            controller = monitor = None
            if run == "long exposure":
                run_predictors = copy.deepcopy(predictors)
                controller = convert(tuned, predictors=run_predictors)
                monitor = DriftMonitor(run_predictors, tuned) if run_predictors.config.drift_every else None
            results[run] = finetune(tuned, blocks, args.steps, args.batch_size, args.lr, seed=args.seed, monitor=monitor,
                                    controller=controller, progress=not args.quiet, desc=f"{run} fine-tuning")
            if run == "long exposure":
                restore(tuned)
                run_predictors.save(out / "predictors")
                unpermute(tuned, predictors)  # the adapter must fit the original model
                _save_adapter(tuned, args.method, out / "adapter")
            losses[run] = evaluate(tuned, eval_blocks, args.batch_size)
            curves[run] = results[run].losses
        sparse = results["long exposure"]
        rows = [[layer, sparse.mlp_density.get(layer, float("nan")), sparse.attn_density.get(layer, float("nan"))]
                for layer in sorted(set(sparse.mlp_density) | set(sparse.attn_density))]
        table("Long Exposure densities (mean over steps)", ["layer", "MLP density", "attention density"], rows, args.quiet)
        summary_rows = [[run, losses[run], math.exp(losses[run]), sum(results[run].step_seconds) / len(results[run].step_seconds)]
                        for run in runs]
        table(f"{args.method}, {args.steps} steps; held-out loss with the dense model (before: {base_loss:.4f})",
              ["run", "held-out loss", "perplexity", "s / step"], summary_rows, args.quiet)
        if sparse.drift_events:
            say(args.quiet, f"drift events: {[(e.step, e.layer, e.part, e.action) for e in sparse.drift_events]}")
        plot_densities(out / "density.png", sparse.mlp_density, sparse.attn_density, "Long Exposure densities")
        plot_losses(out / "loss.png", curves)
        summary = {"method": args.method, "steps": args.steps, "base_loss": base_loss, "held_out_loss": losses,
                   "mlp_density": sparse.mlp_density, "attn_density": sparse.attn_density,
                   "seconds_per_step": {r: sum(results[r].step_seconds) / len(results[r].step_seconds) for r in runs}}
        if "dense" in losses:
            summary["gap"] = (losses["long exposure"] - losses["dense"]) / losses["dense"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    gap = f"; gap to the dense adapter {100 * summary['gap']:+.2f}%" if "gap" in summary else ""
    say(args.quiet, f"done in {time.time() - started:.0f} s: adapter, predictors, summary.json, density.png and "
                    f"loss.png in {args.out}{gap}")
    return 0


def _save_adapter(model, method: str, path: Path) -> None:
    if hasattr(model, "save_pretrained") and method not in ("bitfit", "bottleneck"):
        model.save_pretrained(path)
        return
    from safetensors.torch import save_file

    from .peft import adapter_state_dict

    path.mkdir(parents=True)
    weights = adapter_state_dict(model) if method == "bottleneck" else {
        n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, path / "adapter.safetensors")
    (path / "adapter.json").write_text(json.dumps({"method": method}))


def cmd_evaluate(args) -> int:
    from .pipeline import evaluate

    model, tokens, texts = load_model(args.model, args.seed, args.quiet, args.device)
    if args.adapter:
        model = _load_adapter(model, args.adapter)
    data = load_texts(args.data) if args.data else (texts["evaluate"] if texts else None)
    if data is None:
        raise UsageError("--data is required with --model")
    loss = evaluate(model, tokens.blocks(data, args.seq, max_blocks=256), args.batch_size)
    table("Evaluation with the dense model", ["held-out loss", "perplexity"], [[loss, math.exp(loss)]], args.quiet)
    return 0


def _load_adapter(model, path: str):
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        import peft

        return peft.PeftModel.from_pretrained(model, folder)
    if (folder / "adapter.json").is_file():
        from safetensors.torch import load_file

        method = json.loads((folder / "adapter.json").read_text())["method"]
        if method == "bottleneck":
            from .peft import add_bottleneck_adapters

            weights = load_file(folder / "adapter.safetensors")
            rank = next(t for n, t in weights.items() if n.endswith("adapter_attn.down.weight")).shape[0]
            add_bottleneck_adapters(model, rank)
        else:
            weights = load_file(folder / "adapter.safetensors")
        missing = set(weights) - {n for n, _ in model.named_parameters()}
        if missing:
            raise UsageError(f"the adapter in {path} does not fit this model ({len(missing)} unknown parameters)")
        model.load_state_dict(weights, strict=False)
        return model
    raise UsageError(f"{path} holds no adapter (adapter_config.json or adapter.json)")


def cmd_bench(args) -> int:
    from .__main__ import main as operators_bench

    return operators_bench(["--repeats", str(args.repeats)])


# ---- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .pipeline import METHODS

    parser = argparse.ArgumentParser(prog="long-exposure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, out_default):
        p.add_argument("--model", help="a local OPT model directory (default: the embedded small OPT)")
        p.add_argument("--data", help="training/calibration text: .txt, .jsonl or .jsonl.gz with a \"text\" field")
        p.add_argument("--eval-data", help="held-out text (default: the last tenth of --data)")
        p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-sequences", type=int, default=2000, help="sequences read from --data at most")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        p.add_argument("--device", default="cpu",
                       help="cpu, cuda or cuda:N (default cpu); on a GPU the model runs in bf16 on the CUDA kernels")
        p.add_argument("--tile", type=int, help="tokens per MLP mask tile (default 32 on the host, 64 on a GPU)")
        p.add_argument("--block", type=int, help="neurons per MLP block (default 32 on the host, 128 on a GPU)")
        p.add_argument("--attn-block", type=int, help="tokens per attention block (default 32 on the host, 64 on a GPU)")
        p.add_argument("--policy", choices=["mass", "threshold"], default="mass", help="the exposer's MLP policy")
        p.add_argument("--eps", type=float, default=0.05, help="mass policy: share of a tile's mass it may drop")
        p.add_argument("--coverage", type=float, default=0.95, help="share of attention mass layouts keep")
        p.add_argument("--mlp-rank", type=int, default=32)
        p.add_argument("--attn-rank", type=int, default=8)
        p.add_argument("--drift-every", type=int, default=50, help="steps between drift checks (0: never)")
        p.add_argument("--calibration-sequences", type=int, default=64)
        p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")

    p = sub.add_parser("calibrate", help="measure densities and errors of the mask policies")
    common(p, "long-exposure-calibration")
    p.set_defaults(handler=cmd_calibrate)
    p = sub.add_parser("train-predictors", help="calibrate and train the predictors, and save them")
    common(p, "long-exposure-predictors")
    p.set_defaults(handler=cmd_train_predictors)
    p = sub.add_parser("finetune", help="the whole pipeline: predictors, fine-tuning, dense evaluation")
    common(p, "long-exposure-run")
    p.add_argument("--method", choices=METHODS, default="lora_qv")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank / adapter bottleneck")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--predictors", help="saved predictors to use instead of training new ones")
    p.add_argument("--no-compare-dense", dest="compare_dense", action="store_false",
                   help="skip the dense fine-tuning run the result is compared with")
    p.set_defaults(handler=cmd_finetune)
    p = sub.add_parser("evaluate", help="held-out loss of a model (and adapter) with the dense model")
    common(p, "unused")
    p.add_argument("--adapter", help="an adapter folder written by finetune")
    p.set_defaults(handler=cmd_evaluate)
    p = sub.add_parser("bench", help="the operators against the dense PyTorch ones on this machine")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(handler=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if hasattr(args, "device"):
            resolve_device(args)
        return args.handler(args)
    except UsageError as error:
        print(f"long-exposure {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, TypeError, ValueError) as error:
        print(f"long-exposure {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
