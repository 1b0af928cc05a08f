"""`ds-sft train` refuses what its flags and files alone refuse before the expensive work: no weights
loaded or initialised, no process group, no DeepSpeed engine, nothing written to the run folder.

The refusal that rows are longer than the model's positions came after the base model's weights had
loaded (seconds to minutes for a large model); a val split without trained tokens, after the engine
was built. Each kind of refusal below runs with the weights' loaders, the process group and the engine
replaced by traps that record being reached; a damaged checkpoint to resume is refused once the folder
is claimed (in the group), still before any weight loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ds_sft.cli import main
from tests.data.match_helpers import CORPUS, prepare, tiny_model_dir, train_bpe, two_tokenizers
from tests.data.test_model_positions import bare_safetensors, hf_folder, tiny, torch_file
from tests.gguf_files import write_model_gguf
from tests.train.helpers import write_data_dir

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs the refusals are made of, built once."""
    root = tmp_path_factory.mktemp("preflight")
    a, b = two_tokenizers(root / "tokenizers")
    data_a = prepare(root / "data_a", a)  # rows of 256 tokens, tokenizer A (420 tokens)
    tokenizer = train_bpe(root / "tok" / "tokenizer.json", CORPUS)
    return {
        "root": root,
        "data_a": data_a,
        "model_b": tiny_model_dir(root / "model_b", b),  # B's tokenizer, 256 positions
        "short_a": tiny_model_dir(root / "short_a", a, max_seq_len=32),
        # models that take the 64-token rows of write_data_dir but for their positions (< 64), as each
        # layout declares them; the data has no tokenizer to compare theirs with
        "positions": {
            "ds-sft folder": tiny_model_dir(root / "folder", max_seq_len=32),
            "run dir": tiny_model_dir(root / "run_dir", layout="run", max_seq_len=40),
            "weights file": tiny_model_dir(root / "file", max_seq_len=48) / "model.safetensors",
            "hf folder": hf_folder(root / "hf", tokenizer, 56),
            "nanogpt .pt": torch_file(root / "nanogpt" / "base.pt", 60),
        },
        # a model of each layout with 512 embeddings and positions enough for write_data_dir's rows
        "vocabulary": {
            "ds-sft folder": tiny_model_dir(root / "v_folder"),
            "run dir": tiny_model_dir(root / "v_run_dir", layout="run"),
            "weights file": tiny_model_dir(root / "v_file") / "model.safetensors",
            "bare .safetensors": bare_safetensors(root / "v_bare" / "bare.safetensors"),
            "hf folder": hf_folder(root / "v_hf", tokenizer, 256),
            "gguf": gguf_of_tiny(root / "v_gguf" / "tiny.gguf"),
            "nanogpt .pt": torch_file(root / "v_nanogpt" / "base.pt", 256),
        },
    }


def gguf_of_tiny(path: Path) -> Path:
    path.parent.mkdir(parents=True)
    model = tiny(max_seq_len=256)
    return write_model_gguf(path, model.config, model.state_dict())


class Trapped(Exception):
    """The run reached what a refusal from the files alone must come before."""


@pytest.fixture
def traps(monkeypatch) -> list[str]:
    """The expensive steps, each replaced by a trap: the names of those reached, in order."""
    import deepspeed

    import ds_sft.model.checkpoint
    import ds_sft.train.cli
    import ds_sft.train.distributed

    reached: list[str] = []

    def trap(name):
        def reach(*args, **kwargs):
            reached.append(name)
            raise Trapped(name)

        return reach

    monkeypatch.setattr(ds_sft.model.checkpoint, "load_model", trap("load_model"))
    monkeypatch.setattr(ds_sft.train.cli, "build_model", trap("build_model"))
    monkeypatch.setattr(ds_sft.train.distributed, "process_group", trap("process_group"))
    monkeypatch.setattr(deepspeed, "initialize", trap("deepspeed.initialize"))
    return reached


def data_dir(tmp_path: Path, **kwargs) -> Path:
    return write_data_dir(tmp_path / "data", train_rows=8, **kwargs)


