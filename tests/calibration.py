"""A small ReLU OPT pretrained on the corpus, shared by the exposer and predictor tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from long_exposure.data import CORPUS_NAME, find_corpus, load_addresses, split_by_year, token_blocks

SEQ = 128
# The corpus lives beside the project: <repo>/../shared/data.
BESIDE_THE_PROJECT = Path(__file__).resolve().parents[2] / "shared" / "data" / CORPUS_NAME


def corpus_splits():
    path = os.environ.get("LONG_EXPOSURE_DATA", BESIDE_THE_PROJECT)
    try:
        find_corpus(path)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return split_by_year(load_addresses(path))


def pretrained_small_opt(splits, steps: int = 120):
    from long_exposure.small_opt import build_small_opt, pretrain

    model = build_small_opt(seed=0, hidden=64, layers=2, heads=4, ffn=256, max_positions=SEQ)
    blocks = token_blocks(splits["pretrain"], SEQ, max_blocks=2000)
    pretrain(model, blocks, steps=steps, batch_size=16, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def calibration_batches(splits, n_batches: int, batch: int = 8, split: str = "finetune") -> list[torch.Tensor]:
    blocks = token_blocks(splits[split], SEQ, max_blocks=n_batches * batch)
    return list(blocks.split(batch))
