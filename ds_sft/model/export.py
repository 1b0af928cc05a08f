"""Write a checkpoint as a Hugging Face LLaMA model that ``AutoModelForCausalLM`` loads as it is.

    ds-sft export --base_model runs/sft-001 --hf exported/sft-001
    ds-sft export --base_model best_model_fp8_optimized.pt --tokenizer gpt2 --hf exported/base

``--base_model`` is anything ``load_model`` reads (a run or ds-sft checkpoint directory, a base
``.pt``, ``.safetensors``, an HF directory, a GGUF file, a model alias). The output directory gets
``config.json`` (a ``LlamaConfig``), ``model.safetensors``, ``generation_config.json`` and the
tokenizer files. The tokenizer comes from ``--tokenizer`` if given, else from the source: the
``tokenizer/`` folder of a checkpoint directory (``RUN/final/tokenizer``) or beside a ``.pt``, the
GGUF metadata, or the HF directory. ``--verify`` reloads the export with transformers and compares
its logits with ds-sft's on a few random tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ds_sft.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base_model",
        required=True,
        help="checkpoint to export: run dir, ds-sft checkpoint dir, .pt, .safetensors, HF dir, "
        ".gguf, or an alias such as smollm2-135m-instruct",
    )
    parser.add_argument(
        "--hf", required=True, metavar="OUT", help="output directory (created; files overwritten)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to ship with the model (tokenizer.json, directory, .gguf, 'gpt2', alias); "
        "default: the one found with the checkpoint",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the written weights (default: float32)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="reload the export with transformers and check its logits equal ds-sft's",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ds_sft.model.checkpoint import load_model
    from ds_sft.paths import resolve_model_path, writable_dir

    out = writable_dir(args.hf, "--hf")
    source = resolve_model_path(args.base_model)
    tokenizer = _load_tokenizer(args.tokenizer, source)
    model = load_model(source, dtype=torch.float32)
    out = export_hf(model, tokenizer, out, dtype=getattr(torch, args.dtype))
    print(f"wrote {out} ({model.num_parameters():,} parameters, {args.dtype})")
    if args.verify:
        diff = max_logit_difference(model, out)
        print(f"verify: transformers' logits differ from ds-sft's by at most {diff:.2e}")
        if args.dtype == "float32" and diff > 1e-4:
            raise UserError(f"the export's logits differ by {diff:.2e} (> 1e-4); please report this as a bug")
    return 0


def export_hf(model, tokenizer, out: Path, dtype=None) -> Path:
    """Write ``model`` (+ ``tokenizer``) into ``out`` in the Hugging Face LLaMA layout."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from ds_sft.model.checkpoint import hf_config, to_hf_state_dict

    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model only {model.config.vocab_size:,} "
            "embeddings: pass the tokenizer the model was trained with (--tokenizer)"
        )
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.wte.weight.dtype
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = hf_config(model.config, **token_ids)
    config.dtype = dtype
    config.save_pretrained(out)
    state = {name: t.detach().to(dtype).contiguous().cpu() for name, t in to_hf_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(**token_ids, max_length=model.config.max_seq_len).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def max_logit_difference(model, hf_dir: Path) -> float:
    """Largest |logit| difference between ``model`` and transformers' load of ``hf_dir`` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.float().eval()(ids) - hf(ids).logits).abs().max().item()


def _load_tokenizer(spec: str | None, source: Path):
    from ds_sft.data.tokenizer import load_tokenizer

    if spec is not None:
        return load_tokenizer(spec)
    candidates = [source / "final", source] if source.is_dir() else [source, source.parent]
    for candidate in candidates:
        if (
            candidate.suffix == ".gguf"
            or (candidate / "tokenizer").is_dir()
            or (candidate / "tokenizer.json").exists()
        ):
            return load_tokenizer(str(candidate))
    raise UserError(
        f"no tokenizer found with {source}: pass --tokenizer (e.g. gpt2 for the GPT-2 vocabulary)"
    )


if __name__ == "__main__":
    import sys

    from ds_sft.command import main_for

    sys.exit(main_for("export"))
