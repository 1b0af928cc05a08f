"""A damaged or hostile GGUF is one line naming the file: never a traceback, a hang or a huge allocation.

Every model command reads a ``.gguf`` ``--base_model`` through ``load_model``, which parses it first
with a reader that refuses any read past the end of the file and checks that the tensors' data lie
back to back (:func:`ds_sft.gguf_file.read_gguf`), then lets transformers build the model. The files
below start from one valid tiny llama GGUF and damage one item each, at byte offsets found by
:mod:`tests.model.gguf_layout`: cut at every item boundary, wrong magic, counts, lengths and dims
too large, tensor offsets out of range, overlapping or leaving gaps, tensor types that do not match
the bytes, value types that do not exist, and metadata of the wrong type.
"""

from __future__ import annotations

import struct
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from tests.gguf_files import write_model_gguf
from tests.model.gguf_layout import layout

gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install -e '.[gguf]')")
KIND = gguf.GGUFValueType
TINY = ModelConfig.preset("tiny")
# a token list (an array of strings) and token types and a byte array (arrays of scalars)
ARRAYS = {
    "tokenizer.ggml.tokens": ([f"t{i}" for i in range(TINY.vocab_size)], KIND.ARRAY),
    "tokenizer.ggml.token_type": ([1] * TINY.vocab_size, KIND.ARRAY),
}


@cache
def valid_bytes() -> bytes:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "valid.gguf"
        return write_model_gguf(path, TINY, LlamaModel(TINY).state_dict(), dict(ARRAYS)).read_bytes()


