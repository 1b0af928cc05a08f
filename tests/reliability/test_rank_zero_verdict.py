"""Rank 0's share of a collective section (``train.distributed.on_rank_zero``) ends every rank as the
command would have ended rank 0 alone (``command.execute``): one rule, ``errors.refusal_line``, says what
the user can mend. Two of them once disagreed: rank 0 printed its one line and exited 2 for a memory
that ran out, a library's disguised full disk or a native panic, while the other ranks were told "a bug"
and exited 1.

Two real gloo ranks run every kind of ending in turn through ``execute``, each inside ``on_rank_zero``.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch

from ds_sft.errors import UserError, refusal_line
from tests.rendezvous import rendezvous, without_launcher_variables
from tests.train.helpers import REPO_ROOT

# kind -> the expression that builds what rank 0's work raises (in the ranks' script)
ENDINGS = {
    "user": "UserError('--out_dir is taken: pass --overwrite')",
    "disk full": "OSError(errno.ENOSPC, 'No space left on device', '/run/lock')",
    "disguised disk full": "Exception('No space left on device (os error 28)')",
    "cpu memory": "RuntimeError('[enforce fail] DefaultCPUAllocator: can\\'t allocate memory: you tried to "
    "allocate 4294967296 bytes.')",
    "gpu memory": "torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 79.10 GiB of which 1.00 GiB is free.')",
    "native panic": "PanicException('regex backtrack limit')",
    "bug": "ValueError('a bug')",
    "ctrl-c": "KeyboardInterrupt()",
}

RANKS_SCRIPT = """
import argparse, errno, json, os, sys
import torch, torch.distributed as dist
from ds_sft.command import execute
from ds_sft.errors import UserError
from ds_sft.train.distributed import on_rank_zero

class PanicException(BaseException):  # the name pyo3 gives a Rust panic
    pass

ENDINGS = {endings}
dist.init_process_group("gloo")

class Command:
    @staticmethod
    def run(args):
        def work():
            raise eval(ENDINGS[args.kind])
        on_rank_zero(work, "cpu")
        return 0

codes = {{}}
for kind in ENDINGS:
    print(f"== {{kind}}", file=sys.stderr, flush=True)
    try:
        codes[kind] = execute("ds-sft train", Command, argparse.Namespace(kind=kind))
    except SystemExit as stop:
        codes[kind] = stop.code
    except BaseException as err:  # a bug keeps its traceback: rank 0 raises it
        codes[kind] = "raised " + type(err).__name__
    dist.barrier()
print(json.dumps(codes), flush=True)
sys.stderr.flush()
os._exit(0)  # past a process group that a failed rank would tear down noisily
"""


class PanicException(BaseException):
    """Named as pyo3 names a Rust panic, as in the ranks' script."""


@pytest.fixture(scope="module")
def ranks_ended(tmp_path_factory) -> list[tuple[dict, dict[str, str]]]:
    """Each rank's exit code per ending, and what it wrote to stderr per ending."""
    script = tmp_path_factory.mktemp("verdict") / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(endings=repr(ENDINGS)))
    with rendezvous() as store:
        procs = [
            subprocess.Popen(
                [sys.executable, str(script)],
                env={
                    **without_launcher_variables(),
                    **store,
                    "RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "LOCAL_RANK": str(rank),
                    "PYTHONPATH": str(REPO_ROOT),
                    "OMP_NUM_THREADS": "1",
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for rank in range(2)
        ]
        try:
            outputs = [proc.communicate(timeout=300) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
    ended = []
    for out, err in outputs:
        said = dict(part.split("\n", 1) if "\n" in part else (part, "") for part in err.split("== ")[1:])
        ended.append((json.loads(out.strip().splitlines()[-1]), said))
    return ended


def expected_line(kind: str) -> str | None:
    namespace = {"UserError": UserError, "PanicException": PanicException, "errno": errno, "torch": torch}
    return refusal_line(eval(ENDINGS[kind], namespace))


@pytest.mark.parametrize("kind", [kind for kind in ENDINGS if expected_line(kind) is not None])
def test_a_refusal_on_rank_0_ends_every_rank_with_2_and_rank_0_says_it_once(ranks_ended, kind):
    (codes0, said0), (codes1, said1) = ranks_ended
    assert (codes0[kind], codes1[kind]) == (2, 2)
    assert said0[kind].strip().splitlines() == [f"ds-sft train: error: {expected_line(kind)}"]
    assert "error" not in said1[kind] and "Traceback" not in said1[kind]


def test_a_bug_on_rank_0_keeps_its_traceback_there_and_ends_the_others_with_1(ranks_ended):
    (codes0, _), (codes1, said1) = ranks_ended
    assert (codes0["bug"], codes1["bug"]) == ("raised ValueError", 1)
    assert said1["bug"].strip() == ""


def test_ctrl_c_on_rank_0_ends_every_rank_with_130(ranks_ended):
    (codes0, _), (codes1, _) = ranks_ended
    assert (codes0["ctrl-c"], codes1["ctrl-c"]) == (130, 130)


def test_every_mendable_kind_is_one_the_rule_knows():
    """The endings tried above cover each branch of the rule: all but the bug and Ctrl-C are refusals."""
    assert {kind for kind in ENDINGS if expected_line(kind) is None} == {"bug", "ctrl-c"}
