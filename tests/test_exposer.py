import itertools
import math

import pytest
import torch

from long_exposure.exposer import (AttentionMassPolicy, Exposer, MlpMassPolicy, MlpThresholdPolicy,
                                   attention_block_mass, coverage_mask, mlp_output_error, tile_block_sums)
from calibration import calibration_batches


def brute_coverage(row, coverage):
    """Fewest entries reaching `coverage` of the row's sum, by trying every subset size."""
    total = sum(row)
    for size in range(len(row) + 1):
        for subset in itertools.combinations(range(len(row)), size):
            if sum(row[i] for i in subset) >= coverage * total - 1e-12:
                return size
    return len(row)


def test_coverage_mask_keeps_the_fewest_entries():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(20, 6, generator=g) ** 3
    for coverage in (0.5, 0.9, 0.99):
        kept = coverage_mask(mass, coverage)
        for row, keep in zip(mass.tolist(), kept):
            assert keep.sum().item() == brute_coverage(row, coverage)
            assert sum(v for v, k in zip(row, keep) if k) >= coverage * sum(row) - 1e-6


def test_coverage_mask_always_keeps_what_it_is_told():
    mass = torch.tensor([[0.0, 10.0, 0.0]])
    always = torch.tensor([[True, False, False]])
    assert coverage_mask(mass, 0.9, always).tolist() == [[True, True, False]]


def test_tile_block_sums_handles_ragged_edges():
    values = torch.arange(7 * 10, dtype=torch.float32).view(7, 10)
    sums = tile_block_sums(values, 3, 4)
    assert sums.shape == (3, 3)
    for i, j in itertools.product(range(3), range(3)):
        assert sums[i, j].item() == values[3 * i : 3 * i + 3, 4 * j : 4 * j + 4].sum().item()


def test_threshold_policy_follows_its_definition():
    h = torch.zeros(4, 20)  # one tile of 4 tokens, two blocks of 10 neurons
    h[:, 0] = 1.0  # block 0: one neuron carries everything: 1 of 10 is not more than 10%
    h[:, 10:12] = 1.0  # block 1: two neurons at the peak: 2 of 10 is more than 10%
    keep = MlpThresholdPolicy(0.10, 0.05).mask(h, 4, 10)
    assert keep.tolist() == [[False, True]]
    h[:, 1] = 0.06  # a second neuron of block 0 at 6% of its peak
    assert MlpThresholdPolicy(0.10, 0.05).mask(h, 4, 10).tolist() == [[True, True]]
    assert MlpThresholdPolicy(0.10, 0.07).mask(h, 4, 10).tolist() == [[False, True]]


def test_mlp_error_is_zero_when_everything_is_kept_and_grows_as_less_is():
    g = torch.Generator().manual_seed(1)
    h = torch.relu(torch.randn(64, 96, generator=g))
    w2 = torch.randn(32, 96, generator=g)
    assert mlp_output_error(h, w2, torch.ones(4, 6, dtype=torch.bool), 16, 16) == 0.0
    errors = [mlp_output_error(h, w2, MlpMassPolicy(eps).mask(h, 16, 16), 16, 16) for eps in (0.0, 0.1, 0.3, 0.6)]
    assert errors[0] == 0.0 and errors == sorted(errors) and errors[-1] > 0


def test_attention_block_mass_sums_to_the_queries_of_each_block():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    mass = attention_block_mass(q, k, 16)
    assert mass.shape == (2, 3, 3, 3)
    torch.testing.assert_close(mass.sum(-1), torch.tensor([16.0, 16.0, 5.0]).expand(2, 3, 3))
    assert torch.all(mass.triu(1) == 0)
    keep = AttentionMassPolicy(0.5).mask(mass)
    assert torch.all(keep.diagonal(dim1=-2, dim2=-1))


def test_exposer_reports_on_a_pretrained_model(small_opt, corpus):
    exposer = Exposer(small_opt, tile_m=16, block_n=16, attn_block=16,
                      mlp_policies={"threshold": MlpThresholdPolicy(), "mass": MlpMassPolicy(0.05),
                                    "mass_loose": MlpMassPolicy(0.3), "dense": MlpMassPolicy(0.0)},
                      attn_policy=AttentionMassPolicy(0.9))
    reports = exposer.report(calibration_batches(corpus, 2, split="evaluate"))
    assert len(reports) == 2
    for report in reports:
        assert report.mlp_density["dense"] == pytest.approx(1.0, abs=0.02)  # blocks with no mass at all may go
        assert report.mlp_error["dense"] == pytest.approx(0.0, abs=1e-6)
        assert report.mlp_density["mass_loose"] < report.mlp_density["mass"] <= 1.0
        assert 0 < report.mlp_error["mass"] < report.mlp_error["mass_loose"]
        assert 0 < report.attn_density <= 1.0
        assert math.isfinite(report.attn_error)


def test_exposer_refuses_models_that_are_not_opt():
    with pytest.raises(TypeError, match="OPT"):
        Exposer(torch.nn.Linear(2, 2))
