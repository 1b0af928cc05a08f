"""Whether an output already there can be reused: the reuse key (a hash of everything the output is
made from) and the check that the folder still holds every file its manifest lists.

Sources enter the key by their content (sha256) or hub id, never by path, so moving a file changes
nothing; the output folder and the flags that only name sources stay out of it (``NOT_IN_CACHE_KEY``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import TYPE_CHECKING

from ds_sft.locations import expand_user

if TYPE_CHECKING:
    from ds_sft.data.prepare_inputs import Inputs

FORMAT_VERSION = 4  # bump when the output layout, a cleaning or tokenizing rule changes: old outputs redone
NOT_IN_CACHE_KEY = {"output_dir", "force", "alpaca", "gsm8k", "dolly", "source", "from_shared", "command"}


def cache_key(args: argparse.Namespace, specs: list, tokenizer, identity: str, reference: dict) -> str:
    """A hash of everything the output is made from: the flags that shape it, each source's content
    (:func:`input_fingerprints`), the tokenizer and the GSM8K test set decontaminated against."""
    # source locations enter through their content hashes, not their paths
    config = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_CACHE_KEY}
    # the whole tokenizer: what its ids mean, and its text pipeline and chat template (which ids a row gets)
    tokenizer_parts = [identity, tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template]
    blob = json.dumps(
        [FORMAT_VERSION, config, input_fingerprints(specs), tokenizer_parts, reference],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def input_fingerprints(specs: list) -> list[dict]:
    """What each source is for the reuse key: its name, how it is read (its kind: --gsm8k F strips
    calculator annotations that --source NAME=F keeps) and its bytes, or its hub id."""
    from ds_sft.safe_read import sha256_file

    return [
        {"name": s.name, "kind": s.kind}
        | ({"sha256": sha256_file(expand_user(s.location))} if s.is_local else {"hub_id": s.location})
        for s in specs
    ]


def output_is_current(args: argparse.Namespace, inputs: Inputs, key: str) -> bool:
    """Whether the output already there is reused: it was made with the same ``key`` and still holds
    every file its manifest lists (``check_output_dir`` found the present ones intact), and no
    --force asks to redo it."""
    from ds_sft.written_files import missing_files

    previous = inputs.previous
    if previous is None or previous.get("key") != key or args.force:
        return False
    missing = missing_files(inputs.output_dir, previous["files"])
    if not missing:
        print(f"{args.output_dir}: up to date (same inputs and flags); reusing it. Pass --force to redo.")
        return True
    print(f"{args.output_dir}: {len(missing)} file(s) missing (first: {missing[0]}); redoing it")
    return False
