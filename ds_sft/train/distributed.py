"""The process group, the few collectives the training loop makes itself, and its preemption flag.

**Every tensor handed to torch.distributed lives on the engine's device.** On GPUs the process group
runs NCCL, and NCCL serves CUDA tensors only: an all-reduce of a CPU tensor raises ("No backend type
associated with device type cpu"). Torch could give the group a second backend for CPU tensors
(``"cpu:gloo,cuda:nccl"``), but then each small collective would copy its values to the host first
and wait for the GPU to finish, every micro-batch; keeping the values on the device lets the loop
queue its work without waiting (the loss sum of a step is a device tensor, read once per step, not
``.item()``-ed per micro-batch). So the helpers here take the device explicitly, and nothing in
ds-sft builds a collective tensor without one. Object collectives (``all_gather_object``) pick
their device themselves: the current CUDA device, which is why :func:`init_distributed` sets it
before the group exists.

Launchers: the deepspeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*.
Slurm's ``srun`` exports SLURM_* instead; :func:`use_slurm_environment` translates them, and must
run before anything reads WORLD_SIZE (``ds-sft train`` calls it first thing). A plain process gets
a one-rank group whose store binds a free local port itself. Several ranks must all be told one port
(:func:`master_port`): nothing here picks one for them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import sys

from ds_sft.errors import UserError, refusal_line

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000  # below Linux's ephemeral range (32768-60999)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, compact or not: ``gpu[007-009,12],cpu1`` -> ``gpu007``.

    The same host ``scontrol show hostnames`` prints first, without needing scontrol on the node."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_master_port(job_id: str) -> int:
    """The port every rank of Slurm job ``job_id`` derives alike (29500 when the id is not a number)."""
    # ASCII digits only: str.isdigit() also holds for "²", which int() refuses (a ValueError traceback)
    numeric = job_id.isascii() and job_id.isdigit()
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if numeric else 29500


def use_slurm_environment(environ=os.environ) -> bool:
    """Under ``srun`` without torchrun, set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    from SLURM_*. Returns whether it did. Variables a launcher already set are kept.

    Every rank derives the same port from the job id (a random free port would differ per rank and
    the group would never form); MASTER_ADDR is the first host of the job's node list."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    environ.setdefault("MASTER_ADDR", first_host(nodelist) if nodelist else "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(slurm_master_port(environ.get("SLURM_JOB_ID", ""))))
    return True


MAX_WORLD_SIZE = 2**20  # the most ranks a checkpoint's trainer state may record
SLURM_SOURCES = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}|\[?[0-9A-Fa-f:.]+\]?")  # a name, IPv4 or IPv6


