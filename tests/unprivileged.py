"""Run a command without root's power to read and write any file (to test permission refusals)."""

from __future__ import annotations

import os
import shutil

import pytest

# the capabilities that let root ignore file modes
FILE_ACCESS_CAPS = "-dac_override,-dac_read_search,-fowner"


def unprivileged() -> list[str]:
    """The prefix that runs a command under the file modes an ordinary user meets (none when not root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and util-linux's setpriv (to drop root's file access) is missing")
    return ["setpriv", f"--bounding-set={FILE_ACCESS_CAPS}", f"--inh-caps={FILE_ACCESS_CAPS}"]
