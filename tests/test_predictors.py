import json

import pytest
import torch

from long_exposure.config import LongExposureConfig
from long_exposure.predictors import (DriftMonitor, MlpPredictor, PredictorSet, calibrate_threshold,
                                      model_fingerprint)
from calibration import calibration_batches

CONFIG = dict(tile_m=16, block_n=16, attn_block=16, mlp_eps=0.05, mlp_rank=16, attn_rank=8)


@pytest.fixture(scope="module")
def fitted(small_opt, corpus):
    batches = calibration_batches(corpus, 14)
    torch.manual_seed(0)
    predictors = PredictorSet(LongExposureConfig(**CONFIG), model_fingerprint(small_opt))
    reports = predictors.fit(small_opt, batches[:8], batches[8:], steps=150, progress=False)
    return predictors, reports, batches


def test_calibrated_threshold_is_the_largest_that_reaches_the_recall():
    g = torch.Generator().manual_seed(0)
    scores, mass = torch.randn(50, 8, generator=g), torch.rand(50, 8, generator=g)
    target = torch.rand(50, 8, generator=g) < 0.6
    for recall in (0.5, 0.9, 0.99):
        threshold = calibrate_threshold(scores, mass, target, recall)
        kept = (scores > threshold) & target
        assert (mass * kept).sum() >= recall * (mass * target).sum() - 1e-5
        # Raising the threshold to the next kept score loses the target.
        next_up = scores[kept].min()
        assert (mass * ((scores > next_up) & target)).sum() < recall * (mass * target).sum()


def test_held_out_mass_recall_meets_the_target(fitted):
    _, reports, _ = fitted
    for report in reports:
        print(report)  # the numbers behind the assertions, with -s
        assert report.mlp.mass_recall >= 0.99
        assert 0 < report.mlp.density <= 1 and report.mlp.recall > 0.95
        assert 0 < report.attn_density <= 1 and report.attn_covered > 0.5


def test_every_tile_keeps_at_least_one_block():
    predictor = MlpPredictor(8, 5, 4)
    predictor.set_threshold(1e9)
    keep = predictor.keep(torch.randn(37, 8), 16)
    assert keep.shape == (3, 5) and keep.sum(1).tolist() == [1, 1, 1]
    mask = predictor.mask(torch.randn(37, 8), 16, 32)
    assert mask.counts.tolist() == [1, 1, 1]


def test_core_ops_give_the_predictors_own_masks_and_scores(fitted, small_opt, corpus):
    predictors, _, batches = fitted
    data = predictors._layer_data(small_opt, batches[8:9])
    for index, layer in enumerate(data):
        x = layer.mlp_x[0]
        mask = predictors.mlp[index].mask(x, 16, 16)
        assert torch.equal(mask.to_dense(mask.indices.shape[1]), predictors.mlp[index].keep(x, 16))
        hidden = layer.attn_hidden[0]
        torch.testing.assert_close(predictors.attn[index].scores(hidden),
                                   predictors.attn[index](hidden).exp(), atol=1e-5, rtol=1e-4)


def test_attention_predictor_learns_the_block_maps(small_opt, corpus, fitted):
    predictors, _, batches = fitted
    fresh = PredictorSet(LongExposureConfig(**CONFIG), model_fingerprint(small_opt))
    data = predictors._layer_data(small_opt, batches[8:10])[0]

    def cross_entropy(attn):
        log_scores = attn(data.attn_hidden[0])
        return -(data.attn_target[0] * log_scores.masked_fill(torch.isinf(log_scores), 0)).sum(-1).mean().item()

    assert cross_entropy(predictors.attn[0]) < cross_entropy(fresh.attn[0])


