"""Artifacts that do or don't belong together, built in seconds: two byte-level BPE tokenizers of the
same vocabulary size with different merges, data prepared with each, and tiny models that carry a
tokenizer in each of the layouts ``train`` and ``eval`` accept."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tests.data.helpers import alpaca_rows, gsm8k_rows, write_jsonl

EOS = "<|endoftext|>"
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n### Input:\n### Response:\n",
    *(" ".join(row.values()) for row in alpaca_rows(8) + gsm8k_rows(8)),
]
VOCAB = 420  # both tokenizers; the tiny models below get 512 embeddings
SEQ_LEN = 256


def train_bpe(path: Path, corpus: list[str]) -> Path:
    """A byte-level BPE of exactly :data:`VOCAB` tokens trained on ``corpus``, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus * 20, trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def two_tokenizers(root: Path) -> tuple[Path, Path]:
    """(A, B): the same size, different merges (B learned from the corpus with its words reversed)."""
    reversed_corpus = [" ".join(word[::-1] for word in text.split(" ")) for text in CORPUS]
    return train_bpe(root / "a" / "tokenizer.json", CORPUS), train_bpe(
        root / "b" / "tokenizer.json", reversed_corpus
    )


def prepare(
    out: Path, tokenizer: Path, seq_len: int = SEQ_LEN, rows: int = 40, offset: int = 0, extra: tuple = ()
) -> Path:
    """``ds-sft prepare`` on small Alpaca + GSM8K files (``offset`` shifts the rows: other data;
    ``extra``: more flags)."""
    from ds_sft.data import prepare as prepare_command

    src = out.with_name(out.name + "_src")
    src.mkdir(parents=True, exist_ok=True)
    flags = [
        "--alpaca",
        str(write_jsonl(src / "alpaca.jsonl", alpaca_rows(rows, offset))),
        "--gsm8k",
        str(write_jsonl(src / "gsm8k.jsonl", gsm8k_rows(rows, offset))),
        "--gsm8k_test",
        str(write_jsonl(src / "test.jsonl", gsm8k_rows(3, offset=1000))),
        "--tokenizer",
        str(tokenizer),
        "--seq_len",
        str(seq_len),
        "--min_val_rows",
        "4",
        "--output_dir",
        str(out),
        *extra,
    ]
    parser = argparse.ArgumentParser()
    prepare_command.add_arguments(parser)
    prepare_command.run(parser.parse_args(flags))
    return out


def tiny_model_dir(out: Path, tokenizer: Path | None = None, layout: str = "folder", **config) -> Path:
    """A tiny model (512 embeddings, SEQ_LEN positions, ``config`` overrides) saved by ``save_model``,
    carrying ``tokenizer``:

    - ``folder``: ``OUT/tokenizer/`` (save_pretrained), as a run's ``final/``; returns OUT
    - ``root``: a Hugging Face layout, tokenizer files beside the weights; returns OUT
    - ``run``: a training run directory, ``OUT/final/tokenizer/``; returns OUT (the run dir)
    """
    import torch

    from ds_sft.data.tokenizer import load_tokenizer
    from ds_sft.model.checkpoint import save_model
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    torch.manual_seed(0)
    weights = out / "final" if layout == "run" else out
    save_model(
        LlamaModel(ModelConfig.preset("tiny", **{"vocab_size": 512, "max_seq_len": SEQ_LEN, **config})),
        weights,
    )
    if tokenizer is not None:
        where = weights if layout == "root" else weights / "tokenizer"
        load_tokenizer(str(tokenizer)).save_pretrained(str(where))
    if tokenizer is not None and layout == "root":
        shutil.copy(tokenizer, weights / "tokenizer.json")  # the bare file, as the hub ships it
    return out
