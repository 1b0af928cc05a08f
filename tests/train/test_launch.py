"""The launch scripts' --dry-run prints the exact command: the right launcher around `-m ds_sft.train`."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.helpers import REPO_ROOT, this_python_first


@pytest.mark.parametrize(
    ("script", "options", "expected"),
    [
        (
            "torchrun.sh",
            ["--nproc", "2", "--"],
            "python3 -m ds_sft.torchrun --standalone --nproc_per_node 2 -m ds_sft.train",
        ),
        (
            "torchrun.sh",
            ["--nproc", "8", "--nnodes", "2", "--rdzv", "10.0.0.1:29400", "--"],
            "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400",
        ),
        (
            "deepspeed_multinode.sh",
            ["--hostfile", "launch/hostfile.example", "--master_addr", "node-01", "--"],
            "deepspeed --hostfile launch/hostfile.example --master_addr node-01 --master_port 29500 --module "
            "ds_sft.train",
        ),
        ("deepspeed_multinode.sh", ["--no_ssh", "--node_rank", "1", "--"], "--no_ssh --node_rank 1 --module"),
        ("slurm.sbatch", [], "srun --kill-on-bad-exit=1 python3 -m ds_sft.torchrun --nnodes 1"),
    ],
)
def test_dry_run_prints_the_command(script, options, expected):
    train_flags = ["--data_dir", "data dir", "--model", "tiny"]
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / script), "--dry-run", *options, *train_flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert done.stdout.rstrip().endswith(r"--data_dir data\ dir --model tiny")  # flags passed through, quoted
    if script == "slurm.sbatch":
        assert "-m ds_sft.train --resume" in done.stdout  # a requeued job continues


@pytest.mark.parametrize("job_id", ["12345", "7", "987654321", ""])
def test_slurm_rendezvous_port_is_derived_from_the_job_id(job_id):
    """Every node of one job computes the same port, and jobs sharing a head node get different ones
    (the srun rule, ``slurm_master_port``), not a fixed 29500."""
    from ds_sft.train.distributed import slurm_master_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_JOB_ID": job_id}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # this test's python3
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), "--dry-run", "--model", "tiny"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"--rdzv_endpoint localhost:{slurm_master_port(job_id)} " in done.stdout


BAD_OPTIONS = [
    ("torchrun.sh", ["--nproc", "0"]),
    ("torchrun.sh", ["--nproc", "-3"]),
    ("torchrun.sh", ["--nproc", "abc"]),
    ("torchrun.sh", ["--nproc", "2.5"]),
    ("torchrun.sh", ["--nproc", "99999999999999999999"]),
    ("torchrun.sh", ["--nproc", ""]),
    ("torchrun.sh", ["--rdzv", " "]),
    ("deepspeed_multinode.sh", ["--hostfile", ""]),  # an unset variable
    ("torchrun.sh", ["--nproc"]),
    ("torchrun.sh", ["--nproc", "--"]),
    ("torchrun.sh", ["--nnodes", "x"]),
    ("torchrun.sh", ["--nnodes", "0"]),
    ("torchrun.sh", ["--rdzv", "node-01"]),
    ("torchrun.sh", ["--rdzv", "node-01:0"]),
    ("torchrun.sh", ["--rdzv", "node-01:65536"]),
    ("torchrun.sh", ["--rdzv", "node 01:29400"]),
    ("torchrun.sh", ["--rdzv", "a;touch x:29400"]),
    ("torchrun.sh", ["--rdzv", ":29400"]),
    ("torchrun.sh", ["--bogus"]),
    ("torchrun.sh", ["--rdzv", "node-01:29400"]),  # without --nnodes each node trained alone
    ("torchrun.sh", ["--nnodes", "2"]),  # without --rdzv each node waited at its own 127.0.0.1
    ("deepspeed_multinode.sh", ["--master_port", "0"]),
    ("deepspeed_multinode.sh", ["--master_port", "70000"]),
    ("deepspeed_multinode.sh", ["--master_port", "port"]),
    ("deepspeed_multinode.sh", ["--master_addr"]),
    ("deepspeed_multinode.sh", ["--master_addr", "a b"]),
    ("deepspeed_multinode.sh", ["--master_addr", "$(reboot)"]),
    ("deepspeed_multinode.sh", ["--node_rank", "-1"]),
    ("deepspeed_multinode.sh", ["--node_rank", "one"]),
    ("deepspeed_multinode.sh", ["--node_rank", "1"]),  # without --no_ssh the launcher ignored it
    ("deepspeed_multinode.sh", ["--no_ssh"]),  # the launcher's AssertionError traceback
    ("deepspeed_multinode.sh", ["--node_rank", "2", "--no_ssh", "--hostfile", "launch/hostfile.example"]),
    ("deepspeed_multinode.sh", ["--hostfile"]),
    ("deepspeed_multinode.sh", ["--bogus"]),
]


def _dry_run(script: str, options: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / script), "--dry-run", *options, "--", "--model", "tiny"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(("script", "options"), BAD_OPTIONS)
def test_a_wrong_launcher_option_stops_in_one_line_before_any_launcher(script, options):
    """Unchecked, these reached torchrun (a bare AssertionError traceback for --nproc 0) or bash's
    "unbound variable"; now the script names the option and starts nothing."""
    done = _dry_run(script, options)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""  # no command printed: nothing would have started
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"launch/{script}: "), done.stderr
    assert options[0] in lines[0]


@pytest.mark.parametrize(
    ("script", "option", "low", "high"),
    [
        ("torchrun.sh", "--nproc", 1, 4096),
        ("torchrun.sh", "--nnodes", 1, 65536),
        ("deepspeed_multinode.sh", "--master_port", 1, 65535),
        ("deepspeed_multinode.sh", "--node_rank", 0, 65535),
    ],
)
def test_launcher_counts_are_accepted_exactly_inside_their_range(script, option, low, high):
    ssh = ["--no_ssh"] if option == "--node_rank" else []  # a node's rank is for runs without ssh
    for value in (low - 1, low, low + 1, high - 1, high, high + 1, 10 * high):
        rdzv = ["--rdzv", "node-01:29400"] if option == "--nnodes" and value > 1 else []  # several nodes meet
        done = _dry_run(script, [*ssh, *rdzv, option, str(value)])
        inside = low <= value <= high
        assert (done.returncode == 0) == inside, (value, done.stderr)
        if inside and (option, value) != ("--nnodes", 1):  # one node runs --standalone
            assert f" {value} " in done.stdout


def _readme_launcher_lines() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    return [line for line in readme.splitlines() if line.startswith("launch/")]


@pytest.mark.parametrize("line", _readme_launcher_lines())
def test_the_readme_launcher_commands_are_accepted(line):
    """The README once showed torchrun.sh options it never had (--node_rank, --master_addr)."""
    script, *words = shlex.split(line)
    done = subprocess.run(
        ["bash", str(REPO_ROOT / script), "--dry-run", *words],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_readme_shows_every_launcher():
    shown = {shlex.split(line)[0] for line in _readme_launcher_lines()}
    assert shown == {"launch/torchrun.sh", "launch/deepspeed_multinode.sh"}


# Through ssh the deepspeed launcher (pdsh) hands the train flags to each node's shell as one line,
# wrapping only a word with a space in double quotes: these ran as code, or reached the trainer changed.
REREAD_WORDS = ["runs/$(touch pwned)", "runs/`id`", "a;b", "it's", 'say "x"', "runs/*", "$HOME/runs", "a\nb",
                "", "runs/50%h", "~/runs", "a|b", "x{1,2}", "a b $(id)", "a\\b"]  # fmt: skip
INTACT_WORDS = ["my data", "runs/sft-1", "alpaca=0.5,gsm8k=1", "node:1", "a@b+c", "/abs/path/x.json"]
DEEPSPEED_SH = str(REPO_ROOT / "launch" / "deepspeed_multinode.sh")


def _deepspeed_sh(*words: str, cwd=REPO_ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", DEEPSPEED_SH, *words], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


@pytest.mark.parametrize("word", REREAD_WORDS)
def test_a_train_flag_a_nodes_shell_would_read_again_is_refused_through_ssh(word, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-01 slots=8\nnode-02 slots=8\n")
    flags = ["--hostfile", str(hostfile), "--", "--out_dir", word, "--model", "tiny"]
    done = _deepspeed_sh("--dry-run", *flags, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "each node's shell" in lines[0] and "--no_ssh" in lines[0], done.stderr
    assert not (tmp_path / "pwned").exists()
    # without ssh no shell reads them: the launcher passes each word as it is, train's parser permitting
    done = _deepspeed_sh("--dry-run", "--no_ssh", "--node_rank", "0", *flags)
    if word == "":  # an empty value is train's own refusal, now made before any launcher starts
        assert done.returncode == 2 and "--out_dir: the value is empty" in done.stderr, done.stderr
        return
    if "\n" in word:  # as is a control character (options.control_character)
        assert done.returncode == 2 and "holds a control character" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {done.stdout}"], capture_output=True, text=True)
    assert words.stdout.split("\0")[-5:-1] == ["--out_dir", word, "--model", "tiny"]  # bash reads its %q


def test_the_words_let_through_reach_every_node_unchanged():
    """What the check accepts, put through the launcher's own pdsh quoting and a shell, is unchanged."""
    import argparse

    from deepspeed.launcher.multinode_runner import PDSHRunner

    runner = PDSHRunner.__new__(PDSHRunner)
    runner.args = argparse.Namespace(user_args=INTACT_WORDS)
    line = " ".join(runner.parse_user_args())
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True)
    assert done.stdout.split("\0")[:-1] == INTACT_WORDS
    for word in INTACT_WORDS:
        done = _deepspeed_sh("--dry-run", "--hostfile", "launch/hostfile.example", "--", "--out_dir", word)
        assert done.returncode == 0, done.stderr


