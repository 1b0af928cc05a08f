"""The data folder changed while a run trains: ``ds-sft prepare`` run again into it, with another
tokenizer. The run's ``final/`` ships the tokenizer its weights were trained on, read at its start;
copied at the end, it was the new one, and eval and export then read the model with it."""

from __future__ import annotations

import time

from .conftest import single_rank_env, word_tokenizer, write_tiny_data_dir
from .runs import launch, train_flags, train_records

STEPS = 300  # far more than the few steps before the tokenizer is replaced


def test_final_ships_the_tokenizer_the_run_read_at_its_start(tmp_path):
    data = write_tiny_data_dir(tmp_path / "data", tokenizer=word_tokenizer(tmp_path / "first", "a"))
    trained_with = {p.name: p.read_bytes() for p in (data / "tokenizer").iterdir()}
    second = word_tokenizer(tmp_path / "second", "b")
    out = tmp_path / "run"
    proc = launch(train_flags(data, out, STEPS, "--save_interval", str(STEPS)), single_rank_env())
    try:
        deadline = time.monotonic() + 600
        while not train_records(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        for path in second.iterdir():  # as prepare's swap: new files under the old names
            (data / "tokenizer" / path.name).write_bytes(path.read_bytes())
        assert proc.poll() is None, "the run ended before its data changed: nothing was tried"
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert max(r["step"] for r in train_records(out)) == STEPS
    final = out / "final" / "tokenizer"
    assert {p.name: p.read_bytes() for p in final.iterdir()} == trained_with
