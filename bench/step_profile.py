"""Where a training step's time goes: GPU kernel time by kind (torch.profiler) and the host's
Python time by function (cProfile), written as text files beside the benchmark's table."""

from __future__ import annotations

import cProfile
import io
import pstats
import re
from collections import defaultdict
from pathlib import Path

import torch

# First match wins; names are the demangled kernel names the profiler reports.
KINDS = [
    ("sparse MLP (Long Exposure)", re.compile(r"neuron_block")),
    ("sparse attention (Long Exposure)", re.compile(r"attention_cuda|transpose_block")),
    # Long Exposure's loss kernels count with the loss they replace, not with its predictors.
    ("elementwise, norms, loss, optimizer", re.compile(r"cross_entropy")),
    ("predictors and layouts (Long Exposure)", re.compile(r"long_exposure")),
    ("attention (PyTorch: SDPA, cuDNN, flash)", re.compile(r"flash|fmha|cudnn|sdpa|attention", re.I)),
    ("GEMM (cuBLAS)", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|splitk", re.I)),
    ("copies and fills", re.compile(r"memcpy|memset|copy_kernel|fill", re.I)),
]
OTHER = "elementwise, norms, loss, optimizer"


def kind_of(kernel_name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel_name)), OTHER)


def kernel_breakdown(step, steps: int = 2) -> tuple[dict[str, float], str, dict[str, float]]:
    """(ms per step by kind, the top kernels as a table, ms per step of each Long Exposure kernel)
    over `steps` calls of step()."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    ours: dict[str, float] = defaultdict(float)
    for event in prof.events():
        # A range such as "Optimizer.step#AdamW.step" also shows on the GPU, as the span of its
        # kernels, idle gaps included; counting it would count those kernels twice.
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            by_kind[kind_of(event.name)] += event.device_time / 1000 / steps
            if "long_exposure" in event.name:
                ours[event.name] += event.device_time / 1000 / steps
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=60, max_name_column_width=90)
    return dict(by_kind), table, dict(ours)


def host_breakdown(step, steps: int = 3, rows: int = 40) -> str:
    """cProfile's top functions by own and by cumulative time over `steps` calls of step() (the
    GPU keeps running, so with a host-bound step this is where the step's time goes)."""
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return out.getvalue()


def write_profile(step, directory: str, name: str) -> dict[str, float]:
    """Profiles step() both ways into directory/name_{kernels,host}.txt; returns ms per step by kind."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    by_kind, table, ours = kernel_breakdown(step)
    total = sum(by_kind.values())
    lines = [f"GPU kernel time per step: {total:.1f} ms", ""]
    lines += [f"{ms:8.2f} ms  {100 * ms / max(total, 1e-9):5.1f}%  {kind}"
              for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])]
    # Every Long Exposure kernel, however small (the table below stops at sixty rows).
    lines += ["", "Long Exposure kernels, ms per step:"]
    lines += [f"{ms:8.3f} ms  {100 * ms / max(total, 1e-9):5.2f}%  {name[:150]}"
              for name, ms in sorted(ours.items(), key=lambda item: -item[1])]
    (path / f"{name}_kernels.txt").write_text("\n".join(lines) + "\n\n" + table)
    (path / f"{name}_host.txt").write_text(host_breakdown(step))
    return by_kind
