"""Fixtures for the data tests: a tiny tokenizer trained on the fly and small synthetic source files.

The tiny byte-level BPE makes the pipeline testable without ``../shared``; tests on the real files
and the real GPT-2 tokenizer use the ``shared`` fixture and skip when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.helpers import parse_prepare_args

EOS = "<|endoftext|>"
CORPUS = [
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "What is the capital of France? The capital of France is Paris.",
    "Natalia sold 48/2 = 24 clips in May. #### 72 How many clips did she sell?",
    "Give three tips for staying healthy. Eat well, sleep, exercise.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_file):
    from ds_sft.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_file))


@pytest.fixture
def run_prepare(tiny_tokenizer_file, monkeypatch):
    """Run ``prepare`` in-process on the given flags with the tiny tokenizer and no ../shared."""
    import ds_sft.locations
    from ds_sft.data import prepare

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(argv: list[str]) -> dict:
        tokenizer = [] if "--tokenizer" in argv else ["--tokenizer", str(tiny_tokenizer_file)]  # given once
        args = parse_prepare_args([*tokenizer, "--seq_len", "256", *argv])
        prepare.run(args)
        return json.loads((Path(args.output_dir) / "manifest.json").read_text())

    return run
