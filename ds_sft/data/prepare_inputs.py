"""What prepare reads: the sources the flags name, checked with the other flags before any row is
read (:func:`resolve_inputs`), then read and cleaned (:func:`load_records`), and the GSM8K test set
that the rows are decontaminated against (:func:`gsm8k_test_reference`).

Sources come in a fixed order (--alpaca, --gsm8k, --dolly, each --source, then the ../shared/data mix
for sources not given); with none named, the shared mix is used, else the hub when it is reachable.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ds_sft.data.mix import parse_mix
from ds_sft.errors import UserError
from ds_sft.locations import expand_user
from ds_sft.model_source import hub_offline

SHARED_FILES = {
    "alpaca": "alpaca/alpaca_cleaned_first5k.json",
    "gsm8k": "gsm8k/train.jsonl",
    "dolly": "dolly/dolly_5k_instruction_input_output.jsonl",
}
SHARED_GSM8K_TEST = "gsm8k/test.jsonl"


@dataclass
class Inputs:
    """What the flags name, resolved and checked before any row is read."""

    specs: list  # the sources to read, in order (sources.SourceSpec)
    weights: dict[str, float]  # each source's --mix weight, by name
    output_dir: Path  # --output_dir, symlinks resolved
    previous: dict | None  # the manifest of the ds-sft output already there, if any

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]


def resolve_inputs(args: argparse.Namespace) -> Inputs:
    """Refuse what the flags get wrong before any file is read: both --tokenizer and --base_model, a
    --seq_len past the base model's positions, the sources (:func:`collect_sources`), --mix, and an
    output folder prepare may not replace (``output.check_output_dir``, which also refuses one
    holding an input)."""
    from ds_sft.data.model_match import model_positions, refuse_rows_past_positions
    from ds_sft.data.output import check_output_dir

    if args.tokenizer and args.base_model:
        raise UserError("pass --tokenizer or --base_model, not both")
    positions = model_positions(args.base_model) if args.base_model else None
    if positions is not None:  # rows the model cannot attend over were found only when train built it
        refuse_rows_past_positions("--seq_len asks for rows", args.seq_len, args.base_model, positions)
    specs = collect_sources(args)
    weights = parse_mix(args.mix, [spec.name for spec in specs])
    input_paths = [expand_user(spec.location) for spec in specs if spec.is_local]
    if args.gsm8k_test:
        input_paths.append(expand_user(args.gsm8k_test))
    output_dir, previous = check_output_dir(args.output_dir, input_paths)
    return Inputs(specs, weights, output_dir, previous)


def collect_sources(args: argparse.Namespace) -> list:
    """The sources to read, in order: --alpaca, --gsm8k, --dolly, each --source, then shared ones."""
    from ds_sft.data.sources import HUB_IDS, SOURCE_NAME, SourceSpec, parse_field_map
    from ds_sft.locations import shared_dir, shared_dir_sought
    from ds_sft.safe_read import require_regular_file

    field_maps: dict[str, dict[str, str]] = {}
    for text in args.field_map:
        name, mapping = parse_field_map(text)
        if name in field_maps:  # the later one silently replaced the earlier
            raise UserError(
                f"--field_map names {name!r} twice; give all of its fields in one, e.g. "
                f"{name}:instruction=question,response=answer"
            )
        field_maps[name] = mapping
    specs = [SourceSpec(kind, kind, getattr(args, kind)) for kind in HUB_IDS if getattr(args, kind)]
    for item in args.source:
        name, eq, location = item.partition("=")
        if not eq or not name or not location:
            raise UserError(f"--source {item!r}: expected NAME=PATH, e.g. --source mydata=rows.jsonl")
        if not SOURCE_NAME.fullmatch(name):
            raise UserError(
                f"--source {item!r}: NAME must be 1-64 ASCII letters, digits, '_', '.' or '-' "
                f"(not starting with '.' or '-'), e.g. --source mydata=rows.jsonl"
            )
        specs.append(SourceSpec(name, "generic", location, field_maps.pop(name, {})))
    if field_maps:
        raise UserError(f"--field_map given for {sorted(field_maps)} but no --source with that name")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UserError(f"source names must be unique, got {names}")
    shared = shared_dir()
    if args.from_shared or not specs:
        if shared is None and args.from_shared:
            sought = shared_dir_sought()
            raise UserError(f"--from_shared: {sought}; pass --alpaca/--gsm8k/--dolly PATH instead")
        if shared is not None:
            specs += [
                SourceSpec(kind, kind, str(shared / "data" / rel))
                for kind, rel in SHARED_FILES.items()
                if kind not in names
            ]
    for spec in specs:
        if spec.is_local:  # a FIFO, a device or a folder is refused here, before anything opens it
            require_regular_file(expand_user(spec.location), f"{spec.name} data")
    if not specs:
        if hub_offline():
            raise UserError(
                "no data source: pass --alpaca/--gsm8k/--dolly PATH or --source NAME=PATH "
                "(no shared data folder, ../shared or $DS_SFT_SHARED, and HF_HUB_OFFLINE rules out the hub)"
            )
        specs = [SourceSpec(kind, kind, hub_id) for kind, (hub_id, _) in HUB_IDS.items()]
    return specs


def tokenizer_spec(args: argparse.Namespace) -> str:
    """The tokenizer the flags name: --tokenizer, else --base_model's, else GPT-2's."""
    return args.tokenizer or args.base_model or "gpt2"


def load_records(specs: list, skip_bad_rows: bool, drops, train_on: str) -> tuple[list[dict], list[dict]]:
    """Read and clean every source -> (records in source order, input descriptions for the manifest)."""
    from ds_sft.data.clean import clean_records
    from ds_sft.data.sources import load_source

    records, inputs = [], []
    for spec in specs:
        loaded, info = load_source(spec, skip_bad_rows, drops)
        inputs.append(info)
        records += clean_records(loaded, drops, gsm8k=spec.kind == "gsm8k", every_turn=train_on == "all")
        del loaded  # the raw texts: not held while the next source is read
    return records, inputs


def gsm8k_test_reference(args: argparse.Namespace, specs: list) -> tuple[list[str], dict]:
    """GSM8K test texts (question + cleaned answer) to decontaminate against, and where they came from
    (none with --decontam_threshold 0)."""
    from ds_sft.data.clean import Drops, clean_records
    from ds_sft.data.sources import SourceSpec, load_source
    from ds_sft.locations import shared_dir
    from ds_sft.safe_read import require_regular_file

    if args.decontam_threshold == 0:
        return [], {}
    candidates = [args.gsm8k_test] if args.gsm8k_test else []
    if args.gsm8k_test:
        require_regular_file(expand_user(args.gsm8k_test), "--gsm8k_test")
    shared = shared_dir()
    if shared is not None:
        candidates.append(str(shared / "data" / SHARED_GSM8K_TEST))
    for spec in specs:
        if spec.kind == "gsm8k" and spec.is_local:
            folder = expand_user(spec.location).parent
            candidates += [str(folder / "test.jsonl"), str(folder / "test-00000-of-00001.parquet")]
    location = next((path for path in candidates if expand_user(path).is_file()), None)
    if args.gsm8k_test and location != args.gsm8k_test:
        raise UserError(f"--gsm8k_test {args.gsm8k_test}: no such file")
    if location is None:
        if hub_offline():
            return [], {"reference": None, "note": "no GSM8K test set found offline; pass --gsm8k_test PATH"}
        location = "openai/gsm8k"
    try:
        records, info = load_source(SourceSpec("gsm8k_test", "gsm8k", location), False, Drops(), split="test")
    except UserError as err:
        if args.gsm8k_test:
            raise UserError(f"--gsm8k_test: {err}") from None
        return [], {"reference": None, "note": f"GSM8K test set unavailable ({err}); pass --gsm8k_test PATH"}
    records = clean_records(records, Drops())
    return [f"{r['instruction']}\n{r['response']}" for r in records], {"reference": info}
