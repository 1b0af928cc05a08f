"""``ds-sft export --hf OUT``: export replaces only the files a previous export wrote there, nothing else.

Every refusal test snapshots every byte under its temporary root (files, and symlinks as their
targets), runs export, and checks: exit 2, one line on stderr, and the same bytes after. The folders
come from generated contents (hypothesis), mutations of a real export, and a matrix of places that
are, hold or lie inside the model or tokenizer being exported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_sft.command import main_for
from ds_sft.export import MANIFEST
from ds_sft.model.checkpoint import save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from ds_sft.run_layout import RUN_SIGNS
from ds_sft.safe_read import sha256_file
from tests.data.test_output_dir import snapshot
from tests.model.conftest import make_word_tokenizer

# what export writes, and names a user keeps beside a model
EXPORT_NAMES = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]
USER_NAMES = [*EXPORT_NAMES, "README.md", MANIFEST, "manifest.json", "notes/a.txt", "tokenizer/vocab.json"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """What ``ds-sft train`` leaves: RUN/final/ with the weights and RUN/final/tokenizer/."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("source") / "run"
    save_model(LlamaModel(ModelConfig.preset("tiny")), run / "final")
    make_word_tokenizer().save_pretrained(run / "final" / "tokenizer")
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    """A real export (fp32) of ``run_dir``, copied by the tests that change one."""
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert main_for("export", ["--base_model", str(run_dir), "--hf", str(out)]) == 0
    return out


def _export(source: Path, out: Path, *extra: str) -> int:
    return main_for("export", ["--base_model", str(source), "--hf", str(out), *extra])


def _refused(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    files=st.dictionaries(st.sampled_from(USER_NAMES), st.binary(max_size=64), min_size=1),
    nested=st.booleans(),
)
def test_a_folder_of_the_users_is_refused_and_left_as_it_was(run_dir, capsys, files, nested):
    """F3 (a): config.json, model.safetensors, README.md ... of the user's: refused, not one byte changed."""
    root = Path(tempfile.mkdtemp())
    try:
        out = root / "userdir"
        _write_tree(out / ("deep" if nested else ""), files)
        before = snapshot(root)
        err = _refused(capsys, _export(run_dir, out))
        assert "cannot prove it wrote" in err or "not as ds-sft wrote them" in err
        assert snapshot(root) == before
    finally:
        shutil.rmtree(root)


def _add_readme(out: Path) -> None:
    (out / "README.md").write_text("my notes\n")


def _change_listed(out: Path) -> None:
    (out / "config.json").write_text('{"edited": "by the user"}\n')


def _add_nested(out: Path) -> None:
    (out / "eval").mkdir()
    (out / "eval" / "eval.md").write_text("# mine\n")


def _add_symlink(out: Path) -> None:
    (out / "weights.bin").symlink_to(out.parent / "victim.txt")


def _forge_listing(out: Path) -> None:  # the manifest claims a user's file with its real bytes
    (out / "README.md").write_text("mine\n")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["../victim.txt"] = {"bytes": 0, "sha256": "0" * 64}
    (out / MANIFEST).write_text(json.dumps(manifest))


def _drop_manifest(out: Path) -> None:
    (out / MANIFEST).unlink()


def _garble_manifest(out: Path) -> None:
    (out / MANIFEST).write_text("not json")


def _prepare_manifest_only(out: Path) -> None:  # another command's manifest is not export's
    (out / MANIFEST).rename(out / "manifest.json")


