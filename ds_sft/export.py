"""``ds-sft export``: write a checkpoint as a Hugging Face LLaMA model that ``AutoModelForCausalLM`` loads.

    ds-sft export --base_model runs/sft-001 --hf exported/sft-001
    ds-sft export --base_model best_model_fp8_optimized.pt --tokenizer gpt2 --hf exported/base

``--base_model`` is anything ``load_model`` reads (a run or ds-sft checkpoint directory, a base
``.pt``, ``.safetensors``, an HF directory, a GGUF file, a model alias). The output directory gets
``config.json`` (a ``LlamaConfig``), ``model.safetensors``, ``generation_config.json`` and the
tokenizer files. The tokenizer comes from ``--tokenizer`` if given, else from the source: the
``tokenizer/`` folder of a checkpoint directory (``RUN/final/tokenizer``) or beside a ``.pt``, the
GGUF metadata, or the HF directory. ``--verify`` reloads the export with transformers and compares
its logits with ds-sft's on a few random tokens. The writing itself is
:func:`ds_sft.model.export.export_hf`; this module finds the model and its tokenizer.
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
        ".gguf, a Hugging Face id (owner/name[@revision]), or an alias such as smollm2-135m-instruct",
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
    from ds_sft.model.export import export_hf, max_logit_difference
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