def test_save_and_load_round_trip(fitted, small_opt, tmp_path):
    predictors, _, batches = fitted
    path = predictors.save(tmp_path / "predictors")
    loaded = PredictorSet.load(path, model=small_opt, config=LongExposureConfig(**CONFIG))
    for (name, a), (_, b) in zip(predictors.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(40, small_opt.config.hidden_size)
    assert torch.equal(loaded.mlp[1].keep(x, 16), predictors.mlp[1].keep(x, 16))
    assert json.loads((path / "long_exposure.json").read_text())["model"]["ffn_dim"] == small_opt.config.ffn_dim


def test_load_refuses_another_model_or_block_size(fitted, small_opt, tmp_path):
    from long_exposure.small_opt import build_small_opt

    predictors, _, _ = fitted
    path = predictors.save(tmp_path / "p")
    other = build_small_opt(hidden=64, layers=3, heads=4, ffn=256, max_positions=128)
    with pytest.raises(ValueError, match="num_hidden_layers: saved 2 vs model 3"):
        PredictorSet.load(path, model=other)
    with pytest.raises(ValueError, match="block_n=16, not 32"):
        PredictorSet.load(path, config=LongExposureConfig(**{**CONFIG, "block_n": 32}))
    with pytest.raises(FileNotFoundError, match="no saved predictors"):
        PredictorSet.load(tmp_path / "nowhere")
    (path / "long_exposure.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Long Exposure predictor config"):
        PredictorSet.load(path)


def test_a_failed_save_leaves_nothing_behind(fitted, tmp_path, monkeypatch):
    import safetensors.torch

    predictors, _, _ = fitted

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        predictors.save(tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_drift_monitor_retrains_or_sends_layers_dense(fitted, small_opt):
    predictors, _, batches = fitted
    for action in ("retrain", "dense"):
        damaged = PredictorSet(predictors.config, predictors.fingerprint)
        damaged.load_state_dict(predictors.state_dict())
        damaged.mlp[1].set_threshold(1e9)  # keeps one block per tile: far below target
        with torch.no_grad():  # identical, large sketches: every query block scores itself far above the rest
            damaged.attn[0].wk.copy_(damaged.attn[0].wq * 100)
            damaged.attn[0].wq.mul_(100)
        monitor = DriftMonitor(damaged, small_opt, every=10, action=action)
        assert monitor.due(20) and not monitor.due(21)
        events = monitor.check(20, batches[9])
        done = "retrained" if action == "retrain" else "dense"
        assert {(e.layer, e.part, e.action) for e in events} == {(1, "mlp", done), (0, "attention", done)}
        assert all(e.measured < e.target for e in events)
        again = monitor.check(30, batches[10])
        if action == "retrain":
            assert not any(e.layer == 1 and e.part == "mlp" for e in again)
            assert damaged.mlp[1].threshold.item() < 1e9
        else:
            assert bool(damaged.dense_mlp[1]) and bool(damaged.dense_attn[0]) and again == []
            reloaded = PredictorSet(damaged.config, damaged.fingerprint)
            reloaded.load_state_dict(damaged.state_dict())  # the flags survive saving
            assert reloaded.is_dense("mlp", 1) and reloaded.is_dense("attention", 0)
            assert not reloaded.is_dense("mlp", 0)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="mlp_policy"):
        LongExposureConfig(mlp_policy="magic")
    with pytest.raises(ValueError, match="target_recall must lie in"):
        LongExposureConfig(target_recall=1.5)
    with pytest.raises(ValueError, match="unknown Long Exposure settings: colour"):
        LongExposureConfig.from_dict({"colour": 1})


@pytest.mark.gpu
def test_predictors_fit_and_drift_checks_run_on_the_gpu(small_opt, corpus):
    """Calibration, predictor training and drift retraining where the model lies, as on the host."""
    import copy

    model = copy.deepcopy(small_opt).cuda()
    batches = calibration_batches(corpus, 14)  # on the host: fit and check move them to the model
    torch.manual_seed(0)
    predictors = PredictorSet(LongExposureConfig(**CONFIG), model_fingerprint(model)).cuda()
    reports = predictors.fit(model, batches[:8], batches[8:], steps=150, progress=False)
    for report in reports:
        assert report.mlp.mass_recall >= 0.99
        assert 0 < report.mlp.density <= 1 and report.attn_covered > 0.5
    predictors.mlp[1].set_threshold(1e9)
    monitor = DriftMonitor(predictors, model, every=10, action="retrain")
    events = monitor.check(10, batches[9])
    assert (1, "mlp", "retrained") in {(e.layer, e.part, e.action) for e in events}
    assert predictors.mlp[1].threshold.item() < 1e9 and predictors.mlp[1].threshold.is_cuda
