"""Pure-PyTorch reference of every Long Exposure op: the contract the C++ and CUDA kernels meet.

Each function takes the same arguments as its op and computes the dense operator with the
masked-out blocks' contributions removed, in the precision of its inputs (pass fp32 or fp64
inputs for the high-precision reference). Autograd gives the reference gradients.
"""

from __future__ import annotations

import math

import torch

from .formats import _dense_from_lists, _lists_from_dense


def mlp_active_neurons(counts, indices, n_tokens: int, n_neurons: int, tile_m: int, block_n: int) -> torch.Tensor:
    """Boolean [n_tokens, n_neurons]: which (token, neuron) pairs the MLP mask computes."""
    tiles = _dense_from_lists(counts, indices, math.ceil(n_neurons / block_n))
    return tiles.repeat_interleave(tile_m, 0)[:n_tokens].repeat_interleave(block_n, 1)[:, :n_neurons]


def neuron_block_mlp(x, w1, b1, w2, b2, counts, indices, tile_m, block_n, lora1_u=None, lora1_b=None, lora2_a=None):
    """(y, h, lora2_v) of the neuron-block MLP; see cpp/include/long_exposure/mlp.h."""
    pre = torch.nn.functional.linear(x, w1, b1)
    if lora1_u is not None:
        pre = pre + lora1_u @ lora1_b.t()
    keep = mlp_active_neurons(counts, indices, x.shape[0], w1.shape[0], tile_m, block_n)
    h = torch.where(keep, torch.relu(pre), torch.zeros((), dtype=pre.dtype, device=pre.device))
    y = torch.nn.functional.linear(h, w2, b2)
    lora2_v = h @ lora2_a.t() if lora2_a is not None else x.new_empty(x.shape[0], 0)
    return y, h, lora2_v


def attention_allowed(counts, indices, block: int, seq_len: int, prefix_len: int = 0) -> torch.Tensor:
    """Boolean [Lb, H, S, P + S]: which keys each query attends (prefix first, then the sequence)."""
    n = math.ceil(seq_len / block)
    blocks = _dense_from_lists(counts, indices, n)
    allowed = blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :seq_len, :seq_len]
    allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=counts.device).tril()
    if prefix_len:
        prefix = torch.ones((*allowed.shape[:-1], prefix_len), dtype=torch.bool, device=counts.device)
        allowed = torch.cat([prefix, allowed], dim=-1)
    return allowed


def _attention_scores(q, k, v, counts, indices, block, scale, prefix_k, prefix_v, stat_dtype):
    """(keys, values, allowed [B, H, S, P + S], scaled scores in stat_dtype) with the prefix first."""
    B, H, S, _ = q.shape
    if prefix_k is not None:
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    allowed = attention_allowed(counts, indices, block, S, k.shape[2] - S).expand(B, H, -1, -1)
    return k, v, allowed, (q @ k.transpose(-1, -2)).to(stat_dtype) * scale


def block_sparse_attention(q, k, v, counts, indices, block, scale, prefix_k=None, prefix_v=None):
    """(out, lse) of block-sparse causal attention; see cpp/include/long_exposure/attention.h.

    Softmax statistics are kept in fp32 (fp64 for fp64 inputs), probabilities are cast back to the
    input dtype before the product with V, as PyTorch's own math attention does.
    """
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    _, v, allowed, scores = _attention_scores(q, k, v, counts, indices, block, scale, prefix_k, prefix_v, stat_dtype)
    has_keys = allowed.any(dim=-1, keepdim=True)
    # Empty rows get finite placeholder scores so that no -inf - -inf reaches autograd.
    safe = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_keys, 0.0)
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    p = torch.where(allowed, torch.exp(safe - lse), torch.zeros((), dtype=stat_dtype, device=q.device))
    out = p.to(q.dtype) @ v
    lse = lse.squeeze(-1).masked_fill(~has_keys.squeeze(-1), -math.inf)
    return out, lse.float()


def mlp_predictor_tile_max(x, down, up, bias, tile_m: int) -> torch.Tensor:
    """fp32 [n_tiles, n_blocks]: the largest predictor logit of each block over each tile of tokens.

    z = x @ down^T is kept in x's dtype (bf16 inputs round it, as a bf16 model stores it); the
    product with up and the bias are in fp32. See cpp/include/long_exposure/predictors.h.
    """
    logits = torch.addmm(bias.float(), (x @ down.t()).float(), up.float().t())
    tokens, n_blocks = logits.shape
    n_tiles = math.ceil(tokens / tile_m)
    pad = logits.new_full((n_tiles * tile_m - tokens, n_blocks), -math.inf)
    return torch.cat([logits, pad]).view(n_tiles, tile_m, n_blocks).amax(1)


