"""A prepared data dir that is damaged or forged is refused in one line before the first step.

Before, each damage below ended in a traceback (JSONDecodeError, KeyError, IndexError in the middle
of a step; token ids past the embedding, which on a GPU is a device-side assert), or trained on
garbage offsets without a word.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_sft.data.shards import SHARD_PARTS, PackedDataset
from ds_sft.errors import UserError
from tests.train.helpers import write_data_dir


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("pristine"))


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def shard(data: Path, part: str) -> Path:
    return data / "train" / f"shard_00000.{part}.npy"


def resave(data: Path, part: str, change) -> None:
    np.save(shard(data, part), change(np.load(shard(data, part))))


def one_row_split(data: Path, row_offsets: np.ndarray) -> None:
    """Replace the train split by one hand-made row of one document, indexed by ``row_offsets``."""
    seq_len = json.loads((data / "train" / "index.json").read_text())["seq_len"]
    for path in (data / "train").glob("shard_*"):
        path.unlink()
    np.save(shard(data, "tokens"), np.full((1, seq_len), 5, np.uint16))
    np.save(shard(data, "loss_mask"), np.zeros((1, seq_len), np.uint8))
    np.save(shard(data, "documents"), np.array([[10, 0]], np.int32))
    np.save(shard(data, "row_offsets"), row_offsets)
    index = {"seq_len": seq_len, "dtype": "uint16", "rows": 1, "shards": [{"name": "shard_00000", "rows": 1}]}
    (data / "train" / "index.json").write_text(json.dumps(index))


DAMAGES = {
    "manifest not json": lambda d: (d / "manifest.json").write_text("{oops"),
    "manifest not utf-8": lambda d: (d / "manifest.json").write_bytes(b'{"sources": ["\xff"]}'),
    "manifest an array": lambda d: (d / "manifest.json").write_text("[1, 2]"),
    "manifest without sources": lambda d: edit_json(d / "manifest.json", lambda m: {}),
    "sources a number": lambda d: edit_json(d / "manifest.json", lambda m: {**m, "sources": 3}),
    "sources not names": lambda d: edit_json(d / "manifest.json", lambda m: {**m, "sources": [1, None]}),
    "tokenizer a string": lambda d: edit_json(d / "manifest.json", lambda m: {**m, "tokenizer": "x"}),
    "vocab_size a string": lambda d: edit_json(
        d / "manifest.json", lambda m: {**m, "tokenizer": {"vocab_size": "9"}}
    ),
    "index not json": lambda d: (d / "train" / "index.json").write_text("]"),
    "index without shards": lambda d: edit_json(d / "train" / "index.json", lambda i: {**i, "shards": None}),
    "rows a string": lambda d: edit_json(d / "train" / "index.json", lambda i: {**i, "rows": "many"}),
    "rows a boolean": lambda d: edit_json(d / "train" / "index.json", lambda i: {**i, "rows": True}),
    "rows more than the shards": lambda d: edit_json(
        d / "train" / "index.json", lambda i: {**i, "rows": 10**6}
    ),
    "seq_len negative": lambda d: edit_json(d / "train" / "index.json", lambda i: {**i, "seq_len": -5}),
    "shard name leaving the folder": lambda d: edit_json(
        d / "train" / "index.json", lambda i: {**i, "shards": [{**i["shards"][0], "name": "../../x"}]}
    ),
    "shard truncated": lambda d: shard(d, "tokens").write_bytes(shard(d, "tokens").read_bytes()[:300]),
    "shard of python objects": lambda d: np.save(shard(d, "tokens"), np.array([{}] * 4), allow_pickle=True),
    "tokens of another shape": lambda d: resave(d, "tokens", lambda t: t[:, :5]),
    "tokens of floats": lambda d: resave(d, "tokens", lambda t: t.astype(np.float32)),
    "loss mask of another shape": lambda d: resave(d, "loss_mask", lambda m: m[:3]),
    "offsets past the documents": lambda d: resave(d, "row_offsets", lambda o: np.full_like(o, 10**9)),
    "offsets decreasing": lambda d: resave(d, "row_offsets", lambda o: o[::-1].copy()),
    "documents overfull": lambda d: resave(
        d, "documents", lambda docs: np.stack([docs[:, 0] * 1000, docs[:, 1]], 1)
    ),
    "documents of no tokens": lambda d: resave(
        d, "documents", lambda docs: np.stack([docs[:, 0] * 0, docs[:, 1]], 1)
    ),
    "source id unknown": lambda d: resave(
        d, "documents", lambda docs: np.stack([docs[:, 0], docs[:, 1] + 99], 1)
    ),
    "a negative token id": lambda d: resave(
        d, "tokens", lambda t: np.where(t == t[0, 0], -3, t).astype(np.int16)
    ),
    "loss mask on padding": lambda d: resave(d, "loss_mask", lambda m: np.ones_like(m)),
    "a document longer than a row": lambda d: resave(
        d, "documents", lambda docs: np.stack([docs[:, 0] + 10**6, docs[:, 1]], 1)
    ),
    "index dtype unknown": lambda d: edit_json(
        d / "train" / "index.json", lambda i: {**i, "dtype": "float64"}
    ),
    "index without dtype": lambda d: edit_json(
        d / "train" / "index.json", lambda i: {k: v for k, v in i.items() if k != "dtype"}
    ),
    "a one-row split indexed by booleans": lambda d: one_row_split(d, np.array([False, True])),
    "tokens past the recorded vocabulary": lambda d: (
        edit_json(d / "manifest.json", lambda m: {**m, "tokenizer": {"vocab_size": 10}}),
        resave(d, "tokens", lambda t: np.full_like(t, 10)),
    ),
}


def save_zip(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as file:  # np.savez would add .npz to a path given as a name
        np.savez(file, array)


# What each part of a shard may be instead of a .npy array of the dtype write_split gives it: np.load
# handed back an NpzFile for a zip (AttributeError), bool passed as an integer type (a bool row_offsets
# indexed as a mask: IndexError), and any integer dtype passed
WRONG_FORMS = {
    "a zip": lambda path, array: save_zip(path, array),
    "booleans": lambda path, array: np.save(path, array.astype(bool)),
    "floats": lambda path, array: np.save(path, array.astype(np.float32)),
    "signed 64-bit": lambda path, array: np.save(
        path, array.astype(np.int64 if array.dtype != np.int64 else np.int32)
    ),
    "unsigned 32-bit": lambda path, array: np.save(
        path, array.astype(np.uint32 if array.dtype != np.uint32 else np.uint16)
    ),
    "pickled objects": lambda path, array: np.save(path, array.astype(object), allow_pickle=True),
}
for _part in SHARD_PARTS:
    for _form, _write in WRONG_FORMS.items():
        DAMAGES[f"{_part} {_form}"] = lambda d, part=_part, write=_write: write(
            shard(d, part), np.load(shard(d, part))
        )


@pytest.fixture
def damaged(pristine, tmp_path, request) -> Path:
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    DAMAGES[request.param](data)
    return data


@pytest.mark.parametrize("damaged", sorted(DAMAGES), indirect=True)
def test_a_damaged_data_dir_is_refused_in_one_line_naming_the_file(damaged):
    with pytest.raises(UserError) as err:
        PackedDataset(damaged, "train")
    message = str(err.value)
    assert "\n" not in message and str(damaged) in message


def test_the_pristine_data_dir_opens(pristine):
    assert len(PackedDataset(pristine, "train")) == 48


def test_the_hand_made_one_row_split_opens_with_integer_offsets(pristine, tmp_path):
    """The control for 'a one-row split indexed by booleans': the same split, offsets as written."""
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    one_row_split(data, np.array([0, 1], np.int64))
    assert PackedDataset(data, "train").row_arrays(0)["position_ids"][:10].tolist() == list(range(10))


@pytest.mark.parametrize(
    "damaged", ["tokens past the recorded vocabulary", "shard truncated", "tokens a zip"], indirect=True
)
def test_train_refuses_a_damaged_data_dir_before_the_first_step(damaged, tmp_path, capsys):
    from ds_sft.command import main_for

    argv = [
        "--data_dir",
        str(damaged),
        "--model",
        "tiny",
        "--max_iters",
        "1",
        "--out_dir",
        str(tmp_path / "run"),
    ]
    assert main_for("train", [*argv, "--wandb_mode", "disabled"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"ds-sft train: error: {damaged}"), errors


def test_token_ids_past_the_embedding_are_refused_when_the_manifest_records_no_vocabulary(pristine, tmp_path):
    """A hand-made data dir: the ids the rows hold are compared with the model's embedding rows."""
    from ds_sft.data.model_match import check_model_fits
    from ds_sft.model.config import ModelConfig

    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    tiny = ModelConfig.preset("tiny")
    check_model_fits("tiny", tiny, data, None)  # the fixture's ids fit
    resave(data, "tokens", lambda t: np.full_like(t, tiny.vocab_size))
    with pytest.raises(UserError, match=f"holds token id {tiny.vocab_size:,} but the model has"):
        check_model_fits("tiny", tiny, data, None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(
    max_examples=60,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    file=st.sampled_from(["manifest.json", "train/index.json"]),
    key=st.sampled_from(["sources", "tokenizer", "template", "seq_len", "rows", "shards", "dtype", "new"]),
    value=JSON_VALUES,
)
def test_any_forged_json_field_opens_or_is_one_user_error(pristine, tmp_path_factory, file, key, value):
    data = tmp_path_factory.mktemp("forged") / "data"
    shutil.copytree(pristine, data)
    edit_json(data / file, lambda d: {**d, key: value})
    try:
        dataset = PackedDataset(data, "train")
    except UserError as err:
        assert "\n" not in str(err)
        return
    for i in range(len(dataset)):  # what opened serves every row
        dataset[i]


NOT_FILES = {
    "a FIFO": os.mkfifo,
    "a folder": os.mkdir,
    "a link to a device": lambda path: os.symlink("/dev/zero", path),
}


@pytest.mark.parametrize("kind", NOT_FILES)
@pytest.mark.parametrize("part", SHARD_PARTS)
def test_a_shard_that_is_not_a_file_is_refused_without_being_opened(pristine, tmp_path, part, kind):
    """np.load opened a FIFO and blocked forever (train hung after printing its config). Run in a
    thread: a regression fails here instead of hanging."""
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    shard(data, part).unlink()
    NOT_FILES[kind](shard(data, part))
    outcome = []

    def open_dataset():
        try:
            PackedDataset(data, "train")
        except UserError as err:
            outcome.append(str(err))

    worker = threading.Thread(target=open_dataset, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # blocked opening the FIFO: a writer lets it go on
        os.close(os.open(shard(data, part), os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=60)
        pytest.fail("PackedDataset opened a FIFO and blocked")
    assert len(outcome) == 1 and "\n" not in outcome[0]
    assert outcome[0].startswith(f"{shard(data, part)}: is ") and "not a regular file" in outcome[0]


def test_train_refuses_val_rows_of_another_length_before_the_first_step(pristine, tmp_path, capsys):
    """The model checks read the train split's row length: val rows longer than the model's
    positions were an IndexError at the step-0 eval, after the model and the engine were built."""
    from ds_sft.command import main_for
    from ds_sft.data.shards import PackedDataset, write_split

    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    seq_len = PackedDataset(pristine, "val").seq_len * 2
    rows = 4
    mask = np.zeros((rows, seq_len), np.uint8)
    mask[:, 1 : seq_len // 2] = 1
    shutil.rmtree(data / "val")
    packed = {"tokens": np.ones((rows, seq_len), np.int64), "loss_mask": mask,
              "doc_lengths": np.full(rows, seq_len // 2), "doc_sources": np.zeros(rows, np.int64),
              "row_offsets": np.arange(rows + 1)}  # fmt: skip
    write_split(data / "val", packed, 256)
    argv = ["--data_dir", str(data), "--model", "tiny", "--max_iters", "1",
            "--out_dir", str(tmp_path / "run"), "--wandb_mode", "disabled"]  # fmt: skip
    assert main_for("train", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its val rows hold {seq_len} tokens, its train rows {seq_len // 2}" in err[0], (
        err
    )


def masked(pristine: Path, data: Path, which: str) -> PackedDataset:
    """A copy of ``pristine`` whose train loss mask is ``which``: seeded random bits over the rows'
    document tokens, every document token, or only the token that opens each document (which has no
    token before it to be the target of: a mask there trains nothing)."""
    shutil.copytree(pristine, data)
    split = PackedDataset(pristine, "train")
    documents = np.stack([split.row_arrays(i)["document_ids"] for i in range(len(split))])
    in_document = documents >= 0
    opening = in_document & np.concatenate(
        [np.ones((len(split), 1), bool), documents[:, 1:] != documents[:, :-1]], 1
    )
    rng = np.random.default_rng(sum(map(ord, which)))
    masks = {
        "sparse": in_document & (rng.random(documents.shape) < 0.02),
        "half": in_document & (rng.random(documents.shape) < 0.5),
        "all": in_document,
        "openings only": opening,
        "none": np.zeros_like(in_document),
    }
    resave(data, "loss_mask", lambda old: masks[which].astype(old.dtype))
    return PackedDataset(data, "train")


@pytest.mark.parametrize("which", ["sparse", "half", "all", "openings only", "none"])
def test_trained_tokens_are_the_labels_of_every_row(pristine, tmp_path, which):
    split = masked(pristine, tmp_path / "data", which)
    labels = sum(int((split.row_arrays(i)["labels"] != -100).sum()) for i in range(len(split)))
    assert split.trained_tokens == labels
    assert (labels == 0) == (which in ("openings only", "none"))
    assert np.load(shard(tmp_path / "data", "loss_mask")).any() == (which != "none")  # as meant


@pytest.mark.parametrize("which", ["openings only", "none"])
def test_train_refuses_a_train_split_without_trained_tokens(pristine, tmp_path, capsys, which):
    """Every step of it would be skipped (nothing to learn from): the run trained nothing for
    --max_iters steps and said it had finished."""
    from ds_sft.command import main_for

    data, run = tmp_path / "data", tmp_path / "run"
    masked(pristine, data, which)
    argv = ["--data_dir", str(data), "--model", "tiny", "--max_iters", "1", "--micro_batch_size", "2",
            "--grad_accum", "1", "--out_dir", str(run), "--wandb_mode", "disabled"]  # fmt: skip
    assert main_for("train", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}: no train row has a trained token" in err[0], err
    assert not (run / "checkpoints").exists()
