"""``read_config`` gives the config ``load_model`` builds, read without a weight.

``ds-sft train`` checks the data against the base model's config before its process group and the
weights' load (a 2B model's takes minutes): that config must be the one the load builds, for every
layout whose files say it without unpickling (ds-sft folder, run dir, weights file beside its config,
bare safetensors, Hugging Face folder, GGUF), while no weight loader runs. A torch file's shapes lie in
its pickle: None, and the built model decides.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model, read_config
from tests.data.match_helpers import CORPUS, train_bpe
from tests.data.test_model_positions import KINDS, tiny
from tests.gguf_files import write_model_gguf
from tests.model.test_hostile_checkpoints import HOSTILE_FILES, STATE_CHANGES, TORCH_ONLY, _tiny_state


def gguf_model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny(max_seq_len=112)
    return write_model_gguf(path, model.config, model.state_dict())


HEADER_KINDS = {
    **{kind: build for kind, build in KINDS.items() if not kind.endswith(".pt")},
    "gguf": lambda root, tok: gguf_model(root / "tiny.gguf"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_bpe(root / "tok" / "tokenizer.json", CORPUS)
    kinds = {**HEADER_KINDS, **{kind: KINDS[kind] for kind in KINDS if kind.endswith(".pt")}}
    return {kind: build(root / kind.replace(" ", "_"), tokenizer) for kind, build in kinds.items()}


def weights_never_read(monkeypatch) -> None:
    """Every reader of a checkpoint's tensors made to fail the test."""
    import safetensors.torch
    import transformers

    def read(*args, **kwargs):
        pytest.fail("a weight loader ran")

    monkeypatch.setattr(safetensors.torch, "load_file", read)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", read)
    monkeypatch.setattr(torch, "load", read)


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_the_config_read_without_weights_is_the_one_the_load_builds(kind, models, monkeypatch):
    built = load_model(models[kind], config_overrides={"kernels": "torch"}).config
    with monkeypatch.context() as patched:
        weights_never_read(patched)
        read = read_config(models[kind], config_overrides={"kernels": "torch"})
    assert read == built


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind.endswith(".pt")])
def test_a_torch_files_config_is_left_to_its_load(kind, models, monkeypatch):
    weights_never_read(monkeypatch)
    assert read_config(models[kind]) is None


def test_safetensors_whose_names_do_not_fit_are_refused_as_the_load_refuses_them(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    state = {name: t.contiguous() for name, t in tiny().state_dict().items()}
    state.pop("layers.0.mlp.down_proj.weight")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(UserError) as loaded:
        load_model(tmp_path / "cut.safetensors")
    weights_never_read(monkeypatch)
    with pytest.raises(UserError) as read:
        read_config(tmp_path / "cut.safetensors")
    assert str(read.value) == str(loaded.value) and "layers.0.mlp.down_proj.weight" in str(read.value)


# Every malformed state dict safetensors can hold (tests/model/test_hostile_checkpoints.py) but those
# whose fault is in the values: two names of one weight with different values (stand-ins hold no values
# to compare; the load refuses them).
SHAPE_FAULTS = [c for c in STATE_CHANGES if c not in TORCH_ONLY and not c.startswith("two values")]


@pytest.mark.parametrize("change", SHAPE_FAULTS)
def test_a_malformed_safetensors_is_refused_by_its_header_in_the_loads_line(change, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in STATE_CHANGES[change](_tiny_state()).items()}, str(path))
    heads = {"n_heads": 4, "n_kv_heads": 2}
    with pytest.raises(UserError) as loaded:
        load_model(path, config_overrides=heads)
    weights_never_read(monkeypatch)
    with pytest.raises(UserError) as read:
        read_config(path, config_overrides=heads)
    assert str(read.value) == str(loaded.value)


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_a_hostile_base_model_read_without_weights_is_one_line_or_left_to_the_load(
    name, tmp_path, monkeypatch
):
    """Every hostile file the load refuses in one line: read without its weights, it is refused in one
    line naming it, or (what only its weights show) left to the load; nothing runs, nothing hangs."""
    root = tmp_path / "in"
    root.mkdir()
    path = HOSTILE_FILES[name][0](root)
    weights_never_read(monkeypatch)
    try:
        read_config(path)
    except UserError as err:
        line = str(err)
        assert "\n" not in line and (str(path) in line or str(path.with_name("config.json")) in line), line
    assert not (root / "ran").exists()
