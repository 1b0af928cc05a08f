"""``ds-sft export``: write a checkpoint as a Hugging Face LLaMA model that ``AutoModelForCausalLM`` loads.

    ds-sft export --base_model runs/sft-001 --hf exported/sft-001
    ds-sft export --base_model best_model_fp8_optimized.pt --tokenizer gpt2 --hf exported/base

``--base_model`` is anything ``load_model`` reads (a run or ds-sft checkpoint directory, a base
``.pt``, ``.safetensors``, an HF directory, a GGUF file, a model alias). The output directory gets
``config.json`` (a ``LlamaConfig``), ``model.safetensors``, ``generation_config.json`` and the
tokenizer files. The tokenizer comes from ``--tokenizer`` if given, else from the source: the
``tokenizer/`` folder of a checkpoint directory (``RUN/final/tokenizer``) or beside a ``.pt``, the
GGUF metadata, or the HF directory. A run fine-tuned on Alpaca-format data exports with a chat template
that renders that format (``data.templates.alpaca_chat_template``), not the base model's, which
``apply_chat_template`` and serving stacks would otherwise prompt it in. ``--verify`` reloads the
export with transformers and compares its logits with ds-sft's on a few random tokens, both in fp32
from the weights the export holds (rounded to ``--dtype``), within 1e-4. The writing itself is
:func:`ds_sft.model.export.export_hf`; this module finds the model and its tokenizer, and guards the
output folder.

``--hf`` must be a new or empty folder, or one holding a previous export: export lists what it
writes (size and sha256) in ``OUT/ds_sft_export.json`` and replaces only those files, unchanged,
building the new export in a sibling folder swapped in at the end (a failed export leaves the old one
as it was). A folder holding anything else, and one that is, holds or lies inside the model or
tokenizer it reads, is refused before any work (:mod:`ds_sft.data.output`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.locations import expand_user

# the output a refusal that names no file is about (command.execute): where a full disk ran out
OUTPUT_FLAG = "hf"

MANIFEST = "ds_sft_export.json"
# fp32 logits of the same weights, computed by transformers and by ds-sft (kernels sum in other orders)
VERIFY_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ds_sft.options import StoreOnce

    parser.add_argument(
        "--base_model",
        action=StoreOnce,
        required=True,
        help="checkpoint to export: run dir, ds-sft checkpoint dir, .pt, .safetensors, HF dir, "
        ".gguf, a Hugging Face id (owner/name[@revision]), or an alias such as smollm2-135m-instruct",
    )
    parser.add_argument(
        "--hf",
        required=True,
        metavar="OUT",
        help="output folder: a new or empty one, or a previous export's (only the files export wrote there "
        "are replaced); never the model's or the tokenizer's folder",
    )
    parser.add_argument(
        "--tokenizer",
        action=StoreOnce,
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

    from ds_sft.data.model_match import behind_note, trained_record
    from ds_sft.data.output import building_output, check_output_dir, refuse_overlap
    from ds_sft.data.templates import alpaca_chat_template
    from ds_sft.data.tokenizer import load_tokenizer, start_ids
    from ds_sft.model.checkpoint import load_model, refuse_training_state
    from ds_sft.model.export import export_hf
    from ds_sft.model_source import resolve_model_path
    from ds_sft.safe_write import writable_dir

    writable_dir(args.hf, "--hf")
    source = resolve_model_path(args.base_model)
    refuse_training_state(source)  # what the model is decides before its tokenizer is looked for
    tokenizer_spec, tokenizer_path = _find_tokenizer(args.tokenizer, source)
    inputs = {"the model": source} | ({"the tokenizer": tokenizer_path} if tokenizer_path else {})
    refuse_overlap(args.hf, "--hf", inputs)
    out, previous = check_output_dir(args.hf, [], "--hf", "export", MANIFEST)
    tokenizer = load_tokenizer(tokenizer_spec)
    trained = trained_record(str(source))  # final/trained_on.json, read once for the note and the template
    said = behind_note(trained)
    if said:
        print(said)
    trained_format = trained[1]["template"] if trained else None
    if trained_format == "alpaca":  # its chat template (the base model's) is a format it was not tuned on
        tokenizer.chat_template = alpaca_chat_template(tokenizer.decode(start_ids(tokenizer)))
        print("chat template: the Alpaca format the model was fine-tuned on (### Instruction / ### Response)")
    model = load_model(source, dtype=torch.float32)
    old_files = previous["files"] if previous else {}
    manifest = {"written_by": "ds-sft export", "base_model": args.base_model, "dtype": args.dtype}
    manifest["trained_on_template"] = trained_format
    dtype = getattr(torch, args.dtype)
    with building_output(out, old_files, "--hf", manifest, MANIFEST) as staging:
        export_hf(model, tokenizer, staging, dtype=dtype)
        if args.verify:  # before it is swapped in: an export that fails leaves the previous one as it was
            _verify(model, staging, dtype)
    print(f"wrote {out} ({model.num_parameters():,} parameters, {args.dtype})")
    return 0


def _verify(model, folder: Path, dtype) -> None:
    """Refuse the export in ``folder`` unless transformers' logits match ds-sft's within
    :data:`VERIFY_TOLERANCE` (:func:`~ds_sft.model.export.max_logit_difference`)."""
    from ds_sft.model.export import max_logit_difference

    kind = str(dtype).removeprefix("torch.")
    diff = max_logit_difference(model, folder, dtype)
    rounded = "" if kind == "float32" else f" (its weights rounded to {kind})"
    print(f"verify: transformers' logits differ from ds-sft's{rounded} by at most {diff:.2e}")
    if not math.isfinite(diff):
        raise UserError(
            f"the export's logits differ from ds-sft's by {diff}: it does not reproduce the model, so it was "
            "not written"
        )
    if diff > VERIFY_TOLERANCE:
        raise UserError(
            f"the export's logits differ by {diff:.2e} (> {VERIFY_TOLERANCE:.0e}), so it was not written; "
            "please report this as a bug"
        )


def _find_tokenizer(spec: str | None, source: Path) -> tuple[str, Path | None]:
    """(what to load the tokenizer from, the file or folder it is read from; None for a name like gpt2):
    ``--tokenizer``, else the one stored with the model (:func:`~ds_sft.data.tokenizer.stored_tokenizer`,
    the lookup prepare and eval use)."""
    from ds_sft.data.tokenizer import stored_tokenizer

    if spec is not None:
        path = expand_user(spec)
        return spec, path if path.exists() else None
    found = stored_tokenizer(source)
    if found is None:
        raise UserError(
            f"no tokenizer found with {source}: pass --tokenizer (e.g. gpt2 for the GPT-2 vocabulary)"
        )
    return str(found), found


if __name__ == "__main__":
    import sys

    from ds_sft.command import main_for

    sys.exit(main_for("export"))