BAD_HOSTFILES = {
    "a host twice": "node-01 slots=8\nnode-01 slots=4\n",
    "no host": "# nodes go here\n\n",
    "an ssh option as host": "-oProxyCommand=touch_x slots=8\n",
    "a host with a shell character": "node;01 slots=8\n",
    "no slots": "node-01\n",
    "zero slots": "node-01 slots=0\n",
    "slots not a number": "node-01 slots=eight\n",
    "text after the slots": "node-01 slots=8 gpus=8\n",
    "a folder": None,
}


@pytest.mark.parametrize("case", BAD_HOSTFILES)
def test_a_hostfile_the_launcher_cannot_use_is_one_line(case, tmp_path):
    """DeepSpeed's own parser answered these with a ValueError traceback, or took an ssh option for a host."""
    hostfile = tmp_path / "hostfile"
    if BAD_HOSTFILES[case] is None:
        hostfile.mkdir()
    else:
        hostfile.write_text(BAD_HOSTFILES[case])
    (tmp_path / "deepspeed").write_text("#!/bin/sh\nexit 99\n")  # never reached
    (tmp_path / "deepspeed").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for dry_run in (["--dry-run"], []):
        done = _deepspeed_sh(*dry_run, "--hostfile", str(hostfile), "--", "--model", "tiny", env=env)
        assert done.returncode == 2 and done.stdout == "", (dry_run, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"hostfile {hostfile}" in lines[0], done.stderr


def test_a_hostfile_with_comments_tabs_and_crlf_is_accepted(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(
        "# two nodes\r\nnode-01 slots=8  # the first\r\n\n \tnode-02\tslots=2\r\n10.0.0.3 slots=1"
    )
    done = _deepspeed_sh("--dry-run", "--hostfile", str(hostfile), "--", "--model", "tiny")
    assert done.returncode == 0, done.stderr


def _slurm_dry_run(tmp_path, environment: dict, scontrol: str) -> subprocess.CompletedProcess:
    """slurm.sbatch --dry-run in a job described by ``environment``, with ``scontrol`` printing
    ``scontrol`` as the job's host names ("" : scontrol fails)."""
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\nprintf '{scontrol}'\n" if scontrol else "#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | environment
    env["PATH"] = f"{tmp_path}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), "--dry-run", "--model", "tiny"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("environment", "scontrol", "named"),
    [
        ({"SLURM_NNODES": "two"}, "", "SLURM_NNODES"),
        ({"SLURM_NNODES": "0"}, "", "SLURM_NNODES"),
        ({"SLURM_GPUS_ON_NODE": "0"}, "", "SLURM_GPUS_ON_NODE"),
        ({"SLURM_GPUS_ON_NODE": "a100:4"}, "", "SLURM_GPUS_ON_NODE"),
        ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]"}, "", "SLURM_JOB_NODELIST"),
        ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "x"}, "-oProxyCommand=x\\n", "SLURM_JOB_NODELIST"),
    ],
)
def test_slurm_job_values_torchrun_cannot_use_stop_in_one_line(tmp_path, environment, scontrol, named):
    """torchrun met a count it cannot use with a traceback, and a node list scontrol could not read
    sent every node of a two-node job to its own localhost, where it waited for the other forever."""
    done = _slurm_dry_run(tmp_path, environment, scontrol)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/slurm.sbatch: ") and named in lines[0], done.stderr


