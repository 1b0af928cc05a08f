"""Helpers for the trainer tests: tiny packed rows, settings and the DeepSpeed dict for them.

The rows follow the ``PackedDataset`` item contract (docs/ARCHITECTURE.md): shifted labels with -100
on untrained positions, position ids restarting per document, document ids (-1 on padding), source
ids. Trained-token counts differ from row to row on purpose: that is what separates a
token-normalized loss from a mean of micro-batch means.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))

SEQ_LEN = 64
VOCAB = 256  # the tiny preset's


class TinyPacked:
    """``rows`` packed rows of 1-3 documents each, seeded; the map-style dataset the trainer reads.
    Padding keeps token 0 (labels -100, document -1, source -1)."""

    sources = ["alpaca", "dolly", "gsm8k"]
    seq_len = SEQ_LEN
    tokenizer_dir = None

    def __init__(self, rows: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = [self._row(g) for _ in range(rows)]

    def _row(self, g) -> dict:
        T = SEQ_LEN
        # each document counts up from a random token in a random stride: learnable within a few steps
        input_ids = torch.zeros(T, dtype=torch.long)
        labels = torch.full((T,), -100)
        position_ids = torch.zeros(T, dtype=torch.long)
        document_ids = torch.full((T,), -1)
        source_ids = torch.full((T,), -1)
        pos = 0
        for doc in range(int(torch.randint(1, 4, (), generator=g))):
            length = int(torch.randint(6, 24, (), generator=g))
            if pos + length > T:
                break
            prompt = int(torch.randint(1, length - 2, (), generator=g))
            span = slice(pos, pos + length)
            start, stride = torch.randint(0, VOCAB, (2,), generator=g).tolist()
            input_ids[span] = (start + (stride % 4 + 1) * torch.arange(length)) % VOCAB
            position_ids[span] = torch.arange(length)
            document_ids[span] = doc
            source_ids[span] = int(torch.randint(0, 3, (), generator=g))
            # targets: the next token inside the document, after the prompt; not the last token
            labels[pos + prompt : pos + length - 1] = input_ids[pos + prompt + 1 : pos + length]
            pos += length
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "document_ids": document_ids,
            "source_ids": source_ids,
        }

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return copy.deepcopy(self.items[i])


def settings(**overrides) -> SimpleNamespace:
    """Trainer settings as `ds-sft train` would resolve them, for the tiny model on TinyPacked."""
    from ds_sft.train.config_keys import DEFAULTS

    values = {
        **DEFAULTS,
        "model": "tiny",
        "micro_batch_size": 2,
        "grad_accum": 2,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_iters": 3,
        "max_iters": 12,
        "eval_interval": 6,
        "eval_iters": 2,
        "save_interval": 100,
        "wandb_mode": "disabled",
        "log_interval": 100,
        "fp8_recipe": {},
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def ds_config(s: SimpleNamespace, world_size: int = 1, **extra) -> dict:
    """The DeepSpeed dict the config layer would produce for settings ``s``."""
    config = {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "train_batch_size": s.micro_batch_size * s.grad_accum * world_size,
        "gradient_clipping": s.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": s.learning_rate,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": s.weight_decay,
                "torch_adam": True,
                "fused": True,  # as the shipped configs (the reference loop keeps torch's default)
            },
        },
        "zero_optimization": {"stage": s.zero_stage},
        "bf16": {"enabled": s.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }
    config.update(extra)
    return config


def tiny_model(seed: int = 0):
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    torch.manual_seed(seed)
    return LlamaModel(ModelConfig.preset("tiny", kernels="torch"))


def write_data_dir(
    directory: Path, train_rows: int = 48, val_rows: int = 8, seed: int = 1, val_trained_rows=None
) -> Path:
    """A prepared data directory (manifest + train/val shards) holding TinyPacked rows, for the CLI.
    ``val_trained_rows``: the val rows that keep their trained tokens (every other one is all prompt)."""
    import json

    import numpy as np

    from ds_sft.data.shards import write_split

    for split, rows, split_seed in (("train", train_rows, seed), ("val", val_rows, seed + 1000)):
        items = TinyPacked(rows, split_seed).items
        tokens = np.stack([item["input_ids"].numpy() for item in items])
        loss_mask = np.zeros_like(tokens, dtype=np.uint8)
        lengths, sources, offsets = [], [], [0]
        for r, item in enumerate(items):
            loss_mask[r, 1:] = (item["labels"][:-1] != -100).numpy()  # token t+1 is a target of t
            docs = item["document_ids"]
            for doc in range(int(docs.max()) + 1):
                where = (docs == doc).nonzero().flatten()
                lengths.append(len(where))
                sources.append(int(item["source_ids"][where[0]]))
            offsets.append(len(lengths))
        if split == "val" and val_trained_rows is not None:
            loss_mask[[r for r in range(rows) if r not in val_trained_rows]] = 0
        packed = {
            "tokens": tokens,
            "loss_mask": loss_mask,
            "doc_lengths": np.array(lengths),
            "doc_sources": np.array(sources),
            "row_offsets": np.array(offsets, dtype=np.int64),
        }
        write_split(directory / split, packed, vocab_size=VOCAB)
    (directory / "manifest.json").write_text(json.dumps({"sources": TinyPacked.sources}))
    return directory


def reference_losses(
    s, dataset, order, world_size: int = 1, seed: int = 0
) -> tuple[list[float | None], list[float | None], dict]:
    """A plain-PyTorch AdamW loop written from the definitions (not from ds-sft's code): decay only on
    ``*_proj.weight``, loss = sum of token losses over the global batch / its trained tokens,
    ``clip_grad_norm_``. Step k trains rows ``order[k * G : (k + 1) * G]``, G = micro x accum x
    ``world_size``; a step whose rows hold no trained token has nothing to learn from and does not
    step AdamW (loss and norm None). Returns (losses, pre-clip grad norms) per step and the final
    weights."""
    from ds_sft.train.schedule import lr_at

    model = tiny_model(seed)
    decay = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("proj.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rows_per_step = s.micro_batch_size * s.grad_accum * world_size
    losses, norms = [], []
    for step in range(s.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s.learning_rate, s.min_lr, s.warmup_iters, s.max_iters)
        rows = [dataset[int(i)] for i in order[step * rows_per_step : (step + 1) * rows_per_step]]
        trained = sum(int((r["labels"] != -100).sum()) for r in rows)
        if trained == 0:
            losses.append(None)
            norms.append(None)
            continue
        total = 0.0
        for start in range(0, rows_per_step, s.micro_batch_size):
            batch = {
                k: torch.stack([r[k] for r in rows[start : start + s.micro_batch_size]]) for k in rows[0]
            }
            loss_sum = model(
                batch["input_ids"], batch["position_ids"], batch["document_ids"], batch["labels"]
            )
            (loss_sum / trained).backward()
            total += loss_sum.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / trained)
    return losses, norms, model.state_dict()


def this_python_first(folder: Path, env: dict) -> dict:
    """``env`` in which ``python3`` is this test's interpreter (the launch scripts call ``python3``),
    the rest of PATH as it was. Not the venv's bin first: that also brings the venv's ninja, and
    DeepSpeed rebuilds its CPU op (~50 s under load) each time the ninja binary changes."""
    import shlex
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python3"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    return {**env, "PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}"}