@pytest.mark.parametrize(
    "mutate",
    [
        _add_readme,
        _change_listed,
        _add_nested,
        _add_symlink,
        _forge_listing,
        _drop_manifest,
        _garble_manifest,
        _prepare_manifest_only,
    ],
)
def test_a_previous_export_with_anything_not_as_export_wrote_it_is_refused(
    run_dir, exported, tmp_path, capsys, mutate
):
    (tmp_path / "victim.txt").write_text("the user's only copy\n")
    out = tmp_path / "hf"
    shutil.copytree(exported, out, symlinks=True)
    mutate(out)
    before = snapshot(tmp_path)
    _refused(capsys, _export(run_dir, out, "--dtype", "bfloat16"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("where", "tokenizer"),
    [
        ("run", None),  # F3: the source itself
        ("run/final", None),  # F3 (c): the run's own final/
        ("run/final/tokenizer", None),  # the tokenizer found with the run
        ("run/hf", None),  # a new folder inside the run
        ("run/final/hf/deep", None),
        (".", None),  # the folder holding the run
        ("tok", "tok"),  # --tokenizer's folder
        ("tok/hf", "tok"),
        ("tok", "tok/tokenizer.json"),  # the folder holding --tokenizer's file
    ],
)
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(
    run_dir, tmp_path, capsys, where, tokenizer
):
    root = tmp_path / "root"
    shutil.copytree(run_dir, root / "run")
    make_word_tokenizer().save_pretrained(root / "tok")
    extra = ["--tokenizer", str(root / tokenizer)] if tokenizer else []
    before = snapshot(tmp_path)
    err = _refused(capsys, _export(root / "run", root / where, *extra))
    assert "outside what it is made from" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("run_file", RUN_SIGNS)
@pytest.mark.parametrize("where", ["run", "run/hf", "run/checkpoints/hf"])
def test_a_runs_final_stands_for_the_whole_run(run_dir, tmp_path, capsys, run_file, where):
    """``--base_model RUN/final --hf RUN/hf`` would put the export among the run's own files."""
    run = tmp_path / "run"
    shutil.copytree(run_dir / "final", run / "final")
    (run / run_file).mkdir() if run_file == "checkpoints" else (run / run_file).write_text("{}\n")
    before = snapshot(tmp_path)
    err = _refused(capsys, _export(run / "final", tmp_path / where))
    assert "the run of the model" in err
    assert snapshot(tmp_path) == before


def test_a_final_folder_outside_a_run_is_just_a_model(run_dir, tmp_path):
    shutil.copytree(run_dir / "final", tmp_path / "models" / "final")
    assert _export(tmp_path / "models" / "final", tmp_path / "models" / "hf") == 0
    assert _manifest_matches(tmp_path / "models" / "hf")["base_model"] == str(tmp_path / "models" / "final")


@pytest.mark.parametrize("source_kind", ["previous export", "user's HF folder"])
def test_exporting_a_folder_into_itself_is_refused(run_dir, exported, tmp_path, capsys, source_kind):
    """F3 (b): ``--base_model m --hf m --dtype bfloat16`` would replace m's fp32 weights for good."""
    model = tmp_path / "m"
    shutil.copytree(exported, model)
    if source_kind == "user's HF folder":
        (model / MANIFEST).unlink()
    before = snapshot(tmp_path)
    err = _refused(capsys, _export(model, model, "--dtype", "bfloat16"))
    assert "--hf" in err and " is the model " in err
    assert snapshot(tmp_path) == before


def _manifest_matches(out: Path) -> dict:
    manifest = json.loads((out / MANIFEST).read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], MANIFEST]) == on_disk
    for name, record in manifest["files"].items():
        assert record == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    return manifest


@pytest.mark.parametrize("state", ["missing", "empty", "previous export"])
def test_export_writes_a_new_or_empty_folder_and_replaces_a_previous_export(
    run_dir, exported, tmp_path, state
):
    from safetensors import safe_open

    out = tmp_path / "hf"
    if state == "empty":
        out.mkdir()
    elif state == "previous export":
        shutil.copytree(exported, out)
    beside = tmp_path / "beside.txt"
    beside.write_text("not export's\n")

    assert _export(run_dir, out, "--dtype", "bfloat16") == 0

    manifest = _manifest_matches(out)
    assert set(EXPORT_NAMES) <= set(manifest["files"]) and manifest["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert beside.read_text() == "not export's\n"
    assert sorted(os.listdir(tmp_path)) == ["beside.txt", "hf"]  # no staging folder left


def test_a_failed_export_leaves_the_previous_one_as_it_was(run_dir, exported, tmp_path, monkeypatch, capsys):
    import ds_sft.model.export

    out = tmp_path / "hf"
    shutil.copytree(exported, out)
    before = snapshot(tmp_path)
    real = ds_sft.model.export.export_hf

    def half_then_fail(model, tokenizer, folder, dtype=None):
        real(model, tokenizer, folder, dtype)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ds_sft.model.export, "export_hf", half_then_fail)
    _refused(capsys, _export(run_dir, out, "--dtype", "bfloat16"))
    assert snapshot(tmp_path) == before  # the old export, and no staging folder beside it


