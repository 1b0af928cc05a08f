"""Packed rows on disk, and the training-side reader of them.

Layout of one split (``DATA/train`` or ``DATA/val``)::

    index.json                 {"seq_len", "dtype", "rows", "shards": [{"name", "rows"}, ...]}
    shard_00000.tokens.npy     [rows, seq_len] uint16 (uint32 when the vocab exceeds 65,536)
    shard_00000.loss_mask.npy  [rows, seq_len] uint8: 1 where the token is a trained target
    shard_00000.documents.npy  [docs, 2] int32: (length, source id) of each document, in row order
    shard_00000.row_offsets.npy [rows + 1] int64: row r holds documents row_offsets[r]:row_offsets[r+1]

All ``.npy`` files open memory-mapped (``open_memmap``, the ``.npy`` format alone: no zip, no pickle),
so a reader touches only the rows it serves.
Everything a training step needs (shifted labels, per-document position ids, document ids, source
ids) is derived from these in :meth:`PackedDataset.__getitem__`, so the files hold each fact once.

A data dir may come from anyone, damaged or forged, so the reader trusts none of it: the manifest
and index are checked key by key (:func:`read_checked_json`), and every shard once, when the dataset
opens (:meth:`PackedDataset.check_shard`): shapes, the exact dtype of each part (the one
:func:`write_split` writes), document lengths before they are summed, offsets, source ids,
and token ids below the recorded vocabulary (an id past the embedding is a device-side assert on a
GPU). A bad file is one line naming it, before the first step rather than in the middle of a run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ds_sft.data.sources import SOURCE_NAME, SOURCE_NAME_RULE
from ds_sft.errors import UserError
from ds_sft.labels import IGNORE_INDEX
from ds_sft.safe_read import read_json_object, require_regular_file

ROWS_PER_SHARD = 16384  # 16M tokens (32 MB of uint16) per shard at seq_len 1024
SHARD_PARTS = ("tokens", "loss_mask", "documents", "row_offsets")  # one .npy file each
SHARD_NAME = re.compile(r"shard_\d{5,}")  # what write_split names them; nothing that leaves the folder
REPREPARE = "run `ds-sft prepare` again to rebuild it"
TOKEN_DTYPES = ("uint16", "uint32")  # the index's "dtype": what token_dtype picks for the vocabulary
# The dtype of every other part, written so and required so: a bool or float array passes integer
# checks in ways an index must not (a bool row_offsets indexes as a mask)
PART_DTYPES = {
    "loss_mask": np.dtype(np.uint8),
    "documents": np.dtype(np.int32),
    "row_offsets": np.dtype(np.int64),
}


def read_checked_json(path: Path, required: dict[str, type | tuple[type, ...]]) -> dict:
    """The JSON object in ``path`` (:func:`ds_sft.safe_read.read_json_object`) with each ``required`` key
    present and of its type; else one UserError naming the file and the key (a bool is no int)."""
    value = read_json_object(path, "prepared data file")
    for key, kind in required.items():
        field = value.get(key)
        if not isinstance(field, kind) or isinstance(field, bool):
            raise UserError(f"{path}: {key!r} is missing or not {_type_name(kind)}; {REPREPARE}")
    return value


def _type_name(kind) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


def read_manifest(data_dir: str | Path, required: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """``DATA/manifest.json``, checked: ``sources`` (a list of names) always, plus ``required``."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{data_dir}: no manifest.json, so not a prepared data dir; run `ds-sft prepare --output_dir DIR`"
        )
    manifest = read_checked_json(path, {"sources": list, **(required or {})})
    if not manifest["sources"] or not all(isinstance(name, str) for name in manifest["sources"]):
        raise UserError(f"{path}: 'sources' must name each source; {REPREPARE}")
    # prepare writes only names of its --source rule; another one (an escape sequence, a newline) came
    # from an edited manifest, and the eval lines and the report would print it
    misnamed = next((name for name in manifest["sources"] if not SOURCE_NAME.fullmatch(name)), None)
    if misnamed is not None:
        raise UserError(f"{path}: source name {misnamed!r} is not {SOURCE_NAME_RULE}; {REPREPARE}")
    tokenizer = manifest.get("tokenizer", {})
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("vocab_size", 1), int):
        raise UserError(f"{path}: 'tokenizer' must be an object with an integer vocab_size; {REPREPARE}")
    return manifest


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
        parts = {
            "loss_mask": packed["loss_mask"][first:last],
            "documents": documents[doc_first:doc_last],
            "row_offsets": row_offsets[first : last + 1] - doc_first,
        }
        for part, array in parts.items():
            np.save(directory / f"{name}.{part}.npy", array.astype(PART_DTYPES[part], copy=False))
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
        self.manifest = read_manifest(self.data_dir)
        self.index = read_checked_json(
            index_path, {"seq_len": int, "rows": int, "dtype": str, "shards": list}
        )
        self.split = split
        self.seq_len: int = self.index["seq_len"]
        self.sources: list[str] = self.manifest["sources"]
        self.tokenizer_dir = self.data_dir / "tokenizer"
        shards = self.index["shards"]
        if (
            self.seq_len < 2
            or self.index["dtype"] not in TOKEN_DTYPES
            or not all(
                isinstance(shard, dict)
                and isinstance(shard.get("name"), str)
                and SHARD_NAME.fullmatch(shard["name"])
                and type(shard.get("rows")) is int
                and shard["rows"] >= 0
                for shard in shards
            )
            or sum(shard["rows"] for shard in shards) != self.index["rows"]
        ):
            raise UserError(f"{index_path}: its seq_len, dtype, rows or shard list is malformed; {REPREPARE}")
        self._first_rows = np.cumsum([0] + [shard["rows"] for shard in shards])
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self.largest_token_id = -1  # over every row; set by the checks
        self.trained_tokens = 0  # labels other than -100 over every row; set by the checks
        for number in range(len(shards)):
            self.check_shard(number)
        self._open.clear()  # the checks read every shard; serving opens them again, lazily

    def __len__(self) -> int:
        return int(self.index["rows"])

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        # opened lazily, so a dataset pickled into DataLoader workers carries no open maps
        if number not in self._open:
            name = self.index["shards"][number]["name"]
            paths = {part: self.data_dir / self.split / f"{name}.{part}.npy" for part in SHARD_PARTS}
            for path in paths.values():  # a FIFO would block the read forever, a device never end
                require_regular_file(path, "prepared shard")
            # open_memmap reads the .npy format and nothing else: np.load would hand back an NpzFile
            # for a zip under the same name
            self._open[number] = {
                part: np.lib.format.open_memmap(path, mode="r") for part, path in paths.items()
            }
        return self._open[number]

    def check_shard(self, number: int) -> None:
        """Refuse, in one line, a shard whose arrays do not describe ``rows`` packed rows of this
        split: unreadable, of another shape or dtype than :func:`write_split` writes, document lengths
        outside 1..seq_len (checked before they are summed, so no sum overflows), offsets that do not
        index the documents, rows overfull, source ids outside the manifest's, token ids at or past the
        manifest's vocabulary, a loss mask set on padding (trained as targets of no document)."""
        name = self.index["shards"][number]["name"]
        rows = self.index["shards"][number]["rows"]
        where = f"{self.data_dir / self.split / name}.*.npy"
        try:
            shard = self._shard(number)
        except ValueError as err:  # truncated, not .npy, or objects (which would need pickle)
            raise UserError(f"{where}: unreadable ({str(err).splitlines()[0]}); {REPREPARE}") from None
        tokens, mask, documents, offsets = (shard[part] for part in SHARD_PARTS)
        vocab = self.manifest.get("tokenizer", {}).get("vocab_size")
        expected = {**PART_DTYPES, "tokens": np.dtype(self.index["dtype"])}
        fault = (
            "of another dtype"
            if any(shard[part].dtype != expected[part] for part in SHARD_PARTS)
            else "of another shape"
            if tokens.shape != (rows, self.seq_len)
            or mask.shape != tokens.shape
            or documents.ndim != 2
            or documents.shape[1] != 2
            or offsets.shape != (rows + 1,)
            else None
        )
        if fault is None and rows:
            self.largest_token_id = max(self.largest_token_id, int(tokens.max()))
            lengths, sources = documents[:, 0].astype(np.int64), documents[:, 1].astype(np.int64)
            sized = not ((lengths < 1) | (lengths > self.seq_len)).any()
            indexed = offsets[0] == 0 and offsets[-1] == len(documents) and not (np.diff(offsets) < 0).any()
            ends = np.concatenate([[0], np.cumsum(lengths)]) if sized else None
            used = ends[offsets[1:]] - ends[offsets[:-1]] if sized and indexed else None  # tokens per row
            fault = (
                "with a document of no tokens, or longer than a row"
                if not sized
                else "with row offsets that do not index its documents"
                if not indexed
                else "with rows overfull"
                if (used > self.seq_len).any()
                else "with a source id the manifest does not list"
                if ((sources < 0) | (sources >= len(self.sources))).any()
                else f"with token ids past the vocabulary of {vocab}"
                if vocab is not None and self.largest_token_id >= vocab
                else "with trained positions in a row's padding"
                if (mask.astype(bool) & (np.arange(self.seq_len)[None, :] >= used[:, None])).any()
                else None
            )
        if fault is not None:
            raise UserError(f"{where}: arrays {fault}; {REPREPARE}")
        if rows:
            # a trained token is a label unless it opens its document (no token of it comes before)
            row_of_document = np.repeat(np.arange(rows), np.diff(offsets))
            opening = ends[:-1] - ends[offsets[row_of_document]]
            trained = int(mask.sum(dtype=np.int64)) - int(mask[row_of_document, opening].sum(dtype=np.int64))
            self.trained_tokens += trained

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
