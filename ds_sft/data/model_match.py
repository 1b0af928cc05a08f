"""Does a model belong with a prepared data directory? Same tokenizer, enough embeddings and positions.

Token ids only mean something together with the tokenizer that produced them: data prepared with
another tokenizer of the same vocabulary size trains without an error, just badly (tiny model on
the shared mix: loss 5.9 instead of 4.0). So ``train`` and ``eval`` compare the tokenizer a model
carries (a Hugging Face folder, a GGUF's metadata, a ds-sft run's ``final/tokenizer``) with the one
``prepare`` saved in ``DATA/tokenizer``, by :func:`tokenizer_identity`: a hash of what decides the
ids, not of file bytes, so the same tokenizer read from a GGUF, a ``tokenizer.json`` or a
``save_pretrained`` folder hashes the same. It is the one tokenizer hash of ds-sft: ``prepare`` records
it in the manifest (``tokenizer.identity``) and a run's checkpoints in their run identity.

Rows longer than the model's positions (its RoPE table, ``max_seq_len``) would index past the table
at the first step; :func:`check_model_fits` refuses them, and token ids past the embedding, first.
``prepare --base_model`` refuses such rows before it makes them, reading the positions from the
model's files (:func:`model_positions`), with the same line (:func:`refuse_rows_past_positions`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ds_sft import gguf_file, locations, model_source, run_layout, safe_read
from ds_sft.data.shards import PackedDataset, read_manifest
from ds_sft.errors import UserError
from ds_sft.json_input import parse_json_object
from ds_sft.positions import DEFAULT_POSITIONS, POSITION_FIELDS


def identity(model_type: str | None, vocab: list[str], merges: list, eos_token_id: int | None) -> str:
    """sha256 of what turns text into ids and back: the model type, every token by id (added tokens
    included), the merges in priority order, and the EOS id."""
    # merges are "a b" strings in older tokenizer.json files and GGUF, [a, b] pairs in newer files
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    canonical = {"type": model_type, "vocab": vocab, "merges": pairs, "eos_token_id": eos_token_id}
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """:func:`identity` of a loaded tokenizer. Formatting, normalizer options that files spell
    differently, chat templates and special-token flags are left out."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    return identity(model.get("type"), vocab, model.get("merges") or [], tokenizer.eos_token_id)


def gguf_identity(path: Path) -> str | None:
    """:func:`identity` read straight from a GGUF's metadata, for BPE vocabularies (``gpt2``), in
    ~1/5 of the time transformers takes to build the tokenizer; None for other kinds."""
    from ds_sft.data.tokenizer import gguf_special_token_ids

    fields = gguf_file.read_gguf(path, "tokenizer").fields

    def strings(name: str) -> list[str]:
        field = fields[name]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    if "tokenizer.ggml.model" not in fields or strings("tokenizer.ggml.model") != ["gpt2"]:
        return None
    eos_id = gguf_special_token_ids(fields).get("eos_token")
    return identity("BPE", strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"), eos_id)


def model_tokenizer_identity(where: Path) -> str:
    """:func:`identity` of the tokenizer at ``where`` (a folder, or a GGUF)."""
    from ds_sft.data.tokenizer import load_tokenizer

    found = gguf_identity(where) if where.is_file() else None
    return found or tokenizer_identity(load_tokenizer(str(where)))


def data_tokenizer_identity(data_dir: str) -> str | None:
    """:func:`tokenizer_identity` of ``DATA/tokenizer``, computed from the folder, never read from the
    manifest (None when the data dir holds no tokenizer and its manifest records none).

    The identity ``prepare`` recorded (``tokenizer.identity``) must agree, or the folder is not the
    tokenizer the shards were made with. Manifests written before it was recorded hold another hash
    (``tokenizer.sha256``, of the tokenizer's files as parsed) that nothing compares: the folder decides.
    """
    folder = Path(data_dir) / "tokenizer"
    recorded = read_manifest(data_dir).get("tokenizer", {}).get("identity")
    if not folder.is_dir():
        if recorded is not None:  # a copy of the shards without it: nothing says what the ids mean
            raise UserError(
                f"{data_dir} has no tokenizer/ folder, though it was prepared with one: copy the data dir "
                "whole, or run `ds-sft prepare` again"
            )
        return None
    found = _folder_identity(str(folder.resolve()), _folder_stamp(folder))
    if recorded is not None and recorded != found:
        raise UserError(
            f"{folder} is not the tokenizer {data_dir} was prepared with (manifest.json records another "
            "tokenizer identity): run `ds-sft prepare` again for this folder"
        )
    return found


def _folder_stamp(folder: Path) -> tuple:
    """Name, inode, size and change times of each file: a file rewritten or replaced in between (even
    by a copy that keeps the old modification time) stamps differently."""
    stats = ((p.name, p.stat()) for p in folder.iterdir())
    return tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats))


