"""The settings of Long Exposure for one model, saved next to its predictors as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .exposer import AttentionMassPolicy, MlpMassPolicy, MlpThresholdPolicy


@dataclass
class LongExposureConfig:
    # tokens per MLP mask tile: 128-token tiles pass the quality test as 64-token ones do, and the
    # kernels run them 20-30% faster (they share each weight tile between two warpgroup rows)
    tile_m: int = 128
    block_n: int = 128  # neurons per MLP block
    attn_block: int = 64  # tokens per attention block (queries and keys)
    mlp_policy: str = "mass"  # the exposer's MLP policy: "mass" or "threshold"
    mlp_eps: float = 0.01  # mass policy: share of a tile's activation mass it may drop
    threshold_neuron_share: float = 0.10  # threshold policy (the paper's filter)
    threshold_activation_fraction: float = 0.05
    attn_coverage: float = 0.95  # share of each query block's attention mass the layout keeps
    mlp_rank: int = 64  # rank of the MLP predictor's projection
    attn_rank: int = 16  # rank of the attention predictor's per-head Q/K sketches
    target_recall: float = 0.99  # predicted MLP masks keep this share of the exposer mask's mass
    drift_every: int = 100  # steps between drift checks (0: never)
    drift_action: str = "retrain"  # a layer below target: "retrain" its predictor or run it "dense"
    # the causal-LM loss without HF's fp32 copy of the logits (ops/cross_entropy.py); False keeps HF's
    fused_loss: bool = True

    def __post_init__(self):
        for name in ("tile_m", "block_n", "attn_block", "mlp_rank", "attn_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mlp_policy not in ("mass", "threshold"):
            raise ValueError(f"mlp_policy must be 'mass' or 'threshold', got {self.mlp_policy!r}")
        if self.drift_action not in ("retrain", "dense"):
            raise ValueError(f"drift_action must be 'retrain' or 'dense', got {self.drift_action!r}")
        for name in ("mlp_eps", "threshold_neuron_share", "threshold_activation_fraction", "attn_coverage", "target_recall"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.drift_every < 0:
            raise ValueError(f"drift_every must be >= 0, got {self.drift_every}")

    def mlp_policy_object(self):
        if self.mlp_policy == "mass":
            return MlpMassPolicy(self.mlp_eps)
        return MlpThresholdPolicy(self.threshold_neuron_share, self.threshold_activation_fraction)

    def attn_policy_object(self) -> AttentionMassPolicy:
        return AttentionMassPolicy(self.attn_coverage)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LongExposureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Long Exposure settings: {', '.join(unknown)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
