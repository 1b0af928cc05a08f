"""What prepare says of its output: the manifest's record of the rows (:func:`count_rows`, the token
lengths, the tokenizer, the warnings a skimming reader would miss) and the summary table it prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ds_sft.data.prepare_inputs import tokenizer_spec
from ds_sft.data.prepare_selection import DROP_REASON_TOO_LONG
from ds_sft.errors import one_line

if TYPE_CHECKING:
    from ds_sft.data.prepare_inputs import Inputs
    from ds_sft.data.prepare_selection import Chosen
    from ds_sft.data.tokenize import Documents


def count_rows(chosen: Chosen, train_docs: Documents, inputs: Inputs, read: list[dict], drops, args) -> dict:
    """The manifest's ``counts``: per source, its rows read, kept, in train and val, in the training mix,
    and dropped by reason (rows_in = kept + the sum of dropped), its conversations by how their turns
    were masked, and with --truncate the rows cut."""
    from ds_sft.data.tokenize import ROUTES

    rows_in = {info["name"]: info["rows"] for info in read}
    dropped = drops.by_source()
    kept, is_val = chosen.kept, chosen.is_val
    train_after_mix = np.bincount(train_docs.source_ids, minlength=len(inputs.names))
    kept_routes, kept_sources = chosen.docs.routes, chosen.sources[kept]  # docs: the kept rows, in order
    counts = {}
    for i, name in enumerate(inputs.names):
        mine = chosen.sources == i
        counts[name] = {
            "rows_in": rows_in[name],
            "kept": int((kept & mine).sum()),
            "train": int((kept & mine & ~is_val).sum()),
            "val": int((kept & mine & is_val).sum()),
            "train_after_mix": int(train_after_mix[i]),
            "weight": inputs.weights[name],
            "dropped": dropped.get(name, {}),
            # kept conversations trained on every turn, by how their turns were masked (tokenize.ROUTES)
            "turns_masked_by": {
                route: int((kept_routes[kept_sources == i] == code).sum())
                for code, route in enumerate(ROUTES)
                if code
            },
        }
        if args.truncate:  # kept rows cut to seq_len; tokens_cut is a floor for rows cut before tokenizing
            cut = kept & mine & (chosen.full_lengths > args.seq_len)
            counts[name]["truncated"] = {
                "rows": int(cut.sum()),
                "tokens_cut": int((chosen.full_lengths[cut] - args.seq_len).sum()),
            }
    return counts


def length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"count": 0}
    p50, p95 = np.percentile(lengths, [50, 95])
    return {
        "count": int(len(lengths)),
        "mean": round(float(lengths.mean()), 1),
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "max": int(lengths.max()),
    }


def describe_tokenizer(args: argparse.Namespace, tokenizer, identity: str) -> dict:
    """The manifest's ``tokenizer``: how it was named, what it is (``identity``), its id bound, and the
    ids train needs (padding is the EOS when the tokenizer has no pad token)."""
    from ds_sft.data.tokenizer import pad_id
    from ds_sft.vocab import id_bound

    return {
        "spec": tokenizer_spec(args),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "identity": identity,
        "vocab_size": id_bound(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id(tokenizer),
    }


def source_warnings(counts: dict, args: argparse.Namespace) -> list[str]:
    """What the summary table shows but a user skimming it misses: a source the mix wanted that kept no
    training example, and a val split left under ``--min_val_rows`` by the drops after the split (the
    split is cut before tokenizing; rows too long for ``--seq_len`` leave it later), whose val loss is
    then a figure of a few rows."""
    said = []
    for name, c in counts.items():
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in c["dropped"].items()) or "none dropped"
        too_long = any(reason in c["dropped"] for reason in DROP_REASON_TOO_LONG.values())
        fix = "raise --seq_len or pass --truncate" if too_long else "see the dropped column above"
        if c["rows_in"] and c["weight"] > 0 and not c["train_after_mix"]:
            said.append(f"{name}: no training example left of its {c['rows_in']:,} rows ({reasons}): {fix}")
        elif args.val_fraction > 0 and c["val"] < min(args.min_val_rows, c["kept"] // 2):  # not the cap
            said.append(
                f"{name}: {c['val']:,} val row(s), under --min_val_rows {args.min_val_rows} ({reasons}): "
                f"its val loss is a figure of few rows; {fix}"
            )
    return said


def print_summary(manifest: dict, output_dir: Path) -> None:
    print(f"prepared {output_dir}  (template {manifest['template']}, seq_len {manifest['seq_len']})")
    print(f"{'source':<12}{'rows in':>9}{'kept':>8}{'train':>8}{'val':>6}{'mixed':>8}  dropped")
    for name, c in manifest["counts"].items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in c["dropped"].items()) or "-"
        if c.get("truncated", {}).get("rows"):
            dropped += f"; truncated {c['truncated']['rows']:,} ({c['truncated']['tokens_cut']:,} tokens cut)"
        print(
            f"{name:<12}{c['rows_in']:>9,}{c['kept']:>8,}{c['train']:>8,}{c['val']:>6,}"
            f"{c['train_after_mix']:>8,}  {dropped}"
        )
    for split, s in manifest["splits"].items():
        eff = s["efficiency"]
        print(
            f"{split}: {s['rows']:,} rows of {manifest['seq_len']}, {s['documents']:,} examples, "
            f"{s['tokens']:,} tokens; row fill {eff['real_tokens']:.2%} (trained {eff['trained_tokens']:.2%})"
        )
    if manifest["decontamination"].get("note"):
        print(f"note: {manifest['decontamination']['note']}", file=sys.stderr)
    for line in manifest.get("warnings", []):
        print(f"warning: {one_line(line)}", file=sys.stderr)
