"""``python -m ds_sft.torchrun``: torchrun as ds-sft's launchers run it (``launch/torchrun.sh``,
``launch/slurm.sbatch``), with the same arguments and two changes to how a run ends.

- A rank that fails: torchrun raises ``ChildFailedError`` out of its main, a 40-line traceback and
  report below the rank's own one-line error, and exits 1 whatever the rank's code was, so a refused
  flag (2), a signal (128 + N) and a crash (1) looked alike to a script or a scheduler. Here it ends
  in the first failing rank's code and one line that points at that rank's own message; a rank that
  got a signal itself (srun's, scancel's), saved and exited 128 + N is said to have stopped, not failed.
- A signal to torchrun (Slurm's preemption, Ctrl-C): torchrun passes it to the ranks, which save a
  checkpoint and exit, then ends in the same traceback; here in one line and 128 + the signal. Where
  torchrun can wait longer for that checkpoint (``--shutdown_timeout``, 30 s by default, after which
  it kills the ranks: torch 2.13 has it, 2.11 not), it waits :data:`SHUTDOWN_SECONDS` unless the
  command line or the environment says otherwise; an older torchrun kills them after 30 s.
"""

from __future__ import annotations

import os
import sys

from ds_sft.errors import process_ending, stopped_on_signal

# A checkpoint of a 2B model with its optimizer state on a slow shared file system; Slurm's own grace
# period (KillWait) and the job's --signal lead time bound the wait from outside anyway.
SHUTDOWN_SECONDS = 300
# where torchrun reads a shutdown timeout from the environment (its flag's variable; LaunchConfig's)
SHUTDOWN_VARIABLES = ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")


def torchrun_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--shutdown_timeout`` where this torchrun has the flag and neither torchrun's own
    part of ``argv`` (before ``-m MODULE``; the rest is the module's) nor the environment sets it."""
    from torch.distributed.run import get_args_parser

    knows = any("--shutdown_timeout" in action.option_strings for action in get_args_parser()._actions)
    own = argv[: argv.index("-m")] if "-m" in argv else argv
    given = any(word.split("=")[0] in ("--shutdown_timeout", "--shutdown-timeout") for word in own)
    if not knows or given or any(os.environ.get(name) for name in SHUTDOWN_VARIABLES):
        return argv
    return ["--shutdown_timeout", str(SHUTDOWN_SECONDS), *argv]


def exit_code(code: int) -> int:
    """A process's exit status as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code if 0 < code < 256 else 1


def main(argv: list[str] | None = None) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            f"torchrun: {sys.executable} has no torch: activate the environment ds-sft is installed in",
            file=sys.stderr,
        )
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as run

    try:
        run(torchrun_argv(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        ending = process_ending(failure.exitcode)
        if failure.exitcode < 0:  # no word of its own: the kernel's out-of-memory killer, a crash
            line = f"{err.name} on rank {rank} was {ending}"
        elif stopped_on_signal(failure.exitcode):  # a rank that got the signal itself (srun, scancel)
            line = f"{err.name} stopped on rank {rank} ({ending}); its own line is above"
        else:
            line = f"{err.name} failed on rank {rank} ({ending}); its own error is above"
        print(f"torchrun: {line}", file=sys.stderr)
        return exit_code(failure.exitcode)
    except SignalException as err:
        print(f"torchrun: stopped by {err.sigval.name}; the ranks were told to stop", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
