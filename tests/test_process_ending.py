"""How a child process ended, in words (:func:`ds_sft.errors.process_ending`), checked against the
operating system: a process a signal ends, and the code a shell reports for it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from ds_sft.errors import process_ending, stopped_on_signal

# signals whose default action ends the process (SIGSTOP/SIGCHLD/... would not)
ENDING = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGSEGV, signal.SIGABRT,
          signal.SIGUSR1, signal.SIGPIPE, signal.SIGALRM]  # fmt: skip


@pytest.mark.parametrize("sig", ENDING, ids=lambda sig: sig.name)
def test_a_process_a_signal_ended_is_named_by_the_signal(sig):
    # the default action (Python handles SIGINT and ignores SIGPIPE), then the signal; no core file
    no_core = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    code = f"import os, signal; signal.signal({int(sig)}, signal.SIG_DFL); os.kill(os.getpid(), {int(sig)})"
    if sig is signal.SIGKILL:  # no action to set
        code = f"import os; os.kill(os.getpid(), {int(sig)})"
    code = no_core + code
    returncode = subprocess.run([sys.executable, "-c", code], check=False).returncode
    assert (returncode, process_ending(returncode)) == (-sig, f"killed by {sig.name}")
    assert not stopped_on_signal(returncode)


@pytest.mark.parametrize("sig", ENDING, ids=lambda sig: sig.name)
def test_a_shells_code_for_a_signal_is_a_stop_on_it(sig):
    """A shell reports a child the signal ended as 128 + N; a process that caught the signal and exits
    with that code (ds-sft's commands do) is described the same way."""
    # the child restores the signal's default action: one ignored when the shell started (SIGINT in a
    # background job, SIGHUP under nohup, as CI runs) stays ignored for a shell's own kill
    child = f"import os, signal; signal.signal({int(sig)}, signal.SIG_DFL); os.kill(os.getpid(), {int(sig)})"
    if sig is signal.SIGKILL:  # no action to set
        child = f"import os; os.kill(os.getpid(), {int(sig)})"
    shell = f"ulimit -c 0; {sys.executable} -c '{child}'; echo $?"  # no core file
    said = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True)
    code = int(said.stdout.split()[-1])
    assert (code, process_ending(code)) == (128 + sig, f"exit {128 + sig}, on {sig.name}")
    assert stopped_on_signal(code)


@pytest.mark.parametrize("code", [0, 1, 2, 127, 128, 200, 255])
def test_other_codes_are_plain_exits(code):
    assert (process_ending(code), stopped_on_signal(code)) == (f"exit {code}", False)


def test_a_number_that_is_no_signal_is_still_named():
    assert process_ending(-99) == "killed by signal 99"


def test_a_peer_lost_message_is_read_as_such_only_in_a_group_of_several_ranks():
    """A single process whose library said "Broken pipe" was told another rank had ended."""
    from ds_sft.errors import lost_rank_line

    for words in ("Connection closed by peer", "Broken pipe", "Timed out waiting 15000ms"):
        assert lost_rank_line(RuntimeError(f"[pair.cc:553] {words}")) is None
