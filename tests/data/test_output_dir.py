"""``prepare``'s output folder: nothing ds-sft did not write is ever deleted, moved or changed.

Every test snapshots all bytes under its temporary folder (files, and symlinks as their targets)
except the output ds-sft itself writes, runs ``prepare``, and compares: user files at any depth,
symlinks pointing out, inputs inside the output and forged manifests must all come out identical.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ds_sft.data.output import MANIFEST
from ds_sft.errors import UserError
from ds_sft.written_files import list_files, remove_listed
from tests.data.helpers import alpaca_rows, write_jsonl

FLAGS = ["--val_fraction", "0", "--decontam_threshold", "0"]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file's bytes and every symlink's target under ``root`` (``skip``'s contents left out)."""
    found = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(folder) / name
            if skip is not None and path.is_relative_to(skip) and path != skip:
                continue
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[key] = b"-> " + os.readlink(path).encode()
            elif path.is_file():
                found[key] = path.read_bytes()
    return found


def staging_left(root: Path) -> list[Path]:
    return list(root.rglob(".*.new-*"))


@pytest.fixture
def world(tmp_path) -> dict[str, Path]:
    """An input file, a victim folder outside everything, and where the output goes."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("the user's only copy\n")
    (tmp_path / "inputs").mkdir()
    data = write_jsonl(tmp_path / "inputs" / "alpaca.jsonl", alpaca_rows(12))
    return {"input": data, "victim": victim, "out": tmp_path / "out", "root": tmp_path}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_file) -> Path:
    """A real prepared output (tiny tokenizer), copied by the tests that need one."""
    from ds_sft.command import main_for

    base = tmp_path_factory.mktemp("prepared")
    data = write_jsonl(base / "alpaca.jsonl", alpaca_rows(12))
    argv = ["--alpaca", str(data), "--tokenizer", str(tiny_tokenizer_file), "--seq_len", "256", *FLAGS]
    assert main_for("prepare", [*argv, "--output_dir", str(base / "out")]) == 0
    return base / "out"


def prepare_into(run_prepare, world, out=None, extra=()) -> dict:
    return run_prepare(
        ["--alpaca", str(world["input"]), *FLAGS, "--output_dir", str(out or world["out"]), *extra]
    )


def test_folder_with_its_own_manifest_and_src_is_refused(run_prepare, world):
    """The issue's case: a project folder (README, src/, a manifest.json of its own) as --output_dir."""
    out = world["out"]
    (out / "src" / "pkg").mkdir(parents=True)
    (out / "README.md").write_text("# my project\n")
    (out / "src" / "main.py").write_text("print('hi')\n")
    (out / "src" / "pkg" / "mod.py").write_text("X = 1\n")
    (out / "manifest.json").write_text(json.dumps({"name": "my-project", "version": 3}))
    before = snapshot(world["root"])
    with pytest.raises(UserError, match="cannot prove it wrote"):
        prepare_into(run_prepare, world)
    assert snapshot(world["root"]) == before and not staging_left(world["root"])


