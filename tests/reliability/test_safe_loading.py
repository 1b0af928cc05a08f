"""Loading a checkpoint never runs code from it, and a damaged file is named, not a traceback.

A ``.pt`` file is a pickle, and unpickling can call any importable function: a checkpoint downloaded
from the internet could run ``os.system``. ``load_model`` must refuse such files (torch's
``weights_only`` unpickler or safetensors only), in every on-disk flavour of pickle, with a
:class:`UserError` that says why, and the payload must never run. Each payload here would create a
sentinel file if executed, so "it did not run" is checked, not assumed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model, save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel

from .conftest import Payload


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return LlamaModel(ModelConfig.preset("tiny")).state_dict()


def _write_zip(path: Path, obj) -> None:
    torch.save(obj, path)


def _write_legacy(path: Path, obj) -> None:  # torch < 1.6's format, still common for old .pt/.bin
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _write_raw_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


WRITERS = {"zip": _write_zip, "legacy": _write_legacy, "raw-pickle": _write_raw_pickle}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, writer, suffix):
    sentinel = tmp_path / "payload_ran"
    path = tmp_path / f"evil{suffix}"
    WRITERS[writer](path, {"model": _tiny_state(), "trainer": Payload(sentinel)})

    with pytest.raises(UserError) as err:
        load_model(path)
    message = str(err.value)
    assert not sentinel.exists(), "unpickling ran the checkpoint's code"
    assert "\n" not in message
    assert str(path) in message and "weights_only" in message and "safetensors" in message


def test_refusal_names_the_offending_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _tiny_state(), "trainer": Payload(tmp_path / "ran")}, path)
    with pytest.raises(UserError, match=r"(io|builtins)\.open"):
        load_model(path)


@pytest.mark.parametrize("writer", ["zip", "legacy"])
def test_plain_state_dicts_load_in_both_torch_formats(tmp_path, writer):
    """The positive control: refusing code must not refuse honest checkpoints."""
    state = _tiny_state()
    path = tmp_path / "model.pt"
    WRITERS[writer](path, {"model": state, "model_args": {"n_heads": 4, "n_kv_heads": 2}})
    loaded = load_model(path).state_dict()
    for name, tensor in state.items():
        if name in loaded:
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    state = _tiny_state()
    model_dir = save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    good_pt = tmp_path / "good.pt"
    torch.save(state, good_pt)
    files = {
        "empty .pt": b"",
        "truncated .pt": good_pt.read_bytes()[: good_pt.stat().st_size // 2],
        "random bytes .pt": bytes(range(256)) * 4,
        "truncated .safetensors": (model_dir / "model.safetensors").read_bytes()[:1000],
        "zeros .safetensors": b"\0" * 64,
    }
    out = {}
    for label, data in files.items():
        path = tmp_path / label.replace(" ", "_").replace("_.", ".")
        path.write_bytes(data)
        out[label] = path
    truncated_dir = tmp_path / "truncated_dir"
    truncated_dir.mkdir()
    (truncated_dir / "model_config.json").write_text((model_dir / "model_config.json").read_text())
    (truncated_dir / "model.safetensors").write_bytes(files["truncated .safetensors"])
    out["ds-sft dir with truncated weights"] = truncated_dir
    return out


def test_damaged_checkpoint_files_are_one_clear_error(tmp_path):
    for label, path in _damaged_files(tmp_path).items():
        with pytest.raises(UserError) as err:
            load_model(path)
        message = str(err.value)
        assert "\n" not in message, label
        assert str(path) in message and ("corrupt" in message or "truncated" in message), (label, message)
