"""The block-sparse attention kernels against cuDNN SDPA (dense causal) and FlexAttention with the
same block mask (compiled), in one process, at OPT attention shapes: forward and forward+backward
at layout densities 1.0 (the causal layout) and below (local window + sink columns). Head dim 80 is
OPT-2.7B's. Writes a markdown table to stdout.

    python bench/attention_kernels.py --model 1.3b 2.7b --density 1.0 0.2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings

import torch
from timing import cuda_times_ms, graph_times_ms

from long_exposure import BlockLayout, _C, ops
from long_exposure._views import _DTYPE_CODES

OPT_ATTENTION = {"1.3b": (32, 64), "2.7b": (32, 80)}  # (heads, head dim)


def cuda_ms(fn, reps) -> float:
    """Median per-call time replayed from a CUDA graph (the kernels' time without the host's launch
    overhead, for every method alike); eager timing where a method cannot be captured."""
    try:
        return statistics.median(graph_times_ms(fn, reps=reps))
    except Exception as error:  # noqa: BLE001
        print(f"<!-- not capturable, timed eagerly: {type(error).__name__}: {str(error)[:120]} -->", file=sys.stderr)
        return statistics.median(cuda_times_ms(fn, reps=reps, warmup=5))


def local_sink_layout(heads, seq_len, block, density) -> BlockLayout:
    """A window of w diagonal blocks plus the first s block columns, (w, s) chosen to bring the
    share of causal blocks closest to `density` (1.0: the causal layout)."""
    n = math.ceil(seq_len / block)
    if density >= 1.0:
        return BlockLayout.causal(heads, seq_len, block)
    rows, cols = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
    causal = n * (n + 1) / 2
    best = None
    for sinks in (1, 2, 4):
        for window in range(1, n + 1):
            active = ((rows - cols >= 0) & (rows - cols < window)) | ((cols < sinks) & (cols <= rows))
            gap = abs(active.sum().item() / causal - density)
            if best is None or gap < best[0]:
                best = (gap, active)
    return BlockLayout.from_dense(best[1].expand(1, heads, n, n), block)


def visible_pairs(layout: BlockLayout, seq_len: int) -> int:
    """(query, key) pairs the layout computes, summed over heads (of batch row 0)."""
    active = layout.to_dense()[0].cpu().tril()  # blocks above the diagonal hold no visible key
    sizes = (seq_len - torch.arange(layout.rows()) * layout.block).clamp(max=layout.block)
    full = sizes.unsqueeze(1) * sizes.unsqueeze(0)
    diagonal = torch.diag(sizes * (sizes + 1) // 2)
    pairs = torch.where(torch.eye(layout.rows(), dtype=torch.bool), diagonal, full)
    return int((active * pairs).sum().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(OPT_ATTENTION), nargs="+", default=["1.3b", "2.7b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, nargs="+", default=[1.0, 0.2])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    parser.add_argument("--kernel-times", action="store_true",
                        help="after each density's rows, our fwd+bwd's kernels by GPU time (torch.profiler)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    B, S = args.batch, args.seq
    print(f"# Block-sparse attention, batch {B}, seq {S}, block {args.block}, {args.dtype}, "
          f"{torch.cuda.get_device_name()}\n")
    print("TFLOP/s count the pairs each method computes (cuDNN: all causal pairs); ratios are time "
          "ratios, baseline / ours (> 1: ours faster). fwd+bwd FLOPs are 3.5 x fwd.\n")
    print("| model | H x D | density | pass | ours | ours ms | ours TFLOP/s | cuDNN ms | cuDNN TFLOP/s | "
          "cuDNN / ours | flex ms | flex TFLOP/s | flex / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.model:
        H, D = OPT_ATTENTION[model]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=dtype) for _ in range(4))
        scale = 1.0 / math.sqrt(D)
        kernel = _C.attention_cuda_supports(_DTYPE_CODES[dtype], D, args.block)
        for density in args.density:
            layout = local_sink_layout(H, S, args.block, density).to("cuda")
            real_density = layout.counts.sum().item() / (H * layout.rows() * (layout.rows() + 1) / 2)
            flops_fwd = 4.0 * B * D * visible_pairs(layout, S)
            flops_causal = 4.0 * B * H * D * S * (S + 1) / 2
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

            def ours_fwd():
                return ops.attention_forward(*leaves, None, None, layout.counts, layout.indices, args.block, scale)[0]

            def cudnn_fwd():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)

            block_mask = layout.to_block_mask(S) if flex is not None else None

            def flex_fwd():
                return flex(*leaves, block_mask=block_mask, scale=scale)

            def fwd_bwd(fn):
                # autograd.grad, not backward(): accumulating into .grad would add three elementwise
                # kernels per call to every method's time.
                def run():
                    torch.autograd.grad(fn(), leaves, dout)
                return run

            for name, flops_mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                times = {}
                for method, fn in (("ours", ours_fwd), ("cudnn", cudnn_fwd), ("flex", flex_fwd)):
                    if method == "flex" and flex is None:
                        continue
                    call = fn if name == "fwd" else fwd_bwd(fn)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            if name == "fwd":
                                with torch.no_grad():
                                    times[method] = cuda_ms(call, args.reps)
                            else:
                                times[method] = cuda_ms(call, args.reps)
                    except Exception as error:  # noqa: BLE001  (a baseline that cannot run this shape)
                        print(f"<!-- {model} {method} {name}: {type(error).__name__}: {str(error)[:200]} -->",
                              file=sys.stderr)

                def cell(method, flops):
                    if method not in times:
                        return "n/a | n/a"
                    return f"{times[method]:.3f} | {flops * flops_mult / times[method] / 1e9:.1f}"

                def ratio(method):
                    return f"{times[method] / times['ours']:.2f}" if method in times and "ours" in times else "n/a"

                print(f"| {model} | {H} x {D} | {real_density:.2f} | {name} | {'kernel' if kernel else 'reference'} | "
                      f"{cell('ours', flops_fwd)} | {cell('cudnn', flops_causal)} | {ratio('cudnn')} | "
                      f"{cell('flex', flops_fwd)} | {ratio('flex')} |", flush=True)
            if args.kernel_times:
                print_kernel_times(fwd_bwd(ours_fwd), f"{model}, density {real_density:.2f}, ours fwd+bwd")


def print_kernel_times(step, title: str, reps: int = 10) -> None:
    """Each kernel's GPU time per call of step(), largest first, as an HTML comment under the table
    (where a fixed cost hides: the delta pass, the layout transpose, short lists)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    lines = [f"{e.device_time_total / reps / 1000:8.3f} ms  {e.count // reps:3d} calls  {e.key[:100]}" for e in rows[:8]]
    print(f"<!-- {title}, GPU time per call:\n" + "\n".join(lines) + "\n-->", flush=True)


if __name__ == "__main__":
    main()