def test_input_inside_output_is_refused(run_prepare, world):
    world["out"].mkdir()
    inside = world["out"] / "rows.jsonl"
    shutil.copy(world["input"], inside)
    before = snapshot(world["root"])
    with pytest.raises(UserError, match="holds the input"):
        run_prepare(["--alpaca", str(inside), *FLAGS, "--output_dir", str(world["out"])])
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize(
    "case", ["is_a_file", "under_a_file", "dot_with_files", "dot_empty", "parent_of_cwd", "fifo"]
)
def test_output_dir_that_is_no_folder_is_one_line_before_any_work(
    case, world, tiny_tokenizer_file, monkeypatch, capsys
):
    """Class 7: one line, exit 2, nothing written, no temporary folder anywhere."""
    from ds_sft.command import main_for

    root = world["root"]
    work = root / "work"
    work.mkdir()
    (root / "plain.txt").write_text("not a folder\n")
    out = {
        "is_a_file": str(root / "plain.txt"),
        "under_a_file": str(root / "plain.txt" / "data"),
        "dot_with_files": ".",
        "dot_empty": ".",
        "parent_of_cwd": "..",
        "fifo": str(root / "pipe"),
    }[case]
    if case == "dot_with_files":
        (work / "notes.txt").write_text("mine\n")
    if case == "fifo":
        os.mkfifo(root / "pipe")
    monkeypatch.chdir(work)
    before = snapshot(root)
    argv = ["--alpaca", str(world["input"]), "--tokenizer", str(tiny_tokenizer_file), "--output_dir", out]
    assert main_for("prepare", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ds-sft prepare: error: --output_dir"), err
    assert snapshot(root) == before and not list(root.parent.glob(".*.new-*"))


FORGED = [
    "../victim/secret.txt",
    "../../victim/secret.txt",
    "train/../../victim/secret.txt",
    "{victim}/secret.txt",  # absolute
    "./lengths.png",
    "",
    "train//index.json",
    "manifest.json",
    "train/link/secret.txt",  # inside by name, outside through a symlink the forger planted
]


@pytest.mark.parametrize("name", FORGED)
def test_forged_manifest_deletes_nothing(name, run_prepare, world, prepared):
    """A manifest listing paths outside its folder (with the right hashes, even) is not ds-sft's."""
    out = world["out"]
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    forged = name.format(victim=world["victim"])
    record = list_files(world["victim"], MANIFEST)["secret.txt"]
    manifest["files"][forged] = record
    (out / "manifest.json").write_text(json.dumps(manifest))
    if "link" in name:
        (out / "train" / "link").symlink_to(world["victim"])
    before = snapshot(world["root"])
    with pytest.raises(UserError, match="lists paths outside the folder|not as ds-sft wrote them"):
        prepare_into(run_prepare, world, extra=["--force"])
    assert snapshot(world["root"]) == before
    # and were the check bypassed, deleting by that listing still touches nothing outside
    remove_listed(out, {forged: record}, MANIFEST)
    assert (world["victim"] / "secret.txt").read_text() == "the user's only copy\n"


@pytest.mark.parametrize("target", ["victim_file", "victim_dir"])
@pytest.mark.parametrize("where", ["top", "train"])
def test_symlink_inside_output_is_refused(target, where, run_prepare, world, prepared):
    out = world["out"]
    shutil.copytree(prepared, out)
    link = out / ("link" if where == "top" else "train/link")
    link.symlink_to(world["victim"] / "secret.txt" if target == "victim_file" else world["victim"])
    before = snapshot(world["root"])
    with pytest.raises(UserError, match="not as ds-sft wrote them"):
        prepare_into(run_prepare, world, extra=["--force"])
    assert snapshot(world["root"]) == before


NAMES = st.sampled_from(["train", "val", "tokenizer", "notes", "shard_00000.tokens.npy", "index.json",
                         "README.md", "lengths.png", "manifest.json", "x"])  # fmt: skip


@st.composite
def user_entries(draw) -> list[tuple[str, bytes]]:
    """Files a user might have put into (or beside) an output: any depth, names that collide with ours."""
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        parts = draw(st.lists(NAMES, min_size=1, max_size=3))
        entries.append(("/".join(parts), draw(st.binary(max_size=20))))
    return entries


@settings(
    max_examples=25,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)  # run_prepare: stateless
@given(
    entries=user_entries(),
    alter=st.sampled_from([None, "train/index.json", "tokenizer/tokenizer.json", "lengths.png"]),
    input_inside=st.booleans(),
)
@example(entries=[("README.md", b"# mine")], alter=None, input_inside=False)
@example(entries=[("train/notes", b"x")], alter=None, input_inside=False)
@example(entries=[], alter="train/index.json", input_inside=False)  # a listed file, changed
@example(entries=[], alter=None, input_inside=True)
@example(entries=[], alter=None, input_inside=False)  # only ds-sft's output: replaced
def test_no_user_byte_is_lost(tmp_path_factory, prepared, run_prepare, entries, alter, input_inside):
    """A prepared output plus user files (any depth), a changed listed file, or an input inside it:
    prepare --force either replaces a pure ds-sft output or refuses; every other byte stays put."""
    root = tmp_path_factory.mktemp("layout")
    out = root / "out"
    shutil.copytree(prepared, out)
    ours = {*json.loads((out / "manifest.json").read_text())["files"], "manifest.json"}
    user = {}
    for name, data in entries:
        path = out / name
        if name in ours or path.is_dir():
            continue  # that would overwrite ours (see ``alter``) or is one of our folders
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except (FileExistsError, NotADirectoryError):
            continue  # a file stands where this path needs a folder
        user[name] = data
    if alter:
        (out / alter).write_bytes((out / alter).read_bytes() + b"\n")
    source = write_jsonl((out if input_inside else root) / "input.jsonl", alpaca_rows(12))
    before, outside = snapshot(root), snapshot(root, skip=out)
    try:
        run_prepare(["--alpaca", str(source), *FLAGS, "--output_dir", str(out), "--force"])
    except UserError as err:
        assert "\n" not in str(err)
        assert snapshot(root) == before  # refused: not one byte anywhere changed
    else:
        assert not user and not alter and not input_inside, "replaced a folder holding user bytes"
        written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert written == {*list_files(out, MANIFEST), "manifest.json"}
    assert snapshot(root, skip=out) == outside and not staging_left(root)


def test_replacing_keeps_what_appeared_meanwhile_and_removes_only_listed(
    run_prepare, world, prepared, monkeypatch, capsys
):
    """A file that shows up in the old output during the run is not deleted; the swap is complete."""
    import ds_sft.data.shards

    out = world["out"]
    shutil.copytree(prepared, out)
    old_files = json.loads((out / "manifest.json").read_text())["files"]
    real_plot = ds_sft.data.shards.plot_lengths

    def plot_and_meddle(path, *args):
        (out / "train" / "late_arrival.txt").write_text("written while prepare ran\n")
        real_plot(path, *args)

    monkeypatch.setattr(ds_sft.data.shards, "plot_lengths", plot_and_meddle)
    manifest = prepare_into(run_prepare, world, extra=["--force", "--seed", "7"])
    assert set(manifest["files"]) == set(old_files)  # the new output, complete, in place
    assert not (out / "train" / "late_arrival.txt").exists()
    note = capsys.readouterr().err
    left = list(world["root"].rglob("late_arrival.txt"))
    assert len(left) == 1 and left[0].read_text() == "written while prepare ran\n"
    assert "kept 1 file(s)" in note and str(left[0].parents[1]) in note


def test_missing_shard_is_not_up_to_date_and_changed_shard_is_refused(run_prepare, world, capsys):
    """Class 5: reuse needs every listed file; a truncated one is refused rather than deleted."""
    out = world["out"]
    prepare_into(run_prepare, world)
    shard = out / "train" / "shard_00000.tokens.npy"
    good = shard.read_bytes()
    shard.unlink()
    capsys.readouterr()
    prepare_into(run_prepare, world)
    assert "missing (first: train/shard_00000.tokens.npy); redoing it" in capsys.readouterr().out
    assert shard.read_bytes() == good
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="first: train/shard_00000.tokens.npy"):
        prepare_into(run_prepare, world)
    assert shard.read_bytes() == good[: len(good) // 2]


def test_manifest_lists_every_file_with_size_and_hash(run_prepare, world):
    from ds_sft.safe_read import sha256_file

    manifest = prepare_into(run_prepare, world)
    on_disk = sorted(p.relative_to(world["out"]).as_posix() for p in world["out"].rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    for name, record in manifest["files"].items():
        path = world["out"] / name
        assert record == {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# Output names whose hidden staging name (".NAME.new-" + 8 random characters, "-swap" when renamed
# twice) would pass the 255-byte name limit: ASCII, two-byte and three-byte characters, up to the limit.
LONG_NAMES = [
    char * (length // len(char.encode())) for char in ("a", "é", "日") for length in (241, 242, 250, 255)
]


@pytest.mark.parametrize("name", LONG_NAMES, ids=lambda name: f"{len(name.encode())}B")
@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_an_output_name_near_the_limit_is_built_and_swapped_in(tmp_path, monkeypatch, name, exchange):
    """A 242-byte --out was refused only after the whole eval: its staging folder's name was too long."""
    import ds_sft.data.output as output

    if exchange == "two renames":
        monkeypatch.setattr(output.ctypes, "CDLL", lambda *args, **kwargs: object())  # no renameat2
    out = tmp_path / name
    for round_ in ("new", "replacing"):
        staging = output.staging_dir(out)
        (staging / "result.txt").write_text(round_)
        assert output.replace_output(staging, out, {}) == (["result.txt"] if round_ == "replacing" else [])
        assert (out / "result.txt").read_text() == round_
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(f".{name[:10]}")) == [name]


@pytest.mark.parametrize("name", LONG_NAMES, ids=lambda name: f"{len(name.encode())}B")
def test_a_result_file_named_near_the_limit_is_written_and_replaced(tmp_path, name):
    from ds_sft.safe_write import write_result_file

    write_result_file(tmp_path / name, "old")
    write_result_file(tmp_path / name, "new")
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_text() == "new"


def test_prepare_into_a_folder_named_at_the_limit(run_prepare, world):
    out = world["root"] / ("d" * 255)
    manifest = prepare_into(run_prepare, world, out=out)
    assert manifest["files"] and (out / "manifest.json").is_file() and not staging_left(world["root"])


@pytest.mark.parametrize("before", ["missing", "a previous output"])
def test_an_output_written_by_another_command_meanwhile_is_not_swapped_over(tmp_path, before):
    """Two prepares into one folder at once: the second to finish swapped its output in and moved the
    first's aside with its manifest deleted (unusable as data), saying only that it "kept files of the
    old output". Now the later one is refused before its swap, and the earlier one's stays whole."""
    from ds_sft.data.output import building_output, check_output_dir

    out = tmp_path / "out"
    if before == "a previous output":
        with building_output(out, {}, "--output_dir", {"who": "previous"}, MANIFEST) as staging:
            (staging / "x.txt").write_text("previous")
    _, previous = check_output_dir(out, [])
    old_files = previous["files"] if previous else {}
    refused = pytest.raises(UserError, match="was written by another ds-sft command while this one ran")
    with refused as err, building_output(out, old_files, "--output_dir", {"who": "A"}, MANIFEST) as first:
        (first / "x.txt").write_text("A")
        with building_output(out, old_files, "--output_dir", {"who": "B"}, MANIFEST) as second:
            (second / "x.txt").write_text("B")
    assert json.loads((out / MANIFEST).read_text())["who"] == "B" and (out / "x.txt").read_text() == "B"
    assert str(first) in str(err.value) and (first / "x.txt").read_text() == "A"
    assert json.loads((first / MANIFEST).read_text())["who"] == "A"  # whole, where the message says


def test_the_manifest_of_an_output_other_than_the_listed_one_is_kept(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "x.txt").write_text("theirs")
    theirs = {"files": list_files(folder, MANIFEST)}
    (folder / MANIFEST).write_text(json.dumps(theirs))
    ours = {"x.txt": {"bytes": 2, "sha256": "0" * 64}}
    assert remove_listed(folder, ours, MANIFEST) == [MANIFEST, "x.txt"]
    assert json.loads((folder / MANIFEST).read_text()) == theirs
