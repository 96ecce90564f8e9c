"""Predictors: cheap per-token models, trained on the exposer's labels, that choose each step's
block masks (DESIGN.md section 1).

MLP: a low-rank map from the MLP input to per-neuron-block logits; a block is active in a token
tile when any of its tokens' logits passes the layer's threshold (at least one block per tile).
The threshold is calibrated so that the kept blocks hold `target_recall` of the activation mass
that the exposer's mask keeps. Attention: per-head low-rank Q/K sketches of block-pooled hidden
states give a block score map per head, projected onto the pattern pool.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import LongExposureConfig
from .exposer import Exposer, causal_density, mass_covered, tile_block_sums
from .formats import MlpMask

logger = logging.getLogger("long_exposure")

WEIGHTS_FILE = "predictors.safetensors"
CONFIG_FILE = "long_exposure.json"
FORMAT_VERSION = 1


def model_fingerprint(model) -> dict:
    """The shape facts a predictor set depends on."""
    config = model.config
    if getattr(config, "model_type", None) != "opt":
        raise TypeError(f"Long Exposure supports OPT models, not {getattr(config, 'model_type', type(model).__name__)!r}")
    return {
        "model_type": "opt",
        "hidden_size": config.hidden_size,
        "ffn_dim": config.ffn_dim,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
    }


# ---- the two predictors -----------------------------------------------------------------------

class MlpPredictor(nn.Module):
    def __init__(self, d_model: int, n_blocks: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, n_blocks)
        self.register_buffer("threshold", torch.zeros(()))
        # A host copy of the threshold, so that building a step's mask never reads the device.
        self._threshold = 0.0

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(value)
        self._threshold = float(value)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._threshold = float(self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token block logits [..., n_blocks]."""
        return self.up(self.down(x))

    @torch.no_grad()
    def tile_max(self, x: torch.Tensor, tile_m: int) -> torch.Tensor:
        """The largest logit of each block over each tile of tokens: [n_tiles, n_blocks]."""
        logits = self(x.reshape(-1, x.shape[-1])).float()
        T = logits.shape[0]
        logits = torch.nn.functional.pad(logits, (0, 0, 0, (-T) % tile_m), value=-math.inf)
        return logits.view(-1, tile_m, logits.shape[1]).amax(1)

    @torch.no_grad()
    def keep(self, x: torch.Tensor, tile_m: int) -> torch.Tensor:
        """Boolean [n_tiles, n_blocks]: blocks over the threshold, and each tile's best block."""
        scores = self.tile_max(x, tile_m)
        keep = scores > self._threshold
        best = torch.zeros_like(keep).scatter_(1, scores.argmax(1, keepdim=True), True)
        return keep | best

    @torch.no_grad()
    def mask(self, x: torch.Tensor, tile_m: int, block_n: int) -> MlpMask:
        """The step's MLP mask, by the fused core op (on x's device, no host synchronisation)."""
        from .ops.predictors import mlp_predictor_mask

        dtype = x.dtype
        return mlp_predictor_mask(x, self.down.weight.to(dtype), self.up.weight.to(dtype), self.up.bias.to(dtype),
                                  self._threshold, tile_m, block_n)


