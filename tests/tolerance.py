"""The DESIGN.md tolerance rules, shared by every op test."""

import torch


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_fp32(actual, expected, name, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_within_twice_reference(actual, low_precision_ref, fp32_ref, name, floor=1e-6):
    """Flash-attention rule: the op's error against fp32 is at most twice that of the
    same-precision PyTorch reference (plus a floor for outputs the reference gets exactly)."""
    ours = max_error(actual, fp32_ref)
    theirs = max_error(low_precision_ref, fp32_ref)
    assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g} > 2 x reference error {theirs:.3g}"
