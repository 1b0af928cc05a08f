"""Every checkpoint format load_model reads gives back the same network; bad files get clear errors."""

from __future__ import annotations

import argparse
import io
import json
import os

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model, save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.hf_families import hf_config
from ds_sft.model.llama import LlamaModel
from ds_sft.model.param_names import to_hf_state_dict


def tiny(**overrides) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(ModelConfig.preset("tiny", kernels="eager", **overrides)).eval()


def same_logits(a: LlamaModel, b: LlamaModel, atol: float = 0.0) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=atol)


def test_save_load_round_trip_and_run_directory(tmp_path):
    model = tiny(tie_embeddings=False, rope_theta=1234.0, init_std=0.01, activation_checkpointing=True)
    save_model(model, tmp_path / "run" / "final")
    saved = json.loads((tmp_path / "run" / "final" / "model_config.json").read_text())
    assert "kernels" not in saved and "activation_checkpointing" not in saved  # run settings, not the model
    for spec in (tmp_path / "run" / "final", tmp_path / "run"):
        loaded = load_model(spec)
        assert loaded.config.architecture() == model.config.architecture()
        assert not loaded.config.activation_checkpointing  # each run sets its own
        same_logits(model, loaded)
    assert load_model(tmp_path / "run", dtype=torch.bfloat16).wte.weight.dtype == torch.bfloat16


def nanogpt_style_checkpoint(model: LlamaModel) -> dict:
    """The fp8 base-trainer layout: compiled-model prefixes, fused qkv, TE extra state, a rope buffer."""
    c = model.config
    state = {"_orig_mod.transformer.wte.weight": model.wte.weight.detach().clone()}
    for i, block in enumerate(model.layers):
        prefix = f"_orig_mod.transformer.h.{i}."
        attn, mlp = block.attn, block.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().clone()
        state[prefix + "ln_1.weight"] = block.attn_norm.weight.detach().clone()
        state[prefix + "attn.c_attn.weight"] = qkv
        state[prefix + "attn.c_attn._extra_state"] = io.BytesIO(b"te fp8 meta qkv %d" % i)
        state[prefix + "attn.c_proj.weight"] = attn.o_proj.weight.detach().clone()
        state[prefix + "attn.c_proj._extra_state"] = torch.tensor([1.0, 2.0, float(i)])
        state[prefix + "ln_2.weight"] = block.mlp_norm.weight.detach().clone()
        state[prefix + "mlp.w1.weight"] = mlp.gate_proj.weight.detach().clone()
        state[prefix + "mlp.w3.weight"] = mlp.up_proj.weight.detach().clone()
        state[prefix + "mlp.w2.weight"] = mlp.down_proj.weight.detach().clone()
    state["_orig_mod.transformer.ln_f.weight"] = model.norm.weight.detach().clone()
    state["_orig_mod.rope_cache"] = torch.randn(c.max_seq_len, c.head_dim // 2, 2)
    model_args = {"n_layer": c.n_layers, "n_head": c.n_heads, "n_kv_head": c.n_kv_heads, "n_embd": c.d_model,
                  "vocab_size": c.vocab_size, "block_size": c.max_seq_len, "rope_theta": c.rope_theta,
                  "norm_eps": c.norm_eps}  # fmt: skip
    return {"model": state, "model_args": model_args, "iter_num": 1200, "best_val_loss": torch.tensor(2.5),
            "config": {"learning_rate": 6e-4, "n_layer": c.n_layers}}  # fmt: skip


@pytest.mark.parametrize("head_dim", [None, 8, 32])
def test_base_pt_with_prefixes_fused_qkv_and_extra_state(tmp_path, head_dim):
    model = tiny(rope_theta=777.0, head_dim=head_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    torch.save(nanogpt_style_checkpoint(model), tmp_path / "base.pt")
    loaded = load_model(tmp_path / "base.pt")
    assert loaded.config.n_kv_heads == 2 and loaded.config.rope_theta == 777.0
    assert loaded.config.head_dim == model.config.head_dim  # from the fused rows: nothing says it
    same_logits(model, loaded)
    assert loaded.fp8_extra_state["layers.1.attn.qkv_proj"].getvalue() == b"te fp8 meta qkv 1"
    torch.testing.assert_close(loaded.fp8_extra_state["layers.0.attn.o_proj"], torch.tensor([1.0, 2.0, 0.0]))


@pytest.mark.parametrize("head_dim", [None, 8, 32])
def test_ddp_prefix_bare_state_dict_with_config_override(tmp_path, head_dim):
    model = tiny(head_dim=head_dim)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    # a bare state dict does not say how many heads: the caller does
    loaded = load_model(tmp_path / "ddp.pt", config_overrides={"n_heads": 4, "max_seq_len": 128})
    assert loaded.config.architecture() == model.config.architecture()  # head_dim, n_kv_heads: q, k rows
    same_logits(model, loaded)


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    for payload in (NotATensor(), argparse.Namespace(lr=1e-3)):
        torch.save({"model": tiny().state_dict(), "args": payload}, tmp_path / "evil.pt")
        with pytest.raises(UserError, match="weights_only=True"):
            load_model(tmp_path / "evil.pt")


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path):
    state = tiny().state_dict()
    del state["layers.1.mlp.up_proj.weight"]
    state["layers.0.attn.rotary.weight"] = torch.zeros(3)
    state["layers.0.attn.o_proj.weight"] = torch.zeros(64, 32)
    torch.save({"model": state, "model_args": {"n_head": 4}}, tmp_path / "bad.pt")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "bad.pt")
    message = str(err.value)
    assert "\n" not in message
    assert "missing (1): layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1): layers.0.attn.rotary.weight" in message
    assert "layers.0.attn.o_proj.weight (64, 32) != (64, 64)" in message


