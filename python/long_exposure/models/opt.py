"""Long Exposure for Hugging Face OPT models, plain or wrapped by peft.

`convert` replaces each decoder layer's forward with one that runs the block-sparse attention and
neuron-block MLP operators under the masks a `Controller` chooses. No module is replaced and no
parameter is renamed, so peft adapters, optimizers, transformers.Trainer, save_pretrained and
checkpoint resume see the model they expect; `restore` puts the original forwards back.

The layer forward mirrors OPTDecoderLayer.forward (pre- or post-LayerNorm, residuals, dropout),
and applies the bottleneck adapters of long_exposure.peft where a layer has them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LongExposureConfig
from ..exposer import decoder_layers
from ..formats import BlockLayout, MlpMask
from ..ops import block_sparse_attention, neuron_block_mlp
from ..ops import cross_entropy
from ..ops.projections import fused_projections

MODES = ("sparse", "full", "off")


@dataclass
class Controller:
    """Chooses every layer's masks for the current step.

    mode "sparse": masks from the predictors; "full": all-active masks through the sparse
    operators (they then compute the dense model exactly); "off": the model's own dense modules.
    """

    config: LongExposureConfig
    predictors: object | None = None  # a PredictorSet, needed for "sparse"
    mode: str = "sparse"
    # On a GPU, run each layer's attention predictor on a second stream, beside the q, k and v
    # projections that read the same input. None: only while a CUDA graph captures the step, where
    # it saved 1.7 ms of a 69.8 ms OPT-1.3B step at 2048 tokens on the H200; an eager step pays the
    # stream switches on the host, which eager steps are short of already (bench/RESULTS.md).
    overlap_attention_predictor: bool | None = None
    # (layer, "mlp" | "attention") -> the mask or layout of the last step, with its block count
    _used: dict = field(default_factory=dict)
    _pools: dict = field(default_factory=dict)
    _full: dict = field(default_factory=dict)  # all-active masks by shape: built once, not every step

    def __post_init__(self):
        self.set_mode(self.mode)

    @property
    def densities(self) -> dict:
        """(layer, "mlp" | "attention") -> the block density of the last step's mask, as a 0-d
        tensor. Computed when asked: each costs kernel launches, which a step need not pay."""
        return {key: used.density(*extra) for key, (used, *extra) in self._used.items()}

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sparse" and self.predictors is None:
            raise ValueError("sparse mode needs predictors (a PredictorSet); use mode='full' for all-active masks")
        self.mode = mode

    def mlp_mask(self, index: int, x: torch.Tensor, n_neurons: int) -> MlpMask:
        cfg = self.config
        if self.mode == "full" or self.predictors.is_dense("mlp", index):
            key = ("mlp", x.shape[0], n_neurons, x.device)
            if key not in self._full:
                self._full[key] = MlpMask.full(x.shape[0], n_neurons, cfg.tile_m, cfg.block_n, device=x.device)
            mask = self._full[key]
        else:
            mask = self.predictors.mlp[index].mask(x, cfg.tile_m, cfg.block_n)
        self._used[(index, "mlp")] = (mask, math.ceil(n_neurons / cfg.block_n))
        return mask

    def attention_layout(self, index: int, hidden: torch.Tensor, heads: int) -> BlockLayout:
        from ..pool import PatternPool

        cfg = self.config
        S = hidden.shape[1]
        if self.mode == "full" or self.predictors.is_dense("attention", index):
            key = ("attention", heads, S, hidden.device)
            if key not in self._full:
                self._full[key] = BlockLayout.causal(heads, S, cfg.attn_block, device=hidden.device)
            layout = self._full[key]
        else:
            n = math.ceil(S / cfg.attn_block)
            if n not in self._pools:
                self._pools[n] = PatternPool(n, device=hidden.device)
            layout, _, _, _ = self.predictors.attn[index].layout(hidden, self._pools[n], cfg.attn_coverage)
        self._used[(index, "attention")] = (layout,)
        return layout


@dataclass
class _LayerState:
    controller: Controller
    index: int


def _lora_parts(module: nn.Module, name: str):
    """(weight, bias, lora) of a Linear or a peft LoRA Linear; lora = (A, B, scaling, dropout) or None."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, module.bias, None
    if getattr(module, "merged", False):
        raise ValueError(f"{name}: merged LoRA weights cannot be split again; unmerge before converting")
    if getattr(module, "disable_adapters", False):  # inside peft's disable_adapter(): the base layer alone
        return base.weight, base.bias, None
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if len(adapters) > 1:
        raise ValueError(f"{name}: Long Exposure runs one active LoRA adapter per layer, found {adapters}")
    if not adapters:
        return base.weight, base.bias, None
    adapter = adapters[0]
    if module.use_dora.get(adapter, False) or adapter in getattr(module, "lora_variant", {}):
        raise ValueError(f"{name}: LoRA variants (DoRA and others) are not supported by Long Exposure's layers")
    if module.lora_B[adapter].bias is not None:
        raise ValueError(f"{name}: LoRA with a bias on its B factor (lora_bias) is not supported")
    return base.weight, base.bias, (module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                    module.scaling[adapter], module.lora_dropout[adapter])


