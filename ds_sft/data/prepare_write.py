"""prepare's output folder, filled: each split's documents packed into rows and written as shards,
the tokenizer, the length histograms and the manifest, all built in a staging sibling and swapped in
whole (``output.building_output``, which also removes the old output's listed files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ds_sft.errors import UserError, as_os_error

if TYPE_CHECKING:
    from ds_sft.data.prepare_inputs import Inputs
    from ds_sft.data.tokenize import Documents


def write_output(
    inputs: Inputs, manifest: dict, tokenizer, splits: dict[str, Documents], lengths: dict, args
) -> None:
    """Build the output in a staging sibling and swap it in whole (``output.building_output``): each
    split's shards (:func:`write_documents`, recorded in ``manifest["splits"]``), the tokenizer, the
    histograms of ``lengths`` (per source, its rows' token counts) and the manifest, which lists every
    file written."""
    from ds_sft.data.output import MANIFEST, building_output
    from ds_sft.data.shards import plot_lengths

    names, vocab_size = manifest["sources"], manifest["tokenizer"]["vocab_size"]
    pad_id = manifest["tokenizer"]["pad_token_id"]
    old_files = inputs.previous["files"] if inputs.previous else {}
    with building_output(inputs.output_dir, old_files, "--output_dir", manifest, MANIFEST) as tmp:
        manifest["splits"] = {
            split: write_documents(tmp / split, split_docs, args, pad_id, vocab_size, names)
            for split, split_docs in splits.items()
        }
        try:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        except Exception as err:  # disk full: tokenizers says so in a plain Exception
            raise as_os_error(err, inputs.output_dir) from err
        plot_lengths(tmp / "lengths.png", lengths, args.seq_len)


def write_documents(directory: Path, docs, args, pad_id: int, vocab_size: int, names: list[str]) -> dict:
    """Pack (or pad, with --no_pack) one split's documents into rows, write its shards, describe it."""
    from ds_sft.data.pack import best_fit_decreasing, efficiency, one_per_row, pack_rows
    from ds_sft.data.shards import write_split

    layout = one_per_row(len(docs)) if args.no_pack else best_fit_decreasing(docs.lengths, args.seq_len)
    check_rows_fit(len(layout), args.seq_len, args.no_pack)
    write_split(directory, pack_rows(docs, layout, args.seq_len, pad_id), vocab_size)
    return {
        "rows": len(layout),
        "documents": len(docs),
        "tokens": int(docs.offsets[-1]),
        "trained_tokens": int(docs.trained.sum(dtype=np.int64)),
        "documents_per_source": {name: int((docs.source_ids == i).sum()) for i, name in enumerate(names)},
        "efficiency": efficiency(docs, len(layout), args.seq_len),
    }


def check_rows_fit(rows: int, seq_len: int, padded: bool) -> None:
    """One line, before the rows are laid out, when they cannot be held: ``rows x seq_len`` token
    ids and loss-mask bytes (:func:`~ds_sft.data.pack.pack_rows`). Packed rows are about as long as
    the data; padded ones (``--no_pack``) each take ``--seq_len`` however short the example, so 5,000
    examples at ``--seq_len 1048576`` asked numpy for 38 GiB and ended in its MemoryError."""
    from ds_sft.data.pack import BYTES_PER_POSITION
    from ds_sft.machine import available_memory

    need, available = rows * seq_len * BYTES_PER_POSITION, available_memory()
    if available is None or need <= available:
        return
    fix = "lower --seq_len, or pack (drop --no_pack)" if padded else "lower --seq_len or --max_examples"
    raise UserError(
        f"{rows:,} rows of --seq_len {seq_len:,} take {need / 2**30:,.1f} GiB to lay out, more than the "
        f"{available / 2**30:,.1f} GiB this machine has available: {fix}"
    )
