"""The fine-tuning pipeline: calibrate, train predictors, fine-tune with the sparse operators,
evaluate the adapter with the dense model (DESIGN.md sections 1 and 7)."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch

from .config import LongExposureConfig
from .models.opt import Controller, convert, dense_forward, restore
from .peft import add_bottleneck_adapters, bitfit
from .predictors import DriftMonitor, PredictorSet, model_fingerprint

METHODS = ("lora_qv", "lora_all", "prefix", "ptuning", "bitfit", "bottleneck")


def apply_method(model, method: str, rank: int = 16, virtual_tokens: int = 8):
    """The model with the PEFT method attached and only its parameters trainable (a peft model
    for the LoRA, prefix and P-tuning methods)."""
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("bitfit", "bottleneck"):
        (bitfit if method == "bitfit" else lambda m: add_bottleneck_adapters(m, rank))(model)
        return model
    import peft

    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("lora"):
        targets = ["q_proj", "v_proj"] if method == "lora_qv" else ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    elif method == "prefix":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    else:
        config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens,
                                          encoder_hidden_size=model.config.hidden_size,
                                          token_dim=model.config.word_embed_proj_dim)
    return peft.get_peft_model(model, config)


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    mlp_density: dict[int, float] = field(default_factory=dict)  # mean over steps, per layer
    attn_density: dict[int, float] = field(default_factory=dict)
    drift_events: list = field(default_factory=list)


def finetune(model, blocks: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
             monitor: DriftMonitor | None = None, controller: Controller | None = None,
             progress: bool = True, desc: str = "fine-tuning", capture: bool | None = None) -> FinetuneResult:
    """Train the model's trainable parameters on [n, seq] token blocks with AdamW.

    With `capture` (the default for a model on a GPU), each step is one replay of a CUDA graph
    (CapturedStep); a step that cannot be captured runs eagerly, with a warning."""
    from tqdm.auto import tqdm

    from .captured_step import CapturedStep, causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: attach a PEFT method first")
    on_gpu = params[0].is_cuda
    if capture and not on_gpu:
        raise ValueError("capture=True needs the model on a CUDA device")
    capture = on_gpu if capture is None else capture
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, capturable=capture)
    captured = CapturedStep(model, optimizer) if capture else None
    device = params[0].device
    generator = torch.Generator().manual_seed(seed)
    result = FinetuneResult()
    sums: dict = {}
    model.train()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)].to(device)
        started = time.perf_counter()
        if captured is not None:
            try:
                loss = captured(batch)
            except RuntimeError as error:  # CapturedStep has put the model and optimizer back
                warnings.warn(f"{error}; fine-tuning continues with eager steps", stacklevel=2)
                captured = None
        if captured is None:
            loss = causal_lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.step_seconds.append(time.perf_counter() - started)
        if controller is not None:  # summed on the device: no host sync per step
            for key, density in controller.densities.items():
                sums[key] = sums.get(key, 0.0) + density
        if monitor is not None and monitor.due(step):
            events = monitor.check(step, batch)
            result.drift_events += events
            if events and captured is not None:
                captured.invalidate()  # the graph holds the predictors' old thresholds and dense marks
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    for (layer, part), total in sums.items():
        (result.mlp_density if part == "mlp" else result.attn_density)[layer] = float(total) / steps
    return result


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss over the blocks, with the dense model (a converted model's controller
    is switched to "off" for the evaluation and back afterwards)."""
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        device = next(model.parameters()).device
        with dense_forward(model):
            for start in range(0, len(blocks), batch_size):
                batch = blocks[start : start + batch_size].to(device)
                total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
                count += len(batch)
    finally:
        model.train(was_training)
    return total / count


def calibrate_and_train_predictors(model, blocks: torch.Tensor, config: LongExposureConfig, batch_size: int = 8,
                                   holdout_share: float = 0.25, steps: int = 300, permute: bool = True,
                                   progress: bool = True):
    """Predictors for the frozen model from [n, seq] calibration blocks: (PredictorSet, reports).

    With `permute`, the model's MLP neurons are first reordered in place (function-preserving) so
    that co-active neurons share blocks; the order is kept in the predictors' neuron_orders."""
    from .permutation import calibrated_orders, permute_model

    device = next(model.parameters()).device
    batches = list(blocks.to(device).split(batch_size))
    n_holdout = max(1, int(len(batches) * holdout_share))
    if len(batches) < 2:
        raise ValueError(f"calibration needs at least {2 * batch_size} sequences, got {len(blocks)}")
    orders = None
    if permute:
        orders = calibrated_orders(model, batches[:-n_holdout], config.tile_m, config.block_n)
        permute_model(model, orders)
    predictors = PredictorSet(config, model_fingerprint(model)).to(device)
    if orders is not None:
        predictors.neuron_orders.copy_(torch.stack(orders))
    reports = predictors.fit(model, batches[:-n_holdout], batches[-n_holdout:], steps=steps, progress=progress)
    return predictors, reports


def unpermute(model, predictors) -> None:
    """Return a model permuted for `predictors` (and its LoRA factors) to the original neuron order,
    so that its adapter fits the unpermuted model."""
    from .permutation import inverse, permute_model

    permute_model(model, inverse(predictors.neuron_orders))


@dataclass
class QualityResult:
    dense_loss: float
    sparse_loss: float
    dense: FinetuneResult
    sparse: FinetuneResult
    predictor_reports: list

    @property
    def gap(self) -> float:
        """Relative difference of the Long Exposure adapter's held-out loss from the dense one's."""
        return (self.sparse_loss - self.dense_loss) / self.dense_loss


def quality_comparison(base_model, finetune_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                       config: LongExposureConfig, method: str = "lora_qv", rank: int = 16, steps: int = 200,
                       batch_size: int = 8, lr: float = 1e-3, calibration_sequences: int = 64,
                       progress: bool = True) -> QualityResult:
    """DESIGN.md section 7: fine-tune the same model on the same data for the same steps, once
    dense and once with Long Exposure, and evaluate both adapters with the dense model."""
    for p in base_model.parameters():
        p.requires_grad_(False)
    predictors, reports = calibrate_and_train_predictors(base_model, finetune_blocks[:calibration_sequences], config,
                                                         batch_size=batch_size, progress=progress)
    dense_model = apply_method(copy.deepcopy(base_model), method, rank)
    dense = finetune(dense_model, finetune_blocks, steps, batch_size, lr, progress=progress, desc="dense fine-tuning")
    sparse_model = apply_method(copy.deepcopy(base_model), method, rank)
    controller = convert(sparse_model, predictors=predictors)
    monitor = DriftMonitor(predictors, sparse_model) if config.drift_every else None
    sparse = finetune(sparse_model, finetune_blocks, steps, batch_size, lr, monitor=monitor, controller=controller,
                      progress=progress, desc="Long Exposure fine-tuning")
    restore(sparse_model)
    unpermute(sparse_model, predictors)
    return QualityResult(evaluate(dense_model, eval_blocks, batch_size), evaluate(sparse_model, eval_blocks, batch_size),
                         dense, sparse, reports)
