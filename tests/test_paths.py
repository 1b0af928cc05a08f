"""Hub ids (``owner/name[@revision]``) resolve through a Hugging Face cache laid out by the client's rules.

Never the network: the cache is written by :mod:`tests.hub_cache` into a temporary folder and read
with ``HF_HUB_OFFLINE=1``; its layout is first checked with the client's own ``scan_cache_dir``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.model_source import hub_id, resolve_model_path
from tests.conftest import REPO_ROOT
from tests.hub_cache import has_tree_cache, publish

REPO = "tiny-org/tiny-llama"
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40
WORDS = ["</s>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def _tokenizer():
    """A word-level tokenizer with an EOS, built in memory (no files of ours to read)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def _save_tiny_llama(folder, layers: int, seed: int):
    """A random-init transformers LlamaForCausalLM and the tokenizer, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return model


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """``REPO`` cached at two commits: ``main`` -> 2 layers, tag ``v1`` -> 1 layer (so a revision
    that were ignored would load the wrong model); the hub client pointed at it, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    models = {}
    for commit, ref, layers in ((COMMIT_MAIN, "main", 2), (COMMIT_V1, "v1", 1)):
        folder = tmp_path / "saved" / ref
        models[ref] = _save_tiny_llama(folder, layers, seed=layers)
        # a file of the repo that downloads skip (the .bin copy of the weights): listed, not cached
        publish(cache, REPO, folder, commit, refs=(ref,), remote_only={"pytorch_model.bin": b"\0" * 64})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, models


def test_the_cache_is_laid_out_as_the_hub_client_lays_it_out(hub_cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    cache, _ = hub_cache
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {COMMIT_MAIN: {"main"}, COMMIT_V1: {"v1"}}
    found = try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision="v1")
    assert found == str(cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT_V1 / "config.json")


@pytest.mark.parametrize(
    ("spec", "commit"),
    [
        (REPO, COMMIT_MAIN),
        (f"{REPO}@main", COMMIT_MAIN),
        (f"{REPO}@v1", COMMIT_V1),
        (f"{REPO}@{COMMIT_V1}", COMMIT_V1),
    ],
)
def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache, spec, commit):
    cache, _ = hub_cache
    assert resolve_model_path(spec) == cache / "models--tiny-org--tiny-llama" / "snapshots" / commit


@pytest.mark.parametrize("ref", ["main", "v1"])
def test_model_and_tokenizer_load_from_a_hub_id(hub_cache, ref):
    """The weights and tokenizer behind a hub id are the saved ones: transformers' own model gives the
    same logits as ds-sft's import of it, and the tokenizer the same ids as the saved one."""
    from ds_sft.data.model_match import model_tokenizer_dir
    from ds_sft.data.tokenizer import load_tokenizer
    from ds_sft.model.checkpoint import load_model

    _, models = hub_cache
    spec = f"{REPO}@{ref}"
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = models[ref](ids).logits
        got = load_model(spec).eval()(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    tokenizer = load_tokenizer(spec)
    assert tokenizer("the cat sat on a mat")["input_ids"] == [2, 3, 4, 5, 7, 6]
    assert tokenizer.eos_token == "</s>"
    assert model_tokenizer_dir(spec) == resolve_model_path(spec)


def test_an_existing_local_path_wins_over_a_hub_id(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / REPO
    local.mkdir(parents=True)
    assert resolve_model_path(REPO) == local.relative_to(tmp_path)


@pytest.mark.parametrize(
    "resolve",
    [
        lambda spec: resolve_model_path(spec),
        lambda spec: __import__("ds_sft.data.tokenizer", fromlist=["_"]).load_tokenizer(spec),
        lambda spec: __import__("ds_sft.model.checkpoint", fromlist=["_"]).load_model(spec),
    ],
    ids=["paths", "tokenizer", "load_model"],
)
@pytest.mark.parametrize("spec", ["someone/not-cached", f"{REPO}@v2", f"{REPO}@{'c' * 40}"])
def test_offline_and_not_cached_is_one_line_naming_what_to_pass(hub_cache, resolve, spec):
    with pytest.raises(UserError) as raised:
        resolve(spec)
    message = str(raised.value)
    assert "\n" not in message
    assert f"{spec!r} is not a local path and is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "pass a local folder" in message
    repo, _, revision = spec.partition("@")
    assert f"`hf download {repo}{f' --revision {revision}' if revision else ''}`" in message


@pytest.mark.skipif(not has_tree_cache(), reason="this huggingface_hub keeps no tree listings")
def test_a_partly_cached_snapshot_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = tmp_path / "saved"
    _save_tiny_llama(folder, layers=1, seed=0)
    publish(tmp_path / "hub", REPO, folder, COMMIT_MAIN, omit=("model.safetensors",))  # interrupted
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"is only partly in the Hugging Face cache .*`hf download "):
        resolve_model_path(REPO)


def test_a_snapshot_without_weights_is_no_model_but_still_a_tokenizer(tmp_path, monkeypatch):
    """What a tokenizer download alone leaves in the cache: the model spec is refused in one line."""
    from huggingface_hub import constants

    from ds_sft.data.tokenizer import load_tokenizer

    folder = tmp_path / "saved"
    _tokenizer().save_pretrained(folder)
    publish(tmp_path / "hub", REPO, folder, COMMIT_MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"has no config.json and no \*.safetensors .* `hf download "):
        resolve_model_path(REPO)
    assert load_tokenizer(REPO)("the dog ran")["input_ids"] == [2, 8, 9]


NOT_REPO_IDS = [
    "missing-model",  # no owner: a local name, as before
    "a/b/c",
    "./owner/name",
    "/abs/owner/name",
    "~/owner/name",
    "owner/na--me",
    "owner/na..me",
    "owner/.name",
    "owner/name-",
    "owner/name.git",
    "owner/name@",
    "owner/na me",
    "owner\\name",
    "owner/" + "n" * 100,
]


@pytest.mark.parametrize("spec", NOT_REPO_IDS)
def test_names_that_cannot_be_repo_ids_are_not_looked_up(spec, monkeypatch):
    import huggingface_hub

    def no_lookup(*args, **kwargs):
        raise AssertionError("snapshot_download called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_lookup)
    assert hub_id(spec) is None
    with pytest.raises(UserError, match=r"^model .* not found: pass an existing path, a Hugging Face id"):
        resolve_model_path(spec)
    with pytest.raises(UserError, match=r"^tokenizer .* not found: pass a tokenizer.json"):
        __import__("ds_sft.data.tokenizer", fromlist=["_"]).load_tokenizer(spec)


@given(
    owner=st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_]|-(?!-)){0,20}[A-Za-z0-9]", fullmatch=True),
    name=st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_]|[-.](?![-.])){0,30}[A-Za-z0-9]", fullmatch=True),
    revision=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,20}", fullmatch=True)),
)
def test_every_repo_id_shape_is_recognised(owner, name, revision):
    """What the hub client accepts as a repo id (its own validator) is looked up, with its revision."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = f"{owner}/{name}"
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return  # e.g. a name ending in .git: covered by the list above
    spec = repo + (f"@{revision}" if revision else "")
    assert hub_id(spec) == (repo, revision)


def test_train_and_export_refuse_an_uncached_hub_id_in_one_line(tmp_path):
    """Through the command line, with the environment a user sets: exit 2, one line, no traceback."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({}))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    # prepare's own source: without one it reads ../shared/data, which a clone elsewhere lacks
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]))
    repo = "Qwen/Qwen3-0.6B"
    for argv in (
        ["export", "--base_model", repo, "--hf", str(tmp_path / "out")],
        ["train", "--base_model", repo, "--data_dir", str(data), "--out_dir", str(tmp_path / "run")],
        ["prepare", "--tokenizer", repo, "--alpaca", str(alpaca), "--output_dir", str(tmp_path / "prepared")],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "ds_sft.cli", *argv], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 2, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (argv, out.stderr)
        assert "'Qwen/Qwen3-0.6B' is not a local path and is not in the Hugging Face cache" in lines[0]
        assert str(tmp_path / "empty-cache") in lines[0] and "hf download Qwen/Qwen3-0.6B" in lines[0]


