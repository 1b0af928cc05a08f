"""Start a child with the signal dispositions a terminal gives it, whatever pytest was started with.

A process inherits ignored signals: a CI step started in the background by a non-interactive shell
ignores SIGINT (and Python then installs no KeyboardInterrupt handler), and one under nohup ignores
SIGHUP. A test that stops a child with those signals would wait out its timeout there and fail, so
the children it stops start from the defaults, and ignore only what the test itself asks.
"""

from __future__ import annotations

import signal

STOPPING = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


def as_from_a_terminal(ignoring: tuple[signal.Signals, ...] = ()):
    """A ``preexec_fn``: the stopping signals at their defaults, but ``ignoring`` ignored (nohup's SIGHUP)."""

    def reset() -> None:
        for signum in STOPPING:
            signal.signal(signum, signal.SIG_IGN if signum in ignoring else signal.SIG_DFL)

    return reset
