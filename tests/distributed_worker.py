"""Run by tests/test_distributed.py under torchrun: a few Long Exposure fine-tuning steps of a tiny
OPT with LoRA, data-parallel (DDP or FSDP2) on the CPU with gloo, the global batch split across
ranks. Rank 0 writes the losses, the drift events and whether every rank holds the same predictors.

    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT.json {ddp,fsdp} {full,sparse} {off,dense,retrain}
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from long_exposure.config import LongExposureConfig
from long_exposure.models.opt import convert
from long_exposure.predictors import DriftMonitor, PredictorSet, model_fingerprint


def main() -> None:
    out, wrapper, mode, action = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import peft
    import transformers

    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=72,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.0, attention_dropout=0.0, activation_function="relu")
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1", "fc2"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    le_config = LongExposureConfig(tile_m=8, block_n=16, attn_block=8, attn_coverage=0.9)
    torch.manual_seed(1)
    predictors = PredictorSet(le_config, model_fingerprint(model))
    for mlp in predictors.mlp:
        mlp.set_threshold(0.0)
    predictors.mlp[1].set_threshold(1e30)  # far below target: the first drift check acts on it
    convert(model, predictors=predictors, mode=mode)
    monitor = DriftMonitor(predictors, model, every=0 if action == "off" else 2,
                           action="dense" if action == "off" else action, retrain_steps=20)
    if wrapper == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # fully_shard's default mesh is on the accelerator where one exists, which would move the
        # model to the GPU and leave the predictors on the CPU; this test is the CPU/gloo case.
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        trained = fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (5, 8, 24), generator=torch.Generator().manual_seed(2))  # 5 steps of 8 sequences
    share = ids.shape[1] // world
    losses = []
    for step in range(1, 6):
        local = ids[step - 1, rank * share : (rank + 1) * share]
        loss = trained(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if monitor.due(step):
            monitor.check(step, local)
    state = torch.cat([t.double().flatten() for t in predictors.state_dict().values()])
    states = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "events": [(e.step, e.layer, e.part, e.action) for e in monitor.events],
                       "predictors_agree": all(torch.equal(states[0], other) for other in states)}, f)
    # Both ranks finish together, then leave without running the process group's teardown: it
    # intermittently aborted rank 0 ("terminate called without an active exception") after the
    # results were already written, failing runs whose results were complete.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
