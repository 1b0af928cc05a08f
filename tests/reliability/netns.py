"""Two "nodes" on one machine: a pair of network namespaces joined by a virtual ethernet cable.

Each namespace has its own network stack, so a process inside sees only ``lo`` and one end of the
veth pair (``10.77.0.1/24`` in namespace A, ``10.77.0.2/24`` in B). A job launched once in each
namespace therefore has to rendezvous and exchange gradients over a real TCP link between two
distinct addresses, as two hosts would, yet it cannot reach (or disturb) anything else: the only
addresses on the link are the two namespaces' own.

Launcher path: DeepSpeed's multi-node runner with ``--no_ssh`` (``deepspeed --hostfile H --node_rank R
--master_addr 10.77.0.1 --no_ssh``), started by hand in each namespace, as one starts it on each node
of a cluster without passwordless ssh. It is the path ``launch/`` documents for ds-sft, it exercises
the hostfile parsing and the rank arithmetic (node_rank x slots) that torchrun's c10d rendezvous
would bypass, and FACTS.md measured it working across namespaces. GLOO_SOCKET_IFNAME pins gloo to
each namespace's veth so no rank advertises ``lo``.

Everything created here is removed on exit, also on failure or interruption: processes first (a
process keeps a deleted namespace alive), then the namespaces, which take their veth ends with them.

Run by hand::

    python tests/reliability/netns.py -- tests/reliability/zero2_toy.py --out /tmp/losses.json
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ADDRESSES = ("10.77.0.1", "10.77.0.2")


class NamespacesUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no iproute2, or no CAP_SYS_ADMIN)."""


@dataclass(frozen=True)
class Node:
    namespace: str
    interface: str
    address: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _must(*args: str) -> None:
    result = _ip(*args)
    if result.returncode:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[Node, Node]]:
    """Create namespaces A and B joined by a veth pair; yield their nodes; always delete them."""
    if os.geteuid() != 0:
        raise NamespacesUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("iproute2's `ip` is not installed")
    tag = secrets.token_hex(3)  # unique per run; interface names are limited to 15 characters
    nodes = tuple(
        Node(namespace=f"dssft-{tag}-{side}", interface=f"dssft{tag}{side}", address=address)
        for side, address in zip("ab", ADDRESSES, strict=True)
    )
    try:
        for node in nodes:
            _must("netns", "add", node.namespace)
        _must("link", "add", nodes[0].interface, "type", "veth", "peer", "name", nodes[1].interface)
        for node in nodes:
            _must("link", "set", node.interface, "netns", node.namespace)
            run = ("netns", "exec", node.namespace, "ip")
            _must(*run, "addr", "add", f"{node.address}/24", "dev", node.interface)
            _must(*run, "link", "set", node.interface, "up")
            _must(*run, "link", "set", "lo", "up")
        yield nodes
    finally:
        _ip("link", "del", nodes[0].interface)  # only present if setup failed before the move
        for node in nodes:
            _ip("netns", "del", node.namespace)


def deepspeed_command(node_rank: int, hostfile: Path, master_port: int, script: Sequence[str]) -> list[str]:
    """The per-node command of DeepSpeed's multi-node launcher without ssh."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--no_ssh", f"--node_rank={node_rank}", f"--hostfile={hostfile}",
        f"--master_addr={ADDRESSES[0]}", f"--master_port={master_port}",
        *script,
    ]  # fmt: skip


def run_two_nodes(
    script: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    # A fixed port is safe here, unlike on the host: the master listens inside namespace A, made for
    # this run, where no other process has a socket that could hold it.
    master_port: int = 29577,
    slots: int = 1,
) -> list[subprocess.CompletedProcess]:
    """Launch ``script`` (a path or ``--module name`` plus its arguments) as a 2-node x ``slots``-process
    job.

    Returns both launchers' completed processes (node 0 first). Raises
    :class:`NamespacesUnavailable` when the namespaces cannot be created, and
    ``subprocess.TimeoutExpired`` (after killing both nodes) when the job outlives ``timeout``.
    """
    with two_namespaces() as nodes, tempfile.TemporaryDirectory(prefix="dssft-2node-") as tmp:
        hostfile = Path(tmp) / "hostfile"
        hostfile.write_text("".join(f"{node.address} slots={slots}\n" for node in nodes))
        procs = []
        try:
            for rank, node in enumerate(nodes):
                node_env = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": node.interface}
                command = ["ip", "netns", "exec", node.namespace,
                           *deepspeed_command(rank, hostfile, master_port, script)]  # fmt: skip
                log = Path(tmp) / f"node{rank}"
                with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
                    # A session of its own, so the launcher and its workers can be killed as one group.
                    procs.append(subprocess.Popen(command, env=node_env, stdout=out, stderr=err,
                                                  start_new_session=True))  # fmt: skip
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        logs = [Path(tmp) / f"node{rank}" for rank in range(len(procs))]
        return [
            subprocess.CompletedProcess(
                proc.args,
                proc.returncode,
                log.with_suffix(".out").read_text(),
                log.with_suffix(".err").read_text(),
            )  # fmt: skip
            for proc, log in zip(procs, logs, strict=True)
        ]


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    results = run_two_nodes(argv, timeout=600)
    for rank, result in enumerate(results):
        print(f"--- node {rank}: exit {result.returncode}\n{result.stdout}{result.stderr}")
    return int(any(result.returncode for result in results))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