@functools.lru_cache(maxsize=8)
def _folder_identity(folder: str, stamp: tuple) -> str:
    """:func:`tokenizer_identity` of a tokenizer folder, once per folder and stamp: a fresh ``train``
    asks for it twice (the model check, then the run identity), and a 150k-entry vocabulary takes
    seconds to load and hash."""
    from ds_sft.data.tokenizer import load_tokenizer

    return tokenizer_identity(load_tokenizer(folder))


def model_tokenizer_dir(spec: str, path: Path | None = None) -> Path | None:
    """Where the tokenizer stored with model ``spec`` lives, or None when it carries none (a
    nanoGPT-style ``.pt``, a bare ``.safetensors``, a ds-sft weights folder without ``tokenizer/``).
    ``path``: ``spec`` resolved already (:func:`ds_sft.model_source.resolve_model_path`), as each function
    here that reads a model's files takes it: online, every resolve of a hub id asks the hub."""
    from ds_sft.data.tokenizer import stored_tokenizer

    return stored_tokenizer(path or model_source.resolve_model_path(spec))


# In a model folder train wrote (RUN/final): the prompt format of the data it was trained on.
TRAINED_ON = "trained_on.json"
TRAINED_ON_BYTES = 1 << 16  # read no more of it: a record is a few dozen bytes
# A record's template: the prompt format its data were rendered in, or None where the data dir names
# none (one made by hand, or by an older prepare). train writes only these and its readers take only
# these: a run whose manifest said nothing was written as null and then refused by eval and export.
RECORDED_TEMPLATES = ("alpaca", "chat", None)


def trained_on(manifest: dict, step: int | None = None) -> str:
    """The :data:`TRAINED_ON` record of a run on the data dir of ``manifest``: its ``template``
    (alpaca or chat: how prompts were rendered; None when the manifest names neither), the data's
    key, and the step whose weights final/ holds."""
    template = manifest.get("template")
    template = template if template in RECORDED_TEMPLATES else None
    record = {"template": template, "data_key": manifest.get("key"), "step": step}
    return json.dumps(record, indent=1) + "\n"


def trained_record(spec: str, path: Path | None = None) -> tuple[Path, dict] | None:
    """(the record's path, the record) when ds-sft's train wrote one with model ``spec`` (a run dir,
    its ``final/`` or the weights file there); None for any other model. ``path``: as for
    :func:`model_tokenizer_dir`."""
    from ds_sft.data.tokenizer import model_folder

    path = model_folder(path or model_source.resolve_model_path(spec))
    record = path / TRAINED_ON
    if not path.is_dir() or not record.is_file():
        return None
    damaged = UserError(f"{record} is not as train writes it: restore it, or delete it to skip the check")
    try:
        with record.open("rb") as file:
            text = file.read(TRAINED_ON_BYTES + 1)  # a few dozen bytes as train writes it
        fields = None if len(text) > TRAINED_ON_BYTES else parse_json_object(text)
    except (OSError, ValueError):
        raise damaged from None
    if not isinstance(fields, dict) or fields.get("template", ...) not in RECORDED_TEMPLATES:
        raise damaged
    return record, fields


def trained_template(spec: str, path: Path | None = None) -> str | None:
    """The template model ``spec`` was fine-tuned on, when ds-sft's train recorded it; None for any
    other model (a base model, a run of an older ds-sft)."""
    found = trained_record(spec, path)
    return found[1]["template"] if found else None


def final_behind(spec: str, path: Path | None = None) -> str | None:
    """A note when model ``spec`` is a run's ``final/`` whose step is not where the run's checkpoints
    are: a run resumed after it finished writes final/ anew only at its end, so while it trains, and
    after it stopped early, the run folder held the old final/ and eval, export and ``--base_model``
    read it without a word. None when they agree, or when either is not recorded."""
    if not locations.expand_user(spec).exists():  # a hub id or an alias: no run of ours, nothing to resolve
        return None
    return behind_note(trained_record(spec, path))


