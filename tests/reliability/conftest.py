"""Fixtures for the reliability tests: isolated single-process DeepSpeed environments on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"


class Payload:
    """Unpickling this object opens (creates) ``path``: harmless, and visible if it ever ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def single_rank_env() -> dict[str, str]:
    """Environment for a subprocess that is a whole DeepSpeed world on its own (rank 0 of 1).

    Without RANK / WORLD_SIZE / MASTER_* DeepSpeed falls back to MPI discovery and fails; MASTER_PORT 0
    lets the one rank's store bind a free port itself (nobody else has to find it). The JIT cache
    lives in the project so its ~16 s shm_comm build happens once.
    """
    return {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR)),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture
def ds_env() -> dict[str, str]:
    return single_rank_env()


@pytest.fixture(scope="module")
def dist_env():
    """This process as rank 0 of a one-process world (what the in-process commands need)."""
    from ds_sft.train.distributed import init_distributed

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    return init_distributed()


@pytest.fixture(scope="module")
def ds_env_module() -> dict[str, str]:
    return single_rank_env()


def write_tiny_data_dir(
    path: Path, train_rows=48, val_rows=8, seq_len=32, seed=0, tokenizer: Path | None = None
):
    """A prepared data directory for the ``tiny`` model preset (vocabulary 256), written in seconds.

    ``ds-sft prepare`` needs a real tokenizer whose ids would not fit the tiny model's embedding, so
    the documents here are random token ids, laid out by the same packer and shard writer that
    ``prepare`` uses: the trainer reads it exactly as it reads a real one. With ``tokenizer`` (a
    tokenizer or model folder) the directory also holds that tokenizer and names the alpaca
    template, as eval needs to read prompts.
    """
    import json
    import shutil

    import numpy as np

    from ds_sft.data.pack import best_fit_decreasing, pack_rows
    from ds_sft.data.shards import write_split
    from tests.data.helpers import documents_with_prompts

    rng = np.random.default_rng(seed)
    sources = ["alpaca", "dolly", "gsm8k"]
    splits = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        lengths = rng.integers(6, seq_len + 1, size=rows * 2)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        docs = documents_with_prompts(
            tokens=rng.integers(1, 256, size=int(offsets[-1])).astype(np.int32),
            offsets=offsets,
            prompt_lens=(lengths // 3).astype(np.int32),
            source_ids=rng.integers(0, len(sources), size=len(lengths)).astype(np.int16),
        )
        packed = pack_rows(docs, best_fit_decreasing(docs.lengths, seq_len), seq_len, pad_id=0)
        splits[split] = write_split(path / split, packed, vocab_size=256)
    manifest = {"sources": sources, "seq_len": seq_len, "splits": splits, "note": "synthetic, for tests"}
    if tokenizer is not None:
        not_tokenizer = shutil.ignore_patterns("*.safetensors", "config.json")
        shutil.copytree(tokenizer, path / "tokenizer", ignore=not_tokenizer)
        manifest["template"] = "alpaca"
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def loading_commands(model: Path, tokenizer: Path, data: Path, tmp_path: Path) -> dict[str, list[str]]:
    """The argv of train, eval and export, each loading ``model`` (with ``data``; export ships
    ``tokenizer``) and writing under ``tmp_path``: every command a hostile model meets."""
    return {
        "train": ["train", "--base_model", str(model), "--data_dir", str(data),
                  "--out_dir", str(tmp_path / "run")],
        "eval": ["eval", "--model", str(model), "--data_dir", str(data), "--no_gsm8k", "--no_generate",
                 "--out", str(tmp_path / "eval")],
        "export": ["export", "--base_model", str(model), "--tokenizer", str(tokenizer),
                   "--hf", str(tmp_path / "hf")],
    }  # fmt: skip


def word_tokenizer(folder: Path, words: str) -> Path:
    """A saved tokenizer of 255 words and an EOS (ids below the tiny preset's 256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"{words}{i}": i for i in range(255)} | {"<|endoftext|>": 255}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"{words}0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder
