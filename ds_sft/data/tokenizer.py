"""Find the tokenizer of a base model, whatever form it comes in.

``load_tokenizer(spec)`` accepts

- ``gpt2``: the GPT-2 byte-level BPE in ``../shared/tokenizers/gpt2`` when present (else the hub's),
- a ``tokenizer.json`` file (the ``tokenizers`` library's format),
- a directory: a Hugging Face tokenizer (``save_pretrained`` layout), or one holding ``tokenizer/``
  (a prepared data dir, a training run's ``final/``),
- a ``.gguf`` file (the tokenizer and chat template live in its metadata),
- a model alias such as ``smollm2-135m-instruct`` or a Hugging Face id such as ``Qwen/Qwen3-0.6B``
  (see :func:`ds_sft.model_source.resolve_model_path`),
- bare weights without a tokenizer (a nanoGPT-style ``.pt``, a checkpoint dir): GPT-2's, with a note,

and returns a fast ``transformers`` tokenizer with an EOS token: training appends EOS to every
response, so a tokenizer without one is refused. A bare ``tokenizer.json`` carries no special-token
roles, so EOS is taken from the well-known end-of-text tokens it contains. A folder whose config
names a special token its vocabulary lacks is refused too: transformers would add it as a new id;
so is one whose normalizer can grow a text without bound (:mod:`ds_sft.data.normalizer_bounds`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ds_sft import gguf_file, locations, model_source, safe_read
from ds_sft.data.normalizer_bounds import refuse_growing_normalizer
from ds_sft.errors import UserError, first_line, is_native_panic
from ds_sft.vocab import id_bound

# End-of-text tokens of common vocabularies, tried in order when a tokenizer does not name its EOS.
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>")
# Bare weights (a nanoGPT-style base .pt, a ds-sft checkpoint) carry no tokenizer: those models use GPT-2's.
WEIGHT_FILES = (".pt", ".bin", ".safetensors")
# GGUF metadata keys (tokenizer.ggml.<key>_token_id) and the tokenizer attributes they name.
GGUF_SPECIAL_TOKENS = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


MAX_TOKEN_ID = 2**31 - 1  # token ids are int32 from tokenization to the model


def _check_id_range(tokenizer_file: Path) -> None:
    """Refuse a tokenizer.json holding an id past :data:`MAX_TOKEN_ID`, read by the tokenizers library
    alone: transformers' wrapper spent 35 s on one id of 3e9 before anything could refuse it."""
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the tokenizers library raises plain Exceptions for a malformed file
        raise UserError(f"{tokenizer_file}: not a tokenizer.json ({first_line(err)})") from None
    largest = max(backend.get_vocab(with_added_tokens=True).values(), default=0)
    if largest > MAX_TOKEN_ID:
        raise UserError(
            f"{tokenizer_file}: has token id {largest:,}, past 2**31 - 1; no model embeds that many"
        )


def _from_file(tokenizer_file: Path):
    from transformers import PreTrainedTokenizerFast

    _check_id_range(tokenizer_file)
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    except Exception as err:  # the tokenizers library raises plain Exceptions for a malformed file
        raise UserError(f"{tokenizer_file}: not a tokenizer.json ({first_line(err)})") from None


