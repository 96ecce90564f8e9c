"""Long Exposure's operators: torch.library custom ops over the core, with autograd for the
training-step ops (the predictor ops only run inference)."""

from .attention import attention_backward, attention_forward, block_sparse_attention
from .cross_entropy import causal_lm_loss, cross_entropy_backward, cross_entropy_forward, token_cross_entropy
from .mlp import mlp_backward, mlp_forward, neuron_block_mlp
from .predictors import attention_block_scores, attention_block_scores_op, mlp_predictor_mask, mlp_predictor_mask_op

__all__ = [
    "attention_backward",
    "attention_block_scores",
    "attention_block_scores_op",
    "attention_forward",
    "block_sparse_attention",
    "causal_lm_loss",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "mlp_backward",
    "mlp_forward",
    "mlp_predictor_mask",
    "mlp_predictor_mask_op",
    "neuron_block_mlp",
    "token_cross_entropy",
]
