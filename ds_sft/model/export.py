"""A ds-sft model in the Hugging Face layout of its family, which ``AutoModelForCausalLM`` loads as it is.

:func:`export_hf` writes ``config.json`` (the family's: ``LlamaConfig``, ``Qwen3Config`` ...),
``model.safetensors``, ``generation_config.json`` and the tokenizer files; :func:`max_logit_difference`
reloads such a folder with transformers and compares its logits with ds-sft's. The ``ds-sft export``
command around them is :mod:`ds_sft.export`.
"""

from __future__ import annotations

from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.vocab import id_bound

VERIFY_TOKENS = 32  # tokens per row that export --verify compares the logits of


def export_hf(model, tokenizer, out: Path, dtype=None) -> Path:
    """Write ``model`` (+ ``tokenizer``) into ``out``, a new or empty folder, in the Hugging Face layout
    of its family. Never into a folder holding anything: every file here would replace one of the same
    name (replacing a previous export is the command's job: :mod:`ds_sft.export`)."""
    from transformers import GenerationConfig

    from ds_sft.model.checkpoint import save_weights
    from ds_sft.model.hf_families import hf_config
    from ds_sft.model.param_names import to_hf_state_dict

    if id_bound(tokenizer) > model.config.vocab_size:  # len() would miss ids past a hole in the vocabulary
        raise UserError(
            f"the tokenizer has token ids up to {id_bound(tokenizer) - 1:,} but the model only "
            f"{model.config.vocab_size:,} embeddings: pass the tokenizer the model was trained with "
            "(--tokenizer)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise UserError(f"{out} is not empty: export writes into a new or empty folder only")
    dtype = dtype or model.wte.weight.dtype
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    state = cast_within_range(to_hf_state_dict(model), dtype)
    config = hf_config(model.config, **token_ids)
    config.dtype = dtype
    config.save_pretrained(out)
    save_weights(state, out / "model.safetensors")
    # token ids only: a max_length here (the model's positions) made every generate(max_new_tokens=...)
    # warn that both were set; transformers' default length is capped at max_position_embeddings anyway
    GenerationConfig(**token_ids).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cast_within_range(state: dict, dtype) -> dict:
    """``state`` in ``dtype`` on the CPU, or one line when a finite value becomes inf there (float16
    tops out at 65,504): the export held inf, and --verify passed it."""
    import torch

    from ds_sft.model.checkpoint import out_of_range

    found = out_of_range(state, dtype)
    if found is not None:
        name, largest = found
        kind = str(dtype).removeprefix("torch.")
        raise UserError(
            f"--dtype {kind}: {name} holds {largest:.3g}, past {kind}'s range "
            f"({torch.finfo(dtype).max:,.0f}); export in bfloat16 or float32"
        )
    return {name: tensor.detach().to(dtype).contiguous().cpu() for name, tensor in state.items()}


def max_logit_difference(model, hf_dir: Path, dtype=None) -> float:
    """Largest |logit| difference between ``model`` and transformers' load of ``hf_dir``, both in fp32.

    ``dtype``: the dtype the export's weights were written in. ds-sft's side then computes with its
    weights rounded to it, so the two sides hold the same numbers and any difference is the export's:
    against the unrounded model a bfloat16 export differed by ~0.5 whether or not it was right (a
    transposed projection differed by as much), and no bound could tell them apart."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from ds_sft.model.checkpoint import transformers_quiet

    with transformers_quiet():  # its loading bar on stderr, around ds-sft's one-line refusal
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=False).eval()
    reference = copy.deepcopy(model).float().eval()
    if dtype is not None:
        with torch.no_grad():
            for weight in reference.parameters():  # a tied weight is one parameter
                weight.copy_(weight.to(dtype).float())
    # no longer than the model's positions (its RoPE table): a model of 8 positions was an IndexError
    length = min(VERIFY_TOKENS, model.config.max_seq_len)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (reference(ids) - hf(ids).logits).abs().max().item()
