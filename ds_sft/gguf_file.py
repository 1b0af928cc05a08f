"""A GGUF file (llama.cpp's model format) read with its metadata and tensors checked first.

transformers reads GGUF with the ``gguf`` package's reader and lets a damaged file end in a
traceback (or, for a huge array count past the end, hours and all the memory). :func:`read_gguf`
parses it first with a reader that refuses every read past the end, checks the metadata ds-sft and
transformers read are of their kinds (:data:`GGUF_KINDS`) and that the tensors lie back to back as
writers lay them, so a damaged file is one line.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ds_sft.errors import UserError, first_line
from ds_sft.safe_read import require_regular_file


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
