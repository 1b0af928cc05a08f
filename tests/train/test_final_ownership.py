"""``--overwrite`` removes from ``final/`` only the files the run wrote there (its listing says which).

A user's file put into ``final/`` or ``final/tokenizer/`` (a note, a tokenizer file of their own, a
file named like one of the run's in a subfolder) is not the run's: ``--overwrite`` refuses, naming it,
and deletes nothing. A ``final/`` of an older ds-sft has no listing: its weights, their config and the
files a saved tokenizer is made of (by name) are the run's, nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from ds_sft.train.final import read_regular_file, read_tokenizer, tokenizer_files, write_final
from ds_sft.train.run_dir import FINAL_LISTING, SAVED_TOKENIZER_FILES, removable

NAME = st.text("abcdefgh_.", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
RELATIVE = st.lists(NAME, min_size=1, max_size=3).map("/".join)


def snapshot(root: Path) -> dict[str, bytes | None]:
    out = {}
    for folder, _, files in os.walk(root):
        out[os.path.relpath(folder, root)] = None
        for name in files:
            out[os.path.relpath(os.path.join(folder, name), root)] = Path(folder, name).read_bytes()
    return out


def finished_run(root: Path, tokenizer_files: set[str]) -> Path:
    """A run folder whose final/ is written as train writes it, with a tokenizer of ``tokenizer_files``."""
    tokenizer = root / "tokenizer_source"
    for name in tokenizer_files:
        (tokenizer / name).parent.mkdir(parents=True, exist_ok=True)
        (tokenizer / name).write_text(f"tokenizer part {name}")
    run_dir = root / "run"
    write_final(
        LlamaModel(ModelConfig.preset("tiny")),
        run_dir / "final",
        read_tokenizer(tokenizer) if tokenizer_files else {},
    )
    return run_dir


def _prefix_free(files: set[str]) -> bool:
    """No path is a folder of another (a file and a folder of one name cannot both exist)."""
    return not any(a != b and b.startswith(a + "/") for a in files for b in files)


@settings(max_examples=30)
@given(
    tokenizer_files=st.sets(st.sampled_from(SAVED_TOKENIZER_FILES) | RELATIVE, max_size=4).filter(
        _prefix_free
    ),
    user_file=RELATIVE,
    under=st.sampled_from(["", "tokenizer/"]),
)
def test_a_user_file_in_final_is_refused_and_nothing_is_removed(
    tmp_path_factory, tokenizer_files, user_file, under
):
    root = tmp_path_factory.mktemp("final")
    run_dir = finished_run(root, tokenizer_files)
    final = run_dir / "final"
    assert set(removable(run_dir)) == {final}  # as written, final/ is all the run's
    path = final / under / user_file
    listed = {
        "model.safetensors",
        "model_config.json",
        FINAL_LISTING,
        *(f"tokenizer/{n}" for n in tokenizer_files),
    }
    relative = path.relative_to(final).as_posix()
    clash = any(relative == n or relative.startswith(n + "/") or n.startswith(relative + "/") for n in listed)
    if clash:  # replacing one of the run's files (or a folder of them) is not a new file: nothing to test
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's own")
    before = snapshot(run_dir)
    with pytest.raises(UserError) as err:
        removable(run_dir)
    assert "\n" not in str(err.value) and f"final/{relative}" in str(err.value)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("listing", ["not json", '{"files": 3}', '["model.safetensors"]', '{"files": [1]}'])
def test_a_damaged_listing_is_not_the_run_s(tmp_path, listing):
    run_dir = finished_run(tmp_path, {"tokenizer.json", "tokenizer_config.json"})
    (run_dir / "final" / FINAL_LISTING).write_text(listing)
    with pytest.raises(UserError, match=r"final/ds_sft_files\.json is not among"):
        removable(run_dir)


@pytest.mark.parametrize(
    "tokenizer_files", [set(), set(SAVED_TOKENIZER_FILES), {"tokenizer.json", "chat_template.jinja"}]
)
@pytest.mark.parametrize("user_file", [None, "notes.txt", "tokenizer/notes.txt", "tokenizer/sub/vocab.json"])
def test_an_older_final_owns_its_weights_and_saved_tokenizer_files(tmp_path, tokenizer_files, user_file):
    """A final/ of an older ds-sft (no listing; `make demo` run again after an upgrade met one): the
    tokenizer files train copied there are replaced; a file of the user's beside them is refused."""
    run_dir = finished_run(tmp_path, tokenizer_files)
    final = run_dir / "final"
    (final / FINAL_LISTING).unlink()
    if user_file is None:
        assert set(removable(run_dir)) == {final}
        return
    (final / user_file).parent.mkdir(parents=True, exist_ok=True)
    (final / user_file).write_text("the user's own")
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=f"final/{user_file} is not among"):
        removable(run_dir)
    assert snapshot(run_dir) == before


def test_the_listing_names_exactly_what_was_written(tmp_path):
    import json

    run_dir = finished_run(tmp_path, {"tokenizer.json", "merges.txt", "sub/vocab.json", "notes.txt"})
    written = {
        p.relative_to(run_dir / "final").as_posix() for p in (run_dir / "final").rglob("*") if p.is_file()
    }
    listed = set(json.loads((run_dir / "final" / FINAL_LISTING).read_text())["files"])
    assert listed == written - {FINAL_LISTING}


