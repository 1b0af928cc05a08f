"""``ds-sft export``: what transformers loads from the export computes what ds-sft computes."""

from __future__ import annotations

import json

import pytest
import torch

from ds_sft.command import main_for
from ds_sft.model.checkpoint import load_model, save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel


@pytest.mark.parametrize("tied", [True, False])
def test_export_run_directory_loads_in_transformers_with_the_same_logits(tmp_path, tied, word_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = LlamaModel(ModelConfig.preset("tiny", tie_embeddings=tied, rope_theta=3000.0)).eval()
    save_model(model, tmp_path / "run" / "final")
    word_tokenizer.save_pretrained(tmp_path / "run" / "final" / "tokenizer")

    assert (
        main_for("export", ["--base_model", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--verify"])
        == 0
    )

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (3, 21))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hello world again").input_ids[-3:] == [3, 4, 5]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is tied
    # and back: ds-sft reads its own export
    torch.testing.assert_close(load_model(tmp_path / "hf")(ids), model(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_generate_with_max_new_tokens_on_an_export_says_nothing_of_max_length(
    tmp_path, word_tokenizer, max_new_tokens
):
    """The export's generation_config.json named max_length (the model's positions): every
    ``generate(max_new_tokens=...)``, the usual call, warned that both were set. transformers' own
    default applies, capped at the config's max_position_embeddings."""
    import logging
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    word_tokenizer.save_pretrained(tmp_path / "ckpt" / "tokenizer")
    assert main_for("export", ["--base_model", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3, 4]])
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    library, verbosity = logging.getLogger("transformers"), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # as a user's session has it
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens)
    finally:
        library.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    said += [str(warning.message) for warning in warned]
    assert not [line for line in said if "max_length" in line], said
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + max_new_tokens


@pytest.mark.parametrize("positions", [1, 8, 31])
def test_export_verifies_a_model_of_fewer_positions_than_it_compares(tmp_path, positions, word_tokenizer):
    torch.manual_seed(0)
    save_model(LlamaModel(ModelConfig.preset("tiny", max_seq_len=positions)), tmp_path / "ckpt")
    word_tokenizer.save_pretrained(tmp_path / "ckpt" / "tokenizer")
    args = ["--base_model", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf"), "--verify"]
    assert main_for("export", args) == 0


def test_export_without_a_tokenizer_asks_for_one(tmp_path, capsys):
    save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    assert main_for("export", ["--base_model", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf")]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys, gpt2_tokenizer_dir):
    save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    args = [
        "--base_model",
        str(tmp_path / "ckpt"),
        "--tokenizer",
        str(gpt2_tokenizer_dir),
        "--hf",
        str(tmp_path / "hf"),
    ]
    assert main_for("export", args) == 2
    assert "token ids up to 50,256 but the model only 256" in capsys.readouterr().err


@pytest.mark.slow
def test_export_smollm2_gguf(tmp_path, smollm2_gguf):
    from transformers import AutoTokenizer

    args = ["--base_model", "smollm2-135m-instruct", "--hf", str(tmp_path / "hf"), "--dtype", "bfloat16"]
    assert main_for("export", args) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ours = load_model(tmp_path / "hf")
    assert ours.config.n_kv_heads == 3 and ours.wte.weight.dtype == torch.float32


@pytest.mark.parametrize("eos_id", [255, 256, 4_000])
def test_export_checks_the_largest_token_id_not_the_count(tmp_path, capsys, eos_id):
    """A vocabulary with a hole (10 words, EOS at id 4,000) passed the check on len(tokenizer) against
    the tiny model's 256 embeddings, and the export could not embed its own EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["[UNK]", *"abcdefghi"])}
    vocab["</s>"] = eos_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    args = ["--base_model", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
            "--hf", str(tmp_path / "hf")]  # fmt: skip
    fits = eos_id < ModelConfig.preset("tiny").vocab_size
    assert main_for("export", args) == (0 if fits else 2)
    if not fits:
        assert f"token ids up to {eos_id:,} but the model only 256" in capsys.readouterr().err
        assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize(
    ("dtype", "value", "refused"),
    [("float16", 1e6, True), ("float16", 6e4, False), ("bfloat16", 1e6, False), ("float32", 1e30, False)],
)
def test_an_export_never_holds_inf_where_the_model_is_finite(
    tmp_path, capsys, gpt2_tokenizer_dir, dtype, value, refused
):
    """--dtype float16 wrote an embedding of 1e6 as inf, and --verify passed it ('differ by at most
    inf', exit 0)."""
    from safetensors.torch import load_file

    model = LlamaModel(ModelConfig.preset("tiny", vocab_size=50304))
    with torch.no_grad():
        model.wte.weight[5, 0] = value
    save_model(model, tmp_path / "ckpt")
    args = ["--base_model", str(tmp_path / "ckpt"), "--tokenizer", str(gpt2_tokenizer_dir),
            "--hf", str(tmp_path / "hf"), "--dtype", dtype]  # fmt: skip
    code = main_for("export", args)
    if refused:
        assert (
            code == 2 and f"embed_tokens.weight holds 1e+06, past {dtype}'s range" in capsys.readouterr().err
        )
        assert not (tmp_path / "hf").exists()
        return
    assert code == 0
    assert all(
        bool(torch.isfinite(t).all()) for t in load_file(tmp_path / "hf" / "model.safetensors").values()
    )


def _transposed_o_proj(real):
    def broken(model):
        state = dict(real(model))
        key = "model.layers.0.self_attn.o_proj.weight"
        state[key] = state[key].t().contiguous()
        return state

    return broken


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("export", ["right", "wrong"])
def test_verify_holds_every_dtype_to_the_weights_it_wrote(
    tmp_path, capsys, monkeypatch, gpt2_tokenizer_dir, tied, dtype, export
):
    """--verify compared a bfloat16 or float16 export with the unrounded fp32 model and bounded only
    float32's difference: an export with a transposed projection passed ('differ by at most 4.6e-01',
    exit 0). Against the same weights rounded to --dtype a right export is within 1e-4 in every dtype."""
    import ds_sft.model.param_names

    torch.manual_seed(0)
    save_model(
        LlamaModel(ModelConfig.preset("tiny", vocab_size=50304, tie_embeddings=tied)), tmp_path / "ckpt"
    )
    if export == "wrong":
        real = ds_sft.model.param_names.to_hf_state_dict
        monkeypatch.setattr(ds_sft.model.param_names, "to_hf_state_dict", _transposed_o_proj(real))
    args = ["--base_model", str(tmp_path / "ckpt"), "--tokenizer", str(gpt2_tokenizer_dir),
            "--hf", str(tmp_path / "hf"), "--dtype", dtype, "--verify"]  # fmt: skip
    code = main_for("export", args)
    err = capsys.readouterr().err
    if export == "right":
        assert code == 0, err
    else:
        assert code == 2 and "ds-sft export: error: the export's logits differ by" in err
