"""A row that can never fit ``--seq_len`` costs ``prepare`` little more memory than reading it.

It is dropped (or cut, with ``--truncate``) right after cleaning (``tokenize.bound_records``), so
dedup, decontamination and the val split never see its text: a 300 MB row once took 6.3 GB (~21x)
and 2 min 20 s, only to be dropped as ``longer_than_seq_len``. Reading a file costs up to ~3x the row
(its bytes, their decoded text and the parsed value), so the whole run is held to 4x, measured by
``tracemalloc`` over the command run in this process.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest

from tests.data.helpers import alpaca_rows, write_jsonl

ROW_BYTES = 40 << 20


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_huge_row_costs_little_more_than_reading_it(run_prepare, tmp_path, suffix, truncate):
    rows = alpaca_rows(30)
    words = "lorem ipsum dolor sit amet "  # words, so dedup and the 13-grams have work to do
    rows.insert(5, {"instruction": "big", "input": "", "output": words * (ROW_BYTES // len(words))})
    data = tmp_path / f"rows{suffix}"
    if suffix == ".json":
        data.write_text(json.dumps(rows))
    else:
        write_jsonl(data, rows)
    flags = ["--alpaca", str(data), "--output_dir", str(tmp_path / "out"), "--min_val_rows", "2"]
    del rows
    tracemalloc.start()
    try:
        manifest = run_prepare(flags + ["--truncate"] * truncate)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * ROW_BYTES, f"peak {peak / 2**20:.0f} MiB for a {ROW_BYTES >> 20} MiB row"
    counts = manifest["counts"]["alpaca"]
    assert counts["rows_in"] == 31
    if truncate:
        assert counts["kept"] == 31 and counts["truncated"]["rows"] == 1
        assert counts["truncated"]["tokens_cut"] >= ROW_BYTES // 128 - 256  # a floor of what was cut
    else:
        assert counts["kept"] == 30 and counts["dropped"] == {"longer_than_seq_len": 1}
