"""Where the ranks a test starts meet: a store the test process itself holds, on a port nobody can take.

Choosing a port in advance (bind port 0, read the number, close the socket, hand it to the ranks)
leaves the port free between that close and the moment rank 0's store binds it; any other process
may take it then, and the launch fails with EADDRINUSE, by chance. Here the port is never free:
:func:`rendezvous` starts a listening ``TCPStore`` on port 0 (the kernel picks the port as it binds)
in the test process and keeps it for the whole launch. The ranks get its real port together with
``TORCHELASTIC_USE_AGENT_STORE=True``, with which torch's ``env://`` rendezvous (``_create_c10d_store``
in ``torch/distributed/rendezvous.py``) connects every rank, rank 0 included, as a client of the
store at MASTER_ADDR:MASTER_PORT instead of having rank 0 bind it. That is how torchrun hands its own
store to its workers, so a torchrun launch needs nothing from here: ``--standalone`` (its store binds
port 0 itself). The deepspeed launcher copies its environment to the ranks, so this works under it
(pass ``--master_port`` the same port).

One store per launch: torch 2.13 gives an agent store no per-attempt key prefix, so a second process
group formed on the same store would find the keys of the first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# What a launcher tells its ranks; a test clears them before launching its own. With
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone would pick its workers' port in advance.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
)


def without_launcher_variables(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) less every variable a launcher sets for its ranks."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in LAUNCHER_VARIABLES}


@contextlib.contextmanager
def rendezvous(host: str = "127.0.0.1", port: int = 0) -> Iterator[dict[str, str]]:
    """Listen on ``host:port`` (0: any free port, picked as the store binds) until the block ends.

    Yields the variables that make every rank a client of this store: MASTER_ADDR, MASTER_PORT (the
    port it listens on) and TORCHELASTIC_USE_AGENT_STORE. Keep the block open until the ranks are done.
    A ``port`` that is taken raises torch's ``DistNetworkError`` here, before any rank starts."""
    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=True, wait_for_workers=False)
    try:
        yield {"MASTER_ADDR": host, "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store  # its last reference: the server stops listening
