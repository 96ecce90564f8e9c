"""The Exposer: a calibration pass of the frozen model that measures, per layer, where the
activation mass lies, and turns it into ground-truth block masks under explicit policies.

MLP: the mass of relu(fc1(x)) in every (token tile, neuron block). Attention: the post-softmax
mass of every (query block, key block) of every head. Each policy reports the density it keeps
and the relative error its mask causes in the layer's output, so approximation is always measured.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import reference


# ---- MLP --------------------------------------------------------------------------------------

def tile_block_sums(values: torch.Tensor, tile_m: int, block_n: int) -> torch.Tensor:
    """Sums of a [T, F] map over every (tile of tile_m rows, block of block_n columns): [n_tiles, n_blocks]."""
    T, F = values.shape
    padded = torch.nn.functional.pad(values, (0, (-F) % block_n, 0, (-T) % tile_m))
    return padded.view(math.ceil(T / tile_m), tile_m, -1, block_n).sum(dim=(1, 3))


def tile_sums(values: torch.Tensor, tile_m: int) -> torch.Tensor:
    """Sums of a [T, F] map over every tile of tile_m rows: [n_tiles, F]."""
    T, F = values.shape
    return torch.nn.functional.pad(values, (0, 0, 0, (-T) % tile_m)).view(-1, tile_m, F).sum(1)


@dataclass(frozen=True)
class MlpThresholdPolicy:
    """Keep a (tile, block) when more than `neuron_share` of the block's neurons carry at least
    `activation_fraction` of the block's largest activation accumulated over the tile."""

    neuron_share: float = 0.10
    activation_fraction: float = 0.05

    def mask(self, h: torch.Tensor, tile_m: int, block_n: int) -> torch.Tensor:
        acc = tile_sums(h, tile_m)  # [n_tiles, F]
        n_tiles, F = acc.shape
        blocks = torch.nn.functional.pad(acc, (0, (-F) % block_n)).view(n_tiles, -1, block_n)
        peak = blocks.amax(-1, keepdim=True)
        carrying = ((blocks >= self.activation_fraction * peak) & (peak > 0)).sum(-1)
        sizes = torch.full((blocks.shape[1],), block_n, device=h.device)
        sizes[-1] = F - block_n * (blocks.shape[1] - 1)
        return carrying > self.neuron_share * sizes


@dataclass(frozen=True)
class MlpMassPolicy:
    """Keep, per tile, the fewest blocks that hold 1 - eps of the tile's activation mass."""

    eps: float = 0.01

    def mask(self, h: torch.Tensor, tile_m: int, block_n: int) -> torch.Tensor:
        return coverage_mask(tile_block_sums(h, tile_m, block_n), 1.0 - self.eps)


def coverage_mask(mass: torch.Tensor, coverage: float, always: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of [..., n] non-negative mass: the fewest entries (largest first) whose sum reaches
    `coverage` of the row (plus `always`, a boolean [..., n] of entries kept regardless)."""
    kept = torch.zeros_like(mass, dtype=torch.bool) if always is None else always.clone()
    total = mass.sum(-1, keepdim=True)
    base = (mass * kept).sum(-1, keepdim=True)
    rest = mass.masked_fill(kept, 0.0)
    values, order = rest.sort(-1, descending=True)
    before = base + values.cumsum(-1) - values  # mass held before taking each entry
    take = (before < coverage * total) & (values > 0)
    kept.scatter_(-1, order, take | kept.gather(-1, order))
    return kept


def mlp_output_error(h: torch.Tensor, fc2_weight: torch.Tensor, keep: torch.Tensor, tile_m: int, block_n: int) -> float:
    """Relative error ||fc2(h) - fc2(h on kept blocks)|| / ||fc2(h)|| (biases cancel)."""
    T, F = h.shape
    dense_keep = keep.repeat_interleave(tile_m, 0)[:T].repeat_interleave(block_n, 1)[:, :F]
    dropped = h.masked_fill(dense_keep, 0.0) @ fc2_weight.t()
    full = h @ fc2_weight.t()
    return (dropped.norm() / full.norm().clamp_min(1e-30)).item()


# ---- attention --------------------------------------------------------------------------------

def attention_block_mass(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Post-softmax causal attention mass per (query block, key block): [B, H, n, n], each row
    summing to the number of queries in the block. q is already scaled."""
    B, H, S, _ = q.shape
    scores = q @ k.transpose(-1, -2)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, -math.inf).softmax(-1)
    n = math.ceil(S / block)
    pad = n * block - S
    probs = torch.nn.functional.pad(probs, (0, pad, 0, pad))
    return probs.view(B, H, n, block, n, block).sum(dim=(3, 5))


@dataclass(frozen=True)
class AttentionMassPolicy:
    """Keep, per head and query block, the fewest key blocks holding `coverage` of the block's
    attention mass; the diagonal block is always kept."""

    coverage: float = 0.95

    def mask(self, block_mass: torch.Tensor) -> torch.Tensor:
        n = block_mass.shape[-1]
        diagonal = torch.eye(n, dtype=torch.bool, device=block_mass.device).expand_as(block_mass)
        return coverage_mask(block_mass, self.coverage, always=diagonal)


def causal_density(keep: torch.Tensor) -> float:
    """Share of the causal block grid a [..., n, n] mask keeps."""
    n = keep.shape[-1]
    return (keep.tril().sum() / (keep[..., 0, 0].numel() * n * (n + 1) / 2)).item()


def mass_covered(target: torch.Tensor, keep: torch.Tensor) -> float:
    """Share of the attention mass of row-normalised [..., n, n] block maps that `keep` holds."""
    return ((target * keep).sum() / target.sum()).item()


