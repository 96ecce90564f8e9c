import copy

import pytest
import torch

from long_exposure.config import LongExposureConfig
from long_exposure.models.opt import convert, is_converted, restore
from long_exposure.peft import add_bottleneck_adapters, bitfit
from long_exposure.predictors import PredictorSet, model_fingerprint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIG = LongExposureConfig(tile_m=8, block_n=16, attn_block=8)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_opt(post_layer_norm: bool = False, seed: int = 0):
    config = transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=72, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16 if post_layer_norm else 32,
        do_layer_norm_before=not post_layer_norm, dropout=0.0, attention_dropout=0.0, activation_function="relu",
    )
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def with_method(model, method: str):
    if method.startswith("lora"):
        targets = ["q_proj", "v_proj"] if method == "lora_qv" else ALL_LINEAR
        # Random B as well as A, so that every LoRA factor gets a non-zero gradient.
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
        return peft.get_peft_model(model, config)
    if method == "prefix":
        return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    if method == "ptuning":
        # Virtual tokens live in the embedding space, which 350m-style models project (word_embed_proj_dim).
        config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16,
                                          token_dim=model.config.word_embed_proj_dim)
        return peft.get_peft_model(model, config)
    if method == "bitfit":
        bitfit(model)
        return model
    if method == "bottleneck":
        add_bottleneck_adapters(model, rank=4)
        with torch.no_grad():  # not the identity, so that the adapters matter
            for name, p in model.named_parameters():
                if "adapter_" in name:
                    p.normal_(0, 0.2)
        return model
    raise ValueError(method)


def one_block_predictors(model) -> PredictorSet:
    """Predictors whose MLP masks keep one block per tile (the threshold passes nothing)."""
    predictors = PredictorSet(CONFIG, model_fingerprint(model))
    for mlp in predictors.mlp:
        mlp.set_threshold(1e30)
    return predictors


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


METHODS = ["lora_qv", "lora_all", "prefix", "ptuning", "bitfit", "bottleneck"]


@pytest.mark.parametrize("post_layer_norm", [False, True], ids=["pre-LN", "post-LN-350m"])
@pytest.mark.parametrize("method", METHODS)
def test_full_masks_give_the_plain_models_losses_and_gradients(method, post_layer_norm):
    plain = with_method(tiny_opt(post_layer_norm), method)
    ours = copy.deepcopy(plain)
    names = [n for n, _ in ours.named_parameters()]
    convert(ours, CONFIG, mode="full")
    assert [n for n, _ in ours.named_parameters()] == names, "parameter names must not change"
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))  # 19: ragged tiles and blocks
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(ours, ids)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sparse_mode_with_everything_kept_equals_the_plain_model():
    plain = with_method(tiny_opt(), "lora_all")
    ours = copy.deepcopy(plain)
    config = LongExposureConfig(tile_m=8, block_n=16, attn_block=8, attn_coverage=1.0)
    predictors = PredictorSet(config, model_fingerprint(ours))
    for mlp in predictors.mlp:
        mlp.set_threshold(-1e30)
    controller = convert(ours, predictors=predictors)
    assert controller.mode == "sparse"
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(ours, ids)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    assert all(d.item() == pytest.approx(1.0) for d in controller.densities.values())


def test_sparse_masks_change_the_result_and_report_their_density():
    model = with_method(tiny_opt(), "lora_qv")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    controller = convert(model, predictors=one_block_predictors(model))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert controller.densities[(0, "mlp")].item() == pytest.approx(1 / 5)  # 72 neurons: 5 blocks of 16
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, dense)