def test_slurm_nodes_meet_at_the_first_host_scontrol_names(tmp_path):
    environment = {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    done = _slurm_dry_run(tmp_path, environment, "gpu07\\ngpu08\\n")
    assert done.returncode == 0, done.stderr
    assert "torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint gpu07:" in done.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [("PYTHONWARNINGS", "$(touch pwned)"), ("NCCL_SOCKET_IFNAME", "eth`id`"), ("MLFLOW_RUN", 'a"b'),
     ("PYTHONSTARTUP", "/x/50%h.py"), ("UCX_TLS", "a\\b")],
)  # fmt: skip
def test_a_variable_the_launcher_exports_to_every_node_is_checked_like_a_flag(name, value, tmp_path):
    """The launcher exports PYTHON*, NCCL*, ... to each node as `export NAME="VALUE";` in one line of
    text: $(...) and backticks ran there, a quote broke the line, %h became a host name."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-01 slots=8\nnode-02 slots=8\n")
    env = {**os.environ, name: value}
    done = _deepspeed_sh(
        "--dry-run", "--hostfile", str(hostfile), "--", "--model", "tiny", cwd=tmp_path, env=env
    )
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.startswith(f"launch/deepspeed_multinode.sh: ${name}=") and done.stderr.count("\n") == 1
    done = _deepspeed_sh("--dry-run", "--hostfile", str(hostfile), "--", "--model", "tiny",
                         env={**os.environ, name: "/a b:/c,d=e"})  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "name", ["PYTHONX;touch pwned;:", "NCCL X", "UCX$(touch pwned)", "MV2-A", "PYTHON\tB"]
)
def test_a_variable_name_the_launcher_would_export_as_a_command_is_refused(name, tmp_path):
    """Names bash cannot hold were skipped by the check (compgen -e lists none of them) and exported
    by the launcher all the same, `export PYTHONX;touch pwned;:=1;`: a command on every node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-01 slots=8\nnode-02 slots=8\n")
    env = {**os.environ, name: "1"}
    done = _deepspeed_sh(
        "--dry-run", "--hostfile", str(hostfile), "--", "--model", "tiny", cwd=tmp_path, env=env
    )
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert "not a variable name" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "pwned").exists()


