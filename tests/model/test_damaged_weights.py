"""Weights that load but cannot train: NaN/Inf values, and transformers' own reporting of a load.

A NaN or Inf in a base model makes every loss NaN from the first step; the training loop can only
blame the learning rate. ``load_model`` (train, eval and export all read ``--base_model`` through it)
checks each tensor once and names the damaged one, in every format it reads. And when a load is
refused, stderr holds ds-sft's one line only: no LOAD REPORT table or progress bar from transformers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model, save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.hf_families import hf_config
from ds_sft.model.llama import LlamaModel
from ds_sft.model.param_names import to_hf_state_dict
from tests.gguf_files import write_model_gguf

TINY = ModelConfig.preset("tiny")
HEADS = {"n_heads": TINY.n_heads, "n_kv_heads": TINY.n_kv_heads}


def _tiny_model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(TINY)


def _write_pt(path: Path, model: LlamaModel) -> Path:
    torch.save({"model": model.state_dict(), "config": HEADS}, path.with_suffix(".pt"))
    return path.with_suffix(".pt")


def _write_safetensors_file(path: Path, model: LlamaModel) -> Path:
    from safetensors.torch import save_file

    file = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    return file


def _write_hf_folder(path: Path, model: LlamaModel) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    hf_config(TINY).save_pretrained(path)
    state = {k: v.contiguous() for k, v in to_hf_state_dict(model).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _write_gguf(path: Path, model: LlamaModel) -> Path:
    return write_model_gguf(path.with_suffix(".gguf"), TINY, model.state_dict())


WRITERS = {
    ".pt": _write_pt,
    ".safetensors": _write_safetensors_file,
    "ds-sft folder": lambda path, model: save_model(model, path),
    "HF folder": _write_hf_folder,
    ".gguf": _write_gguf,
}
# A tensor of every kind: embedding, norms, each projection, both layers.
TENSORS = [
    "wte.weight",
    "norm.weight",
    "layers.0.attn_norm.weight",
    "layers.0.attn.q_proj.weight",
    "layers.0.attn.k_proj.weight",
    "layers.1.attn.v_proj.weight",
    "layers.1.attn.o_proj.weight",
    "layers.0.mlp_norm.weight",
    "layers.1.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.1.mlp.down_proj.weight",
]
VALUES = [math.nan, math.inf, -math.inf]


def _damage(model: LlamaModel, name: str, value: float, where: str) -> None:
    flat = model.state_dict()[name].view(-1)
    index = {"first": 0, "middle": flat.numel() // 2, "last": flat.numel() - 1}[where]
    flat[index] = value


# Every tensor in the cheap formats; a tensor of each kind in the ones transformers reads (slower).
CASES = [
    (fmt, name, value, where)
    for fmt in (".pt", ".safetensors", "ds-sft folder")
    for name in TENSORS
    for value, where in zip(VALUES, ["first", "middle", "last"], strict=True)
] + [
    (fmt, name, value, "middle")
    for fmt in ("HF folder", ".gguf")
    for name, value in zip(TENSORS[::2], VALUES * 2, strict=False)
]


@pytest.mark.parametrize(("fmt", "name", "value", "where"), CASES)
def test_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, fmt, name, value, where):
    model = _tiny_model()
    _damage(model, name, value, where)
    path = WRITERS[fmt](tmp_path / "base", model)
    with pytest.raises(UserError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message
    assert f"tensor {name} " in message and "damaged" in message and str(path) in message, message


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_the_same_weights_all_finite_load(tmp_path, fmt):
    """The positive control: the check refuses the damage, not the format."""
    path = WRITERS[fmt](tmp_path / "base", _tiny_model())
    assert load_model(path).config.d_model == TINY.d_model


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _hf_missing(root: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _write_hf_folder(root / "hf", _tiny_model())
    weights = load_file(str(folder / "model.safetensors"))
    del weights[key]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hf_reshaped(root: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _write_hf_folder(root / "hf", _tiny_model())
    weights = load_file(str(folder / "model.safetensors"))
    weights[key] = weights[key][:-1].contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hf_extra(root: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _write_hf_folder(root / "hf", _tiny_model())
    weights = load_file(str(folder / "model.safetensors"))
    weights[key] = torch.ones(3, 3)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# (make the folder, words of the one line): the loads transformers reports on with its own table
HF_KEY_PROBLEMS = [
    (lambda r: _hf_missing(r, "model.norm.weight"), "missing .*model.norm.weight"),
    (lambda r: _hf_missing(r, "model.layers.1.mlp.down_proj.weight"), "missing .*down_proj"),
    (lambda r: _hf_missing(r, "model.embed_tokens.weight"), "missing .*embed_tokens"),
    (lambda r: _hf_reshaped(r, "model.layers.0.self_attn.q_proj.weight"), "wrong shape.*q_proj"),
    (lambda r: _hf_reshaped(r, "model.layers.1.mlp.up_proj.weight"), "wrong shape.*up_proj"),
    (lambda r: _hf_extra(r, "model.layers.0.self_attn.extra.weight"), "unexpected .*extra"),
]


@pytest.mark.parametrize(("make", "words"), HF_KEY_PROBLEMS)
def test_stderr_holds_only_ds_sft_s_line_when_a_hf_folder_s_weights_do_not_fit(
    tmp_path, capfd, gpt2_tokenizer_dir, make, words
):
    """transformers printed a LOAD REPORT table (and a progress bar) before ds-sft's line."""
    from ds_sft.cli import main

    folder = make(tmp_path)
    capfd.readouterr()
    code = main(["export", "--base_model", str(folder), "--tokenizer", str(gpt2_tokenizer_dir),
                 "--hf", str(tmp_path / "out")])  # fmt: skip
    captured = capfd.readouterr()
    lines = _error_lines(captured.err)
    assert code == 2 and len(lines) == 1, captured.err[-3000:]
    assert re.search(words, lines[0]) and str(folder) in lines[0], lines[0]
    assert "LOAD REPORT" not in captured.out + captured.err


