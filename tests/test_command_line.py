"""Install smoke: the package imports, and every command has a real --help."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_sft.cli import build_parser, command_parsers, main
from ds_sft.command import COMMANDS
from ds_sft.options import StoreOnce
from tests.signals import as_from_a_terminal


def test_every_command_is_registered():
    expected = {"prepare", "train", "eval", "export", "bench"}
    assert set(command_parsers(build_parser())) == set(COMMANDS) == expected


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help(command):
    parser = command_parsers(build_parser())[command]
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags, f"{command} defines no flags"
    missing = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
    assert not missing, f"{command}: flags without help: {missing}"


@pytest.mark.parametrize("argv", [[], *[[c] for c in sorted(COMMANDS)]])
def test_help_runs_as_a_console_command(argv):
    result = subprocess.run(
        [sys.executable, "-m", "ds_sft.cli", *argv, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if argv:
        assert f"ds-sft {argv[0]}" in result.stdout


def test_help_does_not_import_heavy_libraries():
    """`ds-sft --help` must answer instantly: no torch/deepspeed/datasets at import time."""
    code = (
        "import sys; from ds_sft.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('deepspeed', 'datasets', 'transformers') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_trainer_runs_as_a_module_for_launchers():
    result = subprocess.run(
        [sys.executable, "-m", "ds_sft.train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--local_rank" in result.stdout


# what the ds-sft console script runs (pyproject.toml: ds-sft = "ds_sft.cli:main")
CONSOLE_SCRIPT = "import sys; from ds_sft.cli import main; sys.exit(main())"


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["prepare", "--no_such_flag"], ["nonsense"]]
)
def test_python_m_ds_sft_is_the_ds_sft_command(argv):
    """Where the venv is not activated, users type ``python -m ds_sft``: it was "No module named
    ds_sft.__main__". Same output and exit code as the console script."""
    module, script = (
        subprocess.run([sys.executable, *how, *argv], capture_output=True, text=True, timeout=60)
        for how in (["-m", "ds_sft"], ["-c", CONSOLE_SCRIPT])
    )
    assert (module.returncode, module.stdout, module.stderr) == (
        script.returncode,
        script.stdout,
        script.stderr,
    )
    assert "Traceback" not in module.stderr


def _documented_module_entry_points() -> list[tuple[str, str]]:
    """(command, module) for each `python -m MODULE` in docs/ARCHITECTURE.md's command table."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    return re.findall(r"^\| (\w+) \| `[\w.]+` \| `python -m ([\w.]+)`", doc, flags=re.MULTILINE)


def test_the_command_table_lists_every_command():
    assert {command for command, _ in _documented_module_entry_points()} == set(COMMANDS)


@pytest.mark.parametrize(("command", "module"), _documented_module_entry_points())
def test_documented_python_m_entry_points_run(command, module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _value_flags() -> list[tuple[str, str]]:
    return [
        (command, action.option_strings[0])
        for command, parser in sorted(command_parsers(build_parser()).items())
        for action in parser._actions
        if action.option_strings and action.nargs != 0 and action.dest != "help"
    ]


@pytest.mark.parametrize(("command", "flag"), _value_flags())
@pytest.mark.parametrize("empty", ["", " ", "\t"])
def test_an_empty_value_stops_in_one_line_naming_the_flag(command, flag, empty, capsys):
    """Every flag that takes a value, of every command: "" (an unset shell variable) named the working
    directory to a path flag (export --hf "" wrote to ".", its refusal blamed the tokenizer folder)."""
    parser = build_parser()
    action = next(a for a in command_parsers(parser)[command]._actions if a.option_strings[:1] == [flag])
    values = [empty] * (action.nargs if isinstance(action.nargs, int) else 1)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([command, flag, *values])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"argument {flag}: the value is empty" in err


@pytest.mark.parametrize(("command", "flag"), _value_flags())
def test_a_value_that_is_not_utf8_stops_in_one_line_naming_the_flag(command, flag, capsys):
    """Every flag that takes a value, of every command: a Latin-1 name ('caf\\xe9' as bytes) reached the
    command, and train ran to its end before its report failed to be written, a UnicodeEncodeError."""
    not_utf8 = os.fsdecode(b"runs/caf\xe9")  # as Python receives such an argument: runs/caf\udce9
    parser = build_parser()
    action = next(a for a in command_parsers(parser)[command]._actions if a.option_strings[:1] == [flag])
    values = [not_utf8] * (action.nargs if isinstance(action.nargs, int) else 1)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([command, flag, *values])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"argument {flag}: 'runs/caf\\udce9' is not UTF-8" in err
    assert build_parser().parse_args(["export", "--base_model", "café", "--hf", "runs/é"]).hf == "runs/é"


def error_of(argv: list[str], capsys) -> str:
    """What parsing ``argv`` says on stderr ("" when it parses)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return capsys.readouterr().err
    return ""