def _from_pretrained(directory: Path, **kwargs):
    """A tokenizer folder (or ``gguf_file=`` in it) through transformers, never running its code.

    A folder whose configs transformers cannot read falls back to its ``tokenizer.json`` alone, with
    a note: that loses the chat template and the special-token roles the config gave."""
    from transformers import AutoTokenizer

    if not kwargs:
        safe_read.refuse_remote_code(directory)
        if (directory / "tokenizer.json").is_file():
            safe_read.require_regular_file(directory / "tokenizer.json", "tokenizer")
            _check_id_range(directory / "tokenizer.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **kwargs)
    except Exception as err:  # a config of wrong types: TypeError, AttributeError... deep in transformers
        if (directory / "tokenizer.json").is_file() and not kwargs:
            print(
                f"note: transformers cannot read the tokenizer in {directory} ({first_line(err)}); "
                "using its tokenizer.json alone, without the chat template and special-token roles "
                "of its tokenizer_config.json"
            )
            return _from_file(directory / "tokenizer.json")
        raise UserError(f"could not load a tokenizer from {directory}: {first_line(err)}") from None
    if not kwargs:
        refuse_special_tokens_outside_vocab(tokenizer, directory)
    return tokenizer


def vocabulary_of_files(tokenizer, directory: Path) -> set[str]:
    """The tokens a tokenizer folder's files define, before transformers adds the special tokens its
    config names: ``tokenizer.json``'s vocabulary with its added tokens (or, from slow files such as
    ``vocab.json`` or ``tokenizer.model``, the base vocabulary), and the added tokens
    ``tokenizer_config.json`` and ``added_tokens.json`` list with their ids."""
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokens = set(Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True))
    else:
        tokens = {token for token, i in tokenizer.get_vocab().items() if i < tokenizer.vocab_size}
    if (directory / "tokenizer_config.json").is_file():
        config = safe_read.read_json_object(directory / "tokenizer_config.json", "tokenizer config")
        listed = config.get("added_tokens_decoder") or {}
        tokens |= {entry.get("content") for entry in listed.values() if isinstance(entry, dict)}
    if (directory / "added_tokens.json").is_file():
        tokens |= set(safe_read.read_json_object(directory / "added_tokens.json", "added_tokens.json"))
    return tokens


def refuse_special_tokens_outside_vocab(tokenizer, directory: Path) -> None:
    """Refuse a tokenizer folder whose config names special tokens its files do not define.

    transformers adds such a token as a new id past the vocabulary, silently: an EOS the model never
    saw (it would not learn to stop), a pad id past its embedding table. A typo in the config, not a
    choice, so the user fixes the config or passes the model's own tokenizer.
    """
    vocab = vocabulary_of_files(tokenizer, directory)
    named = [(role, token) for role, token in tokenizer.special_tokens_map.items() if isinstance(token, str)]
    with_role = {token for _, token in named}
    named += [("special token", token) for token in tokenizer.all_special_tokens if token not in with_role]
    outside = ", ".join(f"{role} {token!r}" for role, token in named if token not in vocab)
    if outside:
        raise UserError(
            f"{directory}: its tokenizer config names {outside}, which its vocabulary of {len(vocab)} "
            "tokens does not hold, so each would become a new id the model never saw; correct the "
            "name in tokenizer_config.json (or special_tokens_map.json), or pass the model's own tokenizer"
        )


def gguf_special_token_ids(fields) -> dict[str, int]:
    """The special tokens a GGUF's metadata names, by tokenizer attribute: ``{"eos_token": 2, ...}``.
    ``fields`` is ``gguf.GGUFReader(path).fields``."""
    found = {}
    for key, attribute in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            found[attribute] = int(field.parts[field.data[0]][0])
    return found


def _from_gguf(path: Path):
    """The tokenizer in a GGUF's metadata, its special tokens set from the ids the file records.

    The ids win over transformers' converter because some releases get them wrong: 5.17's llama
    converter swaps BOS and EOS, which would train ``<|im_start|>`` as the end of every response.
    They are checked first, as transformers indexes its token list with them unchecked."""
    fields = gguf_file.read_gguf(path, "tokenizer").fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise UserError(f"{path}: this GGUF holds no tokenizer; pass --tokenizer with the model's own")
    special = gguf_special_token_ids(fields)
    for attribute, token_id in special.items():
        if not 0 <= token_id < len(tokens.data):
            raise UserError(
                f"{path}: its metadata names token id {token_id} as {attribute}, but the vocabulary has "
                f"{len(tokens.data)} tokens; the file is damaged: export it again"
            )
    tokenizer = _from_pretrained(path.parent, gguf_file=path.name)
    for attribute, token_id in special.items():
        setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def _gpt2():
    shared = locations.shared_dir()
    if shared is not None and (shared / "tokenizers" / "gpt2" / "tokenizer.json").is_file():
        return _from_pretrained(shared / "tokenizers" / "gpt2")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained("gpt2", trust_remote_code=False)
    except Exception as err:
        raise UserError(
            f"the GPT-2 tokenizer is not available offline ({first_line(err)}); pass --tokenizer PATH"
        ) from None


def model_folder(path: Path) -> Path:
    """The folder holding what is stored with the model at ``path``: a weights file's folder
    (final/model.safetensors: its config, tokenizer and records lie beside it), a run's ``final/``."""
    if path.is_file():
        path = path.parent
    return path / "final" if (path / "final").is_dir() else path


