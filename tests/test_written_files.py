"""Whatever removes or replaces an output, nothing ds-sft did not write goes with it.

One matrix over every command that deletes what an earlier run of it wrote: ``prepare --output_dir``,
``eval --out`` and ``export --hf`` (a whole folder, replaced), ``train --overwrite`` (a run's final/,
metrics and report), a checkpoint tag pruned or replaced during training, and a save's scratch folder
left by a crash. Into each output as ds-sft wrote it goes something of the user's: a file at the top,
inside a folder ds-sft made, in a folder of its own, and an empty folder (where the owner can know
its folders from a listing). Before the command checks its output, or, for a whole-folder output,
while it works (after its check, before its swap). Afterwards every one of them is still there, byte
for byte: where it was, or moved aside (``<tag>.kept``, the replaced output's old folder) and said.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ds_sft.data.output import MANIFEST as PREPARE_MANIFEST
from ds_sft.data.output import building_output, check_output_dir
from ds_sft.errors import UserError
from ds_sft.eval.cli import MANIFEST as EVAL_MANIFEST
from ds_sft.export import MANIFEST as EXPORT_MANIFEST
from ds_sft.run_layout import EFFECTIVE_CONFIG, METRICS_FILE, TRAINER_STATE
from ds_sft.written_files import file_record


class WholeOutput:
    """An output folder a command replaces whole (prepare, eval, export): built and replaced through
    ``ds_sft.data.output`` as the command does, under the command's own manifest name."""

    def __init__(self, command: str, option: str, manifest: str):
        self.command, self.option, self.manifest = command, option, manifest
        self.own_folder = "tokenizer"  # a folder the output's files make

    def build(self, root: Path) -> Path:
        out = root / "out"
        self._write(out, {}, "old")
        return out

    def replace(self, out: Path, meanwhile) -> None:
        out, previous = check_output_dir(out, [], self.option, self.command, self.manifest)
        meanwhile()
        self._write(out, previous["files"], "new")

    def _write(self, out: Path, old_files: dict, what: str) -> None:
        with building_output(out, old_files, self.option, {"what": what}, self.manifest) as staging:
            for name in ("top.json", "train/shard_00000.tokens.npy", "tokenizer/tokenizer.json"):
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_text(f"{what} {name}")


class TrainOverwrite:
    """A finished run's folder, replaced by ``train --overwrite``: its final/ written by train's own
    ``write_final``, its metrics, config and marker; removed by rank 0's claim of the folder."""

    own_folder = "final/tokenizer"

    def build(self, root: Path) -> Path:
        from ds_sft.model.config import ModelConfig
        from ds_sft.model.llama import LlamaModel
        from ds_sft.train.final import write_final
        from ds_sft.train.run_dir import mark

        run_dir = root / "run"
        run_dir.mkdir()
        mark(run_dir)
        (run_dir / EFFECTIVE_CONFIG).write_text("{}")
        (run_dir / METRICS_FILE).write_text(json.dumps({"type": "start", "step": 0}) + "\n")
        write_final(LlamaModel(ModelConfig.preset("tiny")), run_dir / "final", {"tokenizer.json": b"{}"})
        return run_dir

    def replace(self, run_dir: Path, meanwhile) -> None:
        from ds_sft.train.run_dir import claim

        meanwhile()
        claim(run_dir, None, overwrite=True).release()


def trainer_state(files: dict) -> dict:
    """A well-formed trainer state of a ZeRO 0 tag (its checker's fields) listing ``files``."""
    sampler = {"epoch": 0, "consumed_samples": 0, "seed": 0}
    return {"step": 2, "world_size": 1, "zero_stage": 0, "nan_streak": 0, "train_tokens": 0,
            "elapsed_s": 0.0, "val_history": [], "sampler": sampler, "files": files}  # fmt: skip