@pytest.mark.parametrize(
    ("value", "offline"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        (" True ", True),
        ("0", False),
        ("", False),
        ("false", False),
        ("no", False),
    ],  # fmt: skip
)
def test_hf_hub_offline_reads_as_huggingface_hub_reads_it(monkeypatch, value, offline):
    """prepare took only "1": HF_HUB_OFFLINE=true meant offline to the model download, online to it."""
    import huggingface_hub.constants

    from ds_sft.model_source import hub_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
    assert huggingface_hub.constants._is_true(value.strip() or None) is offline  # the library's own reading


def test_ds_sft_shared_names_the_shared_folder_and_nothing_else(monkeypatch, tmp_path):
    """A DS_SFT_SHARED without data/ (a typo) fell back to ../shared without a word."""
    from ds_sft.locations import REPO_ROOT, shared_dir

    (tmp_path / "mine" / "data").mkdir(parents=True)
    monkeypatch.setenv("DS_SFT_SHARED", str(tmp_path / "mine"))
    assert shared_dir() == tmp_path / "mine"
    monkeypatch.setenv("DS_SFT_SHARED", str(tmp_path / "typo"))
    assert shared_dir() is None
    monkeypatch.chdir(tmp_path / "mine" / "data")  # unset: beside the checkout, then beside the folder
    monkeypatch.setenv("DS_SFT_SHARED", "")
    beside = REPO_ROOT.parent / "shared"
    assert shared_dir() == (beside if (beside / "data").is_dir() else None)


def _loop(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return str(tmp_path / "loop")


def _data_is_a_file(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "data").write_text("")
    return str(tmp_path / "flat")


@pytest.mark.parametrize(
    "shared",
    [
        lambda tmp_path: str(tmp_path / "typo"),
        lambda tmp_path: str(tmp_path / ("x" * 100_000)),  # ENAMETOOLONG from is_dir
        lambda tmp_path: "/".join([str(tmp_path)] + ["d" * 250] * 30),  # PATH_MAX
        _loop,
        _data_is_a_file,
    ],
    ids=["typo", "name_too_long", "path_too_long", "link_loop", "data_is_a_file"],
)
def test_prepare_from_shared_names_the_ds_sft_shared_it_could_not_use(shared, monkeypatch, tmp_path, capsys):
    """``prepare --from_shared`` with a DS_SFT_SHARED that holds no data/ said "../shared/data is
    absent", a folder the user had not named, and a 100k-character value ended in "File name too
    long" with the whole path and no word of the variable."""
    from ds_sft.cli import main

    value = shared(tmp_path)
    monkeypatch.setenv("DS_SFT_SHARED", value)
    assert main(["prepare", "--from_shared", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "$DS_SFT_SHARED" in err and len(err) < 600, err
    assert not (tmp_path / "out").exists()
