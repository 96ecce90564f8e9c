import copy

import pytest
import torch

from long_exposure.exposer import Exposer, MlpMassPolicy, MlpThresholdPolicy
from long_exposure.permutation import activation_profiles, balanced_order, permute_mlp, permute_model
from calibration import calibration_batches


def test_balanced_order_fills_every_block():
    g = torch.Generator().manual_seed(0)
    profiles = torch.rand(70, 12, generator=g)
    order = balanced_order(profiles, 16)
    assert torch.equal(order.sort().values, torch.arange(70))


def test_balanced_order_groups_neurons_with_the_same_profile():
    # Four groups of 8 neurons, each active on its own tiles, shuffled.
    profiles = torch.zeros(32, 4)
    for group in range(4):
        profiles[group * 8 : group * 8 + 8, group] = 1.0
    shuffle = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    order = balanced_order(profiles[shuffle], 8)
    groups = (shuffle[order] // 8).view(4, 8)
    assert all(len(set(row.tolist())) == 1 for row in groups)


def test_permuted_model_is_the_same_function_and_denser_blocks_get_rarer(small_opt, corpus):
    model = copy.deepcopy(small_opt)
    calibration = calibration_batches(corpus, 4)
    held_out = calibration_batches(corpus, 2, split="evaluate")
    policies = {"mass": MlpMassPolicy(0.05), "threshold": MlpThresholdPolicy()}
    exposer = Exposer(model, tile_m=16, block_n=16, attn_block=16, mlp_policies=policies)
    before = exposer.report(held_out)
    captures = [exposer.capture(batch) for batch in calibration]
    orders = [balanced_order(activation_profiles([c[i].pre_activation for c in captures], 16), 16)
              for i in range(len(before))]
    with torch.no_grad():
        logits = model(input_ids=held_out[0]).logits
        permute_model(model, orders)
        torch.testing.assert_close(model(input_ids=held_out[0]).logits, logits, atol=1e-4, rtol=1e-4)
    after = exposer.report(held_out)
    for name in policies:
        assert sum(r.mlp_density[name] for r in after) <= sum(r.mlp_density[name] for r in before)
    assert sum(r.mlp_density["mass"] for r in after) < sum(r.mlp_density["mass"] for r in before)


def test_permute_mlp_refuses_what_is_not_a_permutation(small_opt):
    layer = copy.deepcopy(small_opt.model.decoder.layers[0])
    with pytest.raises(ValueError, match="permutation"):
        permute_mlp(layer, torch.zeros(layer.fc1.out_features, dtype=torch.long))


def test_lora_factors_follow_the_permutation_and_back():
    peft = pytest.importorskip("peft")
    from long_exposure.permutation import inverse
    from long_exposure.small_opt import build_small_opt

    model = build_small_opt(hidden=32, layers=2, heads=4, ffn=64, max_positions=32)
    config = peft.LoraConfig(r=4, target_modules=["fc1", "fc2", "q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        orders = [torch.randperm(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        permute_model(model, orders)
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
        assert not torch.equal(dict(model.named_parameters())[next(n for n in before if "fc1.lora_B" in n)],
                               before[next(n for n in before if "fc1.lora_B" in n)])
        permute_model(model, inverse(orders))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
