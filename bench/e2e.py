"""A whole fine-tuning step on the GPU: HF transformers + peft (eager attention, SDPA, optionally
SDPA under torch.compile) against Long Exposure, in one process, at real OPT shapes with random
weights (or a checkpoint directory), bf16.

Long Exposure runs its predictors every step (their cost is part of the step). With random
weights it then uses masks at a stated density profile: per-layer MLP block densities (the paper's
OPT-1.3B profile by default, resampled to the model's depth; a sparsity of 1.0 still keeps one
block per tile) and one attention block density, since random weights give predictors nothing
real to find. With a model pretrained here and its trained predictors (bench/pretrain_opt.py), it
uses the masks those predictors choose on real text.

    python bench/e2e.py --model 1.3b --seq 512 1024 2048 --method lora_qv --graph
    python bench/e2e.py --model 350m --checkpoint OUT/model --predictors OUT/predictors --graph

`--graph` adds SDPA and Long Exposure with each step run through long_exposure.CapturedStep (the
whole step replayed from a CUDA graph), which finetune() uses by default on a GPU.

Under torchrun each rank trains on its own batch through DistributedDataParallel, and the table
gives the throughput of all ranks together (the slowest rank's step), for scaling measurements:

    torchrun --nproc_per_node 2 bench/e2e.py --seq 1024 --baselines sdpa
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from long_exposure.captured_step import CapturedStep
from long_exposure.config import LongExposureConfig
from long_exposure.exposer import decoder_layers
from long_exposure.formats import MlpMask
from long_exposure.models.opt import Controller, convert, restore
from long_exposure.permutation import permute_model
from long_exposure.pipeline import apply_method
from long_exposure.predictors import PredictorSet, model_fingerprint

PREFIX_TOKENS = 8  # prefix tuning's virtual tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from masks import random_layout  # noqa: E402  (the tests' layouts, so both exercise the same thing)
from step_profile import write_profile  # noqa: E402
from timing import cuda_times_ms  # noqa: E402

OPT_SHAPES = {  # hidden, layers, heads, ffn
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, word_embed_proj_dim=512,
                 do_layer_norm_before=False),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
}
DEVICE = "cuda"
# Issue 8's targets at OPT-1.3B with LoRA and the paper's profile: speedup over HF + peft SDPA by sequence length.
TARGETS = {512: 1.3, 1024: 1.6, 2048: 2.0}
# MLP block sparsity per layer of OPT-1.3B as the paper reports it.
PAPER_PROFILE = [0.52, 0.86, 0.95, 0.97, 1.0, 1.0, 0.84, 0.94, 0.75, 0.72, 0.80, 0.81, 0.70, 0.63, 0.72, 0.69, 0.64,
                 0.63, 0.55, 0.66, 0.73, 0.75, 0.63, 0.59]


def resampled(profile: list[float], layers: int) -> list[float]:
    return [profile[min(len(profile) - 1, int(i * len(profile) / layers))] for i in range(layers)]


@dataclass
class TimedController(Controller):
    """The predictors' own masks, with each predictor call bracketed by CUDA events (the step's
    "predictor" column)."""

    predictor_events: list = field(default_factory=list)
    time_predictors: bool = True

    def _timed(self, fn):
        if not self.time_predictors:  # inside a CUDA graph capture: no timing events
            return fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        self.predictor_events.append((start, stop))
        return out

    def mlp_mask(self, index, x, n_neurons):
        return self._timed(lambda: Controller.mlp_mask(self, index, x, n_neurons))

    def attention_layout(self, index, hidden, heads):
        return self._timed(lambda: Controller.attention_layout(self, index, hidden, heads))


@dataclass
class ProfileController(TimedController):
    """Runs the predictors (their cost stays in the step), then hands out the profile's masks."""

    mlp_density: list[float] = field(default_factory=list)
    attn_density: float = 0.25
    _profile: dict = field(default_factory=dict)

    def mlp_mask(self, index, x, n_neurons):
        cfg = self.config
        self._timed(lambda: self.predictors.mlp[index].mask(x, cfg.tile_m, cfg.block_n))
        key = ("mlp", index, x.shape[0])
        if key not in self._profile:
            n_tiles, n_blocks = math.ceil(x.shape[0] / cfg.tile_m), math.ceil(n_neurons / cfg.block_n)
            g = torch.Generator().manual_seed(index)
            active = torch.rand(n_tiles, n_blocks, generator=g) < self.mlp_density[index]
            active[torch.arange(n_tiles), torch.randint(0, n_blocks, (n_tiles,), generator=g)] = True
            self._profile[key] = MlpMask.from_dense(active, cfg.tile_m, cfg.block_n).to(x.device)
        mask = self._profile[key]
        self._used[(index, "mlp")] = (mask, math.ceil(n_neurons / self.config.block_n))
        return mask

    def attention_layout(self, index, hidden, heads):
        from long_exposure.pool import PatternPool

        cfg = self.config
        S = hidden.shape[1]
        n = math.ceil(S / cfg.attn_block)
        if n not in self._pools:
            self._pools[n] = PatternPool(n, device=hidden.device)
        self._timed(lambda: self.predictors.attn[index].layout(hidden, self._pools[n], cfg.attn_coverage))
        key = ("attention", index, S)
        if key not in self._profile:
            # Off-diagonal blocks drawn so that the causal grid's density lands on attn_density.
            causal = n * (n + 1) / 2
            p = max(0.0, (self.attn_density * causal - n) / max(1.0, causal - n))
            g = torch.Generator().manual_seed(1000 + index)
            self._profile[key] = random_layout(1, heads, S, cfg.attn_block, p, generator=g).to(hidden.device)
        layout = self._profile[key]
        self._used[(index, "attention")] = (layout,)
        return layout