def input_flags() -> list[tuple[str, str]]:
    return [
        (command, action.option_strings[0])
        for command, parser in sorted(command_parsers(build_parser()).items())
        for action in parser._actions
        if isinstance(action, StoreOnce)
    ]


# Every flag that names an input, by command: given twice, the last value was used without a word.
PREPARE_INPUTS = ("--alpaca", "--gsm8k", "--dolly", "--gsm8k_test", "--tokenizer", "--base_model")
INPUT_FLAGS = {("prepare", flag) for flag in PREPARE_INPUTS} | {
    ("train", "--data_dir"), ("train", "--base_model"), ("train", "--model"), ("train", "--deepspeed_config"),
    ("eval", "--model"), ("eval", "--compare"), ("eval", "--data_dir"), ("eval", "--gsm8k_test"),
    ("export", "--base_model"), ("export", "--tokenizer"),
}  # fmt: skip


def test_every_input_flag_is_given_once():
    assert set(input_flags()) >= INPUT_FLAGS


@pytest.mark.parametrize(("command", "flag"), input_flags())
def test_an_input_flag_given_twice_is_refused(command, flag, capsys):
    """The last of two values won: `prepare --alpaca a.json --alpaca b.json` read b.json alone and
    dropped a.json's rows without a word. The same value twice is harmless and stays accepted."""
    action = next(a for a in command_parsers(build_parser())[command]._actions if flag in a.option_strings)
    candidates = [
        *map(str, action.choices or ()),
        "1",
        "0.5",
        "512",
        "auto",
        "cpu",
        "x",
        "a=1",
        "a,b",
        "last",
        "offline",
    ]
    count = action.nargs if isinstance(action.nargs, int) else 1  # --compare A B takes two
    value = next(v for v in candidates if flag not in error_of([command, flag, *[v] * count], capsys))
    first, then = [value] * count, ["2" if value != "2" else "3"] * count
    message = error_of([command, flag, *first, flag, *then], capsys)
    expected = f"argument {flag}: given twice ({' '.join(first)!r}, then {' '.join(then)!r})"
    assert message.count("\n") == 1 and expected in message
    assert "given twice" not in error_of([command, flag, *first, flag, *first], capsys)


TILDE = "~no-such-user-of-ds-sft/x"
PATH_FLAGS = [  # argv with the hostile path in place of one path flag; "d" is a prepared data dir
    ["prepare", "--alpaca", TILDE],
    ["prepare", "--source", f"mine={TILDE}"],
    ["prepare", "--alpaca", "a.json", "--output_dir", TILDE],
    ["prepare", "--alpaca", "a.json", "--tokenizer", TILDE],
    ["prepare", "--alpaca", "a.json", "--gsm8k_test", TILDE],
    ["train", "--model", "tiny", "--data_dir", TILDE],
    ["train", "--model", "tiny", "--data_dir", "d", "--out_dir", TILDE],
    ["train", "--data_dir", "d", "--base_model", TILDE],
    ["eval", "--model", "m", "--data_dir", TILDE],
    ["export", "--base_model", TILDE, "--hf", "out"],
    ["export", "--base_model", "m", "--hf", TILDE],
]


@pytest.mark.parametrize("argv", PATH_FLAGS, ids=lambda argv: " ".join(argv[:1] + argv[-2:-1]))
def test_a_path_under_an_unknown_users_home_is_one_line(argv, capsys, tmp_path, monkeypatch):
    """Path.expanduser raises a RuntimeError for ~user of no such user: a traceback from every
    path flag but --source."""
    from ds_sft.cli import main
    from tests.train.helpers import write_data_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.json").write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    write_data_dir(tmp_path / "d")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ds-sft {argv[0]}: error:"), err
    assert "~no-such-user-of-ds-sft" in err[0], err  # named: as no home, or as no data dir


