"""A checkpoint that lies (about its config, its tensors, or what kind of file it is) is one line.

Every model command reads ``--base_model`` / ``--model`` through ``load_model``: a config field of the
wrong type, sign or size, a state dict entry that is not a floating tensor of the expected shape, a
file that is not a regular file, or a Hugging Face folder whose weights do not match its config must
end in one :class:`UserError` naming the file (and the field), never a traceback, a hang, a huge
allocation or a model that silently trains from random weights.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model, save_model
from ds_sft.model.config import RUN_SETTINGS, ModelConfig
from ds_sft.model.hf_families import hf_config
from ds_sft.model.llama import LlamaModel

TINY = ModelConfig.preset("tiny")
WHOLE = [
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_hidden",
    "max_seq_len",
]
POSITIVE = ["rope_theta", "norm_eps", "init_std"]
SWITCHES = ["tie_embeddings", "attention_bias", "qk_norm", "activation_checkpointing"]
# Fields that the tensor shapes decide on load: a checkpoint's own value of them is never used.
SHAPE_DECIDED = {
    "vocab_size",
    "d_model",
    "n_layers",
    "ffn_hidden",
    "tie_embeddings",
    "attention_bias",
    "qk_norm",
}

# Values wrong for any field of the kind, whatever its exact bounds.
NOT_A_NUMBER = st.one_of(
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers()),
)
BAD_WHOLE = st.one_of(
    NOT_A_NUMBER,
    st.booleans(),
    st.integers(max_value=0),
    st.integers(min_value=1 << 40),
    st.floats().filter(lambda x: not (math.isfinite(x) and x.is_integer() and 0 < x < 1 << 40))
    | st.just(4.0),
)
BAD_POSITIVE = st.one_of(
    NOT_A_NUMBER,
    st.booleans(),
    st.integers(max_value=0),
    st.floats(max_value=0.0),
    st.sampled_from([math.nan, math.inf, 1e300]),
)
BAD_SWITCH = st.one_of(NOT_A_NUMBER, st.integers(), st.floats(allow_nan=False), st.none())
BAD = {
    **{name: BAD_WHOLE for name in WHOLE},
    **{name: BAD_POSITIVE for name in POSITIVE},
    **{name: BAD_SWITCH for name in SWITCHES},
}


def _field_and_bad_value(names) -> st.SearchStrategy:
    return st.one_of(*(st.tuples(st.just(name), BAD[name]) for name in names))


def _assert_one_line(err: pytest.ExceptionInfo, *names: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message
    for name in names:
        assert name in message, (name, message)


@given(_field_and_bad_value(BAD))
def test_every_bad_model_config_field_is_refused_naming_field_and_file(tmp_path_factory, bad):
    """model_config.json: each field of the wrong type, sign or size, alone in an otherwise good config."""
    name, value = bad
    path = tmp_path_factory.mktemp("cfg") / "model_config.json"
    path.write_text(json.dumps({**TINY.architecture(), name: value}))
    with pytest.raises(UserError) as err:
        ModelConfig.load(path)
    _assert_one_line(err, name, str(path))


@given(_field_and_bad_value([name for name in BAD if name not in SHAPE_DECIDED and name not in RUN_SETTINGS]))
def test_every_bad_config_hint_of_a_torch_checkpoint_is_refused(tmp_path_factory, bad):
    """A nanoGPT-style ``.pt`` whose ``config`` lies: refused before any size is computed from it.
    (Its run settings are not read at all: the test below.)"""
    name, value = bad
    if value is None:
        return  # a hint of None is "not given": the value is taken from the weights
    path = tmp_path_factory.mktemp("pt") / "base.pt"
    torch.save({"model": _tiny_state(), "config": {"n_heads": 4, "n_kv_heads": 2, name: value}}, path)
    with pytest.raises(UserError) as err:
        load_model(path)
    _assert_one_line(err, name, str(path))


def test_a_1m_token_rope_table_of_wide_heads_is_refused():
    with pytest.raises(UserError, match="max_seq_len 1048576 x head_dim 1024 exceeds"):
        ModelConfig.preset("tiny", n_heads=1, n_kv_heads=1, head_dim=1024, max_seq_len=1 << 20)


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return LlamaModel(TINY).state_dict()


def _without(key: str):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _two_names() -> dict:
    """name -> a change adding a second, different value of one weight under another of its names."""
    q, k, v = (f"layers.0.attn.{p}_proj.weight" for p in "qkv")
    gate, up = "layers.1.mlp.gate_proj.weight", "layers.1.mlp.up_proj.weight"
    return {
        "HF embedding": lambda s: {**s, "model.embed_tokens.weight": s["wte.weight"] + 1},
        "Meta q": lambda s: {**s, "layers.0.attention.wq.weight": s[q] + 1},
        "DDP prefix": lambda s: {**s, "module.norm.weight": s["norm.weight"] * 2},
        "fused qkv": lambda s: {**s, "layers.0.attn.qkv_proj.weight": torch.cat([s[q], s[k], s[v]]) * 2},
        "fused gate-up": lambda s: {**s, "layers.1.mlp.gate_up_proj.weight": torch.cat([s[gate], s[up]]) + 1},
    }


# name -> a change to the tiny model's state dict that no LLaMA of any config fits
STATE_CHANGES = {
    "a weight that is an int": lambda s: {**s, "wte.weight": 5},
    "a weight that is a string": lambda s: {**s, "norm.weight": "abc"},
    "a weight that is a list": lambda s: {**s, "layers.0.attn.q_proj.weight": [1.0, 2.0]},
    "1-D embedding": lambda s: {**s, "wte.weight": torch.zeros(10)},
    "3-D embedding": lambda s: {**s, "wte.weight": torch.zeros(3, 4, 5)},
    "0-D embedding": lambda s: {**s, "wte.weight": torch.tensor(1.0)},
    "int64 weights": lambda s: {k: v.long() for k, v in s.items()},
    "one bool weight": lambda s: {**s, "norm.weight": s["norm.weight"] > 0},
    "layer 99999": lambda s: {**s, "layers.99999.attn_norm.weight": torch.ones(64)},
    "layer 1023 only": lambda s: {**s, "layers.1023.attn_norm.weight": torch.ones(64)},
    "no embedding": _without("wte.weight"),
    "no final norm": _without("norm.weight"),
    "an extra weight": lambda s: {**s, "layers.0.attn.extra.weight": torch.ones(2, 2)},
    "a transposed projection": lambda s: {
        **s,
        "layers.0.mlp.down_proj.weight": s["layers.0.mlp.down_proj.weight"].t().contiguous(),
    },
    "a fused qkv of the wrong height": lambda s: {
        **_without("layers.0.attn.q_proj.weight")(s),
        "layers.0.attn.qkv_proj.weight": torch.zeros(7, 64),
    },
    "a fused qkv that is 1-D": lambda s: {**s, "layers.0.attn.qkv_proj.weight": torch.zeros(128)},
    "a 1-D q projection": lambda s: {**s, "layers.0.attn.q_proj.weight": torch.zeros(64)},
    "a q projection narrower than the heads": lambda s: {
        **s,
        "layers.0.attn.q_proj.weight": torch.zeros(2, 64),
    },
    "an empty embedding": lambda s: {**s, "wte.weight": torch.zeros(0, 64)},
    # weights that torch holds but that are not values to load as they are
    "fp8 weights": lambda s: {k: v.to(torch.float8_e4m3fn) for k, v in s.items()},
    "one fp8 e5m2 weight": lambda s: {**s, "norm.weight": s["norm.weight"].to(torch.float8_e5m2)},
    "a complex weight": lambda s: {**s, "norm.weight": s["norm.weight"].to(torch.complex64)},
    "an int8 weight": lambda s: {
        **s,
        "layers.1.mlp.up_proj.weight": s["layers.1.mlp.up_proj.weight"].to(torch.int8),
    },
    "a sparse weight": lambda s: {**s, "norm.weight": s["norm.weight"].to_sparse()},
    "a meta weight": lambda s: {**s, "norm.weight": torch.empty(64, device="meta")},
    # one weight under two names with different values: either would load, silently
    **{f"two values of one weight: {name}": change for name, change in _two_names().items()},
}


NOT_TENSORS = {"a weight that is an int", "a weight that is a string", "a weight that is a list"}
TORCH_ONLY = NOT_TENSORS | {"a sparse weight", "a meta weight"}  # what safetensors cannot hold


@pytest.mark.parametrize(
    "change, suffix",
    [(change, ".pt") for change in STATE_CHANGES]
    + [(change, ".safetensors") for change in STATE_CHANGES if change not in TORCH_ONLY],
)
def test_every_malformed_state_dict_is_one_line_naming_the_file(tmp_path, change, suffix):
    state = STATE_CHANGES[change](_tiny_state())
    path = tmp_path / f"base{suffix}"
    if suffix == ".pt":
        torch.save({"model": state, "config": {"n_heads": 4, "n_kv_heads": 2}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError) as err:
        load_model(path, config_overrides={} if suffix == ".pt" else {"n_heads": 4, "n_kv_heads": 2})
    _assert_one_line(err, str(path), *(["two different values"] if change.startswith("two values") else []))


def test_one_weight_under_two_names_with_the_same_value_loads(tmp_path):
    """The positive control of the two-values refusal: a copy of a weight under another name is harmless."""
    state = _tiny_state()
    torch.save({**state, "model.embed_tokens.weight": state["wte.weight"].clone()}, tmp_path / "b.pt")
    model = load_model(tmp_path / "b.pt", config_overrides={"n_heads": 4, "n_kv_heads": 2})
    assert torch.equal(model.wte.weight, state["wte.weight"])


# ----------------------------------------------------------------------------- files and folders


def _hf_folder(root: Path, name: str) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = root / name
    LlamaForCausalLM(hf_config(TINY)).save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, **changes}))
    return folder


def _drop_weight(folder: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    del weights[key]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _pickled_bin(folder: Path, marker: Path) -> Path:
    from safetensors.torch import load_file

    from tests.reliability.conftest import Payload

    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "evil": Payload(marker)}, folder / "pytorch_model.bin")
    return folder


def _ds_dir(root: Path, config_text: str | None) -> Path:
    folder = save_model(LlamaModel(TINY), root / "ds")
    if config_text is None:
        (folder / "model_config.json").unlink()
        (folder / "model_config.json").mkdir()
    else:
        (folder / "model_config.json").write_text(config_text)
    return folder


def _safetensors_beside(root: Path, config_text: str) -> Path:
    folder = save_model(LlamaModel(TINY), root / "st")
    (folder / "model_config.json").unlink()
    (folder / "config.json").write_text(config_text)
    return folder / "model.safetensors"


def _sharded(folder: Path, shard, weight_map=None) -> Path:
    """``folder``'s weights in one shard named by a model.safetensors.index.json, the shard made by
    ``shard(path)`` (None: the weights themselves); ``weight_map`` replaces the index's map."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as opened:
        names = list(opened.keys())
    if shard is None:
        weights.rename(folder / "shard.safetensors")
    else:
        weights.unlink()
        shard(folder / "shard.safetensors")
    if weight_map is None:
        weight_map = dict.fromkeys(names, "shard.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}  # as transformers writes it
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _replaced_weights(folder: Path, make) -> Path:
    (folder / "model.safetensors").unlink()
    make(folder / "model.safetensors")
    return folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path.parent


def _fifo(root: Path) -> Path:
    os.mkfifo(root / "x.pt")
    return root / "x.pt"


def _link(root: Path, name: str, target: str) -> Path:
    (root / name).symlink_to(target)
    return root / name


def _loop(root: Path) -> Path:
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    return root / "loop_a"


def _protocol_pickle(root: Path, protocol: int) -> Path:
    (root / "p.pt").write_bytes(pickle.dumps({"wte.weight": [1.0, 2.0]}, protocol=protocol))
    return root / "p.pt"


# name -> (make the file under a folder, words the one line must hold)
HOSTILE_FILES = {
    "plain text .pt": (lambda r: _write(r / "t.pt", "hello world\n" * 50), "corrupt"),
    "FIFO named .pt": (_fifo, "FIFO"),
    "/dev/zero as .pt": (lambda r: _link(r, "z.pt", "/dev/zero"), "character device"),
    "/dev/zero as .safetensors": (lambda r: _link(r, "z.safetensors", "/dev/zero"), "character device"),
    "broken symlink": (lambda r: _link(r, "gone.pt", str(r / "nowhere.pt")), "broken symlink"),
    "symlink loop": (_loop, "symlink loop"),
    "protocol-2 pickle": (lambda r: _protocol_pickle(r, 2), "corrupt|weights_only=True"),
    "protocol-4 pickle": (lambda r: _protocol_pickle(r, 4), "corrupt|weights_only=True"),
    "protocol-5 pickle": (lambda r: _protocol_pickle(r, 5), "corrupt|weights_only=True"),
    "model_config.json invalid": (lambda r: _ds_dir(r, "{oops"), "not valid JSON"),
    "model_config.json a list": (lambda r: _ds_dir(r, "[]"), "JSON list"),
    "model_config.json a directory": (lambda r: _ds_dir(r, None), "is a directory"),
    "model_config.json n_heads 0": (
        lambda r: _ds_dir(r, json.dumps({**TINY.architecture(), "n_heads": 0})),
        "n_heads must be an integer from 1 to 1,024, got 0",
    ),
    "config.json beside .safetensors invalid": (lambda r: _safetensors_beside(r, "{oops"), "not valid JSON"),
    "config.json beside .safetensors a list": (lambda r: _safetensors_beside(r, "[1]"), "JSON list"),
    "config.json beside .safetensors hidden_size str": (
        lambda r: _safetensors_beside(r, json.dumps({**hf_config(TINY).to_dict(), "hidden_size": "64"})),
        "config.json",
    ),
    "HF folder without weights": (
        lambda r: _unlink(_hf_folder(r, "hf") / "model.safetensors"),
        "model.safetensors",
    ),
    "HF config.json invalid": (
        lambda r: _write(_hf_folder(r, "hf") / "config.json", "{oops").parent,
        "not valid JSON",
    ),
    "HF hidden_size str": (lambda r: _edit_config(_hf_folder(r, "hf"), hidden_size="64"), "hidden_size"),
    "HF num_attention_heads 0": (
        lambda r: _edit_config(_hf_folder(r, "hf"), num_attention_heads=0),
        "transformers cannot read",
    ),
    "HF vocab_size 0": (lambda r: _edit_config(_hf_folder(r, "hf"), vocab_size=0), "vocab_size"),
    "HF num_hidden_layers -1": (
        lambda r: _edit_config(_hf_folder(r, "hf"), num_hidden_layers=-1),
        "n_layers must be an integer from 1 to 1,024, got -1",
    ),
    "HF max_position_embeddings huge": (
        lambda r: _edit_config(_hf_folder(r, "hf"), max_position_embeddings=10**10),
        "max_seq_len",
    ),
    "HF rms_norm_eps negative": (lambda r: _edit_config(_hf_folder(r, "hf"), rms_norm_eps=-1.0), "norm_eps"),
    "HF quantization_config": (
        lambda r: _edit_config(_hf_folder(r, "hf"), quantization_config={"quant_method": "bitsandbytes"}),
        "quantized",
    ),
    "HF missing final norm": (lambda r: _drop_weight(_hf_folder(r, "hf"), "model.norm.weight"), "model.norm"),
    "HF missing a layer weight": (
        lambda r: _drop_weight(_hf_folder(r, "hf"), "model.layers.1.mlp.down_proj.weight"),
        "down_proj",
    ),
    "HF model.safetensors a FIFO": (lambda r: _replaced_weights(_hf_folder(r, "hf"), os.mkfifo), "FIFO"),
    "HF model.safetensors a link to /dev/zero": (
        lambda r: _replaced_weights(_hf_folder(r, "hf"), lambda p: p.symlink_to("/dev/zero")),
        "character device",
    ),
    "HF model.safetensors a directory": (
        lambda r: _replaced_weights(_hf_folder(r, "hf"), Path.mkdir),
        "a directory",
    ),
    "HF index naming a FIFO shard": (lambda r: _sharded(_hf_folder(r, "hf"), os.mkfifo), "FIFO"),
    "HF index naming /dev/zero": (
        lambda r: _sharded(_hf_folder(r, "hf"), None, {"model.norm.weight": "/dev/zero"}),
        "outside its folder",
    ),
    "HF index naming a shard in ..": (
        lambda r: _sharded(_hf_folder(r, "hf"), None, {"model.norm.weight": "../x.safetensors"}),
        "outside its folder",
    ),
    "HF index naming a link to /dev/zero": (
        lambda r: _sharded(_hf_folder(r, "hf"), lambda p: p.symlink_to("/dev/zero")),
        "character device",
    ),
    "HF index weight_map a list": (lambda r: _sharded(_hf_folder(r, "hf"), None, ["shard"]), "weight_map"),
    # sizes within ds-sft's bounds, each of which transformers allocated (0.5-1 GB) before refusing
    "HF vocab_size 4M": (lambda r: _edit_config(_hf_folder(r, "hf"), vocab_size=4_000_000), "describes"),
    "HF 1000 layers": (lambda r: _edit_config(_hf_folder(r, "hf"), num_hidden_layers=1000), "describes"),
    "HF intermediate_size 262144": (
        lambda r: _edit_config(_hf_folder(r, "hf"), intermediate_size=262_144),
        "describes",
    ),
    "HF pickled pytorch_model.bin": (
        lambda r: _pickled_bin(_hf_folder(r, "hf"), r / "ran"),
        "weights_only=True",
    ),
}


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_every_hostile_base_model_is_one_line_exit_2_through_export(
    name, tmp_path, capsys, gpt2_tokenizer_dir
):
    """The real command (``export --base_model X``, the loader of train and eval too)."""
    from ds_sft.cli import main

    root = tmp_path / "in"
    root.mkdir()
    make, words = HOSTILE_FILES[name]
    path = make(root)
    code = main(["export", "--base_model", str(path), "--tokenizer", str(gpt2_tokenizer_dir),
                 "--hf", str(tmp_path / "hf_out")])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, (name, code, err[-2000:])  # an exception would have raised
    named = str(path) in lines[0] or str(path.with_name("config.json")) in lines[0]  # or the config beside
    assert re.search(words, lines[0]) and named, (name, lines[0])
    assert "weights_only=False" not in lines[0] and "hf download" not in lines[0], lines[0]
    assert not (root / "ran").exists()


def test_an_honest_hf_folder_still_loads_with_its_tied_head(tmp_path):
    """The positive control of the weights check: nothing missing, nothing unexpected."""
    folder = _hf_folder(tmp_path, "hf")
    model = load_model(folder)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    torch.testing.assert_close(model.norm.weight, saved["model.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.wte.weight, saved["model.embed_tokens.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_config_claiming_tied_embeddings_over_an_untied_head_computes_what_transformers_does(
    tmp_path, family
):
    """transformers keeps a head whose own weight the files hold, whatever tie_word_embeddings says;
    ds-sft took the config's word and dropped the head (logits 1.2 away from transformers')."""
    from transformers import AutoModelForCausalLM

    config = ModelConfig.preset("tiny", family=family, attention_bias=family == "qwen2", tie_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config(config)).save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path / "hf", tie_word_embeddings=True)
    ours = load_model(tmp_path / "hf").eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert not ours.config.tie_embeddings
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("replaced", ["model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"])
def test_a_loaded_weight_unlike_its_config_is_found_whatever_transformers_reported(replaced):
    """transformers 5.17's GGUF path puts a file's tensor of another shape in place and reports nothing
    (5.24 reports it): the loader compares every loaded shape with the config's own model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_sft.model.checkpoint import _shapes_unlike_config

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    assert _shapes_unlike_config(model, config) == []
    module_name, _, attribute = replaced.rpartition(".")
    old = getattr(model.get_submodule(module_name), attribute)
    wider = torch.nn.Parameter(torch.zeros(old.shape[0] + 5, old.shape[1]))
    setattr(model.get_submodule(module_name), attribute, wider)
    found = _shapes_unlike_config(model, config)
    # a tied head shares the embedding: both names may show it, nothing else may
    assert found and all(item.startswith((replaced, "lm_head.weight")) for item in found), found
    assert f"{replaced} ({tuple(wider.shape)} in the file, {tuple(old.shape)} by its config)" in found


# ----------------------------------------------------------------------------- configs naming an architecture

# transformers architectures whose weights have LLaMA's names and shapes but another forward (Gemma:
# (1 + gain) norms, a scaled embedding, GELU; Granite: multipliers; Phi-3: fused layouts): their config
# arguments beyond the common tiny shape
OTHER_ARCHITECTURES = {
    "GemmaConfig": {},
    "GraniteConfig": {"embedding_multiplier": 12.0, "logits_scaling": 8.0},
    "Phi3Config": {"pad_token_id": 0},
}


@pytest.mark.parametrize("config_class", OTHER_ARCHITECTURES)
def test_weights_of_another_architecture_are_refused_by_every_path_to_them(tmp_path, config_class):
    """The folder, its weights file alone (config.json beside it) and a torch file carrying the
    config: all name the model_type, none loads the weights as a LLaMA."""
    import transformers
    from safetensors.torch import load_file

    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = getattr(transformers, config_class)(**shape, **heads, **OTHER_ARCHITECTURES[config_class])
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    torch.save({"model": weights, "config": config.to_dict()}, tmp_path / "base.pt")
    for spec in (folder, folder / "model.safetensors", tmp_path / "base.pt"):
        with pytest.raises(UserError, match=f"model_type '{config.model_type}' is not supported") as err:
            load_model(spec)
        _assert_one_line(err)


@pytest.mark.parametrize("activation", ["gelu", "relu", ["silu"], None])
def test_a_torch_files_config_naming_another_activation_is_refused(tmp_path, activation):
    """A config without a model_type (nanoGPT-style fields) says hidden_act too: ds-sft computes silu."""
    torch.save(
        {"model": _tiny_state(), "config": {"n_heads": 4, "hidden_act": activation}}, tmp_path / "b.pt"
    )
    with pytest.raises(UserError, match=re.escape(f"hidden_act {activation!r}")) as err:
        load_model(tmp_path / "b.pt")
    _assert_one_line(err, str(tmp_path / "b.pt"))


@pytest.mark.parametrize(
    "fields",
    [
        dict(rope_theta=500000.0, norm_eps=1e-6, max_seq_len=512),
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),  # fmt: skip
        dict(family="qwen3", qk_norm=True, rope_theta=1e6),
        dict(family="mistral", sliding_window=5),
    ],
    ids=["theta", "llama3", "qwen3", "mistral"],
)
def test_a_transformers_config_in_a_torch_file_is_read_as_transformers_reads_it(tmp_path, fields):
    """transformers 5 keeps RoPE's theta and scaling in ``rope_parameters``: a torch file saved with
    ``config.to_dict()`` loaded with theta 10,000 and no scaling, a silently different model."""
    config = ModelConfig.preset("tiny", **fields)
    weights = LlamaModel(config).state_dict()
    torch.save({"model": weights, "config": hf_config(config).to_dict()}, tmp_path / "b.pt")
    assert load_model(tmp_path / "b.pt").config == config


@pytest.mark.parametrize("container", ["folder", "pt"])
@pytest.mark.parametrize(
    "setting", [{"kernels": "triton"}, {"kernels": "eager"}, {"activation_checkpointing": True}]
)
def test_run_settings_written_beside_the_weights_are_not_taken_from_them(tmp_path, container, setting):
    """How a run computes is the command's choice: a config that names a kernel backend (a Triton
    backend on a CPU machine ended eval and export in a RuntimeError) or activation checkpointing
    loads with the defaults, and an explicit override still wins."""
    model = LlamaModel(ModelConfig.preset("tiny"))
    if container == "folder":
        path = save_model(model, tmp_path / "base")
        config = json.loads((path / "model_config.json").read_text())
        (path / "model_config.json").write_text(json.dumps({**config, **setting}))
    else:
        path = tmp_path / "base.pt"
        config = {**model.config.architecture(), **setting}
        torch.save({"model": model.state_dict(), "config": config}, path)
    loaded = load_model(path)
    defaults = ModelConfig.preset("tiny")
    assert (loaded.config.kernels, loaded.config.activation_checkpointing) == (
        defaults.kernels,
        defaults.activation_checkpointing,
    )
    assert load_model(path, config_overrides={"kernels": "torch"}).config.kernels == "torch"