@pytest.mark.parametrize("previous", [True, False])
def test_an_export_that_fails_verify_is_not_written(
    run_dir, exported, tmp_path, monkeypatch, capsys, previous
):
    """--verify read the export after it had replaced the previous one: a failed verify (exit 2) left
    the wrong export in place, its manifest claiming it as ds-sft's, and the right one gone."""
    import ds_sft.model.param_names
    from tests.model.test_export import _transposed_o_proj

    out = tmp_path / "hf"
    if previous:
        shutil.copytree(exported, out)
    before = snapshot(tmp_path)
    real = ds_sft.model.param_names.to_hf_state_dict
    monkeypatch.setattr(ds_sft.model.param_names, "to_hf_state_dict", _transposed_o_proj(real))
    assert "so it was not written" in _refused(capsys, _export(run_dir, out, "--verify"))
    assert snapshot(tmp_path) == before  # the old export or nothing, and no staging folder beside it


def test_export_hf_writes_into_a_new_or_empty_folder_only(run_dir, tmp_path):
    from ds_sft.errors import UserError
    from ds_sft.model.checkpoint import load_model
    from ds_sft.model.export import export_hf

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not empty"):
        export_hf(load_model(run_dir), make_word_tokenizer(), tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_weights_are_as_readable_as_any_file_written_beside_them(tmp_path, umask):
    """safetensors creates its file owner-only (0600) whatever the umask: on a shared cluster no one
    else could read the final weights or an export, though every other file of them was readable."""
    previous = os.umask(umask)
    try:
        save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "run" / "final")
        (tmp_path / "run" / "final" / "tokenizer").mkdir()
        make_word_tokenizer().save_pretrained(tmp_path / "run" / "final" / "tokenizer")
        assert _export(tmp_path / "run", tmp_path / "hf") == 0
        (tmp_path / "plain").write_text("a file of this process")
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for weights in (tmp_path / "run" / "final" / "model.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert weights.stat().st_mode & 0o777 == expected, weights


@pytest.mark.parametrize("template", ["alpaca", "chat", None])
def test_an_alpaca_tuned_run_exports_with_the_alpaca_chat_template(run_dir, tmp_path, template):
    """A run tuned on Alpaca-format data (its final/trained_on.json) was exported with its tokenizer's
    chat template, a format it never saw: transformers' apply_chat_template now prompts it as prepare
    did. A run tuned on the chat template, and a model no run of ours made, keep theirs."""
    from transformers import AutoTokenizer

    from ds_sft.data.model_match import TRAINED_ON
    from ds_sft.data.templates import render_prompt

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    if template is not None:
        record = {"template": template, "data_key": "k", "step": 1}
        (run / "final" / TRAINED_ON).write_text(json.dumps(record))
    assert _export(run, tmp_path / "hf") == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = AutoTokenizer.from_pretrained(run / "final" / "tokenizer")
    if template != "alpaca":
        assert exported.chat_template == original.chat_template
        return
    question = {"instruction": "Name a colour", "input": ""}
    asked = [{"role": "user", "content": question["instruction"]}]
    text = exported.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    assert text == render_prompt(question, "alpaca")
    manifest = json.loads((tmp_path / "hf" / MANIFEST).read_text())
    assert manifest["trained_on_template"] == "alpaca"


def test_export_reads_the_runs_training_record_once(run_dir, tmp_path, monkeypatch, capsys):
    """final/trained_on.json was read twice: for the note that final/ is behind the run's checkpoints,
    then for the template the run was tuned on. One read serves both."""
    from ds_sft.data.model_match import TRAINED_ON

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (run / "final" / TRAINED_ON).write_text(json.dumps({"template": "alpaca", "data_key": "k", "step": 1}))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000004")
    reads = []
    real_open = Path.open

    def counted_open(path, *args, **kwargs):
        if path.name == TRAINED_ON:
            reads.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counted_open)
    assert _export(run, tmp_path / "hf") == 0
    assert "holds the weights of step 1, but the run's checkpoints reach step 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / MANIFEST).read_text())["trained_on_template"] == "alpaca"
    assert len(reads) == 1