def stored_tokenizer(path: Path) -> Path | None:
    """The tokenizer stored with the model at ``path`` (a model or run folder, a weights file, a GGUF):
    its ``tokenizer/`` folder, the folder holding its ``tokenizer*.json``, or the GGUF itself; None when
    it carries none (a nanoGPT-style ``.pt``, a ds-sft weights folder without ``tokenizer/``)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    folder = model_folder(path)
    if (folder / "tokenizer").is_dir():
        return folder / "tokenizer"
    return folder if any(folder.glob("tokenizer*")) else None


def holds_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a model's weights, or the config they are read with."""
    weights = (path for suffix in WEIGHT_FILES for path in folder.glob(f"*{suffix}"))
    return any(weights) or any((folder / name).is_file() for name in ("model_config.json", "config.json"))


def _load(spec: str):
    if spec.lower() == "gpt2":
        return _gpt2()
    forms = "a tokenizer.json, a tokenizer directory, a .gguf file, 'gpt2'"
    path = model_source.resolve_model_path(spec, what="tokenizer", forms=forms)
    if path.is_dir() or path.suffix in WEIGHT_FILES:
        stored = stored_tokenizer(path)
        if stored is None and not holds_weights(model_folder(path)):
            raise UserError(
                f"{path} holds no tokenizer and no model weights (a training run has them in final/ once it "
                "has finished): pass the model's folder or weights file, or the tokenizer itself"
            )
        if stored is None:
            # the note cannot know which flag named the path: it says what happens, not which flag to change
            print(
                f"note: no tokenizer files in {path}; using GPT-2's, the one bare nanoGPT-style weights use"
            )
            return _gpt2()
        if stored.is_file():  # a GGUF
            return _from_gguf(stored)
        path = stored
    if path.is_dir():
        return _from_pretrained(path)
    if path.suffix == ".gguf":
        return _from_gguf(path)  # gguf_file.read_gguf refuses anything but a regular file
    if path.suffix == ".json":
        safe_read.require_regular_file(path, "tokenizer")  # a FIFO or a device would hang the reader
        return _from_file(path)
    raise UserError(f"{path}: not a tokenizer; pass a tokenizer.json, a directory, a .gguf file or 'gpt2'")


def control_tokens(tokenizer) -> list[str]:
    """The markers the tokenizer turns into one id before its model sees them: its special tokens,
    and each added token matched on the raw text (``normalized=False``) that is spelled with markup
    (``<``, ``|``, ``[``...), marked special or not: a chat template's ``<|im_start|>`` is often an
    added token without the flag, and data spelling it forge a turn. Added words and whitespace runs,
    which some vocabularies add as tokens, are text."""
    added = [
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special
        or (not token.normalized and any(not (c.isalnum() or c.isspace()) for c in token.content))
    ]
    return list(dict.fromkeys([*tokenizer.all_special_tokens, *added]))


# A chat template's name becomes a file name (chat_templates/NAME.jinja) when the tokenizer is saved
TEMPLATE_NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}"


def load_tokenizer(spec: str):
    """Load the tokenizer named by ``spec`` (see the module docstring) and make sure it has an EOS."""
    tokenizer = _load(str(spec))
    refuse_growing_normalizer(tokenizer.backend_tokenizer, repr(str(spec)))
    refuse_panicking_pipeline(tokenizer.backend_tokenizer, repr(str(spec)))
    if id_bound(tokenizer) > MAX_TOKEN_ID + 1:  # a GGUF's vocabulary, or a folder without tokenizer.json
        raise UserError(f"tokenizer {spec!r} has a token id past 2**31 - 1; no model embeds that many")
    if tokenizer.eos_token_id is None:
        vocab = tokenizer.get_vocab()
        found = next((token for token in KNOWN_EOS if token in vocab), None)
        if found is None:
            raise UserError(f"tokenizer {spec!r} has no EOS token and none of {KNOWN_EOS}; use one that does")
        tokenizer.eos_token = found
    templates = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    odd = next((name for name in templates if not re.fullmatch(TEMPLATE_NAME, str(name))), None)
    if odd is not None:  # transformers refuses it only when it saves the tokenizer, in a traceback
        raise UserError(
            f"tokenizer {spec!r}: chat template name {str(odd)!r:.60} is not a plain name "
            "(letters, digits, _ . -, not starting with a dot); rename it in tokenizer_config.json"
        )
    # Register the special tokens in the backend as save_pretrained does; without this a tokenizer and
    # its saved copy (DATA/tokenizer, RUN/final) split a literal "<|endoftext|>" in text differently.
    from tokenizers import AddedToken

    specials = [AddedToken(token, special=True, normalized=False) for token in tokenizer.all_special_tokens]
    tokenizer.backend_tokenizer.add_special_tokens(specials)
    # A tokenizer.json saved with padding or truncation enabled applies them to every encode: pad
    # tokens were trained as answer text and prompts were cut, silently. Documents are packed here.
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    return tokenizer


