"""Where each item of a GGUF file lies (byte offsets), to damage one item at a time in tests.

GGUF v3: magic ``GGUF``, version u32, tensor count u64, kv count u64; each kv: key (u64 length +
bytes), value type u32, value (scalars; string = u64 length + bytes; array = item type u32, count u64,
items); each tensor info: name, n_dims u32, dims u64 x n_dims, ggml type u32, data offset u64; then
padding to the alignment and the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by value type
STRING, ARRAY = 8, 9


@dataclass
class Layout:
    counts: int = 16  # tensor count at 8, kv count at 16
    keys: dict[str, dict] = field(default_factory=dict)  # key -> {"type": off, "value": off, ...}
    tensors: list[dict] = field(
        default_factory=list
    )  # {"name":, "n_dims": off, "dims": [off], "type": off, "offset": off}
    string_lengths: list[int] = field(default_factory=list)  # offsets of the u64 length of each key, name
    item_lengths: list[int] = field(default_factory=list)  # ... and of each string item of an array
    array_lengths: list[int] = field(default_factory=list)  # offsets of every u64 array count
    info_end: int = 0  # where the tensor infos end (the padding to the data starts)


def layout(data: bytes) -> Layout:
    out = Layout()
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string(at: int, item: bool = False) -> tuple[str, int]:
        (out.item_lengths if item else out.string_lengths).append(at)
        (length,) = struct.unpack_from("<Q", data, at)
        return data[at + 8 : at + 8 + length].decode(), at + 8 + length

    def value(at: int, kind: int, item: bool = False) -> int:
        if kind == STRING:
            return string(at, item)[1]
        if kind == ARRAY:
            item_kind, count = struct.unpack_from("<IQ", data, at)
            out.array_lengths.append(at + 4)
            at += 12
            for _ in range(count):
                at = value(at, item_kind, item=True)
            return at
        return at + SCALAR_SIZES[kind]

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        out.keys[key] = {"type": pos, "value": pos + 4, "kind": kind}
        pos = value(pos + 4, kind)
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        info = {"name": name, "n_dims": pos, "dims": [pos + 4 + 8 * i for i in range(n_dims)]}
        pos += 4 + 8 * n_dims
        info.update(type=pos, offset=pos + 4)
        out.tensors.append(info)
        pos += 12
    out.info_end = pos
    return out
