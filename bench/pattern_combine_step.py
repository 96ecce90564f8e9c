"""Cost of combining every layer's attention layouts for one training step, against the step
itself: HF transformers + peft (LoRA r=16 on q,v) with SDPA attention, bf16, at OPT shapes with
random weights, measured in the same process on the same GPU.

Three measures: (1) in the step: the same step with each decoder layer combining its layouts
in a forward pre-hook, as Long Exposure will, against the step without, interleaved; (2) alone,
one call per layer, timed with events while the GPU has nothing else to do (host-bound); (3) alone,
every layer in one call.

    python bench/pattern_combine_step.py --model 1.3b --batch 4 --seq 2048 --block 64
"""

from __future__ import annotations

import argparse
import statistics

import torch

from long_exposure.pool import PatternPool
from timing import cuda_times_ms

OPT_SHAPES = {  # hidden, layers, heads, ffn
    "125m": (768, 12, 12, 3072),
    "350m": (1024, 24, 16, 4096),
    "1.3b": (2048, 24, 32, 8192),
    "2.7b": (2560, 32, 32, 10240),
}


def build_step(model_name: str, batch: int, seq: int):
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn = OPT_SHAPES[model_name]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       word_embed_proj_dim=hidden, max_position_embeddings=max(2048, seq), vocab_size=50272)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = OPTForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"attention implementation: {model.config._attn_implementation}")
    decoder_layers = [m for name, m in model.named_modules() if type(m).__name__ == "OPTDecoderLayer"]
    return step, decoder_layers


def in_step_cost(step, decoder_layers, pool, selection, block, rounds: int, steps: int):
    """(median step ms without, with per-layer combination in pre-hooks)."""
    def hook_for(layer):
        def hook(module, args):
            pool.combine(selection[layer], block)
        return hook

    plain, hooked = [], []
    for _ in range(rounds):
        plain += cuda_times_ms(step, steps)
        handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(decoder_layers)]
        hooked += cuda_times_ms(step, steps)
        for h in handles:
            h.remove()
    return statistics.median(plain), statistics.median(hooked)


def make_selection(pool, layers, batch_layouts, heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    chosen = torch.rand(layers, batch_layouts, heads, len(pool.atoms), generator=g, device="cuda") < 0.2
    chosen[..., 0] = True
    return pool.selection(chosen)


def alone_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(OPT_SHAPES), default="1.3b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--block", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (3 rounds each way)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    step, decoder_layers = build_step(args.model, args.batch, args.seq)
    for _ in range(3):
        step()
    _, layers, heads, _ = OPT_SHAPES[args.model]
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"OPT-{args.model} ({layers} layers, {heads} heads), batch {args.batch}, seq {args.seq}, "
          f"HF + peft LoRA(q,v) SDPA; layouts per sequence (batch {args.batch} x {heads} heads per layer)")
    print(f"{'block':>6}{'grid':>6}{'atoms':>7}{'step ms':>9}{'+combine':>10}{'in-step %':>11}"
          f"{'alone, per layer':>18}{'alone, 1 call':>15}")
    for block in args.block:
        n = -(-args.seq // block)
        pool = PatternPool(n, device="cuda")
        selection = make_selection(pool, layers, args.batch, heads)
        plain, hooked = in_step_cost(step, decoder_layers, pool, selection, block, rounds=3, steps=args.steps)
        per_layer = alone_ms(lambda: [pool.combine(selection[layer], block) for layer in range(layers)], 50)
        one_call = alone_ms(lambda: pool.combine(selection, block), 50)
        print(f"{block:>6}{n:>6}{len(pool.atoms):>7}{plain:>9.1f}{hooked:>10.1f}{100 * (hooked - plain) / plain:>10.2f}%"
              f"{per_layer:>15.3f} ms{one_call:>12.3f} ms")


if __name__ == "__main__":
    main()