def test_restore_gives_back_the_plain_model():
    model = with_method(tiny_opt(), "lora_qv")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        convert(model, predictors=one_block_predictors(model))
        assert is_converted(model)
        restore(model)
        assert not is_converted(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_a_converted_model_computes_its_loss_without_hfs_fp32_logits_and_restore_gives_hfs_back():
    from long_exposure.models.opt import _FusedCausalLMLoss

    model = with_method(tiny_opt(), "lora_qv")
    lm = model.base_model.model
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    hf_loss = lm.loss_function
    expected, _ = loss_and_grads(model, ids)
    convert(model, CONFIG)
    assert isinstance(lm.loss_function, _FusedCausalLMLoss) and lm.loss_function.fallback is hf_loss
    loss, _ = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    restore(model)
    assert lm.loss_function is hf_loss and "_loss_function" not in lm.__dict__
    convert(model, LongExposureConfig(tile_m=8, block_n=16, attn_block=8, fused_loss=False))
    assert lm.loss_function is hf_loss


def test_a_lora_adapter_saved_from_a_converted_model_loads_into_a_plain_one(tmp_path):
    model = with_method(tiny_opt(), "lora_all")
    convert(model, CONFIG, mode="full")
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(5))
    loaded = peft.PeftModel.from_pretrained(tiny_opt(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_disabled_adapters_give_the_base_models_output():
    plain = tiny_opt()
    model = with_method(copy.deepcopy(plain), "lora_all")
    convert(model, CONFIG, mode="full")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        base = plain(input_ids=ids).logits
    torch.testing.assert_close(off, base, atol=1e-5, rtol=1e-5)
    assert (on - base).abs().max() > 1e-3  # the adapters, random in both factors, do act once enabled


def test_training_forwards_leave_the_kv_cache_empty_and_generation_still_fills_it():
    plain = with_method(tiny_opt(), "lora_qv")
    ours = copy.deepcopy(plain)
    convert(ours, CONFIG, mode="full")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(8))
    cache = ours(input_ids=ids, labels=ids, use_cache=True).past_key_values
    assert cache is None or cache.get_seq_length() == 0, "a training step filled the KV cache"
    plain.eval()
    ours.eval()
    with torch.no_grad():
        cache = ours(input_ids=ids, use_cache=True).past_key_values
        assert cache.get_seq_length() == 16
        expected = plain.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(ours.generate(input_ids=ids, max_new_tokens=6, do_sample=False), expected)


def test_lora_dropout_runs_peft_modules_on_attention_and_is_refused_on_fc2():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3,
                             init_lora_weights=False)
    plain = peft.get_peft_model(tiny_opt(), config)
    ours = copy.deepcopy(plain)
    convert(ours, CONFIG, mode="full")
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(10))
    losses = []
    for model in (plain, ours):
        torch.manual_seed(11)  # the same dropout masks, drawn in the same order (q, then v)
        losses.append(model(input_ids=ids, labels=ids).loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    fc2 = peft.get_peft_model(tiny_opt(), peft.LoraConfig(r=4, target_modules=["fc2"], lora_dropout=0.3))
    convert(fc2, CONFIG, mode="full")
    with pytest.raises(ValueError, match="LoRA dropout on fc2"):
        fc2(input_ids=ids, labels=ids)


@pytest.mark.parametrize("kind", ["lora_bias", "dora"])
def test_lora_kinds_the_layers_cannot_run_are_refused(kind):
    options = {"lora_bias": True} if kind == "lora_bias" else {"use_dora": True}
    model = peft.get_peft_model(tiny_opt(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **options))
    convert(model, CONFIG, mode="full")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="q_proj: LoRA"):
        model(input_ids=ids)


def test_models_it_cannot_run_are_refused():
    with pytest.raises(TypeError, match="converts OPT models"):
        convert(torch.nn.Linear(2, 2))
    gelu = tiny_opt()
    gelu.config.activation_function = "gelu"
    with pytest.raises(ValueError, match="needs ReLU"):
        convert(gelu)
    with pytest.raises(ValueError, match="sparse mode needs predictors"):
        convert(tiny_opt(), CONFIG, mode="sparse")
    other = PredictorSet(CONFIG, {**model_fingerprint(tiny_opt()), "ffn_dim": 128})
    with pytest.raises(ValueError, match="another model shape"):
        convert(tiny_opt(), predictors=other)


def test_trainer_runs_a_converted_model_with_drift_checks(tmp_path):
    from long_exposure.predictors import DriftMonitor
    from long_exposure.trainer import DriftCallback

    model = with_method(tiny_opt(), "lora_qv")
    predictors = one_block_predictors(model)  # far below any recall target: every check must act
    convert(model, predictors=predictors)
    monitor = DriftMonitor(predictors, model, every=2, action="dense")
    ids = torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(6))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[DriftCallback(monitor)])
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert {(e.step, e.part, e.action) for e in monitor.events if e.part == "mlp"} == {(2, "mlp", "dense")}
    assert bool(predictors.dense_mlp.all())


