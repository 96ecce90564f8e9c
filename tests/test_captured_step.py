import pytest
import torch

from long_exposure.captured_step import CapturedStep
from long_exposure.config import LongExposureConfig
from long_exposure.models.opt import convert
from long_exposure.pipeline import evaluate, finetune
from long_exposure.predictors import PredictorSet, model_fingerprint

pytest.importorskip("peft")
from test_opt_integration import kernel_sized_opt, tiny_opt, with_method  # noqa: E402

GPU_CONFIG = LongExposureConfig(tile_m=64, block_n=128, attn_block=64, mlp_rank=16, attn_rank=8, drift_every=0)


def sparse_kernel_sized_opt():
    """The same Long Exposure OPT every call (seeded weights and LoRA factors), on the GPU."""
    model = with_method(kernel_sized_opt().cuda().to(torch.bfloat16), "lora_qv")
    predictors = PredictorSet(GPU_CONFIG, model_fingerprint(model)).cuda()
    for mlp in predictors.mlp:
        mlp.set_threshold(0.0)
    controller = convert(model, GPU_CONFIG, predictors=predictors, mode="sparse")
    return model, controller


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def token_batches(n: int, shape=(2, 256)):
    g = torch.Generator("cuda").manual_seed(5)
    return [torch.randint(0, 512, shape, device="cuda", generator=g) for _ in range(n)]


def eager_steps(model, optimizer, batches) -> list[float]:
    """The losses of one eager training step per batch."""
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_cuda_capturing_is_refused():
    model = with_method(tiny_opt(), "lora_qv")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        CapturedStep(model, torch.optim.AdamW(trainable(model)))


def test_finetune_refuses_to_capture_a_model_off_the_gpu():
    model = with_method(tiny_opt(), "lora_qv")
    blocks = torch.randint(0, 64, (4, 16))
    with pytest.raises(ValueError, match="CUDA device"):
        finetune(model, blocks, steps=1, batch_size=2, progress=False, capture=True)


@pytest.mark.gpu
def test_an_optimizer_that_cannot_be_captured_is_named():
    model, _ = sparse_kernel_sized_opt()
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedStep(model, torch.optim.AdamW(trainable(model), lr=1e-3))


@pytest.mark.gpu
def test_captured_steps_train_as_eager_steps_do():
    """Replays give the eager steps' losses and parameters: the warm-up steps of the capture leave
    no trace, and a second batch shape gets its own graph."""
    batches = token_batches(4)
    eager_model, eager_controller = sparse_kernel_sized_opt()
    model, controller = sparse_kernel_sized_opt()
    for a, b in zip(trainable(eager_model), trainable(model)):
        assert torch.equal(a, b)
    eager = eager_steps(eager_model, torch.optim.AdamW(trainable(eager_model), lr=1e-3, capturable=True), batches)

    step = CapturedStep(model, torch.optim.AdamW(trainable(model), lr=1e-3, capturable=True))
    captured = [step(batch).item() for batch in batches]
    assert len(set(eager)) == len(eager), f"the eager steps did not train: {eager}"
    torch.testing.assert_close(torch.tensor(captured), torch.tensor(eager), rtol=2e-2, atol=0)
    for a, b in zip(trainable(eager_model), trainable(model)):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)
    # Densities read the masks the last replay wrote, which are the last eager step's.
    eager_densities = eager_controller.densities
    assert controller.densities.keys() == eager_densities.keys()
    for key, density in controller.densities.items():
        assert density.item() == pytest.approx(eager_densities[key].item(), abs=0.02), key

    short = token_batches(1, shape=(1, 128))[0]
    assert torch.isfinite(step(short))
    assert step.captured_shapes == [(2, 256), (1, 128)]
    step.invalidate()
    assert step.captured_shapes == []
    assert torch.isfinite(step(batches[0]))


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_leaves_model_and_optimizer_as_they_were():
    model, _ = sparse_kernel_sized_opt()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-3, capturable=True)
    before = [p.detach().clone() for p in trainable(model)]

    def refuses_capture(model, batch):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this loss reads the host")
        return model(input_ids=batch, labels=batch).loss

    step = CapturedStep(model, optimizer, loss_fn=refuses_capture)
    with pytest.raises(RuntimeError, match="could not be captured.*this loss reads the host"):
        step(token_batches(1)[0])
    for p, b in zip(trainable(model), before):
        assert torch.equal(p, b)
    for state in optimizer.state.values():  # the warm-up's state is back to its fresh value
        assert all(not torch.is_tensor(v) or not v.any() for v in state.values())


@pytest.mark.gpu
def test_finetune_captures_by_default_on_the_gpu_and_matches_eager_finetuning():
    blocks = torch.randint(0, 512, (8, 256), generator=torch.Generator().manual_seed(7))
    runs, held_out = {}, {}
    for capture in (False, None):
        model, controller = sparse_kernel_sized_opt()
        runs[capture] = finetune(model, blocks, steps=3, batch_size=2, progress=False, controller=controller,
                                 capture=capture)
        held_out[capture] = evaluate(model, blocks[:4], batch_size=2)  # host blocks, a GPU model
    torch.testing.assert_close(torch.tensor(runs[None].losses), torch.tensor(runs[False].losses), rtol=2e-2, atol=0)
    assert held_out[None] == pytest.approx(held_out[False], rel=2e-2)
    assert runs[None].mlp_density.keys() == runs[False].mlp_density.keys()
    for layer, density in runs[False].mlp_density.items():
        assert runs[None].mlp_density[layer] == pytest.approx(density, abs=0.05)


@pytest.mark.gpu
def test_the_attention_predictor_on_a_side_stream_gives_the_same_steps():
    """Eager steps, then captured ones, with the attention predictor on its own stream beside the
    q, k, v projections: the same losses and layouts as on one stream."""
    batches = token_batches(3)
    runs = {}
    for overlap in (False, True):
        model, controller = sparse_kernel_sized_opt()
        controller.overlap_attention_predictor = overlap
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-3, capturable=True)
        losses = eager_steps(model, optimizer, batches)
        step = CapturedStep(model, optimizer)
        losses += [step(batch).item() for batch in batches]
        runs[overlap] = losses, {key: d.item() for key, d in controller.densities.items()}
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-2, atol=0)
    assert runs[True][1] == pytest.approx(runs[False][1], abs=1e-6)
