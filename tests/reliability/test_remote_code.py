"""No command ever runs Python code that a model or tokenizer folder brings with it.

A Hugging Face folder can name classes of its own in ``auto_map`` (config.json, tokenizer_config.json)
and ship them as ``*.py``: transformers then asks "Do you wish to run the custom code? [y/N]" and
imports the file on "y". ds-sft must refuse such a folder in one line, whatever stdin says, from every
command that reads a model or a tokenizer. Each folder's ``evil.py`` would create a marker file when
imported, so "it did not run" is checked, not assumed.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from ds_sft.model.config import ModelConfig
from ds_sft.model.hf_families import hf_config

from .conftest import loading_commands, write_tiny_data_dir

EVIL_PY = """\
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""
MODEL_AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}

# folder name -> (changes to config.json, changes to tokenizer_config.json); None deletes a key
FOLDERS = {
    "config auto_map, model_type llama": ({"auto_map": MODEL_AUTO_MAP}, {}),
    "config auto_map, model_type evil": ({"auto_map": MODEL_AUTO_MAP, "model_type": "evil"}, {}),
    "config auto_map, no model_type": ({"auto_map": MODEL_AUTO_MAP, "model_type": None}, {}),
    "tokenizer auto_map with tokenizer_class": (
        {},
        {"auto_map": TOKENIZER_AUTO_MAP, "tokenizer_class": "EvilTokenizer"},
    ),
    "tokenizer auto_map, no tokenizer_class": ({}, {"auto_map": TOKENIZER_AUTO_MAP, "tokenizer_class": None}),
}


def _edit_json(path: Path, changes: dict) -> None:
    values = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def clean_hf_folder(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A genuine tiny LLaMA in the Hugging Face layout, with GPT-2's tokenizer files."""
    import torch
    from transformers import LlamaForCausalLM

    from ds_sft.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "clean"
    config = ModelConfig.preset("tiny", vocab_size=50304)
    LlamaForCausalLM(hf_config(config)).save_pretrained(folder)
    load_tokenizer(str(gpt2_tokenizer_dir)).save_pretrained(str(folder))  # writes tokenizer_config.json
    return folder


def _evil_folder(clean: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(the folder with FOLDERS[name]'s auto_map and an evil.py, the marker evil.py would write)."""
    folder = tmp_path / "model"
    shutil.copytree(clean, folder)
    marker = tmp_path / "code_ran"
    (folder / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    config_changes, tokenizer_changes = FOLDERS[name]
    _edit_json(folder / "config.json", config_changes)
    _edit_json(folder / "tokenizer_config.json", tokenizer_changes)
    return folder, marker


def _commands(folder: Path, clean: Path, tmp_path: Path) -> dict[str, list[str]]:
    data = write_tiny_data_dir(tmp_path / "data", tokenizer=clean)
    rows = tmp_path / "alpaca.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    prepare = ["prepare", "--alpaca", str(rows), "--output_dir", str(tmp_path / "prepared")]
    return {
        **loading_commands(folder, folder, data, tmp_path),
        "export --tokenizer": ["export", "--base_model", str(clean), "--tokenizer", str(folder),
                               "--hf", str(tmp_path / "hf2")],
        "prepare --base_model": [*prepare, "--base_model", str(folder)],
        "prepare --tokenizer": [*prepare, "--tokenizer", str(folder)],
    }  # fmt: skip


@pytest.mark.parametrize("name", FOLDERS)
def test_a_folder_asking_to_run_its_code_is_refused_by_every_command(
    name, clean_hf_folder, tmp_path, capsys, monkeypatch, dist_env
):
    from ds_sft.cli import main

    folder, marker = _evil_folder(clean_hf_folder, tmp_path, name)
    config_refused = "tokenizer" not in name
    for command, argv in _commands(folder, clean_hf_folder, tmp_path).items():
        if config_refused or command not in ("train", "eval"):
            monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # the answer that would run it
            code = main(argv)
            err = capsys.readouterr().err
            assert not marker.exists(), f"{command} ran {folder}/evil.py"
            lines = [line for line in err.splitlines() if "error:" in line]
            assert code == 2 and len(lines) == 1, (command, code, err[-2000:])
            assert "auto_map" in lines[0] and str(folder) in lines[0], (command, lines)
            assert "Traceback" not in err, command
    assert not (tmp_path / "prepared").exists()  # nothing written, evil.py not copied into a tokenizer/