def test_padded_batches_are_refused_not_run_wrong():
    model = with_method(tiny_opt(), "lora_qv")
    convert(model, CONFIG, mode="full")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 16, dtype=torch.long)
    model(input_ids=ids, attention_mask=mask)  # all ones: fine
    mask[1, 12:] = 0
    with pytest.raises(ValueError, match="unpadded sequences"):
        model(input_ids=ids, attention_mask=mask)


def test_trainer_checkpoints_of_a_converted_model_resume(tmp_path):
    ids = torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(8))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def trainer(max_steps):
        model = with_method(tiny_opt(), "lora_all")
        convert(model, CONFIG, mode="full")
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                                              learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=2,
                                              use_cpu=True, seed=0, data_seed=0)
        return transformers.Trainer(model=model, args=args, train_dataset=dataset)

    straight = trainer(4)
    straight.train()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_a_converted_model_trains_on_cuda_as_on_the_cpu(mode):
    cpu = with_method(tiny_opt(), "lora_all")
    gpu = copy.deepcopy(cpu).cuda()
    predictors = None
    if mode == "sparse":
        predictors = PredictorSet(LongExposureConfig(tile_m=8, block_n=16, attn_block=8, attn_coverage=0.9),
                                  model_fingerprint(cpu))
        for mlp in predictors.mlp:
            mlp.set_threshold(0.0)
    convert(cpu, CONFIG if predictors is None else None, predictors=predictors, mode=mode)
    convert(gpu, CONFIG if predictors is None else None,
            predictors=copy.deepcopy(predictors).cuda() if predictors is not None else None, mode=mode)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(9))
    cpu_loss, cpu_grads = loss_and_grads(cpu, ids)
    gpu_loss, gpu_grads = loss_and_grads(gpu, ids.cuda())
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-4, rtol=1e-4)
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name].cpu(), cpu_grads[name], atol=1e-4, rtol=1e-3)


def kernel_sized_opt(seed: int = 0):
    """An OPT the CUDA kernels take whole: head dim 64, d_model and d_ffn multiples of 128."""
    config = transformers.OPTConfig(
        vocab_size=512, hidden_size=256, num_hidden_layers=2, ffn_dim=1024, num_attention_heads=4,
        max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, activation_function="relu",
    )
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.gpu
def test_a_sparse_training_step_is_captured_in_a_cuda_graph_and_replayed():
    """A training step of a Long Exposure OPT layer stack (predictors, projection onto the pattern
    pool and combination, the sparse kernels, backward, a capturable AdamW step) in one CUDA graph:
    nothing in it waits on the host. Replays give the losses of the same steps run eagerly."""
    config = LongExposureConfig(tile_m=64, block_n=128, attn_block=64, mlp_rank=16, attn_rank=8)
    model = with_method(kernel_sized_opt().cuda().to(torch.bfloat16), "lora_qv")
    predictors = PredictorSet(config, model_fingerprint(model)).cuda()
    for mlp in predictors.mlp:
        mlp.set_threshold(0.0)
    convert(model, config, predictors=predictors, mode="sparse")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, capturable=True)
    ids = torch.randint(0, 512, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    decoder = model.base_model.model.model.decoder
    with torch.no_grad():
        hidden = decoder.embed_tokens(ids)  # positions do not matter to what this test checks

    def step():
        # The layer stack alone: the model's own mask preparation around it is not ours to capture.
        h = hidden
        for layer in decoder.layers:
            h = layer(h)
        loss = h.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss

    # The first step creates the optimizer state; snapshots are then restored in place, so the
    # graph keeps reading and writing the same memory.
    step()
    torch.cuda.synchronize()
    state = [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in optimizer.state[p].values()]

    def restore_state():
        live = [p.detach() for p in params] + [v for p in params for v in optimizer.state[p].values()]
        for dst, src in zip(live, state):
            dst.copy_(src)

    eager = [step().item() for _ in range(3)]
    restore_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up off the capture stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    restore_state()
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(static_loss.item())
    assert len(set(eager)) == 3, f"the eager steps did not train: {eager}"
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=2e-2, atol=0)
