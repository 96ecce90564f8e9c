"""Linear projections of one input with frozen weights and optional LoRA, as one autograd node.

Attention's q, k and v projections read the same input. Run as separate modules, autograd sums
their three input gradients, and each LoRA's, with an elementwise add per term, and peft scales
each LoRA output and adds it to the projection in two more passes: about 140 passes over an
[tokens, d_model] tensor per OPT-1.3B step (3-5 ms at 8192 tokens, bench/RESULTS.md). Here every
LoRA product and every input-gradient term accumulates into its output in the GEMM itself (cuBLAS
with beta = 1), and LoRA's scale multiplies the rank-r intermediate, not the output.

Only frozen weights are taken (LoRA, BitFit and prefix tuning all keep them frozen); biases and
LoRA factors get gradients when they require them. Composed of torch operations, so CPU, CUDA,
CUDA graphs and torch.compile all run it.
"""

from __future__ import annotations

import torch


class _Projections(torch.autograd.Function):
    """forward(x [N, d], n, w_0, b_0, a_0, bt_0, s_0, ..., w_n-1, ...) -> n outputs [N, out_i].

    Per projection i: weight w_i [out_i, d] (frozen), bias b_i [out_i] or None, and LoRA factors
    a_i [r_i, d], bt_i [out_i, r_i] with scale s_i, or None, None, 0.0. All in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, n, *parts):
        needs = ctx.needs_input_grad
        outputs, saved = [], []
        for i in range(n):
            w, b, a, bt, s = parts[5 * i:5 * i + 5]
            y = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
            u = None
            if a is not None:
                u = (x @ a.t()).mul_(s)  # [N, r]: the scale on the thin side
                if torch.compiler.is_compiling():
                    # torch 2.11's AOT autograd gives every input of this Function a wrong gradient
                    # when its forward adds into an output in place (torch 2.13's does not); a
                    # traced graph fuses the out-of-place add anyway.
                    y = torch.addmm(y, u, bt.t())
                else:
                    y.addmm_(u, bt.t())
            outputs.append(y)
            # Only what the backward reads: u for B's gradient; x (below) for A's. Frozen
            # projections without LoRA keep nothing of x, as autograd's own linear does not.
            saved += [w, a, bt, u if needs[2 + 5 * i + 3] else None]
        keeps_x = any(parts[5 * i + 2] is not None and needs[2 + 5 * i + 2] for i in range(n))
        ctx.scales = [parts[5 * i + 4] for i in range(n)]
        ctx.has_bias = [parts[5 * i + 1] is not None for i in range(n)]
        ctx.save_for_backward(x if keeps_x else None, *saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = None
        part_grads = []
        for i, g in enumerate(grads):
            w, a, bt, u = saved[4 * i:4 * i + 4]
            base = 2 + 5 * i
            db = da = dbt = None
            if g is None:
                part_grads += [None] * 5
                continue
            g = g.reshape(-1, g.shape[-1])
            if needs[0]:
                dx = g @ w if dx is None else dx.addmm_(g, w)
            if ctx.has_bias[i] and needs[base + 1]:
                db = g.sum(0)
            if a is not None and (needs[0] or needs[base + 2] or needs[base + 3]):
                gu = g @ bt  # [N, r], the gradient of the unscaled x @ a.t() is s * gu
                if needs[base + 3]:
                    dbt = g.t() @ u
                gu.mul_(ctx.scales[i])
                if needs[base + 2]:
                    da = gu.t() @ x
                if needs[0]:
                    dx.addmm_(gu, a)
            part_grads += [None, db, da, dbt, None]
        return (dx, None, *part_grads)


def fused_projections(x: torch.Tensor, projections) -> tuple[torch.Tensor, ...]:
    """The projections of x [..., d] by each (weight, bias, lora) in `projections`, lora being
    (a [r, d], b [out, r], scale) or None; weights frozen, everything in x's dtype."""
    parts = []
    for weight, bias, lora in projections:
        if weight.requires_grad:
            raise ValueError("fused_projections takes frozen weights; this one requires a gradient")
        a, b, scale = lora if lora is not None else (None, None, 0.0)
        parts += [weight, bias, a, b, float(scale)]
    lead = x.shape[:-1]
    outputs = _Projections.apply(x.reshape(-1, x.shape[-1]), len(projections), *parts)
    return tuple(y.view(*lead, y.shape[-1]) for y in outputs)