class CheckpointTag:
    """A checkpoint tag as a save publishes it, deleted by a prune, a replacing save or a resume from
    an earlier tag (``checkpointing.remove_tag``, which they all call)."""

    own_folder = None  # DeepSpeed writes a tag flat

    def build(self, root: Path) -> Path:
        from ds_sft.train.checkpointing import file_digests

        tag_dir = root / "checkpoints" / "step_000002"
        tag_dir.mkdir(parents=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        (tag_dir / TRAINER_STATE).write_text(json.dumps(trainer_state(file_digests(tag_dir))))
        return tag_dir

    def replace(self, tag_dir: Path, meanwhile) -> None:
        from ds_sft.train.checkpointing import remove_tag

        meanwhile()
        remove_tag(tag_dir)


class ScratchFolder:
    """The ``checkpoints/.partial`` a save killed mid-way leaves, removed by the next save. Its files
    are known by their names (a save writes no listing before it completes), its folders are not: an
    empty folder there is not told apart from one a killed conversion left, so none is placed."""

    own_folder = "step_000003"

    def build(self, root: Path) -> Path:
        partial = root / "checkpoints" / ".partial"
        (partial / "step_000003").mkdir(parents=True)
        (partial / "step_000003" / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
        return partial

    def replace(self, partial: Path, meanwhile) -> None:
        from ds_sft.train.checkpointing import remove_scratch

        meanwhile()
        remove_scratch(partial)


COMMANDS = {
    "prepare --output_dir": WholeOutput("prepare", "--output_dir", PREPARE_MANIFEST),
    "eval --out": WholeOutput("eval", "--out", EVAL_MANIFEST),
    "export --hf": WholeOutput("export", "--hf", EXPORT_MANIFEST),
    "train --overwrite": TrainOverwrite(),
    "checkpoint tag removed": CheckpointTag(),
    "scratch folder removed": ScratchFolder(),
}
# Where the user's entry goes, relative to the output ({own}: a folder the output's files make there;
# a trailing "/": an empty folder); "{own}" placements are left out where the output has none.
PLACEMENTS = ["notes.txt", "mine/deep/notes.txt", "{own}/notes.txt", "{own}/mine/notes.txt", "mine/",
              "{own}/mine/"]  # fmt: skip


def cases():
    for name, command in COMMANDS.items():
        timings = ["before", "meanwhile"] if isinstance(command, WholeOutput) else ["before"]
        for placement in PLACEMENTS:
            if "{own}" in placement and command.own_folder is None:
                continue
            if placement.endswith("/") and isinstance(command, ScratchFolder):
                continue
            where = placement.format(own=command.own_folder)
            for timing in timings:
                yield pytest.param(name, where, timing, id=f"{name}-{where}-{timing}")


def user_entries(root: Path) -> dict[str, str]:
    """Every file under ``root`` holding the user's bytes, by content, and every user folder, by name."""
    found = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames:
            if name.startswith("users-folder-"):
                found[name] = os.path.join(folder, name)
        for name in filenames:
            path = Path(folder, name)
            if not path.is_symlink() and path.read_bytes().startswith(b"the user's own"):
                found[path.read_text()] = str(path)
    return found


@pytest.mark.parametrize(("command", "placement", "timing"), list(cases()))
def test_no_command_deletes_what_it_did_not_write(tmp_path, command, placement, timing, capsys):
    output = COMMANDS[command]
    out = output.build(tmp_path)
    assert user_entries(tmp_path) == {}  # the command's own output holds nothing of the user's
    if placement.endswith("/"):  # an empty folder of the user's, named to be found wherever it goes
        path = out / placement.rstrip("/")
        path = path.with_name(f"users-folder-{path.name}")
        expected = {path.name}
    else:
        path = out / placement
        expected = {f"the user's own {placement}"}

    def place() -> None:
        if placement.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"the user's own {placement}")

    if timing == "before":
        place()
    try:
        output.replace(out, place if timing == "meanwhile" else lambda: None)
    except UserError as err:  # refused: one line, and the user's entry stays where it was
        assert "\n" not in str(err)
        assert os.path.lexists(path)
    assert set(user_entries(tmp_path)) == expected  # still there, where it was or moved aside
    if not os.path.lexists(path):  # moved aside: the command says where
        assert "kept" in capsys.readouterr().err


def test_a_listing_records_each_file_by_size_and_sha256(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert file_record(tmp_path / "x") == {
        "bytes": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",  # FIPS 180-2's "abc"
    }