def attention_output_error(q, k, v, keep: torch.Tensor, block: int) -> float:
    """Relative error of block-sparse attention under `keep` [B or 1, H, n, n] against dense causal attention."""
    from .formats import BlockLayout

    layout = BlockLayout.from_dense(keep, block)
    sparse, _ = reference.block_sparse_attention(q, k, v, layout.counts, layout.indices, block, 1.0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    return ((sparse - dense).norm() / dense.norm().clamp_min(1e-30)).item()


# ---- capturing a model's activations ----------------------------------------------------------

def decoder_layers(model) -> list:
    """The OPT decoder layers of a plain or peft-wrapped OPTForCausalLM, in order."""
    layers = [m for m in model.modules() if type(m).__name__ == "OPTDecoderLayer"]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no OPT decoder layers; Long Exposure supports OPT models")
    return layers


@dataclass
class LayerCapture:
    """What one forward pass shows of one layer."""

    attn_input: torch.Tensor | None = None  # [B, S, d], after the attention LayerNorm
    q: torch.Tensor | None = None  # [B, H, S, D], scaled as the model scales it
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mlp_input: torch.Tensor | None = None  # [T, d], after the MLP LayerNorm
    pre_activation: torch.Tensor | None = None  # [T, F], fc1 output


@contextmanager
def capture_layers(model):
    """Within the block, every forward pass fills one LayerCapture per decoder layer (detached, fp32)."""
    layers = decoder_layers(model)
    captures = [LayerCapture() for _ in layers]
    handles = []

    def heads(t, attn):
        B, S, _ = t.shape
        return t.detach().float().view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)

    for layer, cap in zip(layers, captures):
        attn = layer.self_attn

        def on_attn(module, args, kwargs, cap=cap):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cap.attn_input = hidden.detach().float()

        def on_q(module, args, out, cap=cap, attn=attn):
            cap.q = heads(out, attn) * attn.scaling

        def on_k(module, args, out, cap=cap, attn=attn):
            cap.k = heads(out, attn)

        def on_v(module, args, out, cap=cap, attn=attn):
            cap.v = heads(out, attn)

        def on_fc1(module, args, out, cap=cap):
            cap.mlp_input = args[0].detach().float().reshape(-1, args[0].shape[-1])
            cap.pre_activation = out.detach().float().reshape(-1, out.shape[-1])

        handles += [
            attn.register_forward_pre_hook(on_attn, with_kwargs=True),
            attn.q_proj.register_forward_hook(on_q),
            attn.k_proj.register_forward_hook(on_k),
            attn.v_proj.register_forward_hook(on_v),
            layer.fc1.register_forward_hook(on_fc1),
        ]
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()


# ---- the exposer ------------------------------------------------------------------------------

@dataclass
class LayerReport:
    layer: int
    mlp_density: dict[str, float] = field(default_factory=dict)  # policy -> density
    mlp_error: dict[str, float] = field(default_factory=dict)  # policy -> relative fc2 output error
    attn_density: float = 0.0
    attn_error: float = 0.0


class Exposer:
    """Calibration of a frozen OPT model: ground-truth MLP and attention block masks per layer."""

    def __init__(self, model, tile_m: int = 128, block_n: int = 128, attn_block: int = 64,
                 mlp_policies: dict | None = None, attn_policy: AttentionMassPolicy | None = None):
        self.model = model
        self.tile_m, self.block_n, self.attn_block = tile_m, block_n, attn_block
        self.mlp_policies = mlp_policies or {"threshold": MlpThresholdPolicy(), "mass": MlpMassPolicy()}
        self.attn_policy = attn_policy or AttentionMassPolicy()
        self.layers = decoder_layers(model)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> list[LayerCapture]:
        from .models.opt import dense_forward

        # A converted model runs its dense modules here, so the hooks see every activation.
        with capture_layers(self.model) as captures, dense_forward(self.model):
            self.model(input_ids=input_ids)
        return captures

    def mlp_masks(self, cap: LayerCapture) -> dict[str, torch.Tensor]:
        h = torch.relu(cap.pre_activation)
        return {name: policy.mask(h, self.tile_m, self.block_n) for name, policy in self.mlp_policies.items()}

    def attention_mass(self, cap: LayerCapture) -> torch.Tensor:
        return attention_block_mass(cap.q, cap.k, self.attn_block)

    @torch.no_grad()
    def report(self, batches) -> list[LayerReport]:
        """Density and output error of every policy, per layer, averaged over `batches` of input ids."""
        reports = [LayerReport(i) for i in range(len(self.layers))]
        n_batches = 0
        for input_ids in batches:
            n_batches += 1
            for report, layer, cap in zip(reports, self.layers, self.capture(input_ids)):
                h = torch.relu(cap.pre_activation)
                for name, keep in self.mlp_masks(cap).items():
                    report.mlp_density[name] = report.mlp_density.get(name, 0.0) + keep.sum().item() / keep.numel()
                    error = mlp_output_error(h, layer.fc2.weight.detach().float(), keep, self.tile_m, self.block_n)
                    report.mlp_error[name] = report.mlp_error.get(name, 0.0) + error
                keep = self.attn_policy.mask(self.attention_mass(cap))
                report.attn_density += causal_density(keep)
                report.attn_error += attention_output_error(cap.q, cap.k, cap.v, keep, self.attn_block)
        if n_batches == 0:
            raise ValueError("no calibration batches")
        for report in reports:
            report.mlp_density = {k: v / n_batches for k, v in report.mlp_density.items()}
            report.mlp_error = {k: v / n_batches for k, v in report.mlp_error.items()}
            report.attn_density /= n_batches
            report.attn_error /= n_batches
        return reports
