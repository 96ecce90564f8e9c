"""CUDA-event timing shared by the Python benchmarks (run them as `python bench/<name>.py`)."""

from __future__ import annotations

import torch


def cuda_times_ms(fn, reps: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of `reps` calls of fn, each bracketed by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times