class AttentionPredictor(nn.Module):
    def __init__(self, d_model: int, heads: int, rank: int, block: int):
        super().__init__()
        self.block = block
        self.wq = nn.Parameter(torch.randn(heads, rank, d_model) * d_model**-0.5)
        self.wk = nn.Parameter(torch.randn(heads, rank, d_model) * d_model**-0.5)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean of the hidden states over each block of tokens: [B, n, d]."""
        B, S, d = hidden.shape
        n = math.ceil(S / self.block)
        sums = torch.nn.functional.pad(hidden, (0, 0, 0, n * self.block - S)).view(B, n, self.block, d).sum(2)
        counts = torch.full((n,), float(self.block), device=hidden.device)
        counts[-1] = S - self.block * (n - 1)
        return sums / counts[:, None]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log block scores [B, H, n, n]: each query block's distribution over causal key blocks."""
        pooled = self.pooled(hidden)
        qs = torch.einsum("bnd,hrd->bhnr", pooled, self.wq)
        ks = torch.einsum("bnd,hrd->bhnr", pooled, self.wk)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(self.wq.shape[1])
        n = scores.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        return scores.masked_fill(~causal, -math.inf).log_softmax(-1)

    @torch.no_grad()
    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Block score maps [B, H, n, n] (each row a distribution), by the core op."""
        from .ops.predictors import attention_block_scores

        return attention_block_scores(hidden, self.wq.to(hidden.dtype), self.wk.to(hidden.dtype), self.block)

    @torch.no_grad()
    def layout(self, hidden: torch.Tensor, pool, coverage: float):
        """(kv BlockLayout per sequence, q lists, density [B, H], covered [B, H]) from the pool."""
        scores = self.scores(hidden)
        selection, density, covered = pool.project(scores, coverage)
        layout, q_lists = pool.combine(selection.to(pool.device), self.block)
        return layout, q_lists, density, covered


# ---- training and evaluation ------------------------------------------------------------------

def train_mlp_predictor(x: torch.Tensor, labels: torch.Tensor, rank: int, steps: int = 300, lr: float = 3e-3,
                        pos_weight: float = 4.0, noise: float = 0.05, batch: int = 1024, seed: int = 0,
                        predictor: MlpPredictor | None = None) -> MlpPredictor:
    """Fit per-token block logits to boolean labels [N, n_blocks]. The positive class weighs
    `pos_weight` times more (recall first) and inputs get Gaussian noise of `noise` times their
    scale, so the predictor tolerates the drift an adapter causes."""
    # Samples and noise are drawn where x lies: on the host, drawing them costs more than the step.
    generator = torch.Generator(x.device).manual_seed(seed)
    if predictor is None:
        torch.manual_seed(seed)
        predictor = MlpPredictor(x.shape[1], labels.shape[1], rank).to(x.device)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=x.device))
    scale = x.std()
    predictor.train()
    for _ in range(steps):
        rows = torch.randint(len(x), (min(batch, len(x)),), generator=generator, device=x.device)
        inputs = x[rows] + noise * scale * torch.randn(len(rows), x.shape[1], generator=generator, device=x.device)
        loss = loss_fn(predictor(inputs), labels[rows].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    predictor.eval()
    return predictor


def calibrate_threshold(tile_max: torch.Tensor, mass: torch.Tensor, target: torch.Tensor, recall: float) -> float:
    """The largest threshold at which blocks scoring above it hold `recall` of the mass of the
    target mask. All arguments are [n_tiles, n_blocks] (stacked over calibration batches)."""
    scores = tile_max[target]
    weights = mass[target]
    total = weights.sum()
    if total <= 0:
        return float(tile_max.max()) if tile_max.numel() else 0.0
    order = scores.argsort(descending=True)
    held = weights[order].cumsum(0)
    needed = int(torch.searchsorted(held, recall * total).clamp(max=len(order) - 1))
    value = float(scores[order][needed])
    return value - 1e-6 * (1.0 + abs(value))  # strictly below: the op keeps blocks with logit > threshold


def calibration_recall(target: float) -> float:
    """The recall thresholds are calibrated to: three quarters of the way from the target to 1, a margin for the
    sampling error of a threshold estimated on a few batches."""
    return target + (1.0 - target) * 3 / 4


@dataclass
class MlpMetrics:
    recall: float  # share of the exposer's (tile, block) pairs the prediction keeps
    precision: float  # share of the predicted pairs the exposer keeps
    density: float  # share of all pairs the prediction keeps
    mass_recall: float  # share of the exposer mask's activation mass the prediction keeps
    exposer_density: float


def mlp_metrics(predicted: torch.Tensor, target: torch.Tensor, mass: torch.Tensor) -> MlpMetrics:
    both = (predicted & target).sum().item()
    return MlpMetrics(
        recall=both / max(1, target.sum().item()),
        precision=both / max(1, predicted.sum().item()),
        density=predicted.float().mean().item(),
        mass_recall=((mass * (predicted & target)).sum() / (mass * target).sum().clamp_min(1e-30)).item(),
        exposer_density=target.float().mean().item(),
    )


def train_attention_predictor(hidden: torch.Tensor, target: torch.Tensor, heads: int, rank: int, block: int,
                              steps: int = 300, lr: float = 3e-3, noise: float = 0.05, seed: int = 0,
                              predictor: AttentionPredictor | None = None) -> AttentionPredictor:
    """Fit the score maps to the exposer's row-normalised block mass [N, H, n, n] (cross-entropy
    between distributions over key blocks) from hidden states [N, S, d]."""
    generator = torch.Generator(hidden.device).manual_seed(seed)
    if predictor is None:
        torch.manual_seed(seed)
        predictor = AttentionPredictor(hidden.shape[-1], heads, rank, block).to(hidden.device)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    scale = hidden.std()
    predictor.train()
    for _ in range(steps):
        rows = torch.randint(len(hidden), (min(8, len(hidden)),), generator=generator, device=hidden.device)
        inputs = hidden[rows] + noise * scale * torch.randn(hidden[rows].shape, generator=generator,
                                                            device=hidden.device)
        log_scores = predictor(inputs)
        loss = -(target[rows] * log_scores.masked_fill(torch.isinf(log_scores), 0.0)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    predictor.eval()
    return predictor


def row_normalised(block_mass: torch.Tensor) -> torch.Tensor:
    return block_mass / block_mass.sum(-1, keepdim=True).clamp_min(1e-30)


@dataclass
class LayerPredictorReport:
    layer: int
    mlp: MlpMetrics
    attn_density: float  # share of the causal block grid the predicted layouts keep
    attn_covered: float  # share of the true attention mass the predicted layouts keep
    attn_exposer_density: float


# ---- a model's predictors ---------------------------------------------------------------------

@dataclass
class _LayerData:
    mlp_x: list = field(default_factory=list)  # [T, d] per batch
    token_labels: list = field(default_factory=list)  # [T, n_blocks] per batch
    tile_mass: list = field(default_factory=list)  # [n_tiles, n_blocks] per batch
    tile_target: list = field(default_factory=list)  # [n_tiles, n_blocks] per batch
    attn_hidden: list = field(default_factory=list)  # [B, S, d] per batch
    attn_target: list = field(default_factory=list)  # [B, H, n, n] per batch
    attn_keep: list = field(default_factory=list)  # the exposer's attention masks


class PredictorSet(nn.Module):
    """Every layer's MLP and attention predictor for one model, with their config."""

    def __init__(self, config: LongExposureConfig, fingerprint: dict):
        super().__init__()
        self.config, self.fingerprint = config, fingerprint
        d, F, H = fingerprint["hidden_size"], fingerprint["ffn_dim"], fingerprint["num_attention_heads"]
        n_blocks = math.ceil(F / config.block_n)
        layers = fingerprint["num_hidden_layers"]
        self.mlp = nn.ModuleList(MlpPredictor(d, n_blocks, config.mlp_rank) for _ in range(layers))
        self.attn = nn.ModuleList(AttentionPredictor(d, H, config.attn_rank, config.attn_block) for _ in range(layers))
        # The neuron order the model was permuted to before calibration (identity: not permuted).
        self.register_buffer("neuron_orders", torch.arange(F).repeat(layers, 1))
        # Layers whose MLP or attention the drift monitor sent back to dense computation.
        self.register_buffer("dense_mlp", torch.zeros(layers, dtype=torch.bool))
        self.register_buffer("dense_attn", torch.zeros(layers, dtype=torch.bool))
        # Host copies of the flags: every layer reads them every step, which must not sync.
        self._dense = {"mlp": set(), "attention": set()}

    def is_dense(self, part: str, layer: int) -> bool:
        """Whether the drift monitor sent this layer's "mlp" or "attention" to dense computation."""
        return layer in self._dense[part]

    def mark_dense(self, part: str, layer: int) -> None:
        (self.dense_mlp if part == "mlp" else self.dense_attn)[layer] = True
        self._dense[part].add(layer)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._dense = {"mlp": set(torch.nonzero(self.dense_mlp.cpu()).flatten().tolist()),
                       "attention": set(torch.nonzero(self.dense_attn.cpu()).flatten().tolist())}

    # -- calibration data

    def _layer_data(self, model, batches) -> list[_LayerData]:
        cfg = self.config
        exposer = Exposer(model, cfg.tile_m, cfg.block_n, cfg.attn_block,
                          mlp_policies={cfg.mlp_policy: cfg.mlp_policy_object()}, attn_policy=cfg.attn_policy_object())
        policy = cfg.mlp_policy_object()
        data = [_LayerData() for _ in self.mlp]
        device = next(model.parameters()).device
        for input_ids in batches:
            for layer, cap in zip(data, exposer.capture(input_ids.to(device))):
                h = torch.relu(cap.pre_activation)
                layer.mlp_x.append(cap.mlp_input)
                # A token's label is what the policy keeps for a tile of that one token.
                layer.token_labels.append(policy.mask(h, 1, cfg.block_n))
                layer.tile_mass.append(tile_block_sums(h, cfg.tile_m, cfg.block_n))
                layer.tile_target.append(policy.mask(h, cfg.tile_m, cfg.block_n))
                mass = exposer.attention_mass(cap)
                layer.attn_hidden.append(cap.attn_input)
                layer.attn_target.append(row_normalised(mass))
                layer.attn_keep.append(cfg.attn_policy_object().mask(mass))
        return data

    def fit(self, model, batches: list[torch.Tensor], holdout: list[torch.Tensor], steps: int = 300,
            progress: bool = True) -> list[LayerPredictorReport]:
        """Train every layer's predictors on `batches` of input ids, calibrate the MLP thresholds
        and report on `holdout` batches."""
        from tqdm.auto import tqdm

        if not batches or not holdout:
            raise ValueError("fitting predictors needs calibration batches and held-out batches")
        if model_fingerprint(model) != self.fingerprint:
            raise ValueError("this predictor set was made for another model shape")
        # The thresholds are calibrated on batches the predictors did not train on (a quarter of
        # them), since the predictors fit their own training batches better than new text.
        n_calibrate = len(batches) // 4 if len(batches) >= 4 else 0
        fit_batches = batches[: len(batches) - n_calibrate]
        train = self._layer_data(model, fit_batches)
        calibrate = self._layer_data(model, batches[len(fit_batches):]) if n_calibrate else train
        held = self._layer_data(model, holdout)
        cfg = self.config
        for index in tqdm(range(len(self.mlp)), desc="training predictors", disable=not progress, leave=False):
            data = train[index]
            train_mlp_predictor(torch.cat(data.mlp_x), torch.cat(data.token_labels), cfg.mlp_rank, steps=steps,
                                seed=index, predictor=self.mlp[index])
            check = calibrate[index]
            tile_max = torch.cat([self.mlp[index].tile_max(x, cfg.tile_m) for x in check.mlp_x])
            threshold = calibrate_threshold(tile_max, torch.cat(check.tile_mass), torch.cat(check.tile_target),
                                            calibration_recall(cfg.target_recall))
            self.mlp[index].set_threshold(threshold)
            train_attention_predictor(torch.cat(data.attn_hidden), torch.cat(data.attn_target),
                                      self.fingerprint["num_attention_heads"], cfg.attn_rank, cfg.attn_block,
                                      steps=steps, seed=index, predictor=self.attn[index])
        return self.evaluate_data(held)

    def evaluate(self, model, batches: list[torch.Tensor]) -> list[LayerPredictorReport]:
        return self.evaluate_data(self._layer_data(model, batches))

    @torch.no_grad()
    def evaluate_data(self, data: list[_LayerData]) -> list[LayerPredictorReport]:
        from .pool import PatternPool

        cfg = self.config
        reports = []
        for index, layer in enumerate(data):
            predicted = torch.cat([self.mlp[index].keep(x, cfg.tile_m) for x in layer.mlp_x])
            mlp = mlp_metrics(predicted, torch.cat(layer.tile_target), torch.cat(layer.tile_mass))
            n = layer.attn_target[0].shape[-1]
            pool = PatternPool(n, device=layer.attn_hidden[0].device)
            density, covered, exposer_density = [], [], []
            for hidden, target, keep in zip(layer.attn_hidden, layer.attn_target, layer.attn_keep):
                grid, _, d, _ = self.attn[index].layout(hidden, pool, cfg.attn_coverage)
                active = grid.to_dense()
                density.append(d.mean().item())
                covered.append(mass_covered(target, active))
                exposer_density.append(causal_density(keep))
            reports.append(LayerPredictorReport(index, mlp, sum(density) / len(density), sum(covered) / len(covered),
                                                sum(exposer_density) / len(exposer_density)))
        return reports

    # -- persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write predictors.safetensors and long_exposure.json into `directory`, all or nothing."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".long_exposure-", dir=directory.parent))
        try:
            tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
            save_file(tensors, staging / WEIGHTS_FILE)
            meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict(), "model": self.fingerprint}
            (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            directory.mkdir(exist_ok=True)
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(staging / name, directory / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None, config: LongExposureConfig | None = None) -> "PredictorSet":
        """Read a saved set; refuse it when it was made for another model shape than `model`'s or
        other block sizes than `config`'s."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not meta_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(f"{directory} holds no saved predictors ({CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(meta_file.read_text())
            saved_config = LongExposureConfig.from_dict(meta["config"])
            fingerprint = meta["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{meta_file} is not a Long Exposure predictor config ({error})") from error
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        if model is not None:
            actual = model_fingerprint(model)
            if actual != fingerprint:
                diff = ", ".join(f"{k}: saved {fingerprint.get(k)} vs model {actual[k]}" for k in actual if fingerprint.get(k) != actual[k])
                raise ValueError(f"the predictors in {directory} were made for another model ({diff})")
        if config is not None:
            for name in ("tile_m", "block_n", "attn_block", "mlp_rank", "attn_rank"):
                if getattr(config, name) != getattr(saved_config, name):
                    raise ValueError(f"the predictors in {directory} were made for {name}={getattr(saved_config, name)}, "
                                     f"not {getattr(config, name)}")
        predictors = cls(saved_config, fingerprint)
        predictors.load_state_dict(load_file(weights_file))
        return predictors


# ---- drift --------------------------------------------------------------------------------------

@dataclass
class DriftEvent:
    step: int
    layer: int
    part: str  # "mlp" or "attention"
    measured: float  # MLP: share of the exposer mask's mass kept; attention: share of the true mass covered
    target: float
    action: str  # "retrained" or "dense"


class DriftMonitor:
    """Every `every` steps, measures each layer's predictors against the exposer on the current
    batch (the adapter changes activations as it trains). An MLP predictor whose masks keep less
    than `recall` of the exposer mask's mass, or an attention predictor whose layouts cover less
    than attn_coverage x `recall` of the true attention mass, is retrained on that batch or sent to
    dense computation, and the event is logged."""

    def __init__(self, predictors: PredictorSet, model, every: int | None = None, recall: float | None = None,
                 action: str | None = None, retrain_steps: int = 100):
        cfg = predictors.config
        self.predictors, self.model = predictors, model
        self.every = cfg.drift_every if every is None else every
        self.recall = cfg.target_recall if recall is None else recall
        self.action = cfg.drift_action if action is None else action
        if self.action not in ("retrain", "dense"):
            raise ValueError(f"action must be 'retrain' or 'dense', got {self.action!r}")
        self.retrain_steps = retrain_steps
        self.events: list[DriftEvent] = []
        self._pools: dict = {}  # grid size -> PatternPool, built once

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, input_ids: torch.Tensor) -> list[DriftEvent]:
        """Measure now (call when `due(step)`); returns this check's events.

        Under torch.distributed every rank measures its own batch; the measurements are reduced
        to their minimum, so every rank takes the same decisions, and a retrained predictor is
        broadcast from rank 0, so the predictors stay identical across ranks."""
        from .pool import PatternPool

        cfg = self.predictors.config
        was_training = self.model.training
        self.model.eval()
        data = self.predictors._layer_data(self.model, [input_ids])
        self.model.train(was_training)
        wanted = {"mlp": self.recall, "attention": cfg.attn_coverage * self.recall}
        measured = []
        for index, layer in enumerate(data):
            mlp = attention = math.inf  # a dense layer has nothing to measure
            if not self.predictors.is_dense("mlp", index):
                kept = self.predictors.mlp[index].keep(layer.mlp_x[0], cfg.tile_m)
                mlp = mlp_metrics(kept, layer.tile_target[0], layer.tile_mass[0]).mass_recall
            if not self.predictors.is_dense("attention", index):
                target = layer.attn_target[0]
                n = target.shape[-1]
                if n not in self._pools:
                    self._pools[n] = PatternPool(n, device=target.device)
                grid, _, _, _ = self.predictors.attn[index].layout(layer.attn_hidden[0], self._pools[n],
                                                                   cfg.attn_coverage)
                attention = mass_covered(target, grid.to_dense())
            measured.append((mlp, attention))
        measured = _smallest_over_ranks(measured)
        events = []
        for index, (layer, values) in enumerate(zip(data, measured)):
            for part, value in zip(("mlp", "attention"), values):
                if value >= wanted[part]:
                    continue
                if self.action == "dense":
                    self.predictors.mark_dense(part, index)
                else:
                    self._retrain(part, index, layer, step)
                event = DriftEvent(step, index, part, value, wanted[part],
                                   "dense" if self.action == "dense" else "retrained")
                logger.info("drift at step %d: layer %d %s measures %.4f (target %.4f); %s", event.step,
                            event.layer, event.part, event.measured, event.target, event.action)
                events.append(event)
        self.events += events
        return events

    def _retrain(self, part: str, index: int, layer: _LayerData, step: int) -> None:
        cfg = self.predictors.config
        if part == "mlp":
            predictor = self.predictors.mlp[index]
            x, mass, target = layer.mlp_x[0], layer.tile_mass[0], layer.tile_target[0]
            train_mlp_predictor(x, layer.token_labels[0], cfg.mlp_rank, steps=self.retrain_steps, seed=step + index,
                                predictor=predictor)
            predictor.set_threshold(calibrate_threshold(predictor.tile_max(x, cfg.tile_m), mass, target,
                                                        calibration_recall(cfg.target_recall)))
        else:
            predictor = self.predictors.attn[index]
            target = layer.attn_target[0]
            train_attention_predictor(layer.attn_hidden[0], target, target.shape[1], cfg.attn_rank, cfg.attn_block,
                                      steps=self.retrain_steps, seed=step + index, predictor=predictor)
        if _world_size() > 1:
            import torch.distributed as dist

            for tensor in predictor.state_dict().values():
                dist.broadcast(tensor, src=0)
            if part == "mlp":
                predictor._threshold = float(predictor.threshold)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _smallest_over_ranks(measured: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Each value's minimum over all ranks (one collective); unchanged in a single process."""
    if _world_size() == 1:
        return measured
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor(measured, dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return [tuple(row) for row in values.tolist()]
