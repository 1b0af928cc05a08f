"""``prepare --base_model M --seq_len N`` refuses N past M's positions, in one line, before it reads a row.

Data prepared at a ``--seq_len`` the model cannot attend over was found only when ``train`` had built the
model (or never, for data prepared and kept). Every kind of model a base model can be (a ds-sft folder,
a run, a weights file, a Hugging Face folder, a nanoGPT-style ``.pt``, bare weights, a GGUF): the
positions prepare reads are those ``load_model`` builds, and prepare takes ``--seq_len`` up to them and
refuses one more or many more (``train`` refuses the same rows with the same check once it has built
the model: tests/train/test_compatibility.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ds_sft.cli import main
from ds_sft.data.model_match import model_positions
from ds_sft.model.checkpoint import load_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.hf_families import hf_config
from ds_sft.model.llama import LlamaModel
from ds_sft.model.param_names import to_hf_state_dict
from tests.data.helpers import alpaca_rows, write_jsonl
from tests.data.match_helpers import CORPUS, tiny_model_dir, train_bpe


def tiny(**config) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(ModelConfig.preset("tiny", vocab_size=512, **config))


def hf_folder(out: Path, tokenizer: Path, positions: int) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files), as the hub ships one."""
    import transformers

    from ds_sft.data.tokenizer import load_tokenizer

    model = tiny(max_seq_len=positions)
    config = hf_config(model.config)
    hf_model = getattr(transformers, config.architectures[0])(config)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    hf_model.save_pretrained(out)
    load_tokenizer(str(tokenizer)).save_pretrained(out)
    return out


def torch_file(out: Path, positions: int | None) -> Path:
    """A nanoGPT-style checkpoint naming its positions ``block_size`` in ``model_args``, or (None) a bare
    state dict that names none."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = tiny().state_dict()
    saved = (
        state if positions is None else {"model": state, "model_args": {"block_size": positions, "n_head": 4}}
    )
    torch.save(saved, out)
    return out


def bare_safetensors(out: Path) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tiny().state_dict().items()}, str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", CORPUS)


# kind -> (how to build it in a folder, given the tokenizer); positions chosen apart, so that none is
# another's by accident
KINDS = {
    "ds-sft folder": lambda root, tok: tiny_model_dir(root, tok, max_seq_len=160),
    "run dir": lambda root, tok: tiny_model_dir(root, tok, "run", max_seq_len=144),
    "weights file": lambda root, tok: tiny_model_dir(root, tok, max_seq_len=136) / "model.safetensors",
    "hf folder": lambda root, tok: hf_folder(root, tok, 192),
    "nanogpt .pt": lambda root, tok: torch_file(root / "base.pt", 176),
    "bare .pt": lambda root, tok: torch_file(root / "bare.pt", None),
    "bare .safetensors": lambda root, tok: bare_safetensors(root / "bare.safetensors"),
}


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {kind: str(build(root / kind.replace(" ", "_"), tokenizer)) for kind, build in KINDS.items()}


def spec_of(kind: str, models: dict[str, str], request) -> str:
    if kind == "gguf alias":
        request.getfixturevalue("smollm2_gguf")  # skips when the package is absent
        return "smollm2-135m-instruct"
    if kind.startswith("bare"):
        request.getfixturevalue("gpt2_tokenizer_dir")  # bare weights use GPT-2's: skips without ../shared
    return models[kind]


ALL_KINDS = [*KINDS, pytest.param("gguf alias", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_prepare_reads_the_positions_train_builds(kind, models, request):
    spec = spec_of(kind, models, request)
    assert model_positions(spec) == load_model(spec).config.max_seq_len


def run_prepare(spec: str, seq_len: int, out: Path) -> int:
    rows = write_jsonl(out.with_name(out.name + ".jsonl"), alpaca_rows(30))
    flags = ["--alpaca", str(rows), "--base_model", spec, "--seq_len", str(seq_len), "--output_dir", str(out)]
    return main(["prepare", *flags, "--decontam_threshold", "0", "--min_val_rows", "2", "--truncate"])


@pytest.mark.parametrize("past", [1, 1000, 2**20])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_seq_len_past_the_model_positions_is_refused_before_any_row_is_read(
    kind, past, models, request, tmp_path, capsys, monkeypatch
):
    import ds_sft.data.prepare

    spec = spec_of(kind, models, request)
    positions = model_positions(spec)  # load_model's, as the test above checks
    monkeypatch.setattr(ds_sft.data.prepare, "load_records", lambda *a, **k: pytest.fail("rows were read"))
    seq_len = min(positions + past, 2**20)
    assert run_prepare(spec, seq_len, tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--seq_len asks for rows of {seq_len:,} tokens but {spec} has {positions:,} positions" in err
    assert f"--seq_len {positions} or less" in err and not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_seq_len_of_exactly_the_model_positions_is_prepared(kind, models, request, tmp_path):
    spec = spec_of(kind, models, request)
    positions = model_positions(spec)
    assert run_prepare(spec, positions, tmp_path / "data") == 0
    assert (tmp_path / "data" / "manifest.json").is_file()
