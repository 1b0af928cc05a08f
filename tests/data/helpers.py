"""Small synthetic rows and helpers shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ds_sft.data.clean import Drops, unique_rows
from ds_sft.data.prepare import add_arguments
from ds_sft.data.tokenize import Documents
from ds_sft.options import OneLineParser


def dedup(records: list[dict], drops: Drops) -> list[dict]:
    """The records :func:`ds_sft.data.clean.unique_rows` keeps (prepare keeps their indices)."""
    return [records[i] for i in unique_rows(records, drops)]


def documents_with_prompts(tokens, offsets, prompt_lens, source_ids) -> Documents:
    """Documents whose first ``prompt_lens[i]`` tokens are not trained and the rest are."""
    lengths = np.diff(offsets)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    trained = (within >= np.repeat(prompt_lens, lengths)).astype(np.uint8)
    return Documents(tokens, offsets, trained, source_ids)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "instruction": f"Describe item number {i} in one sentence.",
            "input": "" if i % 2 else f"Item {i} is red and weighs {i} grams.",
            "output": f"Item {i} is a small red object of {i} grams, used as example {i}.",
        }
        for i in range(offset, offset + n)
    ]


def gsm8k_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "question": f"Sam has {i} apples and buys {i + 3} more apples at the shop today. How many now?",
            "answer": f"Sam has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples."
            f"\n#### {2 * i + 3}",
        }
        for i in range(offset, offset + n)
    ]


def parse_prepare_args(argv: list[str]):
    parser = OneLineParser()  # the command line's parser: its checks run here too
    add_arguments(parser)
    return parser.parse_args(argv)
