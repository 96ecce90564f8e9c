"""The embedded default: text the package generates itself and a small OPT trained on it, so that
`long-exposure finetune` runs end to end with no model, no dataset and no network.

The text comes from a small random grammar. The fine-tuning text draws from the same grammar with
other word frequencies and a phrase pattern the pretraining text lacks, so an adapter has
something to learn.
"""

from __future__ import annotations

import random

SUBJECTS = ["the council", "a farmer", "the river", "our nation", "the engineer", "a child", "the market", "the court"]
VERBS = ["builds", "crosses", "measures", "remembers", "protects", "questions", "repairs", "welcomes"]
OBJECTS = ["the bridge", "a new road", "the harvest", "every citizen", "the old law", "a small boat", "the budget"]
PLACES = ["in the valley", "before winter", "across the sea", "at dawn", "in the capital", "after the storm"]
CLOSERS = ["and all agree.", "with great care.", "for the first time.", "as before.", "without delay."]


def generate_text(sentences: int, seed: int = 0, shifted: bool = False) -> str:
    """`sentences` sentences of the grammar; `shifted` favours other words and adds a clause."""
    rng = random.Random(seed)
    weights = [1 + 3 * (shifted and i % 3 == 0) for i in range(8)]
    out = []
    for _ in range(sentences):
        subject = rng.choices(SUBJECTS, weights=weights[: len(SUBJECTS)])[0]
        verb = rng.choices(VERBS, weights=weights[: len(VERBS)])[0]
        sentence = f"{subject.capitalize()} {verb} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        if shifted and rng.random() < 0.5:
            sentence += f", because {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        out.append(f"{sentence} {rng.choice(CLOSERS)}")
    return " ".join(out)


def embedded_texts(seed: int = 0) -> dict[str, list[str]]:
    """pretrain / finetune / evaluate splits of generated text (evaluate shares finetune's style)."""
    return {
        "pretrain": [generate_text(4000, seed)],
        "finetune": [generate_text(1500, seed + 1, shifted=True)],
        "evaluate": [generate_text(300, seed + 2, shifted=True)],
    }
