"""The training mix: which rows each source gives to val and how often each trains, all seeded per source.

``split_val`` holds out ``--val_fraction`` of each source (at least ``--min_val_rows``, at most half);
``mix_indices`` draws the training documents: a source of weight ``w`` gives floor(w) whole epochs
plus a seeded share of distinct rows, and ``--max_examples`` scales every source by one factor first.
Each source draws from its own generator (:func:`source_rng`), so adding, removing or reweighting one
source leaves the others' draws as they were. ``check_mix_fits`` refuses, before anything is drawn, a
mix larger than the machine's memory.
"""

from __future__ import annotations

import argparse
import zlib

import numpy as np

from ds_sft.errors import UserError


def source_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, source name): one source's draws do not shift when another changes."""
    # surrogatepass: a name holding lone surrogates (argv bytes that are not UTF-8) still hashes
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8", "surrogatepass"))])


def parse_mix(text: str, names: list[str]) -> dict[str, float]:
    """``--mix NAME=W,...`` -> every source's weight (1 where not given); a name given twice is refused."""
    weights = dict.fromkeys(names, 1.0)
    given: set[str] = set()
    for pair in filter(None, text.split(",")):
        name, eq, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not eq or name.strip() not in weights or weight < 0:
            raise UserError(f"--mix {text!r}: expected NAME=WEIGHT pairs (weights >= 0) over sources {names}")
        if name.strip() in given:
            raise UserError(
                f"--mix {text!r}: {name.strip()} is given more than once; give each source one weight"
            )
        given.add(name.strip())
        weights[name.strip()] = weight
    return weights


def split_val(
    records: list[dict], candidates: np.ndarray, names: list[str], args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``val_fraction`` of each source (at least ``min_val_rows``, at most half), seeded.

    ``candidates`` are indices into ``records``; returns (train indices, val indices).
    """
    sources = np.array([records[i]["source"] for i in candidates.tolist()], dtype=object)
    train, val = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for name in names:
        rows = candidates[sources == name]
        n_val = max(round(args.val_fraction * len(rows)), args.min_val_rows) if args.val_fraction > 0 else 0
        order = source_rng(args.seed, name).permutation(len(rows))
        n_val = min(n_val, len(rows) // 2)
        val.append(np.sort(rows[order[:n_val]]))
        train.append(np.sort(rows[order[n_val:]]))
    return np.concatenate(train), np.concatenate(val)


# Bytes a mixed training example costs while the mix is made (its index tiled, drawn and permuted:
# three int64 arrays), and bytes a token of the kept examples costs while they are gathered
# (Documents.select: int64 positions, offsets and sources, the int32 token and its mask byte).
MIX_BYTES_PER_EXAMPLE = 24
SELECT_BYTES_PER_TOKEN = 37


def check_mix_fits(lengths: np.ndarray, source_ids: np.ndarray, names: list[str], weights, args) -> float:
    """The bytes making the mix takes (returned), or one line, before it is made, when they are more than
    the machine has: ``--mix alpaca=1000`` (the flag's bound) on Alpaca's 52k rows asked numpy for ~0.5 TB
    to gather 13 G tokens, a MemoryError traceback after tokenizing."""
    from ds_sft.machine import available_memory

    members = np.bincount(source_ids, minlength=len(names))
    tokens = np.bincount(source_ids, weights=lengths, minlength=len(names))
    total = sum(weights[name] * members[sid] for sid, name in enumerate(names))
    kept = min(1.0, args.max_examples / total) if args.max_examples and total else 1.0
    kept_tokens = kept * sum(weights[name] * tokens[sid] for sid, name in enumerate(names))
    need = total * MIX_BYTES_PER_EXAMPLE + kept_tokens * SELECT_BYTES_PER_TOKEN
    available = available_memory()
    if available is not None and need > available:
        raise UserError(
            f"--mix {args.mix!r} makes {total:,.0f} training examples ({kept_tokens:,.0f} tokens kept), "
            f"{need / 2**30:,.1f} GiB to mix, more than the {available / 2**30:,.1f} GiB this machine has "
            "available: lower the --mix weights"
            + ("" if args.max_examples else " or cap the examples with --max_examples")
        )
    return need


def mix_indices(
    source_ids: np.ndarray, names: list[str], weights: dict[str, float], args
) -> tuple[np.ndarray, int]:
    """Document indices of the training mix: ``w`` copies of a source = floor(w) epochs + a seeded share.

    ``--max_examples`` scales every source's count by the same factor (the remainder going to the
    largest fractional shares) before any row is drawn, and each count is drawn as above: whole epochs
    and a share of distinct rows, so no row is repeated while another of its source is left out.
    Returns (the indices, capped to ``--max_examples``; how many the mix held before the cap).
    """
    members = [np.flatnonzero(source_ids == sid) for sid in range(len(names))]
    counts = np.array([int(weights[name]) * len(mine) + round(weights[name] % 1.0 * len(mine))
                       for name, mine in zip(names, members, strict=True)], dtype=np.int64)  # fmt: skip
    total = int(counts.sum())
    if args.max_examples is not None and total > args.max_examples:
        exact = counts * args.max_examples / total
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact, kind="stable")[: args.max_examples - counts.sum()]] += 1
    chosen = []
    for name, mine, count in zip(names, members, counts.tolist(), strict=True):
        rng = source_rng(args.seed, name)
        whole, share = divmod(count, len(mine)) if len(mine) else (0, 0)
        extra = rng.choice(mine, size=share, replace=False)
        picked = np.concatenate([np.tile(mine, whole), np.sort(extra)])
        chosen.append(picked[rng.permutation(len(picked))])
    return (np.concatenate(chosen) if chosen else np.zeros(0, np.int64)), total