def with_vocabulary(tmp_path: Path, size: int) -> Path:
    data = data_dir(tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": {"vocab_size": size}}))
    return data


def without_trained_train_rows(tmp_path: Path) -> Path:
    data = data_dir(tmp_path)
    for mask in (data / "train").glob("*.loss_mask.npy"):
        np.lib.format.open_memmap(mask, mode="r+")[:] = 0
    return data


def with_tokenizer_link(tmp_path: Path) -> Path:
    data = data_dir(tmp_path)
    (data / "tokenizer").mkdir()
    (data / "tokenizer" / "tokenizer.json").symlink_to("/etc/passwd")
    return data


def with_other_tokenizer_folder(tmp_path: Path, files) -> Path:
    """A copy of data prepared with tokenizer A whose tokenizer/ folder is model B's."""
    data = tmp_path / "data"
    shutil.copytree(files["data_a"], data)
    shutil.rmtree(data / "tokenizer")
    shutil.copytree(files["model_b"] / "tokenizer", data / "tokenizer")
    return data


# refusal -> (its inputs: tmp_path, files -> (data dir, model flags, more flags), a piece of its line)
REFUSALS = {
    "rows past the base model's positions": (
        lambda tmp, f: (f["data_a"], ["--base_model", str(f["short_a"])], []),
        "has 32 positions",
    ),
    "ids past the preset's embeddings": (
        lambda tmp, f: (with_vocabulary(tmp, 50257), ["--model", "tiny"], []),
        "tokenized with a 50,257-token vocabulary but the model has 256 embeddings",
    ),
    "prepared ids past the preset's embeddings": (
        lambda tmp, f: (f["data_a"], ["--model", "tiny"], []),
        "420-token vocabulary but the model has 256 embeddings",
    ),
    "the base model's tokenizer is another": (
        lambda tmp, f: (f["data_a"], ["--base_model", str(f["model_b"])], []),
        "uses another tokenizer",
    ),
    "the data's tokenizer folder is not the one it was made with": (
        lambda tmp, f: (with_other_tokenizer_folder(tmp, f), ["--model", "tiny"], []),
        "is not the tokenizer",
    ),
    "a tokenizer file that is a symlink": (
        lambda tmp, f: (with_tokenizer_link(tmp), ["--model", "tiny"], []),
        "is a symlink, not a regular file",
    ),
    "no trained token in the train split": (
        lambda tmp, f: (without_trained_train_rows(tmp), ["--model", "tiny"], []),
        "no train row has a trained token",
    ),
    "no trained token in the val split": (
        lambda tmp, f: (data_dir(tmp, val_trained_rows=()), ["--model", "tiny"], []),
        "no val row has a trained token",
    ),
    "a micro-step of more rows than the split": (
        lambda tmp, f: (data_dir(tmp), ["--model", "tiny"], ["--micro_batch_size", "9"]),
        "holds 8 packed rows",
    ),
}


def refused_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("ds-sft train: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def train_argv(data, model_flags, more, out) -> list[str]:
    return ["train", "--data_dir", str(data), *model_flags, "--out_dir", str(out), "--fp8", "off",
            "--micro_batch_size", "2", "--grad_accum", "1", "--max_iters", "1", "--wandb_mode", "disabled",
            *more]  # fmt: skip


@pytest.mark.parametrize("refusal", REFUSALS)
def test_what_the_files_refuse_is_refused_before_the_group_the_weights_and_the_engine(
    refusal, files, traps, tmp_path, capsys
):
    make, said = REFUSALS[refusal]
    data, model_flags, more = make(tmp_path, files)
    out = tmp_path / "run"
    assert main(train_argv(data, model_flags, more, out)) == 2
    line = refused_line(capsys)
    assert said in line, line
    assert traps == []
    assert not out.exists()  # not claimed: no lock, no marker, no effective_config.json


@pytest.mark.parametrize("kind", ["ds-sft folder", "run dir", "weights file", "hf folder", "nanogpt .pt"])
def test_rows_past_the_positions_of_every_model_layout_are_refused_before_its_weights(
    kind, files, traps, tmp_path, capsys
):
    """Each layout declares its positions in its own files; the rows (64 tokens) pass none of them."""
    spec = files["positions"][kind]
    out = tmp_path / "run"
    assert main(train_argv(data_dir(tmp_path), ["--base_model", str(spec)], [], out)) == 2
    line = refused_line(capsys)
    assert f"holds rows of 64 tokens but {spec} has" in line and "positions" in line, line
    assert traps == [] and not out.exists()


@pytest.fixture
def weight_readers_trapped(traps, monkeypatch) -> list[str]:
    """:func:`traps`, and every reader of a checkpoint's tensors (safetensors' load, transformers' model
    load, which a GGUF's tensors go through too, and torch's unpickler) a trap as well."""
    import safetensors.torch
    import torch
    import transformers

    def trap(name):
        def reach(*args, **kwargs):
            traps.append(name)
            raise Trapped(name)

        return reach

    monkeypatch.setattr(safetensors.torch, "load_file", trap("safetensors load_file"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap("from_pretrained"))
    monkeypatch.setattr(torch, "load", trap("torch.load"))
    return traps


HEADER_LAYOUTS = ["ds-sft folder", "run dir", "weights file", "bare .safetensors", "hf folder", "gguf"]


@pytest.mark.parametrize("kind", HEADER_LAYOUTS)
def test_a_vocabulary_past_the_base_models_is_refused_before_any_weight_is_read(
    kind, files, weight_readers_trapped, tmp_path, capsys
):
    """The base model's embeddings, read from its config and headers, refuse data of one token more
    (the refusal came once the weights had loaded, after the process group formed)."""
    spec = files["vocabulary"][kind]
    out = tmp_path / "run"
    assert main(train_argv(with_vocabulary(tmp_path, 513), ["--base_model", str(spec)], [], out)) == 2
    line = refused_line(capsys)
    assert f"513-token vocabulary but the model has 512 embeddings ({spec}" in line, line
    assert weight_readers_trapped == [] and not out.exists()


@pytest.mark.parametrize("kind", HEADER_LAYOUTS)
def test_a_vocabulary_the_base_model_has_passes_its_files_checks(
    kind, files, weight_readers_trapped, tmp_path
):
    out = tmp_path / "run"
    with pytest.raises(Trapped):
        main(
            train_argv(
                with_vocabulary(tmp_path, 512), ["--base_model", str(files["vocabulary"][kind])], [], out
            )
        )
    assert weight_readers_trapped == ["process_group"]


def another_family(root: Path, files) -> Path:
    """The Hugging Face folder, its config.json naming a family ds-sft does not compute (Gemma's weights
    have LLaMA's names and shapes)."""
    folder = root / "gemma"
    shutil.copytree(files["vocabulary"]["hf folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    return folder


def a_weight_short(root: Path, files) -> Path:
    """The ds-sft folder without one of its weights."""
    from safetensors import safe_open  # not load_file, a trap in the test
    from safetensors.torch import save_file

    folder = root / "short"
    shutil.copytree(files["vocabulary"]["ds-sft folder"], folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as saved:
        weights = {name: saved.get_tensor(name) for name in saved.keys()}  # noqa: SIM118
    del weights["layers.0.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    return folder


# what a base model's config and headers refuse -> (its spec, given tmp_path and files; a piece of its line)
HEADER_REFUSALS = {
    "a family ds-sft does not compute": (another_family, "gemma"),
    "a weight missing from the header": (a_weight_short, "missing (1): layers.0.mlp.up_proj.weight"),
}


@pytest.mark.parametrize("refusal", HEADER_REFUSALS)
def test_what_a_base_models_headers_refuse_is_refused_before_any_weight_is_read(
    refusal, files, weight_readers_trapped, tmp_path, capsys
):
    make, said = HEADER_REFUSALS[refusal]
    spec = make(tmp_path, files)
    out = tmp_path / "run"
    assert main(train_argv(with_vocabulary(tmp_path, 512), ["--base_model", str(spec)], [], out)) == 2
    line = refused_line(capsys)
    assert said in line and str(spec) in line, line
    assert weight_readers_trapped == [] and not out.exists()


def test_a_torch_files_vocabulary_is_left_to_its_built_model(files, traps, tmp_path):
    """Its shapes lie inside its pickle, which only the load unpickles: the built model is checked
    (tests/train/test_compatibility.py); its files' checks let it through."""
    out = tmp_path / "run"
    spec = files["vocabulary"]["nanogpt .pt"]
    with pytest.raises(Trapped):
        main(train_argv(with_vocabulary(tmp_path, 513), ["--base_model", str(spec)], [], out))
    assert traps == ["process_group"]


def damaged_checkpoint(ckpt_dir: Path) -> Path:
    """A tag whose trainer state lists its one file with another digest than the file has."""
    tag = ckpt_dir / "step_000001"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not what was saved")
    state = {
        "step": 1, "world_size": 1, "zero_stage": 0, "nan_streak": 0, "train_tokens": 1, "elapsed_s": 1.0,
        "best_val": None, "best_tag": None, "val_history": [],
        "sampler": {"epoch": 0, "consumed_samples": 2, "seed": 1337}, "run": {},
        "files": {"mp_rank_00_model_states.pt": {"bytes": 18, "sha256": "0" * 64}},
    }  # fmt: skip
    (tag / "trainer_state.json").write_text(json.dumps(state))
    return tag


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_a_damaged_checkpoint_to_resume_is_refused_before_the_weights_load(
    resume, files, tmp_path, capsys, monkeypatch, dist_env
):
    """Its files are checked once the folder is claimed (that needs the group), before any weight."""
    import ds_sft.model.checkpoint
    import ds_sft.train.cli

    reached = []
    monkeypatch.setattr(ds_sft.train.cli, "build_model", lambda *a, **k: reached.append("build_model"))
    monkeypatch.setattr(ds_sft.model.checkpoint, "load_model", lambda *a, **k: reached.append("load_model"))
    out = tmp_path / "run"
    if resume == "auto":  # a run folder that holds only a copied-in checkpoint
        damaged_checkpoint(out / "checkpoints")
        flags = ["--resume"]
    else:
        flags = ["--resume", str(damaged_checkpoint(tmp_path / "elsewhere"))]
    assert main(train_argv(data_dir(tmp_path), ["--model", "tiny"], flags, out)) == 2
    line = refused_line(capsys)
    assert "mp_rank_00_model_states.pt is corrupted" in line, line
    assert reached == []


def test_the_checks_leave_a_run_that_passes_them_to_the_group(files, traps, tmp_path, capsys):
    """Control: a run none of them refuses reaches the process group (the first trap)."""
    out = tmp_path / "run"
    with pytest.raises(Trapped):
        main(train_argv(data_dir(tmp_path), ["--model", "tiny"], [], out))
    assert traps == ["process_group"] and not os.path.lexists(out)