def launch_environment(environ=os.environ) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as the launcher set them (unset: one rank, 0 / 1 / 0), or one line.

    Checked before any group is formed: torch reads them with ``int()`` deep inside its rendezvous (a
    traceback), and a rank outside the world (RANK=5 of 2, RANK=-1) joins a store where it waits for
    ranks that never come, until the collective timeout."""
    values = {}
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        text = environ.get(key, default)
        if not re.fullmatch("-?[0-9]{1,18}", text):  # ASCII digits, as every launcher writes them
            slurm = SLURM_SOURCES[key]
            shown = f" (srun's {slurm})" if environ.get(slurm) == text else ""
            raise UserError(
                f"{key}={text!r}{shown} is not an integer (ASCII digits, at most 18): the launcher sets it "
                "(torchrun, the deepspeed launcher, srun); unset RANK, WORLD_SIZE and LOCAL_RANK for one rank"
            )
        values[key] = int(text)
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if not 1 <= world <= MAX_WORLD_SIZE:
        raise UserError(
            f"WORLD_SIZE={world} is not a number of ranks (1 to {MAX_WORLD_SIZE}): launch with torchrun "
            "--nproc_per_node N or the deepspeed launcher, or unset it for a one-rank run"
        )
    if not 0 <= rank < world:
        raise UserError(
            f"RANK={rank} is not a rank of WORLD_SIZE={world} (0 to {world - 1}): each process of a run "
            "needs its own RANK below WORLD_SIZE; let torchrun or the deepspeed launcher set them"
        )
    if not 0 <= local < world:
        raise UserError(
            f"LOCAL_RANK={local} is not a rank on this node (0 to {world - 1} at WORLD_SIZE={world}): let "
            "torchrun or the deepspeed launcher set it"
        )
    return rank, world, local


def master_addr(environ=os.environ) -> str:
    """The host of the store the ranks meet at, checked: a name no resolver can answer (a mangled
    Slurm node list, a pasted URL) would leave every rank retrying until the collective timeout."""
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    if not HOST.fullmatch(addr):
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        shown = f" (the first host of srun's node list {nodelist!r})" if nodelist else ""
        raise UserError(
            f"MASTER_ADDR={addr!r}{shown} is not a host name or address: set it to rank 0's host "
            "(node-01, 10.0.0.1), or let torchrun or the deepspeed launcher set it"
        )
    return addr


def store_host(environ=os.environ) -> str:
    """Where this run's ranks meet: for one rank alone, itself (127.0.0.1: a MASTER_ADDR left over in
    the shell from another job, a name that no longer resolves, hung it for the collective timeout);
    for several, MASTER_ADDR (checked by :func:`master_addr`) as torch takes it (an IPv6 address
    without brackets), refused in one line when no resolver here knows it."""
    addr = master_addr(environ)
    if launch_environment(environ)[1] == 1:
        return "127.0.0.1"
    host = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(
            f"MASTER_ADDR={addr!r} has no address here ({reason}): set it to rank 0's host as the other "
            "nodes reach it, or let torchrun or the deepspeed launcher set it"
        ) from None
    return host


def master_port(environ=os.environ) -> str:
    """The port of the store the ranks meet at (rank 0's, or their launcher's): MASTER_PORT, or for
    one rank alone ``"0"``, which lets its store bind a free port itself.

    Several ranks need MASTER_PORT from their launcher: a port each rank picked alone would differ
    (they would wait for each other until the timeout), and a fixed default (torch's 29500) could
    be taken by another job, whose store the other ranks would then join."""
    world, port = launch_environment(environ)[1], environ.get("MASTER_PORT")
    if port is not None and not (re.fullmatch("[0-9]{1,5}", port) and int(port) < 2**16):
        raise UserError(f"MASTER_PORT={port!r} is not a port: set a number from 1 to 65535, or unset it")
    if world == 1:
        return port or "0"
    if port is None or int(port) == 0:
        given = "is not set" if port is None else "is 0, which only a one-rank run may use"
        raise UserError(
            f"WORLD_SIZE={world} but MASTER_PORT {given}: the ranks have no port to meet at; start them "
            f"with `torchrun --standalone --nproc_per_node {world} -m ds_sft.train ...` or the deepspeed "
            "launcher, or give every rank the same MASTER_ADDR and MASTER_PORT"
        )
    return port


def backend_for(device_type: str) -> str:
    """The process group's backend for a trainer on ``device_type``: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(timeout_s: int | None = None) -> tuple[int, int]:
    """Join (or, for a plain ``python``, create) the process group. Returns (rank, world size).

    ``timeout_s`` bounds every collective (None: DeepSpeed's default, $DEEPSPEED_TIMEOUT minutes).
    Without RANK & co. DeepSpeed would fall back to MPI discovery, hence the one-rank defaults.
    """
    use_slurm_environment()
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    launch_environment()  # before the imports and the group: a launch mistake fails at once
    os.environ["MASTER_ADDR"] = store_host()
    os.environ["MASTER_PORT"] = master_port()

    import deepspeed
    import torch
    import torch.distributed as dist

    from ds_sft.train.build_lock import owned_batons

    if torch.cuda.is_available():
        # before the group: NCCL's communicator and all_gather_object use the current device. Modulo
        # the visible count: Slurm's --gpus-per-task shows each task its one GPU as device 0. DeepSpeed
        # takes LOCAL_RANK itself for the device (the group's device_id, the engine's set_device,
        # ZeRO-3's partitions), so it is told the same index, not rank 1's invalid device ordinal 1.
        device = launch_environment()[2] % torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(device)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if timeout:
            # DeepSpeed builds its data-parallel groups with dist.new_group(ranks), which takes torch's
            # module default (30 min) rather than the world group's timeout: make that default ours.
            import torch.distributed.distributed_c10d as c10d

            c10d.default_pg_timeout = timeout["timeout"]
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        with owned_batons():  # DeepSpeed's comm JIT-builds its shared-memory op on CPU
            deepspeed.init_distributed(dist_backend=backend_for(device_type), **timeout)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def process_group(timeout_s: int | None = None):
    """:func:`init_distributed` for the length of one run; yields (rank, world size).

    A one-rank group the run created is destroyed when the run ends, however it ends: a second run in
    the same process (a notebook, a test) then starts its own group with its own ``--dist_timeout``
    rather than inheriting the first run's, and torch's default timeout (which init_distributed set to
    the run's) is put back. A group the caller made is left to the caller; several ranks leave the
    process itself (``train.cli.shutdown_multiprocess``)."""
    import deepspeed.comm
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    created, module_timeout = not dist.is_initialized(), c10d.default_pg_timeout
    rank, world = init_distributed(timeout_s)
    try:
        yield rank, world
    finally:
        if created and world == 1:
            if dist.is_initialized():
                deepspeed.comm.destroy_process_group()  # also DeepSpeed's own references to the group
            c10d.default_pg_timeout = module_timeout


def all_reduce_sum(values, device):
    """Sum ``values`` (a list of numbers or a tensor) over all ranks.

    Returns a new float64 tensor on ``device``; the caller reads it when it needs the numbers
    (``.tolist()``, one host sync)."""
    import torch
    import torch.distributed as dist

    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    if tensor is values:
        tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


class StopSignal:
    """The signal that stops every rank, agreed on after each step: the largest number any rank caught,
    0 for none. A SIGTERM that reached one rank stops them all, and each exits with the same code (128 +
    that number).

    Asked every step, so its one value lives in a tensor made once on the engine's ``device``: the
    vote writes the number into it (``fill_``, no host tensor built and copied over) and all-reduces it
    in place."""

    def __init__(self, device):
        import torch

        self.vote = torch.zeros(1, dtype=torch.float64, device=device)

    def agreed(self, signum: int) -> int:
        """This rank's caught ``signum`` (0: none) in, every rank's agreed signal out (a collective)."""
        import torch.distributed as dist

        self.vote.fill_(signum)
        dist.all_reduce(self.vote, op=dist.ReduceOp.MAX)
        return int(self.vote.item())


@contextlib.contextmanager
def preemption_flag():
    """SIGTERM / SIGINT / SIGHUP (a closed terminal) set ``flag['stop']`` to the signal's number
    instead of stopping the process mid-step (0: none came)."""
    import threading

    flag = {"stop": 0}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request_stop(signum, frame):
        flag["stop"] = int(signum)
        print(
            f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting",
            flush=True,
        )

    caught = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # under nohup the run outlives its terminal
        caught.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, request_stop) for sig in caught}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def collective_device():
    """Where a collective's tensors live before the engine exists: NCCL serves CUDA tensors only."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def on_rank_zero(work, device, prog: str = "ds-sft train"):
    """``work()`` on rank 0 alone, whose outcome every rank hears; its value on rank 0, None on the
    others. Untold, an error of rank 0 left the others waiting at their next collective, to end in
    gloo's "Connection closed by peer" traceback. The telling is a collective, so it is also the barrier
    after the work.

    A refusal (what ``command.execute`` ends in one line, exit 2: :func:`~ds_sft.errors.refusal_line`):
    with several ranks, rank 0 prints its one line *before* the others hear of it and every rank exits 2; a
    launcher that stops the job at the first rank to exit (torchrun, srun --kill-on-bad-exit) could
    otherwise stop rank 0 before it said why. One rank raises it for the command to print. Ctrl-C on
    rank 0 ends the others with 130; any other exception is a bug, whose traceback rank 0 keeps, and the
    others exit 1."""
    import torch.distributed as dist

    value, raised, told = None, None, [0]  # told: the exit code every other rank ends with, 0 for none
    if dist.get_rank() == 0:
        try:
            value = work()
        except BaseException as err:
            raised = err
            line = refusal_line(err)  # None for Ctrl-C and for a bug
            interrupted = isinstance(err, KeyboardInterrupt)
            told[0] = 2 if line is not None else 128 + signal.SIGINT if interrupted else 1
            if line is not None and dist.get_world_size() > 1:
                print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    dist.broadcast_object_list(told, src=0, device=device)
    if raised is not None and not (told[0] == 2 and dist.get_world_size() > 1):
        raise raised
    if told[0]:
        raise SystemExit(told[0])  # rank 0 has said why, once
    return value