def mlp_mask_from_tile_max(tile_max: torch.Tensor, threshold: float):
    """(counts, indices) of the blocks whose tile maximum exceeds `threshold`; a tile where none
    does keeps its best block (the lowest on ties, as argmax picks)."""
    active = tile_max > threshold
    best = torch.arange(tile_max.shape[1], device=tile_max.device) == tile_max.argmax(1, keepdim=True)
    active |= best & ~active.any(1, keepdim=True)
    return _lists_from_dense(active, None)


def mlp_predictor_mask(x, down, up, bias, threshold: float, tile_m: int):
    """(counts, indices, tile_max) of the MLP predictor: the predicted MlpMask with capacity n_blocks."""
    tile_max = mlp_predictor_tile_max(x, down, up, bias, tile_m)
    return (*mlp_mask_from_tile_max(tile_max, threshold), tile_max)


def attention_block_scores(hidden, wq, wk, block: int) -> torch.Tensor:
    """fp32 [B, H, n, n] causal block score maps of the attention predictor, all in fp32."""
    batch, seq, d_model = hidden.shape
    n = math.ceil(seq / block)
    padded = torch.cat([hidden.float(), hidden.new_zeros(batch, n * block - seq, d_model, dtype=torch.float32)], 1)
    sizes = (seq - torch.arange(n, device=hidden.device) * block).clamp(max=block)
    pooled = padded.view(batch, n, block, d_model).sum(2) / sizes.unsqueeze(-1)
    qs = torch.einsum("bnd,hrd->bhnr", pooled, wq.float())
    ks = torch.einsum("bnd,hrd->bhnr", pooled, wk.float())
    scores = qs @ ks.transpose(-1, -2) / math.sqrt(wq.shape[1])
    causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
    return torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)


def neuron_block_mlp_backward(dy, dlora2_v, w1, w2, h, counts, indices, tile_m, block_n,
                              lora1_u=None, lora1_b=None, lora2_a=None):
    """(dx, db1, db2, dlora1_u, dlora1_b, dlora2_a) of neuron_block_mlp, from the saved hidden
    activation h (zero outside the mask, so h > 0 marks exactly the active, positive entries).
    The forward's input is not needed. LoRA gradients are None where the factors are; computed in
    fp32, returned in dy's dtype."""
    f = torch.float32 if dy.dtype != torch.float64 else torch.float64
    dh = dy.to(f) @ w2.to(f)
    if dlora2_v is not None and lora2_a is not None:
        dh = dh + dlora2_v.to(f) @ lora2_a.to(f)
    dpre = dh * (h > 0)
    dx = dpre @ w1.to(f)
    out = [dx, dpre.sum(0), dy.to(f).sum(0), None, None, None]
    if lora1_u is not None:
        out[3] = dpre @ lora1_b.to(f)
        out[4] = dpre.t() @ lora1_u.to(f)
    if lora2_a is not None:
        out[5] = (dlora2_v.to(f).t() @ h.to(f)) if dlora2_v is not None else torch.zeros_like(lora2_a, dtype=f)
    return tuple(None if t is None else t.to(dy.dtype) for t in out)


def block_sparse_attention_backward(dout, q, k, v, out, lse, counts, indices, block, scale, prefix_k=None,
                                    prefix_v=None):
    """(dq, dk, dv, dprefix_k, dprefix_v) of block_sparse_attention from its output and logsumexp,
    written out (not by autograd, which does not run inside a custom op's kernel); fp32 inside."""
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    P = 0 if prefix_k is None else prefix_k.shape[2]
    keys, values, allowed, scores = _attention_scores(q.to(f), k.to(f), v.to(f), counts, indices, block, scale,
                                                      None if prefix_k is None else prefix_k.to(f),
                                                      None if prefix_v is None else prefix_v.to(f), f)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(f).unsqueeze(-1)
    p = torch.where(allowed, torch.exp(scores - safe_lse), torch.zeros((), dtype=f, device=q.device))
    g = dout.to(f)
    d_values = p.transpose(-1, -2) @ g
    ds = p * (g @ values.transpose(-1, -2) - (g * out.to(f)).sum(-1, keepdim=True))
    dq = (ds @ keys) * scale
    d_keys = (ds.transpose(-1, -2) @ q.to(f)) * scale
    grads = [dq, d_keys[:, :, P:], d_values[:, :, P:]]
    grads += [d_keys[:, :, :P], d_values[:, :, :P]] if P else [None, None]
    return tuple(None if t is None else t.to(q.dtype) for t in grads)


def token_cross_entropy(logits, labels, ignore_index: int = -100):
    """Per-token loss [N] fp32 of [N, V] logits, 0 where the label is ignore_index; computed as HF's
    causal-LM loss computes it (the logits cast to fp32, then log_softmax; fp64 logits stay fp64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