def _drops(dropout: nn.Module) -> bool:
    """Whether a LoRA dropout module changes its input in this call (peft's is Identity at p = 0)."""
    return not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0 and dropout.training


def _linear(module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """module(x) for a Linear or a peft LoRA Linear, with the LoRA product in x's dtype, as the
    MLP's. peft runs it in the adapter's dtype, fp32 under a bf16 model: a copy of x to fp32 and
    one of its gradient back, per module and step (64 MiB each at OPT-1.3B with 8192 tokens)."""
    if not hasattr(module, "lora_A"):
        return module(x)
    weight, bias, lora = _lora_parts(module, name)
    y = nn.functional.linear(x, weight, bias)
    if lora is None:
        return y
    a, b, scale, dropout = lora
    return y + nn.functional.linear(nn.functional.linear(dropout(x), a.to(x.dtype)) * scale, b.to(x.dtype))


def _sparse_mlp(layer, x: torch.Tensor, state: _LayerState) -> torch.Tensor:
    w1, b1, lora1 = _lora_parts(layer.fc1, "fc1")
    w2, b2, lora2 = _lora_parts(layer.fc2, "fc2")
    mask = state.controller.mlp_mask(state.index, x, w1.shape[0])
    dtype = x.dtype
    lora1_u = lora1_b = lora2_a = None
    if lora1 is not None:
        a1, b1_factor, scale1, dropout1 = lora1
        lora1_u = (dropout1(x) @ a1.t().to(dtype)) * scale1  # the scale on the thin side
        lora1_b = b1_factor.to(dtype)
    if lora2 is not None:
        a2, _, _, dropout2 = lora2
        if _drops(dropout2):
            raise ValueError("LoRA dropout on fc2 is not supported: the hidden activation never leaves the operator")
        lora2_a = a2.to(dtype)
    y, lora2_v = neuron_block_mlp(x, w1.to(dtype), None if b1 is None else b1.to(dtype), w2.to(dtype),
                                  None if b2 is None else b2.to(dtype), mask, lora1_u, lora1_b, lora2_a)
    if lora2 is not None:
        _, b2_factor, scale2, _ = lora2
        y = torch.addmm(y, lora2_v * scale2, b2_factor.t().to(dtype))  # the add in the GEMM
    return y


def _projections(modules, names, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each module (a Linear or a peft LoRA Linear) applied to x, through fused_projections when it
    can take them: frozen weights, and no LoRA dropout in play (that keeps peft's own dropped input)."""
    parts = [_lora_parts(m, n) for m, n in zip(modules, names)]
    dropping = any(lora is not None and _drops(lora[3]) for _, _, lora in parts)
    plain = all(isinstance(getattr(m, "base_layer", m), nn.Linear) for m in modules)
    if dropping or not plain or any(w.requires_grad for w, _, _ in parts):
        return tuple(_linear(m, x, n) for m, n in zip(modules, names))
    dtype = x.dtype
    return fused_projections(x, [
        (w.to(dtype), None if b is None else b.to(dtype),
         None if lora is None else (lora[0].to(dtype), lora[1].to(dtype), lora[2]))
        for w, b, lora in parts])


def _sparse_attention(attn, hidden: torch.Tensor, cache, state: _LayerState) -> torch.Tensor:
    B, S, _ = hidden.shape
    H, D = attn.num_heads, attn.head_dim

    def heads(t):
        return t.view(B, S, H, D).transpose(1, 2)

    controller = state.controller
    side = _predictor_stream(hidden.device) if _overlaps_predictor(controller, hidden) else None
    if side is not None:
        # The predictor reads only `hidden`, as the projections do, and the layout is first read by
        # the attention kernel: the two can run side by side. No record_stream: `hidden` lives until
        # the join below, the layout's memory (the side stream's) is reused by the side stream
        # only after a later fork, which orders it after every use enqueued here.
        main = torch.cuda.current_stream(hidden.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            layout = controller.attention_layout(state.index, hidden, H)
    # OPT scales q after its projection; the kernels scale the scores in fp32 instead, which
    # saves a pass over q forward and backward.
    q, k, v = map(heads, _projections((attn.q_proj, attn.k_proj, attn.v_proj), ("q_proj", "k_proj", "v_proj"), hidden))
    prefix_k = prefix_v = None
    if cache is not None and not _skips_cache(attn, cache):
        # What the cache held before this step (prefix tuning's virtual keys) comes first.
        full_k, full_v = cache.update(k, v, attn.layer_idx)
        past = full_k.shape[2] - S
        if past > 0:
            prefix_k, prefix_v = full_k[:, :, :past], full_v[:, :, :past]
        # Attend to the cache's copies, as HF's attention does: autograd then keeps one copy of k
        # and v per layer, not the projections and the cache's copies both (0.75 GiB at OPT-1.3B,
        # batch 4, 2048 tokens).
        k, v = full_k[:, :, past:], full_v[:, :, past:]
    if side is None:
        layout = controller.attention_layout(state.index, hidden, H)
    else:
        main.wait_stream(side)
    out = block_sparse_attention(q, k, v, layout, scale=attn.scaling, prefix_k=prefix_k, prefix_v=prefix_v)
    return _projections((attn.out_proj,), ("out_proj",), out.transpose(1, 2).reshape(B, S, H * D))[0]


_PREDICTOR_STREAMS: dict = {}


def _overlaps_predictor(controller: Controller, hidden: torch.Tensor) -> bool:
    if not hidden.is_cuda:
        return False
    choice = controller.overlap_attention_predictor
    return torch.cuda.is_current_stream_capturing() if choice is None else choice


def _predictor_stream(device: torch.device):
    """One side stream per device for the attention predictor, made on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PREDICTOR_STREAMS:
        _PREDICTOR_STREAMS[index] = torch.cuda.Stream(device=index)
    return _PREDICTOR_STREAMS[index]


def _skips_cache(attn, cache) -> bool:
    """True for a training step's forward on an empty cache: HF builds a KV cache in training unless
    told `use_cache=False`, and no training step reads it back. Filling it costs a copy of k and v
    per layer, and a transposing copy of each one's gradient back to the projection's layout (7 ms
    of a 2048-token OPT-1.3B step on the H200, bench/RESULTS.md). A cache that already holds keys
    (prefix tuning's) is kept and extended as before, and so is any forward without gradients."""
    return attn.training and torch.is_grad_enabled() and cache.get_seq_length(attn.layer_idx) == 0


def _layer_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """OPTDecoderLayer.forward with Long Exposure's operators (see the module docstring)."""
    state: _LayerState = self._long_exposure
    mode = state.controller.mode
    cache = kwargs.pop("cache", None)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    dropout = self.dropout if self.training else 0.0

    residual = hidden_states
    if self.do_layer_norm_before:
        hidden_states = self.self_attn_layer_norm(hidden_states)
    if mode == "off":
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          **{_cache_argument(type(self.self_attn)): cache})
    else:
        hidden_states = _sparse_attention(self.self_attn, hidden_states, cache, state)
    hidden_states = nn.functional.dropout(hidden_states, p=dropout, training=self.training)
    if hasattr(self, "adapter_attn"):
        hidden_states = self.adapter_attn(hidden_states)
    hidden_states = residual + hidden_states
    if not self.do_layer_norm_before:
        hidden_states = self.self_attn_layer_norm(hidden_states)

    shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
    residual = hidden_states
    if self.do_layer_norm_before:
        hidden_states = self.final_layer_norm(hidden_states)
    if mode == "off":
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
    else:
        hidden_states = _sparse_mlp(self, hidden_states, state)
    hidden_states = nn.functional.dropout(hidden_states, p=dropout, training=self.training)
    if hasattr(self, "adapter_mlp"):
        hidden_states = self.adapter_mlp(hidden_states)
    hidden_states = (residual + hidden_states).view(shape)
    if not self.do_layer_norm_before:
        hidden_states = self.final_layer_norm(hidden_states)
    return hidden_states


@functools.lru_cache(maxsize=None)
def _cache_argument(attention_class) -> str:
    """What OPTAttention.forward calls its cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(attention_class.forward).parameters else "past_key_values"


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "opt":
        raise TypeError(f"Long Exposure converts OPT models; got {type(model).__name__} "
                        f"(model_type {getattr(config, 'model_type', None)!r})")
    if config.activation_function != "relu":
        raise ValueError(f"the neuron-block MLP needs ReLU; this model uses {config.activation_function!r}")


class _FusedCausalLMLoss:
    """The loss a converted OPTForCausalLM computes: ops.cross_entropy.causal_lm_loss, which reads
    the logits in their own dtype, where HF's loss first copies them to fp32 (about 5 ms of a
    2048-token OPT-1.3B step on the H200). Logits no kernel takes go to HF's loss. A class, not a
    closure, so that a converted model still pickles."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, logits, labels, vocab_size, **kwargs):
        if not cross_entropy.supports(logits):
            return self.fallback(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return cross_entropy.causal_lm_loss(logits, labels, vocab_size, **kwargs)


def _causal_lm(model):
    """The module of `model` (peft wrappers included) whose forward computes the loss, if its
    transformers version lets the loss be swapped (PreTrainedModel.loss_function)."""
    # Asked of the class and the module's own children: peft's wrappers forward unknown attributes
    # to the model inside, so hasattr would find lm_head and loss_function on them too.
    return next((m for m in model.modules()
                 if "lm_head" in m._modules and isinstance(getattr(type(m), "loss_function", None), property)), None)


def _use_fused_loss(model) -> None:
    lm = _causal_lm(model)
    if lm is None or isinstance(lm.loss_function, _FusedCausalLMLoss):
        return
    lm._long_exposure_previous_loss = lm.__dict__.get("_loss_function")
    lm.loss_function = _FusedCausalLMLoss(lm.loss_function)


def _restore_loss(model) -> None:
    lm = _causal_lm(model)
    if lm is None or not hasattr(lm, "_long_exposure_previous_loss"):
        return
    previous = lm._long_exposure_previous_loss
    del lm._long_exposure_previous_loss
    if previous is None:
        del lm._loss_function
    else:
        lm._loss_function = previous


def convert(model, config: LongExposureConfig | None = None, predictors=None, mode: str | None = None) -> Controller:
    """Turn an OPTForCausalLM (plain or peft-wrapped) into a Long Exposure model, in place.

    Returns the Controller; change its mode (or predictors) at any time. Default mode: "sparse"
    with predictors, "full" without.
    """
    _check_model(model)
    config = config or (predictors.config if predictors is not None else LongExposureConfig())
    if predictors is not None:
        from ..predictors import model_fingerprint

        if predictors.fingerprint != model_fingerprint(model):
            raise ValueError("these predictors were made for another model shape")
    controller = Controller(config, predictors, mode or ("sparse" if predictors is not None else "full"))
    for index, layer in enumerate(decoder_layers(model)):
        layer._long_exposure = _LayerState(controller, index)
        layer.forward = types.MethodType(_layer_forward, layer)
    model._long_exposure_controller = controller
    if config.fused_loss:
        _use_fused_loss(model)
    model._long_exposure_padding_hook = model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)
    return controller


def _refuse_padding(module, args, kwargs):
    """The sparse attention has no key-padding mask: padded batches are refused, not run wrong.
    (Reading the mask costs a host synchronisation, paid only by callers that pass one.)"""
    mask = kwargs.get("attention_mask")
    controller = module._long_exposure_controller
    if mask is not None and controller.mode != "off" and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError("Long Exposure runs unpadded sequences: this batch's attention_mask masks tokens; "
                         "pack the text into full-length sequences")


def restore(model) -> None:
    """Undo `convert` (on the model given to it, or a wrapper around it): the layers run their own
    forward again. Layers with bottleneck adapters keep Long Exposure's forward in mode "off" (the
    dense modules), since OPT's own forward does not know the adapters."""
    model = next((m for m in model.modules() if is_converted(m)), None)
    if model is None:
        raise ValueError("this model was not converted by long_exposure.models.opt.convert")
    controller = model._long_exposure_controller
    off = Controller(controller.config, None, "off")
    model._long_exposure_padding_hook.remove()
    del model._long_exposure_padding_hook
    _restore_loss(model)
    for layer in decoder_layers(model):
        if hasattr(layer, "adapter_attn") or hasattr(layer, "adapter_mlp"):
            layer._long_exposure = _LayerState(off, layer._long_exposure.index)
        else:
            del layer.forward
            del layer._long_exposure
    del model._long_exposure_controller


def is_converted(model) -> bool:
    return hasattr(model, "_long_exposure_controller")


def controller_of(model) -> Controller | None:
    """The controller of the converted OPT model inside `model` (peft wrappers included), if any."""
    for module in model.modules():
        if is_converted(module):
            return module._long_exposure_controller
    return None


@contextlib.contextmanager
def dense_forward(model):
    """Within the block a converted model runs its own dense modules (mode "off"): for evaluation
    and for the exposer, whose hooks watch those modules."""
    controller = controller_of(model)
    if controller is None:
        yield
        return
    mode = controller.mode
    controller.mode = "off"
    try:
        yield
    finally:
        controller.mode = mode
