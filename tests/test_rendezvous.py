"""No multi-process launch picks its port in advance.

A port found free (bind port 0, read it, close the socket) and handed to a launch is free again
until the launched store binds it: any process can take it meanwhile, and CI turns red by chance.
Launches meet instead where the port is held from the moment it is chosen: torchrun ``--standalone``,
one rank's MASTER_PORT 0, or the store of :func:`tests.rendezvous.rendezvous`, checked here; and a
guard scans the sources so that no free-port helper comes back.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.rendezvous import rendezvous, without_launcher_variables

SCANNED = ("tests", "bench", "launch", "ds_sft")
# What choosing a port in advance takes, in any language these folders hold (Python, shell).
PORT_CHOICES = {
    "getsockname": "reads the port of a socket it bound, to hand the number on",
    r"\.bind\(\s*\(": "binds a (host, port) itself, to find or reserve a port",
    r"create_server\(": "opens a server socket itself, to find or reserve a port",
    r"free_\w*port|unused_port": "a free-port helper: the port is free again when it is handed on",
}


def port_choices(text: str) -> list[tuple[int, str]]:
    """(line number, why) of each place in ``text`` that picks a port for someone else to bind."""
    return [
        (number, why)
        for number, line in enumerate(text.splitlines(), 1)
        for pattern, why in PORT_CHOICES.items()
        if re.search(pattern, line)
    ]


def test_no_source_picks_a_port_in_advance():
    found = []
    for root in SCANNED:
        for path in sorted((REPO_ROOT / root).rglob("*")):
            if not path.is_file() or path == Path(__file__) or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:  # not source
                continue
            rel = path.relative_to(REPO_ROOT)
            found += [f"{rel}:{number}: {why}" for number, why in port_choices(text)]
    assert not found, "a port picked in advance (use tests/rendezvous.py or torchrun --standalone):\n" + (
        "\n".join(found)
    )


# The helpers this guard replaced, and the other shapes of the same mistake: each must be found.
PICKED_IN_ADVANCE = {
    "free_port helper": """
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
""",
    "probe a derived port": """
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", slurm_master_port(str(job_id))))
        except OSError:
            continue
""",
    "torch's helper": "from torch.distributed.elastic.utils.distributed import get_free_port",
    "launcher flag": 'command += ["--master_port", str(_free_port())]',
    "shell": """PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0))
print(s.getsockname()[1])')""",
    "server socket": "with socket.create_server(('127.0.0.1', 0)) as server: port = server.getsockname()[1]",
    "another library's": "MASTER_PORT=str(portpicker.pick_unused_port())",
}
HELD_WHILE_USED = {
    "the held store": 'with rendezvous() as store:\n    launch(["--master_port", store["MASTER_PORT"]])',
    "torchrun": '[sys.executable, "-m", "torch.distributed.run", "--standalone", "-m", "ds_sft.train"]',
    "one rank": 'env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "0"}',
    "a unix socket": "sock.bind(str(tmp_path / 'sock'))",
}


@pytest.mark.parametrize("source", PICKED_IN_ADVANCE.values(), ids=PICKED_IN_ADVANCE.keys())
def test_the_guard_finds_a_port_picked_in_advance(source):
    assert port_choices(source)


@pytest.mark.parametrize("source", HELD_WHILE_USED.values(), ids=HELD_WHILE_USED.keys())
def test_the_guard_passes_a_port_held_while_used(source):
    assert port_choices(source) == []


# ----------------------------------------------------------------------------- the held store


def client(env: dict[str, str]):
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=30)
    return TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)


def test_the_port_is_listening_when_handed_out_and_each_launch_gets_its_own():
    with rendezvous() as first, rendezvous() as second:
        assert first["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert first["MASTER_PORT"] != second["MASTER_PORT"] and int(first["MASTER_PORT"]) > 0
        # a client connects at once, and two clients of one launch see one store, not the other's
        client(first).set("launch", "first")
        client(second).set("launch", "second")
        assert client(first).get("launch") == b"first" and client(second).get("launch") == b"second"


# Leaves as ds-sft's trainer does (train.cli.shutdown_multiprocess): a plain interpreter exit after a
# gloo group sometimes aborts in teardown ("terminate called without an active exception", FACTS.md),
# which failed this test by chance.
RANK = """
import datetime, torch, torch.distributed as dist
from ds_sft.train.cli import shutdown_multiprocess
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print(total.item())
shutdown_multiprocess()
"""


def start(rank: int, world: int, env: dict[str, str]) -> subprocess.Popen:
    rank_env = {**without_launcher_variables(), **env, "RANK": str(rank), "WORLD_SIZE": str(world)}
    return subprocess.Popen([sys.executable, "-c", RANK], env=rank_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@pytest.mark.multiproc
def test_ranks_meet_at_the_held_store():
    """Two ranks form a group through the held port: rank 0 connects rather than binding it (which
    fails while the store holds it, as the last rank started without the agent-store flag shows)."""
    with rendezvous() as store:
        ranks = [start(rank, 2, store) for rank in range(2)]
        outputs = [rank.communicate(timeout=300) for rank in ranks]
        assert [rank.returncode for rank in ranks] == [0, 0], outputs
        assert [out.split() for out, _ in outputs] == [["3.0"], ["3.0"]]  # 1 + 2, on each rank

        binds_itself = start(0, 1, {**store, "TORCHELASTIC_USE_AGENT_STORE": "False"})
        _, err = binds_itself.communicate(timeout=300)
        assert binds_itself.returncode != 0 and "EADDRINUSE" in err, err[-2000:]