def test_expand_user_expands_a_home_and_refuses_an_unknown_user():
    from ds_sft.errors import UserError
    from ds_sft.locations import expand_user

    assert expand_user("~/x") == Path.home() / "x" and expand_user("a/~b") == Path("a/~b")
    with pytest.raises(UserError, match="~nobody-here names no home folder"):
        expand_user("~nobody-here/data")


A_COMMAND_WITH_CLEANUP = """import sys, time
from ds_sft.command import execute

class Command:
    def run(args):
        try:
            open(sys.argv[1] + "/started", "w").close()
            time.sleep(300)
        finally:
            open(sys.argv[1] + "/cleaned", "w").close()

sys.exit(execute("ds-sft x", Command, None))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
@pytest.mark.parametrize("nohup", [False, True], ids=["", "nohup"])
def test_sigterm_and_sighup_unwind_a_command_like_ctrl_c(tmp_path, signum, nohup):
    """They ended a command on the spot: no `finally` ran (a half-written folder stayed, a benchmark's
    own session ran on). A SIGHUP the command was started without (nohup) stays ignored."""
    command = subprocess.Popen(
        [sys.executable, "-c", A_COMMAND_WITH_CLEANUP, str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"),
        preexec_fn=as_from_a_terminal(ignoring=(signal.SIGHUP,) if nohup else ()),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        command.send_signal(signum)
        if nohup and signum == signal.SIGHUP:
            with pytest.raises(subprocess.TimeoutExpired):
                command.wait(timeout=1)
            signum = signal.SIGTERM
            command.send_signal(signum)
        assert command.wait(timeout=60) == 128 + signum
        assert (tmp_path / "stderr").read_text() == f"ds-sft x: stopped by {signum.name}\n"
        assert (tmp_path / "cleaned").exists()
    finally:
        command.kill()
        command.wait()


def _stopped_while_reading(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while the parser is built (it imports every command module)


def _cli(monkeypatch):
    import ds_sft.cli

    monkeypatch.setattr(ds_sft.cli, "build_parser", _stopped_while_reading)
    return ds_sft.cli.main(["train", "--help"])


def _module_entry(monkeypatch):
    import ds_sft.command

    monkeypatch.setattr(ds_sft.command, "load_command", _stopped_while_reading)
    return ds_sft.command.main_for("bench", ["--quick"])


def _demo(monkeypatch):
    from ds_sft import demo

    monkeypatch.setattr(demo, "add_arguments", _stopped_while_reading)
    return demo.main([])


def _bench_script(monkeypatch):
    import types

    from ds_sft.command import main_for_script

    script = types.SimpleNamespace(__file__="bench/x.py", build_parser=_stopped_while_reading)
    return main_for_script(script, [])


@pytest.mark.parametrize(
    ("entry", "prog"),
    [
        (_cli, "ds-sft"),
        (_module_entry, "ds-sft bench"),
        (_demo, "ds-sft demo"),
        (_bench_script, "bench/x.py"),
    ],
    ids=["ds-sft", "python -m", "demo", "bench script"],
)
def test_ctrl_c_while_reading_the_command_line_is_one_line(entry, prog, monkeypatch, capsys):
    """Building the parser is most of a command's 0.4 s start: a Ctrl-C there was a traceback."""
    try:
        entry(monkeypatch)
    except SystemExit as exited:
        code = exited.code
    except KeyboardInterrupt:  # let out, it would stop pytest itself
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt: a traceback")
    assert code == 130 and capsys.readouterr().err == f"{prog}: interrupted\n"


def test_train_keeps_the_default_sigterm_outside_its_loop(monkeypatch):
    """A rank waiting in its rendezvous is in C code, where no Python handler runs: with SIGTERM
    unwinding there, `kill` left it waiting (measured: init_process_group for a missing second rank
    still alive 13 s after SIGTERM). The training loop catches SIGTERM between steps itself."""
    import ds_sft.train.cli as train_cli
    from ds_sft.command import execute

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    seen = {}
    monkeypatch.setattr(
        train_cli, "run", lambda args: seen.update({sig: signal.getsignal(sig) for sig in before})
    )
    assert execute("ds-sft train", train_cli, None) == 0
    assert seen == before