# Lines of .deepspeed_env, which the launcher exports to every node as `export KEY=VALUE;` in one line
# of text, the value in double quotes when it holds more than [\w@%+=:,./-]: these ran as code there,
# broke the line, or (no =, a blank line) were the launcher's ValueError traceback.
BAD_DEEPSPEED_ENV_LINES = ["A=$(touch pwned)", "NCCL_IFNAME=eth`touch pwned`", 'A=a"b', "A=/x/50%h", "A=a\\b",
                           "$(touch pwned)=1", "A B=1", "#A=1", "=1", "no equals sign", ""]  # fmt: skip
GOOD_DEEPSPEED_ENV_LINES = ["A=/a b:/c,d=e", "  NCCL_SOCKET_IFNAME = eth0 ", "B=x;y|z&'q'", "C=a=b", "D="]


def _deepspeed_env_dry_run(tmp_path, where: str, text: str, *options: str) -> subprocess.CompletedProcess:
    """deepspeed_multinode.sh --dry-run through ssh, with ``text`` as the .deepspeed_env ``where`` the
    launcher reads it: "home" (~/), "here" (./, the folder it runs in: tmp_path, beside a copy of launch/) or
    "named" (the absolute path in $DS_ENV_FILE)."""
    (tmp_path / "launch").mkdir(parents=True)
    for script in ("deepspeed_multinode.sh", "options.sh"):
        (tmp_path / "launch" / script).write_text((REPO_ROOT / "launch" / script).read_text())
    (tmp_path / "home").mkdir()
    (tmp_path / "hostfile").write_text("node-01 slots=8\nnode-02 slots=8\n")
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    env.pop("DS_ENV_FILE", None)
    folder = {"home": tmp_path / "home", "here": tmp_path, "named": tmp_path / "elsewhere"}[where]
    file = folder / ".deepspeed_env"
    file.parent.mkdir(exist_ok=True)
    file.write_text(text)
    if where == "named":
        env["DS_ENV_FILE"] = str(file)
    script = str(tmp_path / "launch" / "deepspeed_multinode.sh")
    hostfile = str(tmp_path / "hostfile")
    return subprocess.run(
        ["bash", script, "--dry-run", "--hostfile", hostfile, *options, "--", "--model", "tiny"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("where", ["home", "here", "named"])
@pytest.mark.parametrize("line", BAD_DEEPSPEED_ENV_LINES)
def test_a_deepspeed_env_line_a_nodes_shell_would_read_again_is_refused(tmp_path, where, line):
    done = _deepspeed_env_dry_run(tmp_path, where, f"OK=1\n{line}\nLAST=2")
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.startswith("launch/deepspeed_multinode.sh: ") and done.stderr.count("\n") == 1
    assert ".deepspeed_env" in done.stderr and "line" in done.stderr, done.stderr
    assert not (tmp_path / "pwned").exists()
    # without ssh the launcher reads no .deepspeed_env: nothing to refuse
    done = _deepspeed_env_dry_run(tmp_path / "no_ssh", where, line, "--no_ssh", "--node_rank", "0")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("where", ["home", "here", "named"])
def test_deepspeed_env_lines_let_through_reach_every_node_unchanged(tmp_path, where):
    """Accepted lines (CRLF endings too), put through the launcher's own export quoting and a shell,
    give the value the launcher meant: the line after its first =, trimmed."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    done = _deepspeed_env_dry_run(tmp_path, where, "\r\n".join(GOOD_DEEPSPEED_ENV_LINES) + "\r\n")
    assert done.returncode == 0, done.stderr
    runner = PDSHRunner.__new__(PDSHRunner)
    runner.exports = {}
    for line in GOOD_DEEPSPEED_ENV_LINES:
        runner.add_export(*line.split("=", maxsplit=1))
    exports = "".join(f"export {key}={value}; " for key, value in runner.exports.items())
    shell = f'{exports}printf "%s\\0" "$A" "$NCCL_SOCKET_IFNAME" "$B" "$C" "$D"'
    shown = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
    meant = [line.split("=", 1)[1].strip() for line in GOOD_DEEPSPEED_ENV_LINES]
    assert shown.stdout.split("\0")[:-1] == meant


@pytest.mark.parametrize("ssh", [[], ["--no_ssh", "--node_rank", "1"]])
def test_every_node_meets_at_the_hostfiles_first_node_by_default(ssh, tmp_path):
    """Without --master_addr each node took its own name: under --no_ssh every node but the first
    waited for itself until DeepSpeed's timeout, in silence."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-07 slots=8\nnode-02 slots=8\n")
    done = _deepspeed_sh(
        "--dry-run", *ssh, "--hostfile", str(hostfile), "--", "--model", "tiny", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert " --master_addr node-07 " in done.stdout, done.stdout


def test_a_given_master_addr_needs_no_hostname_command(tmp_path):
    """The default was `$(hostname)`, run before the flags were read: on an image without hostname
    the script stopped (exit 127) even with --master_addr given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hostname").write_text("#!/bin/sh\necho 'hostname: command not found' >&2; exit 127\n")
    (bin_dir / "hostname").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    flags = ["--dry-run", "--master_addr", "node-01", "--hostfile", str(tmp_path / "absent"), "--"]
    done = _deepspeed_sh(*flags, "--model", "tiny", cwd=tmp_path, env=env)
    assert done.returncode == 0 and " --master_addr node-01 " in done.stdout, done.stderr


def test_torchrun_sh_reads_relative_train_paths_in_the_callers_folder(tmp_path):
    """The script changed into the checkout first: `--data_dir data --out_dir run`, typed in a project
    folder, read the checkout's data (or none) and wrote the run there. It runs where it is called,
    and its ranks import the ds_sft of the checkout the script is in (a copy here, which says so),
    not another one installed in the environment."""
    import shutil

    from tests.reliability.conftest import write_tiny_data_dir
    from tests.reliability.runs import train_flags

    checkout = tmp_path / "checkout"
    for part in ("ds_sft", "launch"):
        shutil.copytree(REPO_ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    imported = tmp_path / "imported"
    with open(checkout / "ds_sft" / "__init__.py", "a") as init:
        init.write(f"\nopen({str(imported)!r}, 'a').write(__file__ + '\\n')\n")
    project = tmp_path / "project"
    write_tiny_data_dir(project / "data")
    flags = train_flags(Path("data"), Path("run"), 6)
    env = this_python_first(tmp_path / "bin", {**os.environ, "OMP_NUM_THREADS": "1"})
    env.pop("PYTHONPATH", None)  # the script itself makes its checkout importable from anywhere
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))  # built once
    done = subprocess.run(
        ["bash", str(checkout / "launch" / "torchrun.sh"), "--nproc", "1", "--", *flags],
        capture_output=True, text=True, timeout=600, cwd=project, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (project / "run" / "final" / "model.safetensors").is_file()
    assert not (checkout / "run").exists() and not (REPO_ROOT / "run").exists()
    # torchrun's wrapper and the rank, each from the copy
    assert set(imported.read_text().splitlines()) == {str(checkout / "ds_sft" / "__init__.py")}


@pytest.mark.parametrize("ssh", [True, False])
def test_deepspeed_multinode_sh_reads_a_relative_hostfile_in_the_callers_folder(tmp_path, ssh):
    (tmp_path / "hostfile").write_text("node-07 slots=2\nnode-08 slots=2\n")
    options = [] if ssh else ["--no_ssh", "--node_rank", "1"]
    done = _deepspeed_sh(
        "--dry-run", "--hostfile", "hostfile", *options, "--", "--model", "tiny", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "--hostfile hostfile --master_addr node-07 " in done.stdout  # the caller's file, read
    (tmp_path / "hostfile").write_text("node-07 slots=two\n")
    done = _deepspeed_sh(
        "--dry-run", "--hostfile", "hostfile", *options, "--", "--model", "tiny", cwd=tmp_path
    )
    assert done.returncode == 2 and "hostfile hostfile: node-07's slots must be a whole number" in done.stderr


def test_through_ssh_the_callers_folder_must_survive_each_nodes_shell(tmp_path):
    """Each node runs `cd FOLDER` unquoted, FOLDER being the folder the launcher was called in."""
    folder = tmp_path / "my project"
    folder.mkdir()
    (folder / "hostfile").write_text("node-07 slots=2\n")
    done = _deepspeed_sh("--dry-run", "--hostfile", "hostfile", "--", "--model", "tiny", cwd=folder)
    assert done.returncode == 2 and "the folder it runs in," in done.stderr and "holds a space" in done.stderr
    without_ssh = ["--no_ssh", "--node_rank", "0"]
    done = _deepspeed_sh(
        "--dry-run", "--hostfile", "hostfile", *without_ssh, "--", "--model", "tiny", cwd=folder
    )
    assert done.returncode == 0, done.stderr


# The deepspeed launcher's script as pip writes it: its interpreter on the first line, or, for a path
# with a space or past 127 bytes, pip's /bin/sh form with the path on the second.
LAUNCHER_SCRIPTS = {
    "plain": ("#!{python}\nfrom deepspeed.launcher.runner import main\n", True),
    "env": ("#!/usr/bin/env python3\nfrom deepspeed.launcher.runner import main\n", True),
    "pip's sh form, long": ("#!/bin/sh\n'''exec' {python} \"$0\" \"$@\"\n' '''\nimport sys\n", True),
    "pip's sh form, a space": (
        "#!/bin/sh\n'''exec' \"/opt/my env/bin/python3\" \"$0\" \"$@\"\n' '''\n",
        False,
    ),
    "a dollar": ("#!/opt/$HOME/bin/python3\n", False),
    "a shell wrapper": ('#!/bin/sh\nexec /opt/x/bin/deepspeed "$@"\n', True),  # its Python is not known
    "not a script": ("\x7fELF\x02\x01 $(x)\n", True),
}


@pytest.mark.parametrize("kind", LAUNCHER_SCRIPTS)
def test_the_launchers_own_python_must_survive_each_nodes_shell(kind, tmp_path):
    """The pdsh runner starts each node with the launcher's sys.executable on the line, unquoted: a venv
    whose path holds a space failed on every node after the launch."""
    text, accepted = LAUNCHER_SCRIPTS[kind]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "deepspeed").write_text(text.format(python="/usr/bin/python3"))
    (bin_dir / "deepspeed").chmod(0o755)
    (tmp_path / "hostfile").write_text("node-07 slots=2\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = _deepspeed_sh(
        "--dry-run", "--hostfile", "hostfile", "--", "--model", "tiny", cwd=tmp_path, env=env
    )
    assert done.returncode == (0 if accepted else 2), done.stderr
    if not accepted:
        assert "the deepspeed launcher's Python" in done.stderr and done.stderr.count("\n") == 1
    without_ssh = ["--no_ssh", "--node_rank", "0"]  # no node's shell reads it
    flags = ["--hostfile", "hostfile", *without_ssh, "--", "--model", "tiny"]
    done = _deepspeed_sh("--dry-run", *flags, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("ranks_exit", "job_exit"), [(143, 0), (1, 1)], ids=["saved and stopped", "crashed"])
def test_slurm_requeues_a_stopped_job_and_ends_in_0_unless_the_ranks_failed(tmp_path, ranks_exit, job_exit):
    """Ranks stopped by SIGTERM now exit 143 after their checkpoint: the job script requeues and
    ends in 0 (its part done); a rank that failed instead still shows in the job's exit code."""
    import time

    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\necho node01\n')
    (tmp_path / "srun").write_text(f"#!/bin/sh\ntrap 'exit {ranks_exit}' TERM\ntouch {tmp_path / 'running'}\n"
                                   "while :; do sleep 0.1; done\n")  # fmt: skip
    for fake in ("scontrol", "srun"):
        (tmp_path / fake).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_JOB_ID": "77"}
    env = this_python_first(tmp_path / "bin", {**env, "PATH": f"{tmp_path}{os.pathsep}{env['PATH']}"})
    script = str(REPO_ROOT / "launch" / "slurm.sbatch")
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    job = subprocess.Popen(["bash", script, "--model", "tiny"], cwd=REPO_ROOT, env=env, **pipes)
    deadline = time.monotonic() + 60
    while not (tmp_path / "running").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # Slurm's notice before the time limit
    out, err = job.communicate(timeout=60)
    assert job.returncode == job_exit, out + err
    assert f"stopped for preemption or the time limit (exit {ranks_exit}); requeueing job 77" in out
    assert "requeue 77" in (tmp_path / "scontrol.log").read_text()


TRAIN_FLAG_MISTAKES = [
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--max_examples", "10"], "unrecognized arguments: --max_examples 10"),  # prepare's
    (["--micro_batch_size", "0"], "--micro_batch_size"),
    (["--dry-run"], "--dry-run is an option of launch/"),  # the script's own option, after --
]


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed_multinode.sh", "slurm.sbatch"])
@pytest.mark.parametrize(("flags", "said"), TRAIN_FLAG_MISTAKES)
def test_a_mistyped_train_flag_stops_the_launch_script_before_any_launcher(script, flags, said):
    """The train flags were first read by each rank, after the launcher had started every node (and
    --dry-run put after -- launched the job for real)."""
    separator = [] if script == "slurm.sbatch" else ["--"]
    command = ["bash", str(REPO_ROOT / "launch" / script), "--dry-run", *separator, "--model", "tiny", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, done.stdout, len(lines)) == (2, "", 1), (done.stdout, done.stderr)
    assert said in lines[0]


# Values a user (or a hostfile, a job environment) can hand the launch scripts that would drive a
# terminal if printed as they are: a title-setting OSC and a screen-clearing CSI, a newline forging a
# line of the launcher's own, a carriage return overwriting the line, C1's one-byte CSI (U+009B), DEL,
# a backspace, a byte that is not UTF-8.
TERMINAL_DRIVING = [
    b"\x1b]0;pwned\x07",
    b"\x1b[2J\x1b[31m",
    b"1\nlaunch/torchrun.sh: all good",
    b"1\rall good",
    "\u009b2J".encode(),
    b"\x7f\x08\x08",
    b"\xff\xfe",
]


def _refusal_sites(tmp_path: Path, value: bytes) -> dict:
    """Each place a launch script refuses what it was handed, quoting it: id -> (script, words, env, cwd)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"node-01 slots=8\n" + value + b"\n")
    not_ds_sft = os.path.join(os.fsencode(tmp_path), b"job" + value)
    os.makedirs(not_ds_sft, exist_ok=True)
    torchrun, deepspeed, slurm, here = "torchrun.sh", "deepspeed_multinode.sh", "slurm.sbatch", REPO_ROOT
    return {
        "--nproc": (torchrun, [b"--nproc", value], {}, here),
        "--nnodes": (torchrun, [b"--nnodes", value], {}, here),
        "--rdzv host": (torchrun, [b"--nnodes", b"2", b"--rdzv", b"n" + value + b":29400"], {}, here),
        "--rdzv port": (torchrun, [b"--nnodes", b"2", b"--rdzv", b"node-01:" + value], {}, here),
        "unknown option": (torchrun, [b"--x" + value], {}, here),
        "--master_addr": (deepspeed, [b"--master_addr", b"n" + value], {}, here),
        "--master_port": (deepspeed, [b"--master_port", value], {}, here),
        "--node_rank": (deepspeed, [b"--no_ssh", b"--node_rank", value], {}, here),
        # --dry-run prints the command without a hostfile yet; a launch checks it first
        "missing hostfile": (deepspeed, [b"--hostfile", os.fsencode(tmp_path) + b"/no" + value], {}, here),
        "hostfile line": (deepspeed, [b"--hostfile", os.fsencode(hostfile)], {}, here),
        "SLURM_NNODES": (slurm, [], {b"SLURM_NNODES": value}, here),
        "SLURM_GPUS_ON_NODE": (slurm, [], {b"SLURM_GPUS_ON_NODE": value}, here),
        "submit folder": (slurm, [], {b"SLURM_SUBMIT_DIR": not_ds_sft}, not_ds_sft),
    }  # fmt: skip


REFUSAL_SITES = [
    "--nproc", "--nnodes", "--rdzv host", "--rdzv port", "unknown option", "--master_addr", "--master_port",
    "--node_rank", "missing hostfile", "hostfile line", "SLURM_NNODES", "SLURM_GPUS_ON_NODE", "submit folder",
]  # fmt: skip


@pytest.mark.parametrize("locale", ["C", "C.UTF-8"])
@pytest.mark.parametrize("value", TERMINAL_DRIVING, ids=repr)
@pytest.mark.parametrize("site", REFUSAL_SITES)
def test_a_launch_refusal_shows_what_it_quotes_escaped(tmp_path, site, value, locale):
    """Every refusal of the launch scripts quotes what it was handed; each character of it that is not
    printable must reach the terminal as its code, on the one line, so a hostile option value, hostfile
    line or folder name neither drives the terminal nor forges a line. They were printed raw."""
    sites = _refusal_sites(tmp_path, value)
    assert sites.keys() == set(REFUSAL_SITES)
    script, words, extra, cwd = sites[site]
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({b"LC_ALL": locale.encode(), **extra})
    done = subprocess.run(
        [b"bash", os.path.join(os.fsencode(REPO_ROOT), b"launch", script.encode()),
         *([] if site == "missing hostfile" else [b"--dry-run"]), *words, b"--", b"--model", b"tiny"],
        capture_output=True, timeout=60, cwd=cwd, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == b"", (site, done.stdout, done.stderr)
    line = done.stderr.removesuffix(b"\n")
    assert line.startswith(f"launch/{script}: ".encode()), (site, done.stderr)
    assert all(0x20 <= byte < 0x7F for byte in line), (site, done.stderr)  # one line, printable