def patched(data: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def patched_file(folder: Path, at: int, fmt: str, value) -> Path:
    """The valid file with the one field at ``at`` overwritten, written into ``folder``."""
    path = folder / "patched.gguf"
    path.write_bytes(patched(valid_bytes(), at, fmt, value))
    return path


def assert_one_line(path: Path) -> str:
    with pytest.raises(UserError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_the_valid_file_loads(tmp_path):
    """The positive control: every case below damages this file, which loads."""
    path = tmp_path / "valid.gguf"
    path.write_bytes(valid_bytes())
    assert load_model(path).config.n_layers == TINY.n_layers


def _boundaries() -> list[int]:
    """Every item boundary of the header, the metadata and the tensor infos, and points in the data."""
    data = valid_bytes()
    found = layout(data)
    items = found.item_lengths[:: max(1, len(found.item_lengths) // 4)]  # a few of the 256 tokens
    cuts = {0, 3, 4, 8, 16, 24, *found.string_lengths, *items, *found.array_lengths, found.info_end}
    for info in found.keys.values():
        cuts |= {info["type"], info["value"]}
    for info in found.tensors:
        cuts |= {info["n_dims"], *info["dims"], info["type"], info["offset"]}
    cuts |= {c + 1 for c in list(cuts)}  # and one byte into each
    return sorted(c for c in cuts if c < len(data)) + [len(data) - 1, len(data) // 2, found.info_end + 100]


@pytest.mark.parametrize("cut", _boundaries())
def test_a_file_cut_at_any_item_boundary_is_one_line(tmp_path, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(valid_bytes()[:cut])
    assert_one_line(path)


@settings(max_examples=40)
@given(magic=st.binary(min_size=4, max_size=4).filter(lambda m: m != b"GGUF"))
def test_a_wrong_magic_is_one_line(tmp_path_factory, magic):
    path = tmp_path_factory.mktemp("magic") / "m.gguf"
    path.write_bytes(magic + valid_bytes()[4:])
    assert "truncated or corrupt" in assert_one_line(path)


HUGE = [2**31, 2**40, 2**63 - 1, 2**64 - 1]


def _count_cases():
    data = valid_bytes()
    found = layout(data)
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    cases = [(f"tensor count {n}", 8, "<Q", n) for n in [n_tensors + 1, *HUGE]]
    cases += [(f"kv count {n}", 16, "<Q", n) for n in [n_kv + 1, *HUGE]]
    for i, at in enumerate(found.string_lengths + found.item_lengths[::64]):
        (length,) = struct.unpack_from("<Q", data, at)
        cases += [(f"string {i} length {n}", at, "<Q", n) for n in [length + 1, len(data), *HUGE[1:3]]]
    for i, at in enumerate(found.array_lengths):
        (count,) = struct.unpack_from("<Q", data, at)
        cases += [(f"array {i} count {n}", at, "<Q", n) for n in [count + 1, 10**9, *HUGE[2:]]]
    return cases


@pytest.mark.parametrize(("name", "at", "fmt", "value"), _count_cases(), ids=lambda v: str(v)[:40])
def test_counts_and_lengths_past_the_file_are_one_line(tmp_path, name, at, fmt, value):
    assert_one_line(patched_file(tmp_path, at, fmt, value))


def test_a_billion_one_byte_items_past_the_end_is_one_line_not_a_loop(tmp_path):
    """The stock reader looped once per item past the end, appending empty parts: hours, then the OOM
    killer. The token-type array becomes 10^9 uint8 items."""
    data = valid_bytes()
    at = layout(data).array_lengths[-1]
    path = tmp_path / "bytes.gguf"
    path.write_bytes(patched(patched(data, at - 4, "<I", int(KIND.UINT8)), at, "<Q", 10**9))
    assert "reads past the end" in assert_one_line(path)


def _tensor_cases():
    data = valid_bytes()
    found = layout(data)
    offsets = [struct.unpack_from("<Q", data, t["offset"])[0] for t in found.tensors]
    cases = []
    for i in (0, 1, 5, len(found.tensors) - 1):
        info = found.tensors[i]
        cases += [(f"tensor {i} n_dims {n}", info["n_dims"], "<I", n) for n in (0, 5, 1000, 2**32 - 1)]
        cases += [(f"tensor {i} dim {n}", info["dims"][0], "<Q", n) for n in (0, 3, 2**32, 2**63)]
        cases += [
            (f"tensor {i} type {t}", info["type"], "<I", t)
            for t in (1, 2, 8, 12, 24, 26, 30, 99, 2**32 - 1)  # F16 Q4_0 Q8_0 Q4_K I8 I32 BF16, none
        ]
        here, other = offsets[i], offsets[(i + 1) % len(offsets)]
        cases += [
            (f"tensor {i} offset {name}", info["offset"], "<Q", value)
            for name, value in [
                ("past the end", len(data)),
                ("huge", 2**63),
                ("onto another", other),
                ("one alignment on", here + 32),
                ("unaligned", here + 1),
            ]
        ]
    return cases


@pytest.mark.parametrize(("name", "at", "fmt", "value"), _tensor_cases(), ids=lambda v: str(v)[:40])
def test_tensor_infos_that_do_not_match_the_data_are_one_line(tmp_path, name, at, fmt, value):
    """Overlapping tensors or a type whose size differs from the bytes loaded wrong weights silently."""
    assert_one_line(patched_file(tmp_path, at, fmt, value))


@pytest.mark.parametrize("key", sorted(layout(valid_bytes()).keys))
@pytest.mark.parametrize("value_type", [13, 99, 2**32 - 1])
def test_a_value_type_that_does_not_exist_is_one_line(tmp_path, key, value_type):
    assert_one_line(patched_file(tmp_path, layout(valid_bytes()).keys[key]["type"], "<I", value_type))


# Metadata of the wrong type or value, written by the gguf writer (a well-formed file that lies).
WRONG_METADATA = {
    "llama.block_count": [("2", KIND.STRING), (2.0, KIND.FLOAT32), (0, KIND.UINT32), (2**31, KIND.UINT32)],
    "llama.embedding_length": [(True, KIND.BOOL), (-64, KIND.INT32), ("64", KIND.STRING)],
    "llama.attention.head_count": [(0, KIND.UINT32), (3, KIND.UINT32), ("x", KIND.STRING)],
    "llama.attention.head_count_kv": [(3, KIND.UINT32), (8, KIND.UINT32)],
    "llama.feed_forward_length": [(0, KIND.UINT32), (7, KIND.UINT32)],
    "llama.attention.layer_norm_rms_epsilon": [("tiny", KIND.STRING), (-1.0, KIND.FLOAT32)],
    "llama.context_length": [(2**31, KIND.UINT32), ("long", KIND.STRING)],
    "llama.vocab_size": [("a", KIND.STRING)],
    "general.architecture": [("gpt2", KIND.STRING), ("nonsense", KIND.STRING)],
}


@pytest.mark.parametrize(
    ("key", "value", "value_type"),
    [(key, value, value_type) for key, wrong in WRONG_METADATA.items() for value, value_type in wrong],
)
def test_metadata_of_the_wrong_type_or_value_is_one_line(tmp_path, key, value, value_type):
    torch.manual_seed(0)
    path = write_model_gguf(
        tmp_path / "meta.gguf", TINY, LlamaModel(TINY).state_dict(), {key: (value, value_type)}
    )
    assert_one_line(path)


# metadata within ds-sft's bounds that describes a model far larger than the file's tensors
OVERSIZED_METADATA = {
    "llama.block_count": 1000,
    "llama.feed_forward_length": 262_144,
    "llama.embedding_length": 4096,
}


@pytest.mark.parametrize(("key", "value"), OVERSIZED_METADATA.items())
def test_metadata_describing_more_weights_than_the_tensors_is_refused_before_building_it(
    tmp_path, key, value
):
    """transformers builds the model the metadata describes and fills what the tensors lack at random
    (0.5-1 GB here), so the count of the metadata's weights is checked against the tensors' first."""
    torch.manual_seed(0)
    path = write_model_gguf(
        tmp_path / "big.gguf", TINY, LlamaModel(TINY).state_dict(), {key: (value, KIND.UINT32)}
    )
    assert "GGUF metadata describes" in assert_one_line(path)


@pytest.mark.parametrize("damage", ["overlap", "cut", "bytes"])
def test_export_of_a_damaged_gguf_prints_one_line(tmp_path, capfd, damage, word_tokenizer):
    from ds_sft.cli import main

    data = valid_bytes()
    found = layout(data)
    if damage == "overlap":
        other = struct.unpack_from("<Q", data, found.tensors[2]["offset"])[0]
        data = patched(data, found.tensors[3]["offset"], "<Q", other)
    elif damage == "cut":
        data = data[: found.info_end + 7]
    else:
        at = found.array_lengths[-1]
        data = patched(patched(data, at - 4, "<I", int(KIND.UINT8)), at, "<Q", 10**9)
    path = tmp_path / "base.gguf"
    path.write_bytes(data)
    word_tokenizer.save_pretrained(tmp_path / "tok")
    capfd.readouterr()
    code = main(
        [
            "export",
            "--base_model",
            str(path),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--hf",
            str(tmp_path / "out"),
        ]
    )
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and str(path) in err[0], err


# Tokenizer metadata of the wrong kind: transformers' GGUF tokenizer reader raised TypeError or
# AttributeError tracebacks ("'int' object is not iterable") on each.
TOKENS = ARRAYS["tokenizer.ggml.tokens"][0]
WRONG_TOKENIZER_METADATA = {
    "tokens of integers": {"tokenizer.ggml.tokens": (list(range(len(TOKENS))), KIND.ARRAY)},
    "tokens a string": {"tokenizer.ggml.tokens": ("abc", KIND.STRING)},
    "merges of integers": {"tokenizer.ggml.merges": ([1, 2], KIND.ARRAY)},
    "token types of strings": {"tokenizer.ggml.token_type": (["a"] * len(TOKENS), KIND.ARRAY)},
    "token types shorter than the tokens": {"tokenizer.ggml.token_type": ([1] * 3, KIND.ARRAY)},
    "model an integer": {"tokenizer.ggml.model": (5, KIND.UINT32)},
    "eos id a string": {"tokenizer.ggml.eos_token_id": ("2", KIND.STRING)},
    "bos id an array": {"tokenizer.ggml.bos_token_id": ([1], KIND.ARRAY)},
    "chat template an integer": {"tokenizer.chat_template": (7, KIND.INT32)},
}


@pytest.mark.parametrize("case", WRONG_TOKENIZER_METADATA)
def test_tokenizer_metadata_of_the_wrong_kind_is_one_line_for_the_model_and_the_tokenizer(tmp_path, case):
    from ds_sft.data.tokenizer import load_tokenizer

    metadata = {**ARRAYS, "tokenizer.ggml.model": ("gpt2", KIND.STRING), **WRONG_TOKENIZER_METADATA[case]}
    torch.manual_seed(0)
    path = write_model_gguf(tmp_path / "tok.gguf", TINY, LlamaModel(TINY).state_dict(), metadata)
    assert "metadata tokenizer." in assert_one_line(path)
    with pytest.raises(UserError) as err:
        load_tokenizer(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