# A sentence every tokenizer meets in its data: words, punctuation, digits, a newline, accents, CJK.
PROBE_TEXT = "Hello, world! 12 + 30 = 42.\nÉté à Paris, 東京で."


def refuse_panicking_pipeline(backend, name: str) -> None:
    """Encode and decode :data:`PROBE_TEXT` once. A damaged part (a SentencePiece charsmap whose trie
    is empty, ...) panics in Rust on any text: refused here, naming the tokenizer, rather than after
    the data has been read. An ordinary error (a word-level vocabulary without an unknown token) is
    left to the data that meets it."""
    try:
        backend.decode(backend.encode(PROBE_TEXT).ids)
    except Exception:  # an ordinary error: see the docstring
        pass
    except BaseException as err:
        if not is_native_panic(err):  # Ctrl-C goes through
            raise
        raise UserError(
            f"tokenizer {name}: it fails on a plain sentence ({first_line(err)}): its tokenizer.json "
            "is damaged; pass the model's own tokenizer"
        ) from None


def pad_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (GPT-2's and LLaMA's
    tokenizers have no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def start_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (a BOS), without any it puts after
    (an EOS, a ``[SEP]``): a prompt starts a document but its answer follows it, so only the start
    belongs there. Read from where :data:`PROBE_TEXT` sits in its own encoding with special tokens;
    a post-processor that does not keep the text whole between a start and an end is refused."""
    backend = tokenizer.backend_tokenizer
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    try:
        whole = backend.encode(PROBE_TEXT, add_special_tokens=True)
        plain = backend.encode(PROBE_TEXT, add_special_tokens=False).ids
    except Exception as err:  # a word-level vocabulary without an unknown token, ...
        raise UserError(f"tokenizer {name}: cannot encode a plain sentence ({first_line(err)})") from None
    text_at = [i for i, sequence in enumerate(whole.sequence_ids) if sequence is not None]
    if not text_at or whole.ids[text_at[0] : text_at[-1] + 1] != plain:
        raise UserError(
            f"tokenizer {name}: its post-processor does not keep a text whole between the tokens it "
            "adds, so no start-of-text ids can be told apart; fix post_processor in its tokenizer.json"
        )
    return whole.ids[: text_at[0]]


def continuation_backend(backend):
    """``backend``, or a copy of it that tokenizes a text as the continuation of another: without the
    word mark SentencePiece-style tokenizers put at the start of a text (a Metaspace pre-tokenizer's
    ``prepend_scheme``, or a ``Prepend`` normalizer: LLaMA-2, TinyLlama, Mistral). Each answer and
    each later turn is tokenized apart, and with the mark every answer began with a space token the
    document's text does not hold ("### Response:\\n Hello"), trained into every answer."""
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    changed = False

    def unmarked(part: dict | None) -> dict | None:
        nonlocal changed
        if part is None:
            return None
        if part.get("type") == "Sequence":
            key = "pretokenizers" if "pretokenizers" in part else "normalizers"
            kept = [unmarked(item) for item in part[key]]
            return {**part, key: [item for item in kept if item is not None]}
        if part.get("type") == "Prepend":
            changed = True
            return None
        if part.get("type") == "Metaspace" and (
            part.get("prepend_scheme", "never") != "never" or part.get("add_prefix_space")
        ):
            changed = True
            return {**part, "prepend_scheme": "never", "add_prefix_space": False}
        return part

    state["normalizer"] = unmarked(state.get("normalizer"))
    state["pre_tokenizer"] = unmarked(state.get("pre_tokenizer"))
    return Tokenizer.from_str(json.dumps(state)) if changed else backend
