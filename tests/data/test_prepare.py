"""``ds-sft prepare`` end to end: counts balance, items are right, outputs are deterministic and reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ds_sft.data.shards import PackedDataset
from ds_sft.errors import UserError
from tests.data.helpers import alpaca_rows, gsm8k_rows, write_jsonl


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    """60 Alpaca rows (+ 2 planted duplicates, 1 planted GSM8K test question), 40 GSM8K rows, a test set"""
    test_set = gsm8k_rows(5, offset=1000)
    alpaca = alpaca_rows(60)
    alpaca += [dict(alpaca[3]), {**alpaca[4], "instruction": alpaca[4]["instruction"].upper()}]
    alpaca.append({"instruction": test_set[2]["question"], "input": "", "output": "It is 2005."})
    return {
        "alpaca": write_jsonl(tmp_path / "alpaca.jsonl", alpaca),
        "gsm8k": write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(40)),
        "test": write_jsonl(tmp_path / "test.jsonl", test_set),
    }


def base_flags(sources, out) -> list[str]:
    files = ["--alpaca", sources["alpaca"], "--gsm8k", sources["gsm8k"], "--gsm8k_test", sources["test"]]
    return [*map(str, files), "--output_dir", str(out), "--min_val_rows", "4"]


def test_counts_balance_and_planted_rows_are_dropped(run_prepare, sources, tmp_path):
    manifest = run_prepare(base_flags(sources, tmp_path / "out"))
    alpaca, gsm8k = manifest["counts"]["alpaca"], manifest["counts"]["gsm8k"]
    assert alpaca["rows_in"] == 63 and gsm8k["rows_in"] == 40
    assert alpaca["dropped"] == {"duplicate_exact": 1, "duplicate_normalized": 1, "overlaps_gsm8k_test": 1}
    for counts in manifest["counts"].values():
        assert counts["rows_in"] == counts["kept"] + sum(counts["dropped"].values())
        assert counts["kept"] == counts["train"] + counts["val"] and counts["val"] == 4
    assert manifest["splits"]["train"]["documents"] == 56 + 36
    assert manifest["sources"] == ["alpaca", "gsm8k"] and manifest["template"] == "alpaca"
    out = tmp_path / "out"
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_items_shift_labels_and_restart_positions(run_prepare, sources, tmp_path, tiny_tokenizer):
    import torch

    run_prepare(base_flags(sources, tmp_path / "out"))
    expected = {r["output"] for r in alpaca_rows(60)} | {
        r["answer"].replace(f"<<{i}+{i + 3}={2 * i + 3}>>", "") for i, r in enumerate(gsm8k_rows(40))
    }
    eos = tiny_tokenizer.eos_token_id
    found = []
    for split in ("train", "val"):
        data = PackedDataset(tmp_path / "out", split)
        assert data.seq_len == 256 and data.sources == ["alpaca", "gsm8k"]
        for i in range(len(data)):
            item = data[i]
            assert set(item) == {"input_ids", "labels", "position_ids", "document_ids", "source_ids"}
            assert all(v.dtype == torch.int64 and tuple(v.shape) == (256,) for v in item.values())
            ids, labels = item["input_ids"].numpy(), item["labels"].numpy()
            docs, pos = item["document_ids"].numpy(), item["position_ids"].numpy()
            for d in range(docs.max() + 1):
                where = np.flatnonzero(docs == d)
                assert (np.diff(where) == 1).all()  # a document is contiguous in its row
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart at 0
                trained = labels[where] != -100
                # labels are the next tokens: label[t] == input_ids[t + 1] wherever trained
                np.testing.assert_array_equal(labels[where][trained], ids[where[trained] + 1])
                assert labels[where[-1]] == -100 and labels[where][trained][-1] == eos
                found.append(tiny_tokenizer.decode(labels[where][trained][:-1].tolist()))
            padding = docs == -1
            assert (labels[padding] == -100).all() and (item["source_ids"].numpy()[padding] == -1).all()
    assert sorted(found) == sorted(expected)  # every kept response exactly once, none split or lost


def test_same_seed_gives_byte_identical_shards(run_prepare, sources, tmp_path):
    run_prepare(base_flags(sources, tmp_path / "a"))
    run_prepare(base_flags(sources, tmp_path / "b"))
    run_prepare([*base_flags(sources, tmp_path / "c"), "--seed", "99"])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npy"))
    assert files and all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_rerun_reuses_output_and_force_redoes_it(run_prepare, sources, tmp_path, capsys):
    out = tmp_path / "out"
    run_prepare(base_flags(sources, out))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    run_prepare(base_flags(sources, out))
    assert "up to date" in capsys.readouterr().out and (out / "manifest.json").stat().st_mtime_ns == stamp
    run_prepare([*base_flags(sources, out), "--force"])
    assert (out / "manifest.json").stat().st_mtime_ns != stamp


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["--gsm8k", "{gsm8k}"], ["--source", "gsm8k={gsm8k}"]),  # GSM8K's cleaning, or none
        (["--source", "gsm8k={gsm8k}"], ["--gsm8k", "{gsm8k}"]),
        (["--alpaca", "{alpaca}"], ["--source", "alpaca={alpaca}"]),
        (["--source", "d={alpaca}"],
         ["--source", "d={alpaca}", "--field_map", "d:instruction=output,response=instruction"]),
    ],
)  # fmt: skip
def test_a_rerun_is_reused_only_when_it_would_write_the_same(run_prepare, sources, tmp_path, first, second):
    """The same file under the same name read as another kind of source (--gsm8k F, then --source
    gsm8k=F, which keeps the calculator annotations) reused the first output as up to date: the key
    held each input's name and bytes, not how it was read. Whatever a rerun reuses equals a fresh run."""
    test = ["--gsm8k_test", str(sources["test"]), "--min_val_rows", "4"]

    def flags(argv: list[str], out: Path) -> list[str]:
        return [*(arg.format(**sources) for arg in argv), *test, "--output_dir", str(out)]

    run_prepare(flags(first, tmp_path / "out"))
    rerun = run_prepare(flags(second, tmp_path / "out"))
    fresh = run_prepare(flags(second, tmp_path / "fresh"))
    assert rerun["splits"] == fresh["splits"] and rerun["counts"] == fresh["counts"]
    files = sorted(p.relative_to(tmp_path / "fresh") for p in (tmp_path / "fresh").rglob("*.npy"))
    assert files and all(
        (tmp_path / "out" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes() for f in files
    )


def test_no_pack_mix_and_max_examples(run_prepare, sources, tmp_path):
    manifest = run_prepare([*base_flags(sources, tmp_path / "p"), "--no_pack", "--mix", "gsm8k=2.5"])
    train = manifest["splits"]["train"]
    assert train["rows"] == train["documents"] == 56 + 90  # 36 GSM8K rows x 2.5
    assert manifest["counts"]["gsm8k"]["train_after_mix"] == 90
    capped = run_prepare([*base_flags(sources, tmp_path / "q"), "--mix", "gsm8k=2.5", "--max_examples", "73"])
    per_source = capped["splits"]["train"]["documents_per_source"]
    assert per_source == {"alpaca": 28, "gsm8k": 45}  # both halved


def test_max_examples_above_the_data_is_said_and_recorded(run_prepare, sources, tmp_path, capsys):
    """Issue 16: the seed's --max_examples 80000 against fewer rows is one note, and in the manifest."""
    manifest = run_prepare([*base_flags(sources, tmp_path / "m"), "--max_examples", "80000"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "--max_examples" in line]
    assert notes == [
        "note: --max_examples 80,000 is more than the 92 training examples left after cleaning, dedup, "
        "decontamination, the val split and --mix: all of them are used"
    ]
    assert manifest["max_examples"] == {"requested": 80000, "available": 92, "used": 92, "note": notes[0][6:]}
    capped = run_prepare([*base_flags(sources, tmp_path / "c"), "--max_examples", "50"])
    assert capped["max_examples"] == {"requested": 50, "available": 92, "used": 50, "note": None}
    assert "--max_examples" not in capsys.readouterr().err


def test_too_long_rows_counted_or_truncated(run_prepare, sources, tmp_path):
    long_rows = alpaca_rows(4) + [{"instruction": "Tell a long story.", "input": "", "output": "word " * 800}]
    path = write_jsonl(tmp_path / "long.jsonl", long_rows)
    flags = ["--alpaca", str(path), "--val_fraction", "0", "--decontam_threshold", "0"]
    dropped = run_prepare([*flags, "--output_dir", str(tmp_path / "d")])
    assert dropped["counts"]["alpaca"]["dropped"] == {"longer_than_seq_len": 1}
    kept = run_prepare([*flags, "--output_dir", str(tmp_path / "t"), "--truncate"])
    assert kept["counts"]["alpaca"]["kept"] == 5 and kept["token_lengths"]["alpaca"]["max"] > 256
    data = PackedDataset(tmp_path / "t", "train")
    assert max(int(data[i]["position_ids"].max()) for i in range(len(data))) == 255


def test_no_source_at_all_says_what_to_pass(run_prepare, tmp_path):
    with pytest.raises(
        UserError, match="no data source: pass --alpaca/--gsm8k/--dolly PATH or --source NAME=PATH"
    ):
        run_prepare(["--output_dir", str(tmp_path / "x")])


def test_generic_source_with_field_map(run_prepare, tmp_path):
    rows = [{"q": f"Question {i} about cats?", "a": f"Answer {i}: cats purr."} for i in range(12)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    flags = ["--source", f"mine={path}", "--field_map", "mine:instruction=q,response=a"]
    manifest = run_prepare([*flags, "--output_dir", str(tmp_path / "g"), "--min_val_rows", "2"])
    assert manifest["counts"]["mine"]["kept"] == 12 and manifest["counts"]["mine"]["val"] == 2


@pytest.fixture(scope="module")
def shared_mix(shared, tmp_path_factory):
    """The whole shared mix prepared once with the GPT-2 tokenizer at seq 1024 (~20 s on 2 cores)."""
    from ds_sft.command import main_for

    out = tmp_path_factory.mktemp("shared_mix") / "data"
    assert main_for("prepare", ["--from_shared", "--tokenizer", "gpt2", "--output_dir", str(out)]) == 0
    return out


def test_shared_mix_packs_above_99_5_percent_with_balanced_counts(shared_mix):
    manifest = json.loads((shared_mix / "manifest.json").read_text())
    assert manifest["splits"]["train"]["efficiency"]["real_tokens"] >= 0.995
    rows_in = {name: c["rows_in"] for name, c in manifest["counts"].items()}
    assert rows_in == {"alpaca": 5000, "gsm8k": 7473, "dolly": 5000}
    for counts in manifest["counts"].values():
        assert counts["rows_in"] == counts["kept"] + sum(counts["dropped"].values())
    assert manifest["decontamination"]["reference"]["rows"] == 1319


def test_shared_mix_masks_start_after_the_response_header(shared_mix):
    from ds_sft.data.tokenizer import load_tokenizer

    data = PackedDataset(shared_mix, "val")
    tokenizer = load_tokenizer(str(data.tokenizer_dir))
    for i in range(len(data)):
        item = data[i]
        ids, labels, docs = item["input_ids"].numpy(), item["labels"].numpy(), item["document_ids"].numpy()
        for d in range(docs.max() + 1):
            where = np.flatnonzero(docs == d)
            first_target = where[np.argmax(labels[where] != -100)]
            assert tokenizer.decode(ids[where[0] : first_target + 1].tolist()).endswith("### Response:\n")
            assert labels[where][labels[where] != -100][-1] == tokenizer.eos_token_id


def test_seed_command_works_as_written(tiny_tokenizer_file, tmp_path, monkeypatch):
    """The seed's flags and file names: a JSON array, a GSM8K parquet, Dolly's own JSONL schema."""
    import datasets

    from ds_sft.command import main_for

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Path("alpaca_data_cleaned.json").write_text(json.dumps(alpaca_rows(30)))
    datasets.Dataset.from_list(gsm8k_rows(30)).to_parquet("train-00000-of-00001.parquet")
    dolly = [
        {
            "instruction": f"Name colour {i}.",
            "context": "",
            "response": f"Colour {i} is blue.",
            "category": "open_qa",
        }
        for i in range(30)
    ]
    write_jsonl(Path("databricks-dolly-15k.jsonl"), dolly)
    seed_command = (
        "--alpaca alpaca_data_cleaned.json --gsm8k train-00000-of-00001.parquet "
        "--dolly databricks-dolly-15k.jsonl --output_dir data_sft_enhanced --max_examples 80000"
    )
    argv = seed_command.split()
    assert main_for("prepare", [*argv, "--tokenizer", str(tiny_tokenizer_file), "--seq_len", "256"]) == 0
    manifest = json.loads(Path("data_sft_enhanced/manifest.json").read_text())
    assert {name: c["kept"] for name, c in manifest["counts"].items()} == {
        "alpaca": 30,
        "gsm8k": 30,
        "dolly": 30,
    }
    assert len(PackedDataset("data_sft_enhanced", "train")) == manifest["splits"]["train"]["rows"]


def test_user_errors_exit_2_with_one_line(tiny_tokenizer_file, tmp_path, capsys):
    from ds_sft.command import main_for

    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    flags = ["--alpaca", str(path), "--output_dir", str(tmp_path / "o")]
    assert main_for("prepare", [*flags, "--tokenizer", str(tiny_tokenizer_file), "--base_model", "x"]) == 2
    assert main_for("prepare", [*flags, "--tokenizer", str(tiny_tokenizer_file), "--mix", "nope=2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        "ds-sft prepare: error: pass --tokenizer or --base_model, not both",
        "ds-sft prepare: error: --mix 'nope=2': expected NAME=WEIGHT pairs (weights >= 0) "
        "over sources ['alpaca']",
    ]


def test_runs_as_python_module():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ds_sft.data.prepare", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--skip_bad_rows" in result.stdout


@pytest.mark.parametrize("max_examples", [None, 50])
def test_a_mix_too_large_to_make_is_refused_before_it_is_made(
    run_prepare, sources, tmp_path, monkeypatch, max_examples
):
    """--mix alpaca=1000 on Alpaca's 52k rows asked numpy for ~0.5 TB: a MemoryError traceback after
    tokenizing. Here the machine has 256 KiB available, and a mix of 56,000 examples needs more (its
    indices alone: 1.3 MiB, however few --max_examples keeps)."""
    import ds_sft.machine

    monkeypatch.setattr(ds_sft.machine, "available_memory", lambda: 256 << 10)
    cap = [] if max_examples is None else ["--max_examples", str(max_examples)]
    with pytest.raises(UserError) as refused:
        run_prepare([*base_flags(sources, tmp_path / "p"), "--mix", "alpaca=1000", *cap])
    message = str(refused.value)
    assert "\n" not in message and "GiB to mix" in message and "lower the --mix weights" in message
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("weights", ["alpaca=1,gsm8k=1", "alpaca=40,gsm8k=0.5", "alpaca=0,gsm8k=300"])
@pytest.mark.parametrize("max_examples", [None, 500])
def test_the_mix_memory_estimate_covers_what_making_the_mix_takes(weights, max_examples):
    """The refusal above compares an estimate with the memory available: it must not be below what
    mix_indices and Documents.select really allocate (tracemalloc sees numpy's arrays)."""
    import argparse
    import tracemalloc

    from ds_sft.data.mix import check_mix_fits, mix_indices, parse_mix
    from ds_sft.data.tokenize import Documents

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    source_ids = (np.arange(300) >= 200).astype(np.int16)  # 200 alpaca, 100 gsm8k
    docs = Documents(
        rng.integers(0, 50_000, offsets[-1]).astype(np.int32), offsets, np.ones(offsets[-1], np.uint8),
        source_ids, None, None,
    )  # fmt: skip
    names = ["alpaca", "gsm8k"]
    args = argparse.Namespace(mix=weights, max_examples=max_examples, seed=7)
    need = check_mix_fits(docs.lengths, docs.source_ids, names, parse_mix(weights, names), args)
    tracemalloc.start()
    try:
        mixed, _ = mix_indices(docs.source_ids, names, parse_mix(weights, names), args)
        docs.select(mixed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= need, f"made the mix in {peak:,} bytes, estimated {need:,.0f}"


@pytest.mark.parametrize("seed", range(6))
def test_a_capped_mix_draws_whole_epochs_and_distinct_rows(seed):
    """--mix alpaca=2,gsm8k=2 --max_examples N (one epoch of each) used 75% of the rows, a quarter of
    them twice: the cap took the first N of the two epochs shuffled together. Every source's count is
    its share of the cap, and within a source no row is drawn twice while another is left out."""
    import argparse

    from ds_sft.data.mix import mix_indices

    rng = np.random.default_rng(seed)
    names = ["alpaca", "gsm8k", "dolly"]
    sizes = rng.integers(1, 400, size=3)
    weights = dict(zip(names, rng.choice([0, 0.3, 1, 1.5, 2, 3.7], size=3).tolist(), strict=True))
    source_ids = np.repeat(np.arange(3, dtype=np.int16), sizes)
    # floor(w) epochs + round(frac(w) x rows) of a share, per source
    full = sum(int(w) * size + round(w % 1 * size) for w, size in zip(weights.values(), sizes, strict=True))
    cap = int(rng.integers(1, max(full, 2)))
    args = argparse.Namespace(seed=seed, max_examples=cap)
    mixed, total = mix_indices(source_ids, names, weights, args)
    assert total == full and len(mixed) == min(cap, full)
    copies = np.bincount(mixed, minlength=len(source_ids))
    for sid, name in enumerate(names):
        mine = copies[source_ids == sid]
        share = weights[name] * sizes[sid] * min(1, cap / full)  # this source's part of the cap
        assert abs(mine.sum() - share) < 1 + 1e-9, (name, mine.sum(), share)
        assert mine.max() - mine.min() <= 1, (name, np.bincount(mine))


@pytest.mark.parametrize(
    "maps",
    [
        ["mine:instruction=q,response=a", "mine:instruction=q2,response=a2"],
        ["mine:instruction=q", "mine:response=a"],
    ],
)
def test_two_field_maps_for_one_source_are_refused(maps, run_prepare, tmp_path):
    """The second silently replaced the first (a split map was refused as 'must map instruction')."""
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"q": f"Q{i}", "a": f"A{i}", "q2": f"R{i}", "a2": f"B{i}"} for i in range(8)])
    flags = ["--source", f"mine={path}"] + [arg for m in maps for arg in ("--field_map", m)]
    with pytest.raises(UserError, match="--field_map names 'mine' twice"):
        run_prepare([*flags, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_source_left_without_training_rows_or_val_rows_is_warned_of(run_prepare, tmp_path, capsys):
    """A source whose rows were all too long for --seq_len, and one whose val split lost most rows to
    that after the split was cut, were only numbers in the summary table: exit 0 and no word, and
    eval then reported a val loss of a few tokens."""
    long_answer = " ".join(["word"] * 400)
    gsm8k = [{"question": f"What is {i} + 1?", "answer": f"{long_answer}\n#### {i + 1}"} for i in range(30)]
    alpaca = alpaca_rows(60)
    for row in alpaca[::2]:  # half too long, which only tokenizing shows (their length floor fits)
        row["output"] = "zqxj" * 120  # 480 characters, a token or two each
    flags = ["--alpaca", str(write_jsonl(tmp_path / "a.jsonl", alpaca)),
             "--gsm8k", str(write_jsonl(tmp_path / "g.jsonl", gsm8k)),
             "--output_dir", str(tmp_path / "out"), "--min_val_rows", "4", "--seq_len", "128"]  # fmt: skip
    manifest = run_prepare(flags)
    counts = manifest["counts"]
    assert (
        counts["gsm8k"]["train_after_mix"] == 0
        and counts["alpaca"]["val"] < 4 <= counts["alpaca"]["kept"] // 2
    )
    warned = manifest["warnings"]
    assert len(warned) == 2
    assert warned[0].startswith("alpaca: ") and "under --min_val_rows 4" in warned[0]
    assert warned[1].startswith("gsm8k: no training example left of its 30 rows (longer_than_seq_len 30)")
    assert all(line.endswith("raise --seq_len or pass --truncate") for line in warned)
    err = capsys.readouterr().err
    assert all(f"warning: {line}" in err for line in warned)


def test_a_prepare_that_keeps_its_sources_whole_warns_of_nothing(run_prepare, sources, tmp_path, capsys):
    manifest = run_prepare(base_flags(sources, tmp_path / "out"))
    assert manifest["warnings"] == [] and "warning:" not in capsys.readouterr().err