def test_safetensors_file_with_hf_names_and_config_beside(tmp_path):
    from safetensors.torch import save_file

    model = tiny(tie_embeddings=False)
    save_file(
        {k: v.contiguous() for k, v in to_hf_state_dict(model).items()}, tmp_path / "weights.safetensors"
    )
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.config).to_dict()))
    same_logits(model, load_model(tmp_path / "weights.safetensors"))


def test_hugging_face_directory(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny()
    hf = LlamaForCausalLM(hf_config(model.config))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.config.tie_embeddings and loaded.lm_head is None
    same_logits(model, loaded)


def test_unknown_files_get_a_user_error(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(UserError, match="unknown checkpoint type"):
        load_model(tmp_path / "weights.npz")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(UserError, match="neither a ds-sft checkpoint"):
        load_model(tmp_path)


def test_smollm2_gguf_import_matches_transformers(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    ours = load_model("smollm2-135m-instruct")
    preset = ModelConfig.preset("smollm2-135m")
    for field in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "ffn_hidden",
        "tie_embeddings",
    ):
        assert getattr(ours.config, field) == getattr(preset, field)
    theirs = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    ids = torch.randint(0, 49152, (2, 33))
    with torch.no_grad():
        assert (ours(ids) - theirs.eval()(ids).logits).abs().max().item() <= 1e-4


def interleaved_rope(x, cos, sin):
    """Meta's original RoPE: features (2i, 2i+1) form the rotated pairs."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)


def test_interleaved_rope_checkpoint_is_permuted_into_the_half_layout(tmp_path, monkeypatch):
    import ds_sft.model.llama as llama

    trained = tiny()  # its weights, read as a network with interleaved RoPE
    ids = torch.randint(0, 256, (2, 23))
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(llama, "apply_rope", interleaved_rope)
        reference = trained(ids)
    c = trained.config
    freqs_cis = torch.polar(
        torch.ones(c.max_seq_len, c.head_dim // 2), torch.zeros(c.max_seq_len, c.head_dim // 2)
    )
    state = {"model": {**trained.state_dict(), "freqs_cis": freqs_cis}, "model_args": {"n_heads": 4}}
    torch.save(state, tmp_path / "meta.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "meta.pt")(ids), reference, rtol=0, atol=1e-5)
        assert (load_model(tmp_path / "meta.pt", rope_layout="half")(ids) - reference).abs().max() > 1e-3


def test_save_model_writes_only_the_llama_weights(tmp_path):
    from safetensors.torch import load_file

    model = tiny()
    model.layers[0].attn.q_proj.register_buffer("fp8_scale", torch.ones(3))  # what an fp8 swap adds
    save_model(model, tmp_path)
    assert "layers.0.attn.q_proj.fp8_scale" not in load_file(tmp_path / "model.safetensors")
    same_logits(model, load_model(tmp_path))


def test_unfinished_run_directory_says_so(tmp_path):
    (tmp_path / "checkpoints" / "step_10").mkdir(parents=True)
    with pytest.raises(UserError, match="training run without final/"):
        load_model(tmp_path)


# Loads a checkpoint in fp32 on the CPU (no conversion copies it), cuts the file to nothing in place as
# `torch.save` over the same path does, and runs the model again.
CUT_UNDER_THE_MODEL = """
import sys
from pathlib import Path
import torch
from ds_sft.model.checkpoint import load_model

spec, weights = sys.argv[1], Path(sys.argv[2])
model = load_model(spec).eval()
ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
with torch.no_grad():
    before = model(ids)
    weights.open("wb").close()
    after = model(ids)
print("same logits", torch.equal(before, after))
"""


@pytest.mark.parametrize("layout", ["ds-sft folder", "safetensors file", "base .pt", "bare .pt", "tied .pt"])
def test_a_checkpoint_rewritten_under_a_loaded_model_does_not_kill_it(tmp_path, layout):
    """The loaded weights are the process's own: a mapped file cut short under them was SIGBUS at the
    next forward (exit -7) - a pretraining run saving its best model again while ds-sft trains on the
    CPU from it, or evaluates it."""
    import subprocess
    import sys

    from tests.train.helpers import REPO_ROOT

    model = tiny(tie_embeddings=layout in ("tied .pt", "ds-sft folder"))
    if layout == "ds-sft folder":
        spec = save_model(model, tmp_path / "final")
        weights = spec / "model.safetensors"
    elif layout == "safetensors file":
        from safetensors.torch import save_file

        spec = weights = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in to_hf_state_dict(model).items()}, weights)
        (tmp_path / "config.json").write_text(json.dumps(hf_config(model.config).to_dict()))
    else:
        spec = weights = tmp_path / "base.pt"
        torch.save(nanogpt_style_checkpoint(model) if layout == "base .pt" else model.state_dict(), weights)
    done = subprocess.run(
        [sys.executable, "-c", CUT_UNDER_THE_MODEL, str(spec), str(weights)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("same logits True")


@pytest.mark.parametrize("given", ["folder", "weights file"])
def test_a_hugging_face_trainer_checkpoint_is_a_model_not_a_training_checkpoint(tmp_path, given):
    """The HF Trainer writes a trainer_state.json into output_dir and every checkpoint-N, beside
    config.json and the weights: its name alone had such a folder refused as DeepSpeed's shards."""
    from transformers import LlamaForCausalLM

    from ds_sft.model.checkpoint import refuse_training_state

    model = LlamaModel(ModelConfig.preset("tiny"))
    folder = tmp_path / "checkpoint-500"
    hf = LlamaForCausalLM(hf_config(model.config))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)  # a tied head: no lm_head
    hf.save_pretrained(str(folder))
    (folder / "trainer_state.json").write_text('{"global_step": 500}')
    refuse_training_state(folder if given == "folder" else folder / "model.safetensors")  # no refusal
    loaded = load_model(
        str(folder if given == "folder" else folder / "model.safetensors"), dtype=torch.float32
    )
    assert torch.equal(loaded.wte.weight, model.wte.weight)


@pytest.mark.parametrize("name", ["step_000002", "a folder with spaces; and $(code)"])
def test_a_training_checkpoint_is_refused_with_a_command_the_shell_reads_back_whole(tmp_path, name):
    import shlex

    tag = tmp_path / "run" / "checkpoints" / name
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text("{}")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    for given in (tag, tag / "mp_rank_00_model_states.pt"):
        with pytest.raises(UserError, match="is a training checkpoint") as err:
            load_model(str(given))
        words = shlex.split(str(err.value).split("`")[1])
        assert words[words.index("--resume") + 1] == str(tag)
