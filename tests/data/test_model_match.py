"""The tokenizer identity: equal for one tokenizer in every file layout, different for any change that
changes which ids mean which text; and where a model keeps its tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ds_sft.data.model_match import (
    check_tokenizer,
    data_tokenizer_identity,
    gguf_identity,
    model_tokenizer_dir,
    model_tokenizer_identity,
    tokenizer_identity,
)
from ds_sft.data.tokenizer import load_tokenizer
from ds_sft.errors import UserError
from tests.data.match_helpers import VOCAB, prepare, tiny_model_dir, two_tokenizers


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    return two_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def identity_of(path: Path) -> str:
    return tokenizer_identity(load_tokenizer(str(path)))


def rewrite(source: Path, out: Path, change) -> Path:
    """tokenizer.json -> ``change(json)`` written to ``out`` (4-space indent, sorted keys)."""
    tree = json.loads(source.read_text())
    change(tree)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tree, indent=4, sort_keys=True))
    return out / "tokenizer.json"


def old_style_merges(tree: dict) -> None:
    tree["model"]["merges"] = [" ".join(pair) for pair in tree["model"]["merges"]]


def test_same_size_different_merges_differ(tokenizers):
    a, b = tokenizers
    assert len(load_tokenizer(str(a))) == len(load_tokenizer(str(b))) == VOCAB
    assert identity_of(a) != identity_of(b)


@pytest.mark.parametrize("layout", ["folder", "root", "run"])
def test_one_tokenizer_in_every_layout_has_one_identity(tokenizers, layout, tmp_path):
    a, _ = tokenizers
    expected = identity_of(a)
    reformatted = rewrite(a, tmp_path / "reformatted", old_style_merges)
    assert reformatted.read_bytes() != a.read_bytes() and identity_of(reformatted) == expected
    model = tiny_model_dir(tmp_path / "model", a, layout)
    where = model_tokenizer_dir(str(model))
    assert where is not None and model_tokenizer_identity(where) == expected


def swap_merges(i: int):
    def change(tree):
        merges = tree["model"]["merges"]
        merges[i], merges[i + 1] = merges[i + 1], merges[i]

    return change


def swap_ids(i: int):
    def change(tree):
        vocab = tree["model"]["vocab"]
        by_id = {v: k for k, v in vocab.items()}
        first, second = by_id[i], by_id[i + 1]
        vocab[first], vocab[second] = i + 1, i

    return change


def other_eos(tree: dict) -> None:
    tree["added_tokens"][0]["content"] = "</s>"
    vocab = tree["model"]["vocab"]
    vocab["</s>"] = vocab.pop("<|endoftext|>")


MUTATIONS = {f"merges {i} and {i + 1} swapped": swap_merges(i) for i in (0, 7, 60, 150)}
MUTATIONS |= {f"ids {i} and {i + 1} swapped": swap_ids(i) for i in (1, 100, 300, VOCAB - 2)}
MUTATIONS["another EOS token"] = other_eos


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_every_change_of_meaning_changes_the_identity(tokenizers, mutation, tmp_path):
    a, _ = tokenizers
    changed = rewrite(a, tmp_path, MUTATIONS[mutation])
    assert len(load_tokenizer(str(changed))) == VOCAB
    assert identity_of(changed) != identity_of(a)


def test_another_eos_id_changes_the_identity(tokenizers):
    a, _ = tokenizers
    tokenizer = load_tokenizer(str(a))
    expected = tokenizer_identity(tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(VOCAB - 1)  # same vocabulary, other EOS
    assert tokenizer_identity(tokenizer) != expected


def test_bare_weights_carry_no_tokenizer(tmp_path):
    import torch

    model = tiny_model_dir(tmp_path / "weights")
    torch.save({"model": {}}, tmp_path / "base.pt")
    assert model_tokenizer_dir(str(model)) is None
    assert model_tokenizer_dir(str(model / "model.safetensors")) is None
    assert model_tokenizer_dir(str(tmp_path / "base.pt")) is None


@pytest.mark.slow
def test_a_gguf_and_its_saved_tokenizer_folder_match(smollm2_gguf, tmp_path):
    """SmolLM2's GGUF: read from its metadata, through transformers, and saved as prepare saves it."""
    assert model_tokenizer_dir(str(smollm2_gguf)) == smollm2_gguf
    tokenizer = load_tokenizer(str(smollm2_gguf))
    tokenizer.save_pretrained(str(tmp_path))
    assert gguf_identity(smollm2_gguf) == tokenizer_identity(tokenizer) == identity_of(tmp_path)


def data_dir_with(tokenizer: Path, out: Path) -> Path:
    """As much of a prepared dir as the tokenizer check reads: DATA/tokenizer and the manifest."""
    load_tokenizer(str(tokenizer)).save_pretrained(str(out / "tokenizer"))
    (out / "manifest.json").write_text(
        json.dumps({"sources": ["mine"], "tokenizer": {"spec": str(tokenizer), "vocab_size": 1}})
    )
    return out


