"""PEFT methods peft does not provide: the bottleneck adapter (after attention and after the MLP
of every decoder layer) and BitFit (biases only)."""

from __future__ import annotations

import types

import torch
from torch import nn

from .exposer import decoder_layers


class BottleneckAdapter(nn.Module):
    """x + up(relu(down(x))), starting as the identity (up is zero)."""

    def __init__(self, d_model: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank)
        self.up = nn.Linear(rank, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


def add_bottleneck_adapters(model, rank: int = 16) -> list[nn.Parameter]:
    """Freeze the model and add a trainable adapter after the attention and after the MLP of every
    decoder layer (submodules adapter_attn and adapter_mlp). Returns the adapters' parameters.

    The layers then run Long Exposure's layer forward (in mode "off" until `convert`), since OPT's
    own forward has no place for adapters."""
    from .config import LongExposureConfig
    from .models.opt import Controller, _layer_forward, _LayerState

    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    off = Controller(LongExposureConfig(), None, "off")
    for index, layer in enumerate(decoder_layers(model)):
        d = layer.embed_dim
        layer.adapter_attn = BottleneckAdapter(d, rank).to(layer.fc1.weight.device, layer.fc1.weight.dtype)
        layer.adapter_mlp = BottleneckAdapter(d, rank).to(layer.fc1.weight.device, layer.fc1.weight.dtype)
        params += list(layer.adapter_attn.parameters()) + list(layer.adapter_mlp.parameters())
        if not hasattr(layer, "_long_exposure"):
            layer._long_exposure = _LayerState(off, index)
            layer.forward = types.MethodType(_layer_forward, layer)
    return params


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The bottleneck adapters' weights, by their parameter names."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if ".adapter_attn." in name or ".adapter_mlp." in name}


def bitfit(model) -> list[nn.Parameter]:
    """Freeze everything but the biases; returns the trainable biases."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))
        if p.requires_grad:
            params.append(p)
    return params