def tokenizer_source(root: Path) -> Path:
    """A DATA/tokenizer with two regular saved files, and a secret file and folder outside it."""
    tokenizer = root / "data" / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "tokenizer_config.json").write_text("{}")
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("not the run's")
    return tokenizer


# Entries that are not a regular file: (kind, how to make one at path, given the outside folder).
NOT_REGULAR = {
    "symlink to a file": lambda path, outside: path.symlink_to(outside / "secret.txt"),
    "symlink to a folder": lambda path, outside: path.symlink_to(outside, target_is_directory=True),
    "symlink to the parent": lambda path, outside: path.symlink_to(".."),
    "fifo": lambda path, outside: os.mkfifo(path),
    "subfolder": lambda path, outside: (path.mkdir(), (path / "secret.txt").write_text("nested")),
}


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_a_saved_tokenizer_name_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, kind):
    """DATA/tokenizer/vocab.json as a link, FIFO or folder: the copy once followed the link (all of
    /work/shared, /etc/passwd) or stopped at the FIFO in a traceback after training."""
    tokenizer = tokenizer_source(tmp_path)
    NOT_REGULAR[kind](tokenizer / "vocab.json", tmp_path / "outside")
    with pytest.raises(UserError) as start:
        tokenizer_files(tokenizer)  # what main checks before the model exists
    with pytest.raises(UserError) as final:
        read_tokenizer(tokenizer)  # what final/ gets
    for err in (start, final):
        assert "\n" not in str(err.value) and "vocab.json" in str(err.value)
    assert not (tmp_path / "run" / "final" / "tokenizer" / "vocab.json").exists()


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_entries_that_are_no_tokenizer_file_are_left_out(tmp_path, kind):
    tokenizer = tokenizer_source(tmp_path)
    NOT_REGULAR[kind](tokenizer / "extra", tmp_path / "outside")
    (tokenizer / "notes.txt").write_text("a regular file, but not a tokenizer's")
    assert tokenizer_files(tokenizer) == (["tokenizer.json", "tokenizer_config.json"], ["extra", "notes.txt"])
    run_dir = tmp_path / "run"
    write_final(LlamaModel(ModelConfig.preset("tiny")), run_dir / "final", read_tokenizer(tokenizer))
    copied = snapshot(run_dir / "final" / "tokenizer")
    assert copied == {".": None, "tokenizer.json": b"{}", "tokenizer_config.json": b"{}"}
    assert set(removable(run_dir)) == {run_dir / "final"}


def test_a_hard_linked_tokenizer_file_is_copied_as_bytes_of_its_own(tmp_path):
    tokenizer = tokenizer_source(tmp_path)
    os.link(tmp_path / "outside" / "secret.txt", tokenizer / "merges.txt")
    write_final(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "final", read_tokenizer(tokenizer))
    copy = tmp_path / "final" / "tokenizer" / "merges.txt"
    assert copy.read_text() == "not the run's" and copy.stat().st_nlink == 1
    assert not copy.samefile(tokenizer / "merges.txt")


@pytest.mark.parametrize("kind", ["symlink to a file", "fifo"])
def test_the_copy_never_goes_through_a_link_or_waits_on_a_fifo(tmp_path, kind):
    """A link or FIFO put in place of a checked file (between the check at start and the copy)."""
    tokenizer = tokenizer_source(tmp_path)
    NOT_REGULAR[kind](tokenizer / "vocab.json", tmp_path / "outside")
    with pytest.raises(UserError, match="vocab.json"):
        read_regular_file(tokenizer / "vocab.json")


@pytest.mark.parametrize("where", ["final", "final/tokenizer"])
@pytest.mark.parametrize("kind", ["link to a user's folder", "link to nowhere", "file"])
def test_a_link_put_at_finals_folders_during_the_run_is_refused_and_nothing_written_through_it(
    tmp_path, where, kind
):
    """The run folder is checked when train starts; a link made at final/ while it ran (ln -s ~/models
    RUN/final) had the final weights and config written over the user's files there."""
    tokenizer = tokenizer_source(tmp_path)
    user = tmp_path / "models"
    user.mkdir()
    for name in ("model.safetensors", "model_config.json", "tokenizer.json"):
        (user / name).write_text(f"the user's {name}")
    before = snapshot(user)
    run_dir = tmp_path / "run"
    (run_dir / where).parent.mkdir(parents=True)
    if kind == "file":
        (run_dir / where).write_text("a file")
    else:
        (run_dir / where).symlink_to(user if kind.endswith("folder") else tmp_path / "nowhere")
    with pytest.raises(UserError) as err:
        write_final(LlamaModel(ModelConfig.preset("tiny")), run_dir / "final", read_tokenizer(tokenizer))
    assert str(run_dir / where) in str(err.value) and "\n" not in str(err.value)
    assert snapshot(user) == before and not (tmp_path / "nowhere").exists()