def test_bare_weights_get_a_note_only_when_the_data_is_not_gpt2(
    tokenizers, gpt2_tokenizer_dir, tmp_path, capsys
):
    bare = tiny_model_dir(tmp_path / "bare")
    check_tokenizer(str(bare), data_dir_with(gpt2_tokenizer_dir, tmp_path / "gpt2_data"))
    assert capsys.readouterr().out == ""
    check_tokenizer(str(bare), data_dir_with(tokenizers[0], tmp_path / "a_data"))
    assert capsys.readouterr().out.startswith(f"note: {bare} carries no tokenizer to compare with")


# ----------------------------------------------------------------------------- the manifest's identity


@pytest.fixture(scope="module")
def prepared(tokenizers, tmp_path_factory) -> dict[str, Path]:
    """Data prepared with tokenizer A and with B (the same vocabulary size)."""
    root = tmp_path_factory.mktemp("prepared")
    return {name: prepare(root / name, source) for name, source in zip("ab", tokenizers, strict=True)}


def recorded_identity(data: Path) -> str:
    return json.loads((data / "manifest.json").read_text())["tokenizer"]["identity"]


def test_prepare_records_the_one_identity_of_its_tokenizer(tokenizers, prepared):
    """The manifest's identity is the tokenizer's, read from its tokenizer.json or from DATA/tokenizer;
    another tokenizer of the same size records another."""
    for name, source in zip("ab", tokenizers, strict=True):
        data = prepared[name]
        assert recorded_identity(data) == identity_of(source) == data_tokenizer_identity(str(data))
    assert recorded_identity(prepared["a"]) != recorded_identity(prepared["b"])


@pytest.mark.parametrize("source", ["gpt2 folder", pytest.param("smollm2 gguf", marks=pytest.mark.slow)])
def test_prepare_records_the_same_identity_for_every_tokenizer_form(source, request, tmp_path):
    tokenizer = request.getfixturevalue("gpt2_tokenizer_dir" if source == "gpt2 folder" else "smollm2_gguf")
    data = prepare(tmp_path / "data", tokenizer)
    expected = gguf_identity(tokenizer) if tokenizer.is_file() else identity_of(tokenizer / "tokenizer.json")
    assert recorded_identity(data) == expected == data_tokenizer_identity(str(data))


def with_manifest(data: Path, out: Path, change) -> Path:
    """A copy of prepared ``data`` whose manifest's tokenizer entry went through ``change``."""
    shutil.copytree(data, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest["tokenizer"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def old_style(entry: dict) -> None:
    """As ds-sft wrote it before the identity was recorded: another hash, under ``sha256``."""
    entry["sha256"] = "5" * 64
    del entry["identity"]


def test_an_old_style_manifest_is_judged_by_its_tokenizer_folder(tokenizers, prepared, tmp_path):
    old = with_manifest(prepared["a"], tmp_path / "old", old_style)
    assert data_tokenizer_identity(str(old)) == identity_of(tokenizers[0])
    check_tokenizer(str(tiny_model_dir(tmp_path / "model_a", tokenizers[0])), old)
    with pytest.raises(UserError, match="uses another tokenizer"):
        check_tokenizer(str(tiny_model_dir(tmp_path / "model_b", tokenizers[1])), old)


def test_a_tokenizer_folder_that_is_not_the_recorded_one_is_refused(prepared, tmp_path):
    """DATA/tokenizer replaced after prepare (or a manifest recording another identity): the shards'
    ids would be judged by the wrong tokenizer, so neither side is trusted."""
    swapped = with_manifest(prepared["a"], tmp_path / "swapped", lambda entry: None)
    shutil.rmtree(swapped / "tokenizer")
    shutil.copytree(prepared["b"] / "tokenizer", swapped / "tokenizer")
    relabelled = with_manifest(
        prepared["a"],
        tmp_path / "relabelled",
        lambda entry: entry.update(identity=recorded_identity(prepared["b"])),
    )
    for data in (swapped, relabelled):
        with pytest.raises(UserError, match="is not the tokenizer .* was prepared with") as error:
            data_tokenizer_identity(str(data))
        assert "\n" not in str(error.value) and "ds-sft prepare" in str(error.value)


def test_the_data_tokenizer_is_hashed_once_until_its_folder_changes(
    tokenizers, prepared, tmp_path, monkeypatch
):
    """A fresh ``train`` asks twice (model check, run identity): one load of the tokenizer. Replacing
    the folder's files at the same path (a copy keeping their modification times) is seen."""
    import ds_sft.data.tokenizer

    loads, load = [], ds_sft.data.tokenizer.load_tokenizer
    monkeypatch.setattr(
        ds_sft.data.tokenizer, "load_tokenizer", lambda path: loads.append(path) or load(path)
    )
    data = with_manifest(prepared["a"], tmp_path / "data", lambda entry: entry.pop("identity"))
    assert (
        data_tokenizer_identity(str(data)) == data_tokenizer_identity(str(data)) == identity_of(tokenizers[0])
    )
    assert len(loads) == 1
    shutil.rmtree(data / "tokenizer")
    shutil.copytree(prepared["b"] / "tokenizer", data / "tokenizer")
    assert data_tokenizer_identity(str(data)) == identity_of(tokenizers[1])
    assert len(loads) == 2
