"""CUDA-event timing shared by the Python benchmarks (run them as `python bench/<name>.py`)."""

from __future__ import annotations

import torch

from long_exposure.captured_step import capture_graph


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


def graph_times_ms(fn, reps: int, replays: int = 10) -> list[float]:
    """Milliseconds per call of fn, with `replays` calls captured in one CUDA graph and each graph
    replay timed: the kernels' own time, without the host's launch overhead between calls (a
    training step captured in a graph runs the same way)."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(replays)])
    return [t / replays for t in cuda_times_ms(graph.replay, reps, warmup=2)]
