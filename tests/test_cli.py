import json

import pytest
import torch

from long_exposure.cli import main
from long_exposure.embedded import generate_text
from long_exposure.small_opt import build_small_opt

FAST = ["--seq", "32", "--batch-size", "4", "--tile", "8", "--block", "16", "--attn-block", "8",
        "--calibration-sequences", "16", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    build_small_opt(hidden=32, layers=2, heads=4, ffn=64, max_positions=64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.txt").write_text(generate_text(400, seed=1))
    with open(folder / "eval.jsonl", "w") as out:
        for seed in range(3):
            out.write(json.dumps({"text": generate_text(40, seed=10 + seed, shifted=True)}) + "\n")
    return folder


def test_every_subcommand_has_help(capsys):
    for command in ("calibrate", "train-predictors", "finetune", "evaluate", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: long-exposure" in capsys.readouterr().out
    assert main([]) == 2


def test_finetune_then_evaluate_a_local_model(model_dir, data, tmp_path):
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(model_dir), "--data", str(data / "train.txt"), "--eval-data",
                 str(data / "eval.jsonl"), "--steps", "3", "--method", "lora_all", "--out", str(out), *FAST])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"adapter", "predictors", "summary.json", "density.png", "loss.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["held_out_loss"]) == {"dense", "long exposure"} and "gap" in summary
    assert all(0 < d <= 1 for d in summary["mlp_density"].values())
    assert main(["evaluate", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--data",
                 str(data / "eval.jsonl"), "--seq", "32", "--quiet"]) == 0
    # The adapter was trained on a neuron-permuted model and saved for the original one: on the
    # unpermuted model it gives the held-out loss the run measured.
    from long_exposure.cli import _load_adapter, load_model, load_texts
    from long_exposure.pipeline import evaluate

    model, tokens, _ = load_model(str(model_dir), 0, True)
    model = _load_adapter(model, str(out / "adapter"))
    loss = evaluate(model, tokens.blocks(load_texts(str(data / "eval.jsonl")), 32, max_blocks=256), 4)
    assert loss == pytest.approx(summary["held_out_loss"]["long exposure"], rel=1e-4)


def test_saved_predictors_are_reused_and_checked(model_dir, data, tmp_path):
    assert main(["train-predictors", "--model", str(model_dir), "--data", str(data / "train.txt"),
                 "--out", str(tmp_path / "p"), *FAST]) == 0
    args = ["finetune", "--model", str(model_dir), "--data", str(data / "train.txt"), "--steps", "2",
            "--method", "bottleneck", "--no-compare-dense", "--predictors", str(tmp_path / "p" / "predictors")]
    assert main([*args, "--out", str(tmp_path / "run"), *FAST]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    mismatched = [a if a != "16" else "32" for a in FAST]  # another neuron block size
    assert main([*args, "--out", str(tmp_path / "bad"), *mismatched]) == 2
    assert not (tmp_path / "bad").exists()


def test_calibrate_writes_its_report(model_dir, data, tmp_path):
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data / "train.txt"),
                 "--out", str(tmp_path / "c"), *FAST]) == 0
    report = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert len(report) == 2 and (tmp_path / "c" / "density.png").is_file()


def test_bad_input_fails_clearly_and_leaves_nothing(model_dir, data, tmp_path, capsys):
    not_opt = tmp_path / "gpt2"
    not_opt.mkdir()
    (not_opt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{oops\n')
    cases = [
        (["--model", str(not_opt), "--data", str(data / "train.txt")], "supports OPT models"),
        (["--model", str(model_dir), "--data", str(tmp_path / "empty.txt")], "holds no text"),
        (["--model", str(model_dir), "--data", str(tmp_path / "broken.jsonl")], "line 2"),
        (["--model", str(model_dir), "--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--model", str(model_dir), "--data", str(data / "train.txt"), "--seq", "100"], "longer than the model's 64"),
        (["--model", str(model_dir), "--data", str(data / "train.txt"), "--device", "tpu"], "runs on cpu, cuda or cuda:N"),
        (["--model", str(model_dir), "--data", str(data / "train.txt"), "--device", "gpu0"], "--device gpu0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", str(model_dir), "--data", str(data / "train.txt"), "--device", "cuda"],
                      "no CUDA device is available"))
    for index, (args, message) in enumerate(cases):
        out = tmp_path / f"out{index}"
        seq = [] if "--seq" in args else ["--seq", "32"]
        code = main(["finetune", *args, *seq, "--steps", "1", "--out", str(out), "--quiet"])
        assert code == 2, args
        assert message in capsys.readouterr().err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out{index}")]


@pytest.mark.gpu
def test_finetune_and_evaluate_on_the_gpu(data, tmp_path):
    # A model the CUDA kernels take (head dim 64, d_ffn a multiple of the 128-neuron blocks), at the
    # GPU's default geometry: 128-token tiles, 128-neuron blocks, 64-token attention blocks.
    model_dir = tmp_path / "model"
    build_small_opt(hidden=128, layers=2, heads=2, ffn=512, max_positions=128).save_pretrained(model_dir)
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(model_dir), "--data", str(data / "train.txt"), "--eval-data",
                 str(data / "eval.jsonl"), "--device", "cuda", "--seq", "128", "--batch-size", "4", "--steps", "3",
                 "--calibration-sequences", "8", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["held_out_loss"]) == {"dense", "long exposure"}
    assert all(0 < d <= 1 for d in summary["mlp_density"].values())
    # bf16 on the GPU: the two adapters' held-out losses agree to well within the quality mark.
    assert abs(summary["gap"]) < 0.05
    assert main(["evaluate", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--data",
                 str(data / "eval.jsonl"), "--seq", "128", "--device", "cuda", "--quiet"]) == 0