def behind_note(found: tuple[Path, dict] | None) -> str | None:
    """:func:`final_behind`'s note for a record :func:`trained_record` read."""
    if found is None or not isinstance(found[1].get("step"), int):
        return None
    final, step = found[0].parent, found[1]["step"]
    tag = run_layout.latest_tag(final.parent / "checkpoints")
    if tag is None or run_layout.tag_step(tag) == step:
        return None
    where = run_layout.tag_step(tag)
    since = "reach" if where > step else "went back to"
    return (
        f"note: {final} holds the weights of step {step}, but the run's checkpoints {since} step {where} "
        "(it was resumed, and has not finished since): reading step "
        f"{step}'s; the run writes final/ anew when it ends"
    )


def check_template(spec: str, data_dir: str | Path, path: Path | None = None) -> None:
    """Refuse data whose prompts are rendered in another template than the one model ``spec`` was
    fine-tuned on: the eval asked an Alpaca-trained model in its chat template (or the reverse) and
    reported the scores of a format it never saw, without a word."""
    trained = trained_template(spec, path)
    rendered = read_manifest(data_dir).get("template")
    if trained is None or rendered is None or trained == rendered:
        return
    raise UserError(
        f"{spec} was fine-tuned on {trained!r}-template prompts but {data_dir} renders {rendered!r} ones: "
        f"prepare the eval data with --template {trained}, or pass --allow_other_template to measure "
        "it in a format it was not trained on"
    )


def gpt2_identity() -> str | None:
    """:func:`identity` of GPT-2's tokenizer, the one bare weights are assumed to use (None offline)."""
    from ds_sft.data.tokenizer import load_tokenizer

    try:
        return tokenizer_identity(load_tokenizer("gpt2"))
    except UserError:
        return None


def describe(manifest: dict) -> str:
    tokenizer = manifest.get("tokenizer", {})
    name = tokenizer.get("spec") or tokenizer.get("name_or_path") or "an unrecorded tokenizer"
    size = tokenizer.get("vocab_size")
    return f"{name} ({size:,} tokens)" if size else name


def check_tokenizer(spec: str, data_dir: str | Path, path: Path | None = None) -> None:
    """Refuse a model whose own tokenizer differs from the one ``data_dir`` was tokenized with.
    Nothing to compare when either side has none; a note then, if the data's is not GPT-2's (the one
    bare nanoGPT-style weights assume)."""
    data_identity = data_tokenizer_identity(str(data_dir))
    if data_identity is None:
        return
    manifest = read_manifest(data_dir)
    where = model_tokenizer_dir(spec, path)
    if where is None:
        if data_identity != gpt2_identity():
            print(
                f"note: {spec} carries no tokenizer to compare with {data_dir}'s, {describe(manifest)}: "
                "make sure the model was trained with that one"
            )
        return
    if model_tokenizer_identity(where) != data_identity:
        raise UserError(
            f"{data_dir} was tokenized with {describe(manifest)} but {spec} uses another tokenizer "
            f"(from {where}): the ids would mean other tokens; prepare the data with the model's "
            f"tokenizer (`ds-sft prepare --base_model {spec} ...`)"
        )


def check_model_fits(spec: str, config, data_dir: str | Path, seq_len: int | None) -> None:
    """Refuse data whose token ids or row length the model ``config`` cannot take (its embedding
    rows, its rotary table of ``max_seq_len`` positions). ``seq_len`` None: no rows to check."""
    data_vocab = read_manifest(data_dir).get("tokenizer", {}).get("vocab_size")
    if data_vocab is None:  # nothing recorded (a hand-made data dir): the ids the rows hold decide
        splits = [split for split in ("train", "val") if (Path(data_dir) / split / "index.json").is_file()]
        largest = max((PackedDataset(data_dir, split).largest_token_id for split in splits), default=-1)
        if largest >= config.vocab_size:
            raise UserError(
                f"{data_dir} holds token id {largest:,} but the model has {config.vocab_size:,} embeddings "
                f"({spec}): prepare the data with the model's tokenizer (`ds-sft prepare --base_model ...`)"
            )
    elif data_vocab > config.vocab_size:
        raise UserError(
            f"{data_dir} was tokenized with a {data_vocab:,}-token vocabulary but the model has "
            f"{config.vocab_size:,} embeddings ({spec}: a {config.vocab_size:,}-token vocabulary): prepare "
            "the data with the model's tokenizer (`ds-sft prepare --base_model ...`)"
        )
    if seq_len is not None:
        refuse_rows_past_positions(f"{data_dir} holds rows", seq_len, spec, config.max_seq_len)


