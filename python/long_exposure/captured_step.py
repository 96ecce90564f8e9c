"""A whole training step (forward, backward, optimizer step) captured in a CUDA graph and replayed.

Launched eagerly from Python, a Long Exposure step spends more host time than GPU time below
2048 tokens: about 1.5 ms of Python per layer for its operators, on top of the model's own
modules (bench/RESULTS.md). Nothing in the step waits on the host (masks and layouts have fixed
capacities, DESIGN.md section 3), so the whole step can be captured once per batch shape and then
replayed with one launch.

    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=True)
    step = CapturedStep(model, optimizer)
    for batch in batches:
        loss = step(batch)  # overwritten by the next call: .item() or .clone() it to keep it

What the graph bakes in is what Python decided while it was captured: the controller's mode,
which layers run dense, the predictors' thresholds, the learning rate if it is a float. Call
`invalidate()` after changing any of these (finetune does so after a drift event); the next call
captures afresh.
"""

from __future__ import annotations

from typing import Callable

import torch


def capture_graph(fn: Callable[[], object], warmup: int = 3):
    """(graph, output): fn captured in a CUDA graph after `warmup` calls on a side stream, as torch
    asks (the warm-up calls are real calls: they allocate what fn keeps and change what it updates)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """The next-token loss of a Hugging Face causal LM on a [batch, seq] block of token ids."""
    return model(input_ids=batch, labels=batch).loss


class CapturedStep:
    """Runs `loss_fn(model, batch)`, its backward and `optimizer.step()` as one CUDA graph replay.

    One graph per batch shape and dtype, each with its own memory pool (activations, gradients,
    the loss): a new shape costs a capture and that memory. Capturing takes `warmup` real steps on
    the first batch of a shape, as CUDA graphs require; the trainable parameters and the
    optimizer's state are put back afterwards, so those steps leave no trace and the first call
    trains exactly once. State the optimizer had not created yet is put back as zeros, which is its
    fresh value for Adam, AdamW and momentum SGD.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = causal_lm_loss, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedStep needs CUDA; without a GPU, run the step eagerly")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            raise ValueError("the optimizer has no parameters to train")
        where = {p.device for p in params}
        if any(d.type != "cuda" for d in where) or len(where) > 1:
            raise ValueError(f"CapturedStep needs every trained parameter on one CUDA device, found {sorted(map(str, where))}")
        if any(group.get("capturable") is False for group in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} was made with capturable=False; create it with "
                             f"capturable=True (for example torch.optim.AdamW(params, lr=..., capturable=True))")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (CUDA graphs need one step run before capture), got {warmup}")
        self.model, self.optimizer, self.loss_fn, self.warmup = model, optimizer, loss_fn, warmup
        self.device = where.pop()
        self._params = params
        self._graphs: dict = {}  # (shape, dtype) -> (graph, static batch, static loss)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        key = (tuple(batch.shape), batch.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch)
        graph, static_batch, static_loss = self._graphs[key]
        static_batch.copy_(batch, non_blocking=True)
        graph.replay()
        return static_loss

    def invalidate(self) -> None:
        """Forget the captured graphs (and their memory); the next call captures afresh."""
        self._graphs.clear()

    @property
    def captured_shapes(self) -> list[tuple]:
        return [shape for shape, _ in self._graphs]

    def _capture(self, batch: torch.Tensor):
        static_batch = batch.to(self.device, copy=True)
        saved = self._snapshot()

        def step():
            # Gradients are None when each call starts, so the graph allocates them and each
            # replay writes them afresh instead of accumulating into the last step's.
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model, static_batch)
            loss.backward()
            self.optimizer.step()
            return loss

        try:
            with torch.cuda.device(self.device):
                graph, static_loss = capture_graph(step, self.warmup)
        except Exception as error:
            self._restore(saved)
            raise RuntimeError(f"the training step could not be captured in a CUDA graph "
                               f"({type(error).__name__}: {error}); run it eagerly instead") from error
        self._restore(saved)
        return graph, static_batch, static_loss

    def _snapshot(self):
        params = [p.detach().clone() for p in self._params]
        state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                 for p in self._params if p in self.optimizer.state}
        return params, state

    @torch.no_grad()
    def _restore(self, saved) -> None:
        """Values back in place: the captured graph keeps the addresses it recorded."""
        params, state = saved
        for p, value in zip(self._params, params):
            p.copy_(value)
        for p in self._params:
            live = self.optimizer.state.get(p)
            if not live:
                continue
            before = state.get(id(p))
            for k, v in live.items():
                if not torch.is_tensor(v):
                    if before is not None and k in before:
                        live[k] = before[k]
                elif before is not None and k in before:
                    v.copy_(before[k])
                else:
                    v.zero_()
