"""Packed rows on disk, and the training-side reader of them.

Layout of one split (``DATA/train`` or ``DATA/val``)::

    index.json                 {"seq_len", "dtype", "rows", "shards": [{"name", "rows"}, ...]}
    shard_00000.tokens.npy     [rows, seq_len] uint16 (uint32 when the vocab exceeds 65,536)
    shard_00000.loss_mask.npy  [rows, seq_len] uint8: 1 where the token is a trained target
    shard_00000.documents.npy  [docs, 2] int32: (length, source id) of each document, in row order
    shard_00000.row_offsets.npy [rows + 1] int64: row r holds documents row_offsets[r]:row_offsets[r+1]

All ``.npy`` files open with ``np.load(mmap_mode="r")``: a reader touches only the rows it serves.
Everything a training step needs (shifted labels, per-document position ids, document ids, source
ids) is derived from these in :meth:`PackedDataset.__getitem__`, so the files hold each fact once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ds_sft.errors import UserError
from ds_sft.labels import IGNORE_INDEX

ROWS_PER_SHARD = 16384  # 16M tokens (32 MB of uint16) per shard at seq_len 1024


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_split(directory: Path, packed: dict[str, np.ndarray], vocab_size: int) -> dict:
    """Write a split's packed rows (from :func:`ds_sft.data.pack.pack_rows`) as shards + index."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens, row_offsets = packed["tokens"], packed["row_offsets"]
    n_rows, seq_len = tokens.shape
    dtype = token_dtype(vocab_size)
    documents = np.stack([packed["doc_lengths"], packed["doc_sources"].astype(np.int32)], axis=1)
    shards = []
    for number, first in enumerate(range(0, max(n_rows, 1), ROWS_PER_SHARD)):
        last = min(first + ROWS_PER_SHARD, n_rows)
        name = f"shard_{number:05d}"
        doc_first, doc_last = row_offsets[first], row_offsets[last]
        np.save(directory / f"{name}.tokens.npy", tokens[first:last].astype(dtype))
        np.save(directory / f"{name}.loss_mask.npy", packed["loss_mask"][first:last])
        np.save(directory / f"{name}.documents.npy", documents[doc_first:doc_last])
        np.save(directory / f"{name}.row_offsets.npy", row_offsets[first : last + 1] - doc_first)
        shards.append({"name": name, "rows": int(last - first)})
    index = {"seq_len": int(seq_len), "dtype": dtype.name, "rows": int(n_rows), "shards": shards}
    (directory / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


class PackedDataset:
    """Map-style dataset over a prepared split; item ``i`` is a dict of int64 tensors [seq_len].

    Keys: ``input_ids``; ``labels`` (the next token, already shifted, -100 where nothing is trained:
    prompt tokens, padding, each document's last token); ``position_ids`` (restart at 0 per
    document); ``document_ids`` (0, 1, ... within the row, -1 on padding); ``source_ids`` (index into
    :attr:`sources`, -1 on padding). Works with ``torch.utils.data.DataLoader`` as is.
    """

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        manifest_path = self.data_dir / "manifest.json"
        index_path = self.data_dir / split / "index.json"
        if not manifest_path.is_file() or not index_path.is_file():
            raise UserError(
                f"{self.data_dir}: no prepared {split!r} split here; run `ds-sft prepare --output_dir DIR`"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.index = json.loads(index_path.read_text())
        self.split = split
        self.seq_len: int = self.index["seq_len"]
        self.sources: list[str] = self.manifest["sources"]
        self.tokenizer_dir = self.data_dir / "tokenizer"
        self._first_rows = np.cumsum([0] + [shard["rows"] for shard in self.index["shards"]])
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.index["rows"])

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        # opened lazily, so a dataset pickled into DataLoader workers carries no open maps
        if number not in self._open:
            name = self.index["shards"][number]["name"]
            self._open[number] = {
                part: np.load(self.data_dir / self.split / f"{name}.{part}.npy", mmap_mode="r")
                for part in ("tokens", "loss_mask", "documents", "row_offsets")
            }
        return self._open[number]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def row_arrays(self, i: int) -> dict[str, np.ndarray]:
        """Item ``i`` as numpy int64 arrays (what :meth:`__getitem__` wraps as tensors)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        number = int(np.searchsorted(self._first_rows, i, side="right") - 1)
        shard, row = self._shard(number), i - int(self._first_rows[number])
        input_ids = shard["tokens"][row].astype(np.int64)
        trained = shard["loss_mask"][row].astype(bool)
        documents = shard["documents"][shard["row_offsets"][row] : shard["row_offsets"][row + 1]]
        lengths, sources = documents[:, 0].astype(np.int64), documents[:, 1].astype(np.int64)
        used = int(lengths.sum())
        padding = self.seq_len - used
        starts = np.cumsum(lengths) - lengths
        document_ids = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), np.full(padding, -1)])
        position_ids = np.concatenate(
            [np.arange(used) - np.repeat(starts, lengths), np.zeros(padding, np.int64)]
        )
        source_ids = np.concatenate([np.repeat(sources, lengths), np.full(padding, -1)])
        # label[t] = token t+1 when t+1 is a trained token of the same document
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        target = trained[1:] & (document_ids[1:] == document_ids[:-1])
        labels[:-1][target] = input_ids[1:][target]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "document_ids": document_ids,
            "source_ids": source_ids,
        }

    def __getitem__(self, i: int) -> dict:
        import torch

        return {key: torch.from_numpy(value) for key, value in self.row_arrays(int(i)).items()}


def plot_lengths(path: Path, lengths_by_source: dict[str, np.ndarray], seq_len: int) -> None:
    """A PNG of token-length histograms per source, with the row length marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    # A bare Figure (no pyplot state to register and close) drawn by the Agg canvas it creates
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.12)  # fixed margins: no layout solver
    top = max([seq_len] + [int(lengths.max()) for lengths in lengths_by_source.values() if len(lengths)])
    edges = np.linspace(0, top, 61)
    for source, lengths in lengths_by_source.items():
        # np.histogram + stairs draws one line per source; ax.hist would build a patch per bin
        ax.stairs(
            np.histogram(lengths, bins=edges)[0], edges, linewidth=1.5, label=f"{source} (n={len(lengths):,})"
        )
    ax.axvline(seq_len, color="black", linestyle="--", linewidth=1, label=f"seq_len {seq_len}")
    ax.set_xlabel("tokens per example (prompt + response + EOS)")
    ax.set_ylabel("examples")
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())  # unlabelled log minor ticks cost more to draw than the data
    # a figure-level title: an axes title is re-positioned against the tick labels' extents at each draw
    fig.text(0.5, 0.95, "Token lengths per source", ha="center", va="bottom", fontsize="large")
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100)