def refuse_rows_past_positions(rows: str, seq_len: int, spec: str, positions: int) -> None:
    """The one refusal of rows longer than model ``spec``'s ``positions`` (its RoPE table): past them
    a row indexes beyond the table. ``rows`` says whose rows they are (a data dir's, ``--seq_len``'s)."""
    if seq_len > positions:
        raise UserError(
            f"{rows} of {seq_len:,} tokens but {spec} has {positions:,} positions (the longest row it can "
            f"attend over): prepare the data with --seq_len {positions} or less"
        )


# The torch files load_model reads (nanoGPT-style checkpoints, bare state dicts)
TORCH_FILES = (".pt", ".pth", ".bin", ".ckpt")


def model_positions(spec: str) -> int | None:
    """The positions model ``spec`` is built with, read from its files without its weights, as the
    model layer reads them: a GGUF's ``context_length``; a torch file's ``config`` / ``model_config`` /
    ``model_args`` (later ones win); else the ``model_config.json`` or ``config.json`` beside the
    weights (a run's ``final/``, a Hugging Face folder); the first of :data:`POSITION_FIELDS`, or what
    transformers gives a config naming a ``model_type``; :data:`DEFAULT_POSITIONS` when none says.
    None when the files do not say and the model layer would not either: a folder without a model
    config (a tokenizer's), a GGUF without ``context_length``, a file torch cannot read (loading it as
    a model says why)."""
    from ds_sft.data.tokenizer import model_folder

    path = model_source.resolve_model_path(spec)
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".gguf":
        return _gguf_positions(path)
    if path.is_file() and suffix in TORCH_FILES:
        hints = _torch_file_config(path)
        return None if hints is None else _declared_positions(hints)
    folder = model_folder(path)
    safe_read.refuse_remote_code(folder)  # as loading its tokenizer or its weights would, first
    for name in ("model_config.json", "config.json"):
        if (folder / name).is_file():
            return _declared_positions(safe_read.read_json_object(folder / name, "model config"))
    return DEFAULT_POSITIONS if path.is_file() and suffix == ".safetensors" else None


def _declared_positions(values: dict) -> int | None:
    """The positions a model config declares (see :func:`model_positions`); None when it is not
    one transformers reads, or its value is not a whole number: loading the model refuses it, naming
    the field, and prepare needs no more of the model than its tokenizer."""
    if "model_type" in values:
        from transformers import AutoConfig

        try:
            found = getattr(AutoConfig.for_model(**values), "max_position_embeddings", None)
        except Exception:  # noqa: BLE001  transformers' validators raise anything
            return None
    else:
        named = [values[name] for name in POSITION_FIELDS if values.get(name) is not None]
        found = named[0] if named else DEFAULT_POSITIONS
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def _torch_file_config(path: Path) -> dict | None:
    """The config fields a torch file carries beside its state dict, as the model layer reads them
    (nothing for a bare state dict); None for a file torch cannot read: loading it says why."""
    import io
    import zipfile

    import torch

    safe_read.require_regular_file(path, "checkpoint")  # a FIFO would hang torch.load
    try:  # weights only, mapped: the tensors are not read
        with torch.serialization.safe_globals([io.BytesIO]):
            checkpoint = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except Exception:  # noqa: BLE001  a damaged or hostile file: the weights' load refuses it in one line
        return None
    if not isinstance(checkpoint, dict):
        return None
    hints = {}
    for key in ("config", "model_config", "model_args"):  # later ones win
        if isinstance(checkpoint.get(key), dict):
            hints.update(checkpoint[key])
    return hints


def _gguf_positions(path: Path) -> int | None:
    """A GGUF's ``{architecture}.context_length`` (transformers' ``max_position_embeddings``)."""
    fields = gguf_file.read_gguf(path).fields
    arch = fields.get("general.architecture")
    name = f"{bytes(arch.parts[-1]).decode('utf-8', 'replace')}.context_length" if arch else None
    field = fields.get(name) if name else None
    return int(field.parts[field.data[0]][0]) if field is not None else None
