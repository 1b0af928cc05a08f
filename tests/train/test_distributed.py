"""Where the ranks meet: Slurm's variables become torch's before anything reads them, and MASTER_PORT
is the launcher's (one rank alone: 0, its store picks); pure functions, and plain processes."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.train.distributed import first_host, master_port, slurm_master_port, use_slurm_environment
from tests.rendezvous import without_launcher_variables
from tests.train.helpers import REPO_ROOT, write_data_dir

names = st.from_regex(r"[a-z][a-z0-9\-]{0,8}[a-z]", fullmatch=True)


@st.composite
def nodelists(draw):
    """A compact Slurm node list and its first host, built from the hosts it stands for."""
    groups, first = [], None
    for _ in range(draw(st.integers(1, 3))):
        prefix = draw(names)
        if draw(st.booleans()):  # a plain host name
            groups.append(prefix)
            first = first or prefix
            continue
        width = draw(st.integers(1, 4))
        ranges = []
        for _ in range(draw(st.integers(1, 3))):
            start = draw(st.integers(0, 10**width - 2))
            end = draw(st.integers(start, 10**width - 1))
            ranges.append(f"{start:0{width}d}" if start == end else f"{start:0{width}d}-{end:0{width}d}")
        suffix = draw(st.sampled_from(["", "-ib"]))
        groups.append(f"{prefix}[{','.join(ranges)}]{suffix}")
        first = first or f"{prefix}{ranges[0].split('-')[0]}{suffix}"
    return ",".join(groups), first


@given(nodelists())
def test_first_host_of_a_compact_node_list(case):
    nodelist, expected = case
    assert first_host(nodelist) == expected


@given(
    ntasks=st.integers(1, 64),
    data=st.data(),
    job_id=st.integers(1, 10**8),
    nodelist=nodelists(),
)
def test_every_rank_derives_the_same_group(ntasks, data, job_id, nodelist):
    ranks = []
    for procid in sorted(set(data.draw(st.lists(st.integers(0, ntasks - 1), min_size=1, max_size=4)))):
        env = {
            "SLURM_PROCID": str(procid),
            "SLURM_NTASKS": str(ntasks),
            "SLURM_LOCALID": str(procid % 8),
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NODELIST": nodelist[0],
        }
        assert use_slurm_environment(env)
        expected = {"RANK": str(procid), "WORLD_SIZE": str(ntasks), "LOCAL_RANK": str(procid % 8)}
        assert {k: env[k] for k in expected} == expected
        ranks.append((env["MASTER_ADDR"], env["MASTER_PORT"]))
    assert len(set(ranks)) == 1, "all ranks must meet at one address and port"
    address, port = ranks[0]
    assert address == nodelist[1] and int(port) == slurm_master_port(str(job_id))
    assert 1024 < int(port) < 32768  # a fixed port outside Linux's ephemeral range


def test_a_launcher_that_set_rank_wins():
    env = {"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_PORT": "1234"}
    before = dict(env)
    assert not use_slurm_environment(env)
    assert env == before


def test_train_translates_slurm_before_the_config_reads_world_size(monkeypatch):
    """``ds-sft train`` under srun: the config check must already see SLURM_NTASKS as WORLD_SIZE."""
    from ds_sft.train import cli
    from ds_sft.train import config as config_module

    seen = {}

    class Stop(Exception):
        pass

    def resolve(args):
        seen.update(world=os.environ.get("WORLD_SIZE"), rank=os.environ.get("RANK"))
        raise Stop

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # records the value to restore: run() writes these
        monkeypatch.delenv(key)
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(config_module, "resolve", resolve)
    with pytest.raises(Stop):
        cli.run(argparse.Namespace(check_flags=False))
    assert seen == {"world": "2", "rank": "1"}


@pytest.mark.parametrize(("local_rank", "visible"), [(1, 1), (3, 1), (3, 2), (2, 4)])
def test_deepspeed_is_told_the_gpu_the_rank_trains_on(local_rank, visible, monkeypatch):
    """Under ``srun --gpus-per-task=1`` each task sees its one GPU as device 0 while LOCAL_RANK counts
    the tasks on the node; DeepSpeed reads LOCAL_RANK as the device (the group's device_id, the
    engine's set_device), so rank 1 asked for device 1: "invalid device ordinal". The device and the
    LOCAL_RANK DeepSpeed reads are one. No GPU here: the CUDA calls are stand-ins."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.comm.utils import get_local_rank_from_launcher

    from ds_sft.train.distributed import init_distributed

    class Formed(Exception):
        pass

    def deepspeed_init(dist_backend, **kwargs):
        raise Formed(dist_backend, get_local_rank_from_launcher())

    launch = {"RANK": local_rank, "WORLD_SIZE": 4, "LOCAL_RANK": local_rank, "MASTER_PORT": 29500}
    for key, value in {**launch, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, str(value))
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", deepspeed_init)
    with pytest.raises(Formed) as formed:
        init_distributed()
    assert current == [local_rank % visible]
    assert formed.value.args == ("nccl", local_rank % visible)


def test_one_rank_lets_the_store_pick_its_port():
    """A plain ``python`` run is one rank: the store binds a free port itself (MASTER_PORT 0), so no
    other process can take a port picked in advance before the store listens on it (EADDRINUSE)."""
    code = (
        "import os\n"
        "from ds_sft.train.distributed import init_distributed\n"
        "print(init_distributed(), os.environ['MASTER_PORT'])\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "0" and "(0, 1)" in done.stdout


# Runs `ds-sft train` three times in one interpreter (as a notebook or a script calling main does) and
# prints, for each, the timeout of the group it trained in and whether a group is left after it.
SEQUENTIAL_RUNS = """
import sys
import torch
import torch.distributed as dist
import ds_sft.train.loop as loop
from ds_sft.cli import main

data, out = sys.argv[1], sys.argv[2]
real_train = loop.train

def train(*args, **kwargs):
    group = dist.distributed_c10d._get_default_group()
    print("group timeout", int(group._get_backend(torch.device("cpu")).options._timeout.total_seconds()))
    return real_train(*args, **kwargs)

loop.train = train
flags = ["--data_dir", data, "--model", "tiny", "--max_iters", "1", "--micro_batch_size", "2", "--wandb_mode",
         "disabled", "--eval_iters", "1"]
for n, timeout in enumerate(["40", "900"]):
    code = main(["train", *flags, "--out_dir", f"{out}/run{n}", "--dist_timeout", timeout])
    print("exit", code, "group left", dist.is_initialized())
# a run that fails after joining the group (the run folder is taken by run0) leaves none either
code = main(["train", *flags, "--out_dir", f"{out}/run0", "--dist_timeout", "60"])
print("exit", code, "group left", dist.is_initialized())
# a group the caller made is the caller's
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
code = main(["train", *flags, "--out_dir", f"{out}/run3"])
print("exit", code, "group left", dist.is_initialized())
"""


def test_each_run_in_one_process_trains_in_its_own_group(tmp_path):
    """A one-rank run destroys the group it created when it ends: the second of two runs in one process
    trained in the first one's group, with the first one's --dist_timeout (40 s where it asked 900)."""
    data = write_data_dir(tmp_path / "data")
    env = {k: v for k, v in without_launcher_variables(os.environ).items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", SEQUENTIAL_RUNS, str(data), str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stdout.splitlines() if line.startswith(("group timeout", "exit"))]
    assert said == [
        "group timeout 40",
        "exit 0 group left False",
        "group timeout 900",
        "exit 0 group left False",
        "exit 2 group left False",
        "group timeout 1800",  # the caller's group, as the caller made it
        "exit 0 group left True",
    ], done.stdout[-3000:]


@pytest.mark.parametrize(
    ("world", "port", "expected"),
    [
        (1, None, "0"),  # one rank alone: its store binds a free port itself
        (1, "0", "0"),
        (1, "29500", "29500"),
        (2, "29500", "29500"),  # a launcher's port is every rank's
        (64, "1", "1"),
        (8, "65535", "65535"),
        (2, None, "MASTER_PORT is not set"),
        (4, "0", "MASTER_PORT is 0"),
        (1, "", "is not a port"),
        (2, "65536", "is not a port"),
        (1, "-1", "is not a port"),
        (2, "29500 ", "is not a port"),
        (1, "\u0663", "is not a port"),  # a digit to str.isdigit, not to int()
    ],
)
def test_master_port(world, port, expected):
    env = {"WORLD_SIZE": str(world), **({} if port is None else {"MASTER_PORT": port})}
    if expected[0].isdigit():
        assert master_port(env) == expected
    else:
        with pytest.raises(UserError, match=expected):
            master_port(env)


ports = st.one_of(st.none(), st.text(max_size=7), st.integers(-5, 70000).map(str))


@given(world=st.integers(1, 64), port=ports)
def test_master_port_is_a_port_the_ranks_share_or_one_line(world, port):
    """Whatever the variables: a port torch's ``env://`` reads (0 for one rank only), or one line."""
    env = {"WORLD_SIZE": str(world), **({} if port is None else {"MASTER_PORT": port})}
    try:
        chosen = master_port(env)
    except UserError as err:
        assert "\n" not in str(err) and "MASTER_PORT" in str(err)
        return
    assert 0 <= int(chosen) < 2**16 and chosen == (port or "0")
    assert world == 1 or int(chosen) > 0


def test_ranks_without_master_port_stop_in_one_line(tmp_path):
    """Two ranks started with only RANK and WORLD_SIZE have no port in common: each stops at once in one
    line saying how to launch (each picking its own free port, they waited for each other until the
    collective timeout)."""
    data = write_data_dir(tmp_path / "data")
    env = {k: v for k, v in without_launcher_variables().items() if not k.startswith("SLURM_")}
    run = ["--data_dir", str(data), "--out_dir", str(tmp_path / "run"), "--model", "tiny", "--max_iters", "1"]
    command = [sys.executable, "-m", "ds_sft.train", *run, "--wandb_mode", "disabled"]
    ranks = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [rank.communicate(timeout=180) for rank in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks still wait for each other after 180 s")
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    for rank, (_, err) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 2, err[-3000:]
        (line,) = err.strip().splitlines()
        assert line.startswith("ds-sft train: error: WORLD_SIZE=2 but MASTER_PORT is not set"), line
        assert "torchrun --standalone --nproc_per_node 2" in line


# ----------------------------------------------------------------------------- RANK, WORLD_SIZE, LOCAL_RANK

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
launch_values = st.one_of(
    st.none(),  # unset
    st.integers(-3, 12).map(str),
    st.sampled_from(["abc", "", " 1", "1 ", "+1", "1.0", "1e3", "0x1", "\u0661", "1_0", "--1", "00"]),
    st.just("2" * 25),
    st.text(max_size=4),
)


def oracle(env: dict) -> tuple[int, int, int] | str:
    """The variables as a launcher means them, or the name of one that no launcher would set."""
    values = {}
    for key, default in zip(LAUNCH_KEYS, (0, 1, 0), strict=True):
        text = env.get(key)
        digits = text[1:] if text and text.startswith("-") else text
        if text is not None and not (digits and digits.isascii() and digits.isdigit() and len(digits) <= 18):
            return key
        values[key] = default if text is None else int(text)
    rank, world, local = (values[key] for key in LAUNCH_KEYS)
    if not 1 <= world <= 2**20:
        return "WORLD_SIZE"
    if not 0 <= rank < world:
        return "RANK"
    return "LOCAL_RANK" if not 0 <= local < world else (rank, world, local)


@given(rank=launch_values, world=launch_values, local=launch_values)
def test_the_launch_variables_are_a_rank_of_the_world_or_one_line(rank, world, local):
    from ds_sft.train.distributed import launch_environment

    env = {k: v for k, v in zip(LAUNCH_KEYS, (rank, world, local), strict=True) if v is not None}
    expected = oracle(env)
    if isinstance(expected, tuple):
        assert launch_environment(env) == expected
        return
    with pytest.raises(UserError) as refused:
        launch_environment(env)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{expected}="), (env, message)


LAUNCH_MISTAKES = {  # the red team's: a traceback, a hang, or a message blaming MASTER_PORT
    "WORLD_SIZE abc": ({"WORLD_SIZE": "abc", "RANK": "0"}, "WORLD_SIZE='abc' is not an integer"),
    "RANK abc": ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    "LOCAL_RANK abc": ({"LOCAL_RANK": "abc"}, "LOCAL_RANK='abc' is not an integer"),
    "RANK 5 of 2": ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 is not a rank of WORLD_SIZE=2"),
    "RANK -1": ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is not a rank"),
    "RANK 1 of 1": ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not a rank of WORLD_SIZE=1"),
    "WORLD_SIZE 0": ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 is not a number of ranks"),
    "WORLD_SIZE -1": ({"WORLD_SIZE": "-1", "RANK": "0"}, "WORLD_SIZE=-1 is not a number of ranks"),
    "MASTER_ADDR [[[": (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "[[["},
        "MASTER_ADDR='[[[' is not a host name",
    ),
}


def test_a_launch_mistake_stops_each_process_in_one_line_before_any_group(tmp_path):
    """Real processes, with a MASTER_PORT (so nothing stops them at the port check): each mistake ends
    at once in one line naming the variable; before, they ended in tracebacks or waited for ranks
    that never came."""
    data = write_data_dir(tmp_path / "data")
    env = {k: v for k, v in without_launcher_variables().items() if not k.startswith("SLURM_")}
    processes = {}
    for name, (variables, _) in LAUNCH_MISTAKES.items():
        out = tmp_path / name.replace(" ", "_")
        run = ["--data_dir", str(data), "--out_dir", str(out), "--model", "tiny"]
        processes[name] = subprocess.Popen(
            [sys.executable, "-m", "ds_sft.train", *run, "--max_iters", "1", "--wandb_mode", "disabled"],
            env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", **variables},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        outputs = {name: process.communicate(timeout=240) for name, process in processes.items()}
    except subprocess.TimeoutExpired:
        pytest.fail("a process still runs after 240 s: it waits for ranks that never come")
    finally:
        for process in processes.values():
            process.kill()
            process.communicate()
    for name, (_, err) in outputs.items():
        assert processes[name].returncode == 2, (name, err[-3000:])
        (line,) = err.strip().splitlines()
        assert line.startswith(f"ds-sft train: error: {LAUNCH_MISTAKES[name][1]}"), (name, line)


GOOD_HOSTS = [
    "node-01",
    "gpu007.cluster.local",
    "10.0.0.1",
    "127.0.0.1",
    "::1",
    "fd00::1",
    "[fd00::1]",
    "n" * 253,
]
BAD_HOSTS = ["", " ", "[[[", "a b", "http://node-01", "node-01:29500", "-node", "n" * 254, "node;rm", "nöde"]


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_master_addr_takes_host_names_and_addresses(host):
    from ds_sft.train.distributed import master_addr

    assert master_addr({"MASTER_ADDR": host}) == host


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_master_addr_no_resolver_answers_stops_in_one_line(host):
    """Before, the ranks retried such a host until the collective timeout (10 minutes by default)."""
    from ds_sft.train.distributed import master_addr

    with pytest.raises(UserError) as refused:
        master_addr({"MASTER_ADDR": host})
    assert str(refused.value).startswith(f"MASTER_ADDR={host!r} is not a host name or address")


@pytest.mark.parametrize("nodelist", ["[[[", "gpu[", ",node", "a b[1-2]"])
def test_a_mangled_slurm_node_list_is_named(nodelist):
    from ds_sft.train.distributed import master_addr, use_slurm_environment

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": nodelist}
    assert use_slurm_environment(env)
    with pytest.raises(UserError, match=re.escape(f"srun's node list {nodelist!r}")):
        master_addr(env)


@pytest.mark.parametrize(("slurm", "key"), [("SLURM_PROCID", "RANK"), ("SLURM_NTASKS", "WORLD_SIZE"),
                                            ("SLURM_LOCALID", "LOCAL_RANK")])  # fmt: skip
def test_a_bad_slurm_variable_is_named_with_the_one_it_became(slurm, key):
    """Under srun the user never set RANK: the message names the SLURM variable it came from."""
    from ds_sft.train.distributed import launch_environment, use_slurm_environment

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", slurm: "x1"}
    use_slurm_environment(env)
    with pytest.raises(UserError) as refused:
        launch_environment(env)
    assert str(refused.value).startswith(f"{key}='x1' (srun's {slurm}) is not an integer")


@pytest.mark.parametrize("addr", ["nonexistent.invalid", "[::1]", "node-01", "10.0.0.1"])
def test_one_rank_meets_itself_whatever_master_addr_says(addr):
    """A MASTER_ADDR left in the shell (a name that no longer resolves, a bracketed IPv6 address
    torch does not take) hung a one-rank run until the collective timeout, then a traceback."""
    from ds_sft.train.distributed import store_host

    assert store_host({"MASTER_ADDR": addr}) == "127.0.0.1"


@pytest.mark.parametrize(
    ("addr", "host"), [("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"), ("[::1]", "::1")]
)
def test_several_ranks_meet_at_master_addr_as_torch_takes_it(addr, host):
    from ds_sft.train.distributed import store_host

    assert store_host({"MASTER_ADDR": addr, "WORLD_SIZE": "2", "RANK": "1"}) == host


def test_several_ranks_are_refused_a_master_addr_no_resolver_here_knows():
    from ds_sft.train.distributed import store_host

    with pytest.raises(UserError, match=r"^MASTER_ADDR='nonexistent\.invalid' has no address here \(") as err:
        store_host({"MASTER_ADDR": "nonexistent.invalid", "WORLD_SIZE": "2", "RANK": "0"})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("job_id", ["²", "12³", "٣٤", "", "12a", "-5", " 7", "1_000"])
def test_a_slurm_job_id_that_is_not_ascii_digits_gets_the_default_port(job_id):
    """ "²" passed str.isdigit() and failed int(): a ValueError traceback on every rank."""
    assert slurm_master_port(job_id) == 29500


def test_a_numeric_slurm_job_id_gets_a_port_of_its_own():
    assert {slurm_master_port(str(i)) for i in range(100)} == set(
        range(slurm_master_port("0"), slurm_master_port("0") + 100)
    )
