"""The text corpus for calibration, tests and benchmarks, and a byte-level tokenizer.

No model or dataset hub is reachable here, so text comes from the State of the Union corpus
(../shared/data/sotu.jsonl.gz beside the project, or a path given by the caller or by
LONG_EXPOSURE_DATA) and is tokenized as UTF-8 bytes, which needs no vocabulary file.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CORPUS_NAME = "sotu.jsonl.gz"


@dataclass(frozen=True)
class Address:
    year: int
    president: str
    party: str
    text: str


def find_corpus(path: str | os.PathLike | None = None) -> Path:
    """The corpus file: `path`, else $LONG_EXPOSURE_DATA, else shared/data beside or above the cwd.
    A folder given as `path` or in $LONG_EXPOSURE_DATA stands for the corpus file in it."""
    candidates = []
    given = path if path is not None else os.environ.get("LONG_EXPOSURE_DATA") or None
    if given is not None:
        candidates.append(Path(given) / CORPUS_NAME if Path(given).is_dir() else Path(given))
    else:
        here = Path.cwd().resolve()
        for folder in (here, *here.parents):
            candidates += [folder / "shared" / "data" / CORPUS_NAME, folder.parent / "shared" / "data" / CORPUS_NAME]
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates[:4]) + (" ..." if len(candidates) > 4 else "")
    raise FileNotFoundError(
        f"the text corpus {CORPUS_NAME} is missing (looked in {looked}); "
        "pass its path or set LONG_EXPOSURE_DATA"
    )


def load_addresses(path: str | os.PathLike | None = None) -> list[Address]:
    """Every address of the corpus, oldest first."""
    file = find_corpus(path)
    addresses = []
    with gzip.open(file, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                addresses.append(Address(int(row["year"]), row["president"], row["party"], row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{file}: line {number} is not an address record ({error})") from error
    if not addresses:
        raise ValueError(f"{file} holds no addresses")
    return sorted(addresses, key=lambda a: a.year)


def split_by_year(addresses: list[Address]) -> dict[str, list[str]]:
    """The project's split: pretrain before 1950, fine-tune 1950-1999, evaluate 2000 onward."""
    return {
        "pretrain": [a.text for a in addresses if a.year < 1950],
        "finetune": [a.text for a in addresses if 1950 <= a.year < 2000],
        "evaluate": [a.text for a in addresses if a.year >= 2000],
    }


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; id 256 separates documents."""

    vocab_size = 257
    separator = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def token_blocks(texts: list[str], seq_len: int, tokenizer: ByteTokenizer | None = None,
                 max_blocks: int | None = None) -> torch.Tensor:
    """Documents joined by the separator and cut into [n, seq_len] int64 blocks (the tail dropped)."""
    tokenizer = tokenizer or ByteTokenizer()
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        ids.append(tokenizer.separator)
        if max_blocks is not None and len(ids) >= (max_blocks + 1) * seq_len:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
