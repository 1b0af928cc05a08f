"""Each model family end to end, as a user runs it: prepare -> train (ZeRO-2 and ZeRO-3) -> eval -> export.

A random-init tiny model of each transformers class, with the family's real vocabulary size and its
switches (Llama 3: the ``llama3`` RoPE rule, untied head, 128,256 entries; Qwen3: RMSNorm on each
head's q and k, tied, 151,936 entries), saved with ``save_pretrained`` beside the shared GPT-2
tokenizer. The Qwen3 model is handed to ds-sft as a Hugging Face id, from a hub cache laid out by the
client's rules (``tests/hub_cache.py``), the Llama 3 one as a folder. The data is a slice of the shared
mix. One gloo rank on CPU, fp32, three steps per run.

Checked: ZeRO-2 and ZeRO-3 train every parameter (family-specific ones included) to the same weights;
``eval`` scores the run; ``export --hf`` writes the family's own transformers class, whose logits
equal ds-sft's final weights' (fp32, 1e-4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ds_sft.cli import main
from tests.hub_cache import publish
from tests.train.conftest import dist_env  # noqa: F401  (one gloo rank for the session)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

SLICE_ROWS = 48  # per source of the shared mix
SEQ_LEN = 128
STEPS = 3
QWEN3_ID = "tiny-org/qwen3-tiny"


def _llama3_config(eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
        # Llama 3.1's rule, with the original context shortened so that it bends the frequencies
        # these short rows use too
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip


def _qwen3_config(eos: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip


# family -> (config, transformers class export must write, base model handed over as a hub id?)
FAMILIES = {
    "llama3": (_llama3_config, "LlamaForCausalLM", False),
    "qwen3": (_qwen3_config, "Qwen3ForCausalLM", True),
}


def _write_slice(shared: Path, root: Path) -> list[str]:
    """The first rows of each shared source (and of the GSM8K test set), as prepare flags."""
    data = shared / "data"
    alpaca = json.loads((data / "alpaca" / "alpaca_cleaned_first5k.json").read_text())[:SLICE_ROWS]
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    for name, source in (
        ("dolly.jsonl", data / "dolly" / "dolly_5k_instruction_input_output.jsonl"),
        ("gsm8k.jsonl", data / "gsm8k" / "train.jsonl"),
        ("gsm8k_test.jsonl", data / "gsm8k" / "test.jsonl"),
    ):
        with source.open() as lines:
            (root / name).write_text("".join(next(lines) for _ in range(SLICE_ROWS)))
    return [
        "--alpaca", str(root / "alpaca.json"), "--dolly", str(root / "dolly.jsonl"),
        "--gsm8k", str(root / "gsm8k.jsonl"), "--gsm8k_test", str(root / "gsm8k_test.jsonl"),
    ]  # fmt: skip


def _base_model(family: str, root: Path, tokenizer_dir: Path, monkeypatch) -> tuple[str, Path]:
    """(the spec ds-sft is given, the saved folder) for a fresh random-init model of ``family``."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_config, _, as_hub_id = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    folder = root / "base"
    AutoModelForCausalLM.from_config(make_config(tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not as_hub_id:
        return str(folder), folder
    publish(root / "hub", QWEN3_ID, folder, "0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return QWEN3_ID, folder


def _train(base: str, data: Path, out: Path, zero_stage: int) -> None:
    flags = [
        "train", "--base_model", base, "--data_dir", str(data), "--out_dir", str(out),
        "--zero_stage", str(zero_stage), "--precision", "fp32", "--fp8", "off",
        "--max_iters", str(STEPS), "--micro_batch_size", "2", "--grad_accum", "1",
        "--learning_rate", "1e-3", "--warmup_iters", "1", "--eval_interval", str(STEPS),
        "--eval_iters", "1", "--save_interval", "1000", "--wandb_mode", "disabled",
    ]  # fmt: skip
    assert main(flags) == 0, f"train at ZeRO-{zero_stage} failed"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_prepare_train_eval_export(family, shared, tmp_path, monkeypatch, dist_env):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from ds_sft.data.shards import PackedDataset
    from ds_sft.model.checkpoint import load_model

    base, base_folder = _base_model(family, tmp_path, shared / "tokenizers" / "gpt2", monkeypatch)

    data = tmp_path / "data"
    prepare = ["prepare", *_write_slice(shared, tmp_path), "--base_model", base]
    assert main([*prepare, "--seq_len", str(SEQ_LEN), "--output_dir", str(data)]) == 0

    runs = {stage: tmp_path / f"run_zero{stage}" for stage in (2, 3)}
    for stage, out in runs.items():
        _train(base, data, out, stage)

    # ZeRO-3 partitions and gathers every parameter, the family's own included: it must train them
    # exactly as ZeRO-2 does, and every one of them must have moved from the base weights
    before = load_model(base_folder).state_dict()
    zero2, zero3 = (load_model(out / "final").state_dict() for out in runs.values())
    assert zero2.keys() == zero3.keys() == before.keys()
    for name in before:
        torch.testing.assert_close(zero3[name], zero2[name], atol=1e-5, rtol=1e-4, msg=name)
        assert not torch.equal(zero3[name], before[name]), f"{name} did not train"

    report = tmp_path / "eval"
    evaluate = ["eval", "--model", str(runs[3]), "--data_dir", str(data), "--out", str(report)]
    evaluate += ["--gsm8k_limit", "2", "--max_new_tokens", "4", "--dtype", "float32", "--val_rows", "4"]
    assert main([*evaluate, "--batch_size", "2", "--generate_batch_size", "2"]) == 0
    (scored,) = json.loads((report / "eval.json").read_text())["models"]
    assert scored["val"]["overall"]["tokens"] > 0 and math.isfinite(scored["val"]["overall"]["loss"])
    assert scored["gsm8k"]["total"] == 2

    exported = tmp_path / "hf"
    assert main(["export", "--base_model", str(runs[3]), "--hf", str(exported)]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == FAMILIES[family][1]
    if family == "llama3":
        assert hf_model.config.rope_parameters["rope_type"] == "llama3"
    ids = PackedDataset(data, "val")[0]["input_ids"][None]
    with torch.no_grad():
        ours = load_model(runs[3] / "final").eval()(ids)
        theirs = hf_model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
