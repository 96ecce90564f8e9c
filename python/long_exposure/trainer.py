"""transformers.Trainer integration: drift checks as a TrainerCallback."""

from __future__ import annotations

from transformers import TrainerCallback

from .predictors import DriftMonitor


class DriftCallback(TrainerCallback):
    """Runs the DriftMonitor's checks on the batch of the step that just ended. Trainer does not
    hand batches to callbacks, so a forward pre-hook on the model keeps the latest input ids."""

    def __init__(self, monitor: DriftMonitor):
        self.monitor = monitor
        self._last_ids = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def remember(module, module_args, module_kwargs):
            ids = module_kwargs.get("input_ids", module_args[0] if module_args else None)
            if ids is not None and module.training:
                self._last_ids = ids.detach()

        self._hook = model.register_forward_pre_hook(remember, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self._last_ids is not None and self.monitor.due(state.global_step):
            self.monitor.check(state.global_step, self._last_ids)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