def _every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    """Each command's parser, and each bench script's."""
    import importlib.util

    parsers = sorted(command_parsers(build_parser()).items())
    for script in sorted(Path(__file__).parents[1].glob("bench/*.py")):
        spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "build_parser"):
            parsers.append((f"bench/{script.name}", module.build_parser()))
    return parsers


def test_a_flag_is_taken_whole_never_by_its_prefix(capsys):
    """argparse takes any unique prefix: `train --base m` meant --base_model, so a command in a script
    changed meaning, or stopped, the day a flag sharing that prefix was added. Every proper prefix of every
    flag of every parser (commands and bench scripts) is now refused in one line."""
    tried = 0
    for name, parser in _every_parser():
        # A missing required flag is reported before an unknown one: these parsers are this test's own.
        for action in parser._actions:
            action.required = False
        for group in parser._mutually_exclusive_groups:
            group.required = False
        flags = {flag for action in parser._actions for flag in action.option_strings}
        for flag in sorted(f for f in flags if f.startswith("--")):
            for prefix in {flag[:n] for n in range(3, len(flag))} - flags:
                with pytest.raises(SystemExit) as exited:
                    parser.parse_args([prefix, "1"])
                err = capsys.readouterr().err.strip()
                assert exited.value.code == 2 and len(err.splitlines()) == 1, (name, prefix, err)
                assert prefix in err, (name, prefix, err)
                tried += 1
    assert tried > 1000


class _Stop(BaseException):
    """A BaseException of no library: execute must let it through."""


def test_only_a_native_panic_among_base_exceptions_becomes_one_line(capsys):
    from types import SimpleNamespace

    from tokenizers import Regex, Tokenizer, models, normalizers

    from ds_sft.command import execute

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace(Regex("(a|aa)+b"), "x")
    panics = SimpleNamespace(run=lambda args: tokenizer.encode("a" * 60))
    assert execute("ds-sft prepare", panics, argparse.Namespace()) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(_Stop):
        execute("ds-sft prepare", SimpleNamespace(run=lambda args: (_ for _ in ()).throw(_Stop())), None)


def _misplaced_flags() -> list[tuple[str, str, str]]:
    """(command, a flag it lacks, the other command that has it), for every such pair."""
    parsers = command_parsers(build_parser())
    return [
        (command, flag, other)
        for command, parser in parsers.items()
        for other, elsewhere in parsers.items()
        for flag in elsewhere._option_string_actions
        if other != command and flag.startswith("--") and flag not in parser._option_string_actions
    ]


@pytest.mark.parametrize(("command", "flag", "other"), _misplaced_flags())
def test_a_flag_given_to_the_wrong_command_names_the_command_that_has_it(capsys, command, flag, other):
    """`ds-sft train --max_examples 10` said "ds-sft: error: unrecognized arguments: --max_examples 10"."""
    parser = command_parsers(build_parser())[command]
    needed = [a for a in parser._actions if a.required and a.option_strings]
    needed += [group._group_actions[0] for group in parser._mutually_exclusive_groups if group.required]
    required = [word for action in needed for word in (action.option_strings[0], "x")]
    with pytest.raises(SystemExit) as stop:
        main([command, *required, flag, "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"ds-sft {command}: error: unrecognized arguments: {flag} 1")
    assert f"{flag} is a flag of " in err and f"ds-sft {other}" in err.split(f"{flag} is a flag of ", 1)[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_with_a_default_shows_it_in_help(command):
    """eval's --out runs/eval and --dtype bfloat16 were defaults --help did not say."""
    parser = command_parsers(build_parser())[command]
    text = " ".join(parser.format_help().split())  # argparse wraps lines: compare words
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.nargs == 0 or default is None or default == []:
            continue
        helped = " ".join((action.help or "").split())
        assert "default" in helped or f"{helped} (default: {default})" in text, (action.option_strings, text)
