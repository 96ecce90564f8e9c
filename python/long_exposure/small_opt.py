"""A small ReLU OPT, built from OPTConfig and pretrained here on the corpus.

Real checkpoints cannot be downloaded on these machines. A small model trained on real text has
real activation statistics (sparse ReLU activations, structured attention), which is what the
exposer, the predictors and the quality test need; random weights do not.
"""

from __future__ import annotations

import math

import torch

from .data import ByteTokenizer


def small_opt_config(hidden: int = 128, layers: int = 4, heads: int = 4, ffn: int = 512, max_positions: int = 512):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
        num_attention_heads=heads, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
        do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
        pad_token_id=ByteTokenizer.separator, bos_token_id=ByteTokenizer.separator,
        eos_token_id=ByteTokenizer.separator,
    )


def build_small_opt(seed: int = 0, **config):
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(small_opt_config(**config))
    model.config._attn_implementation = "sdpa"
    return model


def pretrain(model, blocks: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
             progress: bool = True, seconds: float | None = None) -> list[float]:
    """Plain next-token training on [n, seq] token blocks, where the model lies (bf16 autocast on a
    GPU); returns the loss of every step. With `seconds`, it stops when that much time has passed,
    and the warm-up and cosine schedule run to `steps` or to `seconds`, whichever comes first, so a
    run cut by the clock still ends at a low learning rate."""
    import contextlib
    import time

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=on_gpu)
    warmup = max(1, steps // 10)
    blocks = blocks.to(device)  # the whole corpus is tens of MB: no copy per step
    model.train()
    losses = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="pretraining", disable=not progress, leave=False)
    for step in bar:
        elapsed = time.perf_counter() - started  # loss.item() below syncs: the device's time too
        if seconds is not None and elapsed >= seconds:
            break
        done = max(step / steps, elapsed / seconds if seconds else 0.0)
        warm = min(1.0, max((step + 1) / warmup, 10 * done))
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator).to(device)]
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise ValueError(f"pretraining diverged: loss {losses[-1]} at step {step + 1}; try a smaller learning rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