def test_transformers_logging_is_restored_after_a_load(tmp_path):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    try:
        with pytest.raises(UserError):
            load_model(_hf_missing(tmp_path, "model.norm.weight"))
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


NARROWING_VALUES = (65504.0, 65519.0, 65520.0, 7e4, 3.38e38, 3.4e38, 1e39, 1e300)
NARROWING = [
    (stored, loaded, value)
    for stored in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    for loaded in (torch.float32, torch.bfloat16, torch.float16)
    for value in NARROWING_VALUES
    # a value the file can hold (finite, and not rounded to another in its dtype)
    if math.isfinite(torch.tensor(value, dtype=torch.float64).to(stored).item())
]


@pytest.mark.parametrize(
    ("stored", "loaded", "value"),
    NARROWING,
    ids=[f"{s}-{d}-{v:g}".replace("torch.", "") for s, d, v in NARROWING],
)
def test_a_weight_past_the_loaded_dtype_s_range_is_refused(tmp_path, stored, loaded, value):
    """load_model(dtype=float16) of fp32 weights past 65,504 gave inf without a word (every forward
    NaN); fp64 weights past 3.4e38 did at the default float32. The oracle is torch's own cast."""
    model = _tiny_model()
    state = {name: tensor.to(stored) for name, tensor in model.state_dict().items()}
    state["layers.1.mlp.up_proj.weight"][3, 2] = -value
    torch.save({"model": state, "config": HEADS}, tmp_path / "m.pt")
    held = torch.tensor(-value, dtype=torch.float64).to(stored)
    if bool(held.to(loaded).isinf()):
        with pytest.raises(UserError) as refusal:
            load_model(tmp_path / "m.pt", dtype=loaded)
        message = str(refusal.value)
        assert "\n" not in message and "layers.1.mlp.up_proj.weight" in message
        assert f"past {str(loaded).removeprefix('torch.')}'s largest value" in message
    else:
        loaded_model = load_model(tmp_path / "m.pt", dtype=loaded)
        weight = loaded_model.layers[1].mlp.up_proj.weight
        assert weight.dtype == loaded and weight[3, 2].item() == held.to(loaded).item()


def test_the_range_check_passes_over_tensors_without_values():
    """torch.aminmax of an empty tensor is a RuntimeError: a traceback in place of the check."""
    from ds_sft.model.checkpoint import out_of_range

    state = {"empty": torch.zeros(0, 4), "large": torch.tensor([1e5]), "fits": torch.tensor([1.0])}
    assert out_of_range(state, torch.float16) == ("large", 1e5)
    assert out_of_range({"empty": torch.zeros(0)}, torch.float16) is None