def build_model(name: str, checkpoint: str | None, attn: str, kv_cache: bool = True):
    import transformers

    if checkpoint:
        model = transformers.OPTForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).cuda()
    else:
        config = transformers.OPTConfig(vocab_size=50272, max_position_embeddings=2048, dropout=0.0,
                                        attention_dropout=0.0, activation_function="relu", **OPT_SHAPES[name])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.OPTForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = attn
    model.config.use_cache = kv_cache  # HF's default (True) builds a KV cache even in a training step
    return model


def time_steps(model, ids, steps: int, warmup: int, controller=None, profile: tuple[str, str] | None = None) -> dict:
    """Medians over `steps` eager steps; with profile = (directory, name), two more steps are
    profiled into files there (bench/step_profile.py) and the kernel time by kind is returned."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = {"forward": [], "backward": [], "optimizer": [], "step": [], "predictor": []}
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        if controller is not None:
            controller.predictor_events.clear()
        events[0].record()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        saved = torch.cuda.memory_allocated() - before  # what the forward keeps for the backward
        events[1].record()
        loss.backward()
        events[2].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events[3].record()
        torch.cuda.synchronize()
        if i < warmup:
            continue
        for name, (a, b) in zip(("forward", "backward", "optimizer"), zip(events, events[1:])):
            times[name].append(a.elapsed_time(b))
        times["step"].append(events[0].elapsed_time(events[3]))
        if controller is not None:
            times["predictor"].append(sum(a.elapsed_time(b) for a, b in controller.predictor_events))
    out = {k: statistics.median(v) if v else 0.0 for k, v in times.items()}
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["saved_gib"] = saved / 2**30
    out["loss"] = loss.item()
    out["density"] = densities_used(controller)
    if profile is not None:
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        out["kinds"] = write_profile(step, *profile)
    return out


def densities_used(controller) -> str:
    """Mean MLP and attention block densities of the masks the last step used, as 'mlp / attn'."""
    if controller is None:
        return ""
    means = [statistics.mean(d.item() for (_, part), d in controller.densities.items() if part == p)
             for p in ("mlp", "attention")]
    return f"{means[0]:.3f} / {means[1]:.3f}"


def time_graphed_steps(model, ids, steps: int, controller=None) -> dict:
    """The same step through long_exposure.CapturedStep: captured once in a CUDA graph and replayed,
    so no host work runs between kernels (a capturable AdamW; each call copies the batch in)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=True)
    if controller is not None:
        controller.time_predictors = False
    torch.cuda.reset_peak_memory_stats()
    step = CapturedStep(model, optimizer)
    loss = step(ids)
    return {"step": statistics.median(cuda_times_ms(lambda: step(ids), steps, warmup=2)), "forward": float("nan"),
            "backward": float("nan"), "optimizer": float("nan"), "predictor": float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item(),
            "density": densities_used(controller)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(OPT_SHAPES), default="1.3b")
    parser.add_argument("--checkpoint", help="a local OPT checkpoint directory instead of random weights")
    parser.add_argument("--predictors", help="trained predictors for --checkpoint (bench/pretrain_opt.py writes both): "
                        "Long Exposure then uses the masks they predict on 1950-1999 addresses, not a density profile")
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--method", default="lora_qv",
                        choices=["lora_qv", "lora_all", "bitfit", "bottleneck", "prefix"])
    parser.add_argument("--baselines", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa", "compile"])
    parser.add_argument("--attn-density", type=float, default=0.25)
    parser.add_argument("--mlp-density", type=float, help="one MLP block density for every layer instead of "
                        "the paper's OPT-1.3B profile")
    parser.add_argument("--tile-m", type=int, default=LongExposureConfig.tile_m,
                        help="tokens per MLP mask tile (LongExposureConfig's default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--plot", help="PNG of the speedup over each baseline against sequence length")
    parser.add_argument("--profile", metavar="DIR", help="profile each eager step into DIR: GPU kernel time by "
                        "kind, the top kernels, and the host's Python time by function")
    parser.add_argument("--graph", action="store_true", help="also time SDPA and Long Exposure with the whole "
                        "step captured in a CUDA graph (sdpa+graph, long_exposure+graph)")
    parser.add_argument("--overlap-predictor", choices=("auto", "on", "off"), default="auto",
                        help="run Long Exposure's attention predictor on a second stream beside the q, k, v "
                        "projections: auto (the default) does in captured steps only")
    parser.add_argument("--hf-loss", action="store_true", help="Long Exposure keeps HF's loss (fp32 copy of the "
                        "logits) instead of its own cross-entropy: the ablation of LongExposureConfig.fused_loss")
    parser.add_argument("--no-kv-cache", action="store_true", help="every system's model with use_cache=False. "
                        "By default HF fills a KV cache in training steps too (a copy of k and v per layer), as a "
                        "user who leaves the default gets; Long Exposure's layers skip it in training either way")
    args = parser.parse_args()
    if args.method == "prefix":
        positions = 2048
        if args.checkpoint:
            import transformers

            positions = transformers.AutoConfig.from_pretrained(args.checkpoint).max_position_embeddings
        if max(args.seq) + PREFIX_TOKENS > positions:
            # Past them the baseline's own position embedding fails with a device-side assert,
            # which leaves the process's CUDA context unusable for every later system.
            parser.error(f"prefix tuning adds {PREFIX_TOKENS} virtual tokens, so OPT's {positions} positions take "
                         f"sequences of up to {positions - PREFIX_TOKENS} tokens; got --seq {max(args.seq)}")
    if args.predictors and not args.checkpoint:
        parser.error("--predictors needs the --checkpoint it was trained for")
    trained = None
    if args.predictors:
        import transformers

        shape_of = types.SimpleNamespace(config=transformers.AutoConfig.from_pretrained(args.checkpoint))
        trained = PredictorSet.load(args.predictors, model=shape_of)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
        rank = dist.get_rank()
        if DEVICE == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if args.graph or "compile" in args.baselines:
            raise SystemExit("--graph and the compile baseline run in one process only")
    show = print if rank == 0 else (lambda *a, **k: None)
    layers = OPT_SHAPES[args.model]["num_hidden_layers"]
    mlp_density = ([args.mlp_density] * layers if args.mlp_density is not None
                   else [1.0 - s for s in resampled(PAPER_PROFILE, layers)])
    masks = (f"masks from the trained predictors in {args.predictors} on 1950-1999 addresses" if trained else
             f"MLP density profile mean {statistics.mean(mlp_density):.3f}, attention density {args.attn_density}")
    show(f"GPU {torch.cuda.get_device_name()} x {world}, torch {torch.__version__}, OPT-{args.model} "
         f"({'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}), {args.method}, "
         f"batch {args.batch} per rank, bf16; {masks}; KV cache in training: "
         f"{'off (use_cache=False)' if args.no_kv_cache else 'HF default'}; Long Exposure's loss: "
         f"{'HF' if args.hf_loss else 'its own cross-entropy'}")
    show("| seq | system | step ms | fwd / bwd / opt ms | predictor ms | peak GiB | tokens/s (all ranks) "
         "| density MLP / attn | speedup vs eager | vs SDPA | vs compile |")
    show("|---|---|---|---|---|---|---|---|---|---|---|")
    speedups: dict[str, list[tuple[int, float]]] = {}
    vocab = 50000
    if args.checkpoint:  # random ids within the checkpoint's vocabulary (pretrain_opt's has 257 byte tokens)
        import transformers

        vocab = min(vocab, transformers.AutoConfig.from_pretrained(args.checkpoint).vocab_size)
    for seq in args.seq:
        if trained:  # real text, so that the predictors see what they were trained on
            from long_exposure.data import load_addresses, split_by_year, token_blocks

            blocks = token_blocks(split_by_year(load_addresses())["finetune"], seq, max_blocks=args.batch * world)
            ids = blocks[rank * args.batch:(rank + 1) * args.batch].to(DEVICE)
        else:
            ids = torch.randint(0, vocab, (args.batch, seq), device=DEVICE,
                                generator=torch.Generator(DEVICE).manual_seed(seq + 1000 * rank))
        results = {}
        systems = args.baselines + ["long_exposure"] + (["sdpa+graph", "long_exposure+graph"] if args.graph else [])
        for system in systems:
            attn = "eager" if system == "eager" else "sdpa"
            resident = torch.cuda.memory_allocated()  # what earlier systems left (compiled code's caches)
            model = build_model(args.model, args.checkpoint, attn, kv_cache=not args.no_kv_cache)
            if trained is not None:
                permute_model(model, trained.neuron_orders)  # the neuron order the predictors were made in
            model = apply_method(model, args.method, virtual_tokens=PREFIX_TOKENS)
            controller = None
            if system.startswith("long_exposure") and trained is not None:
                predictors = copy.deepcopy(trained).to(DEVICE, torch.bfloat16)
                predictors.config.fused_loss = not args.hf_loss
                controller = TimedController(predictors.config, predictors, "sparse")
                convert(model, predictors.config, predictors=predictors, mode="sparse")
                for layer in decoder_layers(model):
                    layer._long_exposure.controller = controller
            elif system.startswith("long_exposure"):
                config = LongExposureConfig(tile_m=args.tile_m, block_n=128, attn_block=64, fused_loss=not args.hf_loss)
                predictors = PredictorSet(config, model_fingerprint(model)).to(DEVICE, torch.bfloat16)
                controller = ProfileController(config, predictors, "sparse", mlp_density=mlp_density,
                                               attn_density=args.attn_density)
                convert(model, config, predictors=predictors, mode="sparse")
                # convert made its own Controller; the layers read the one in their state.
                for layer in decoder_layers(model):
                    layer._long_exposure.controller = controller
            if controller is not None:
                controller.overlap_attention_predictor = {"auto": None, "on": True, "off": False}[args.overlap_predictor]
            runner = torch.compile(model) if system == "compile" else model
            if world > 1:
                runner = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[torch.cuda.current_device()] if DEVICE == "cuda" else None)
            try:
                if system.endswith("+graph"):
                    results[system] = time_graphed_steps(runner, ids, args.steps, controller)
                else:
                    where = (args.profile, f"{args.model}_{args.method}_seq{seq}_{system}_rank{rank}") if args.profile else None
                    results[system] = time_steps(runner, ids, args.steps, args.warmup, controller, where)
            except Exception as error:  # noqa: BLE001  (out of memory, or a step that cannot be captured)
                results[system] = None
                show(f"| {seq} | {system} | failed: {type(error).__name__}: {str(error)[:120]} | | | | | | | |")
            if world > 1 and results[system] is not None:
                # The slowest rank sets the pace of a data-parallel step.
                slowest = torch.tensor([results[system]["step"]], device=DEVICE)
                torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
                results[system]["step"] = slowest.item()
            if results[system] is not None:
                results[system]["peak_gib"] -= resident / 2**30
            if system.startswith("long_exposure"):
                restore(model)
            if system == "compile":
                torch._dynamo.reset()
            del model, runner
            torch.cuda.empty_cache()
        for system, r in results.items():
            if r is not None and "kinds" in r:
                kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in sorted(r["kinds"].items(), key=lambda i: -i[1]))
                show(f"seq {seq}, {system}: forward keeps {r['saved_gib']:.2f} GiB for the backward; "
                     f"GPU ms per step by kind: {kinds}")
        le = results.get("long_exposure")
        if results.get("sdpa+graph") and results.get("long_exposure+graph"):
            ratio = results["sdpa+graph"]["step"] / results["long_exposure+graph"]["step"]
            show(f"| {seq} | both in CUDA graphs | long_exposure+graph is {ratio:.2f}x sdpa+graph | | | | | | | |")
        for system, r in results.items():
            if r is None:
                continue
            ratios = [f"{results[b]['step'] / r['step']:.2f}x" if results.get(b) and system.startswith("long_exposure")
                      else "" for b in ("eager", "sdpa", "compile")]
            tokens_per_s = world * args.batch * seq / (r["step"] / 1000)
            show(f"| {seq} | {system} | {r['step']:.1f} | {r['forward']:.1f} / {r['backward']:.1f} / "
                 f"{r['optimizer']:.1f} | {r['predictor']:.2f} | {r['peak_gib']:.1f} | {tokens_per_s:,.0f} | "
                 f"{r['density']} | {' | '.join(ratios)} |")
        if le:
            for b in args.baselines:
                if results.get(b):
                    speedups.setdefault(b, []).append((seq, results[b]["step"] / le["step"]))
        captured = results.get("long_exposure+graph")
        if captured:  # both steps captured, and ours captured against the eager SDPA step
            for b, label in (("sdpa+graph", "sdpa, both captured"), ("sdpa", "sdpa, ours captured")):
                if results.get(b):
                    speedups.setdefault(label, []).append((seq, results[b]["step"] / captured["step"]))
        target = TARGETS.get(seq)
        if target and args.model == "1.3b" and args.method.startswith("lora") and results.get("sdpa") and not trained:
            for system in ("long_exposure", "long_exposure+graph"):
                if results.get(system):
                    ratio = results["sdpa"]["step"] / results[system]["step"]
                    verdict = "met" if ratio >= target else f"missed by {target - ratio:.2f}x"
                    show(f"| {seq} | issue 8 target | {system} is {ratio:.2f}x eager SDPA; target {target}x: {verdict} "
                         f"| | | | | | | |")
    if world > 1:
        torch.distributed.destroy_process_group()
    if args.plot and speedups and rank == 0:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for b, points in speedups.items():
            ax.plot(*zip(*points), marker="o", label=f"over HF + peft, {b}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("step speedup")
        ax.set_title(f"Long Exposure, OPT-{args.model}, {args.method}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
