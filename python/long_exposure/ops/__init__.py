"""Long Exposure's operators: torch.library custom ops over the core, with autograd."""

from .attention import attention_backward, attention_forward, block_sparse_attention
from .mlp import mlp_backward, mlp_forward, neuron_block_mlp

__all__ = [
    "attention_backward",
    "attention_forward",
    "block_sparse_attention",
    "mlp_backward",
    "mlp_forward",
    "neuron_block_mlp",
]
