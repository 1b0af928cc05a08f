"""``ds-sft bench --quick`` runs every benchmark script that exists and each writes its JSON.

A smoke test only: it asserts that the scripts run and report what they promise, never a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_sft.bench import BENCH_DIR, RESULTS_DIR, available_scripts, has_quick_mode
from ds_sft.errors import UserError
from tests.signals import as_from_a_terminal

# Keys each script's quick JSON must hold (scripts not listed are only required to exit 0).
EXPECTED_KEYS = {
    "train_throughput": {"machine", "config", "a", "b", "c"},
}


@pytest.fixture(scope="module")
def quick_summary():
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(BENCH_DIR.parent / ".cache" / "torch_extensions")}
    result = subprocess.run(
        [sys.executable, "-m", "ds_sft.cli", "bench", "--quick", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((RESULTS_DIR / "summary.quick.json").read_text())


@pytest.mark.slow
def test_every_existing_script_runs_quick(quick_summary):
    scripts = available_scripts([])
    assert quick_summary["quick"] is True
    assert list(quick_summary["scripts"]) == [script.stem for script in scripts]
    for script in scripts:
        entry = quick_summary["scripts"][script.stem]
        if not has_quick_mode(script):
            assert entry["skipped"], script.stem
            continue
        assert entry["returncode"] == 0, script.stem
        assert entry["results"], f"{script.stem} wrote no JSON under bench/results/"


@pytest.mark.slow
def test_train_throughput_quick_json_has_every_part(quick_summary):
    if "train_throughput" not in quick_summary["scripts"]:
        pytest.skip("bench/train_throughput.py is absent")
    data = json.loads((RESULTS_DIR / "train_throughput.quick.json").read_text())
    assert EXPECTED_KEYS["train_throughput"] <= data.keys()
    assert set(data["a"]["rows"]) == {"hf_llama_adamw", "dssft_model_adamw", "dssft_deepspeed_zero2"}
    assert all(row["tokens_per_s"] > 0 for row in data["a"]["rows"].values())
    layouts = data["b"]["layouts"]
    assert set(layouts) == {"packed", "pad_to_seq_len", "pad_to_longest"}
    # the same documents in every layout; padding to the batch's longest never takes more slots
    assert len({(layout["tokens"], layout["trained_tokens"]) for layout in layouts.values()}) == 1
    assert layouts["pad_to_longest"]["slots"] <= layouts["pad_to_seq_len"]["slots"]
    # the padded layouts again through transformers' model, on the very same batches
    for name, row in data["b"]["hf_padded"].items():
        assert row["slots"] == layouts[name]["slots"] and row["trained_tokens_per_s"] > 0
    assert set(data["b"]["hf_padded"]) == {"pad_to_seq_len", "pad_to_longest"}
    assert data["c"]["fraction_of_gemm"] > 0 and data["c"]["gemm_bf16_flops"] > 0


def test_scripts_run_in_order_and_unknown_names_are_refused():
    from ds_sft.errors import UserError

    names = [script.stem for script in available_scripts([])]
    assert names[-1] == "train_throughput"  # the longest runs last
    known_first = [name for name in ("prepare_speed", "kernel_speed", "fp8") if name in names]
    assert names[: len(known_first)] == known_first
    assert [s.stem for s in available_scripts(["train_throughput"])] == ["train_throughput"]
    with pytest.raises(UserError, match="no benchmark 'nope'"):
        available_scripts(["nope"])


def test_useful_flops_counts_real_tokens_trained_logits_and_in_document_pairs():
    """bench/train_throughput.py (c): the second FLOP count, checked by hand on one small row."""
    import importlib.util

    import torch

    from ds_sft.model.config import ModelConfig

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH_DIR / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = ModelConfig.preset("tiny")
    # documents of 3 and 2 tokens, then a padding slot; 3 of the 5 real tokens are trained
    batch = {
        "document_ids": torch.tensor([[0, 0, 0, 1, 1, -1]]),
        "labels": torch.tensor([[5, -100, 7, -100, 9, -100]]),
    }
    head = config.vocab_size * config.d_model
    causal_pairs = 3 * 4 // 2 + 2 * 3 // 2
    expected = (
        6 * (config.matmul_parameters() - head) * 5
        + 6 * head * 3
        + 12 * config.n_layers * config.d_model * causal_pairs
    )
    assert bench.useful_flops(config, batch) == expected


@pytest.mark.parametrize("parts,select,projections", [("a,c", "all", "14 of 14"), ("c", "auto", "0 of 14")])
def test_train_throughput_fp8_step_is_measured_in_fp8(tmp_path, parts, select, projections):
    """(c) in fp8 is its own measurement even when (a) measured the bf16 step (it used to reuse
    (a)'s); ``--fp8_select auto`` asks the roofline, which at the quick size (128 tokens per
    micro-batch) keeps every projection in bf16."""
    out = tmp_path / "throughput.json"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(BENCH_DIR.parent / ".cache" / "torch_extensions")}
    command = [sys.executable, str(BENCH_DIR / "train_throughput.py"), "--quick", "--parts", parts]
    command += ["--fp8", "torch", "--fp8_select", select, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    c = json.loads(out.read_text())["c"]
    assert (c["fp8"], c["fp8_select"], c["fp8_projections"]) == ("torch", select, projections)
    assert c["tokens_per_s"] > 0


@pytest.mark.parametrize(
    ("device_type", "warmed"), [("cuda", {(4, 10), (4, 12), (2, 12)}), ("cpu", {(4, 10)})]
)
def test_layout_timing_warms_up_every_shape_a_cuda_step_compiles_for(monkeypatch, device_type, warmed):
    """bench/train_throughput.py (b): on CUDA flex_attention is compiled per (B, T), and padding to
    the longest row gives nearly every batch its own: warming up one batch left every compile inside
    the timed steps. Each step function's calls before the first timed one are its warm-ups."""
    import importlib.util
    from types import SimpleNamespace

    import torch

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH_DIR / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    monkeypatch.setattr(bench, "_sync", lambda device: calls.append("sync"))

    def step(batch):
        calls.append(tuple(batch["input_ids"].shape))

    batches = [
        {"input_ids": torch.zeros(shape, dtype=torch.long)} for shape in [(4, 10), (4, 12), (4, 10), (2, 12)]
    ]
    device = SimpleNamespace(type=device_type)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: self)
    bench.time_layouts({"padded": (step, batches)}, device)
    warm_ups = calls[: calls.index("sync")]
    assert set(warm_ups) == warmed and len(warm_ups) == len(warmed)


def test_layout_timing_compiles_every_shape_in_the_warm_up(monkeypatch):
    """bench/train_throughput.py (b): past dynamo's recompile limit (8 shapes) a function compiled
    per shape runs uncompiled (flex_attention: the whole score matrix), so the padded layouts were
    timed on slow code. Here a stand-in compiled per shape sees 10 shapes: each is compiled once,
    all before the first timed step (the first ``_sync``)."""
    import importlib.util
    from types import SimpleNamespace

    import torch

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH_DIR / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    compiled, calls = [], []
    monkeypatch.setattr(bench, "_sync", lambda device: calls.append("sync"))

    def backend(graph, inputs):
        compiled.append(tuple(inputs[0].shape))
        return graph.forward

    double_sum = torch.compile(lambda ids: (ids * 2).sum(), backend=backend, dynamic=False)

    def step(batch):
        double_sum(batch["input_ids"])
        calls.append(len(compiled))

    shapes = [(4, 128 * (1 + i % 8)) for i in range(12)] + [(1 + i % 3, 1024) for i in range(5)]  # 11 shapes
    batches = [{"input_ids": torch.zeros(shape, dtype=torch.long)} for shape in shapes]
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: self)
    bench.time_layouts({"padded": (step, batches)}, SimpleNamespace(type="cuda"))
    assert sorted(compiled) == sorted(set(shapes)) and len(compiled) > 8
    assert calls[calls.index("sync") - 1] == len(compiled)  # every compile came before the timing


def test_padding_to_the_longest_rounds_up_to_a_multiple_within_seq_len():
    """bench/train_throughput.py (b): the ds-sft model's padded rows on CUDA are a multiple of
    flex_attention's block (a few shapes to compile), at most seq_len; the documents and their
    order are those of padding to the longest exactly, and only padding is added."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH_DIR / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lengths = [5, 130, 300, 7, 129, 256, 450, 9, 12, 128, 400]
    docs = [bench.Document(torch.arange(1, n + 1), torch.arange(2, n + 2)) for n in lengths]
    exact = bench.padded_layouts(docs, 450, 2, seed=0)["pad_to_longest"]
    rounded = bench.padded_layouts(docs, 450, 2, seed=0, multiple=128)["pad_to_longest"]
    assert [b["input_ids"].shape[1] for b in rounded] == [
        min(450, -(-b["input_ids"].shape[1] // 128) * 128) for b in exact
    ]
    assert {b["input_ids"].shape[1] for b in rounded} <= {128, 256, 384, 450}
    for short, long in zip(exact, rounded, strict=True):
        width = short["input_ids"].shape[1]
        for key in short:
            assert torch.equal(long[key][:, :width], short[key])
        assert (long["document_ids"][:, width:] == -1).all()
        assert (long["labels"][:, width:] == -100).all()


RESULT_HOLDERS = {
    "a link to a user's file": lambda path: path.symlink_to(path.parent / "notes.txt"),
    "a dangling link": lambda path: path.symlink_to(path.parent / "nowhere"),
    "a folder": lambda path: path.mkdir(),
    "a FIFO": lambda path: os.mkfifo(path),
}


@pytest.mark.parametrize("holder", RESULT_HOLDERS)
def test_a_result_name_held_by_anything_but_a_file_is_refused_and_left_as_it_was(tmp_path, holder):
    """A link at a result's name was written through: `ds-sft bench` overwrote the user's notes it
    pointed at with its summary. A result replaces only a regular file, and the refusal comes first."""
    from ds_sft.errors import UserError
    from ds_sft.safe_write import write_result_file

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    path = tmp_path / "result.json"
    RESULT_HOLDERS[holder](path)
    with pytest.raises(UserError, match=r"result\.json is (a link|not a regular file): .* move it away"):
        write_result_file(path, "{}")
    assert notes.read_text() == "my notes" and os.path.lexists(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"notes.txt", "result.json"})


def test_a_result_file_is_replaced_whole_and_readable_by_others(tmp_path):
    from ds_sft.safe_write import write_result_file

    path = tmp_path / "deeper" / "result.json"
    write_result_file(path, "old")
    write_result_file(path, "new")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left


def test_bench_refuses_a_linked_summary_before_running_anything(tmp_path, monkeypatch):
    import ds_sft.bench
    from ds_sft.errors import UserError

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "summary.quick.json").symlink_to(notes)
    monkeypatch.setattr(ds_sft.bench, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(ds_sft.bench, "run_script", lambda *args: pytest.fail("a script ran"))
    args = argparse.Namespace(quick=True, only=["attention"], timeout=None)
    with pytest.raises(UserError, match="summary.quick.json is a link"):
        ds_sft.bench.run(args)
    assert notes.read_text() == "my notes"


def test_a_bench_script_refuses_a_linked_out_in_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "gemm.json").symlink_to(notes)
    command = [
        sys.executable,
        str(BENCH_DIR / "gpu_check.py"),
        "gemm",
        "--n",
        "16",
        "--out",
        str(tmp_path / "gemm.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bench/gpu_check.py: error: ")
    assert "Traceback" not in result.stderr and notes.read_text() == "my notes"


def test_no_flag_of_a_bench_script_names_code_to_run(tmp_path):
    """`generate_speed.py --worker DIR` imported the `ds_sft` package found in DIR (a hidden flag for
    its own worker processes): any folder's code ran. The worker now takes its tree from PYTHONPATH,
    set by the parent, and its settings on stdin."""
    planted = tmp_path / "elsewhere" / "ds_sft"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    command = [sys.executable, str(BENCH_DIR / "generate_speed.py"), "--worker", str(planted.parent),
               "--worker_batch", "1", "--problems", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unrecognized arguments: --worker" in result.stderr, result.stderr
    assert not (tmp_path / "ran").exists()


def test_generate_speed_gives_the_inputs_to_the_current_code_before_the_baseline(tmp_path):
    """The baseline revision's ds_sft (600 commits old, before later checks) read the user's model and
    data first, and a refusal in either tree ended in both trees' output pasted whole. The current code
    reads them first, and a refusal is its one line."""
    command = [
        sys.executable,
        str(BENCH_DIR / "generate_speed.py"),
        "--data_dir",
        str(tmp_path),
        "--problems",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "bench/generate_speed.py: error: current, batch 8: the GSM8K pass stopped: UserError: "
    )
    assert str(tmp_path) in line and result.stdout == "timing current, batch 8 ...\n"


def test_generate_speed_names_a_worker_killed_without_a_word(tmp_path, monkeypatch):
    """A worker killed by the kernel (out of memory) left no ERROR line: the message was its last,
    unrelated stderr line ("  warnings.warn("), without the kill."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate_speed", BENCH_DIR / "generate_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys\nprint('  warnings.warn(', file=sys.stderr, flush=True)\nos.kill(os.getpid(), 9)\n"
    )
    monkeypatch.setattr(module, "WORKER", worker)
    args = module.build_parser().parse_args([])
    with pytest.raises(UserError) as err:
        module.time_tree(args, "current", tmp_path, 8)
    stopped = "current, batch 8: the GSM8K pass stopped: killed by SIGKILL"
    assert str(err.value) == f"{stopped}; its last line: warnings.warn("


def test_a_timed_out_script_is_stopped_with_its_workers_and_links_are_no_results(tmp_path, monkeypatch):
    """A timeout killed the script alone (its worker processes ran on), and a stale link in
    bench/results/ failed `ds-sft bench` after every script had run, with no summary written."""
    import ds_sft.bench

    results = tmp_path / "results"
    results.mkdir()
    (results / "stale.json").symlink_to(tmp_path / "gone.json")
    monkeypatch.setattr(ds_sft.bench, "RESULTS_DIR", results)
    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "slow.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
        f"open({str(results / 'slow.json')!r}, 'w').write('{{}}')\n"
        "time.sleep(300)\n"
    )
    entry = ds_sft.bench.run_script(script, quick=False, timeout=5)
    assert entry["returncode"] is None and entry["results"] == [str(results / "slow.json")]
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.1)  # killed; its parent (gone) no longer reaps it, init does
    state = (
        Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(f"/proc/{worker}").exists() else "gone"
    )
    assert state in ("gone", "Z"), f"the worker is still running (state {state})"


@pytest.mark.parametrize(
    ("case", "words"),
    [('["run_memory_case", "eager", "nope", 1, 1, 1, 1]', "dtype must be one of float32, bfloat16"),
     ('["run_timing_case", "float32", -5, 4, 4, 1, 1]', "tokens must be an integer from 1"),
     ('["run_timing_case", "float32", 4, 4, 4, 1, 0]', "repeats must be an integer from 1"),
     ('["run_memory_case", "fast", "float32", 4, 4, 4, 1]', "method must be one of eager, chunked"),
     ('["print", 1]', "name one of")],
)  # fmt: skip
def test_a_kernel_case_outside_its_flags_domains_is_one_line(case, words):
    """--case checked the case's name and arity only: a wrong value was a KeyError or a
    negative-dimension traceback, and a huge size went straight to torch.randn."""
    command = [sys.executable, str(BENCH_DIR / "kernel_speed.py"), "--case", case]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert (
        result.returncode == 2 and last.startswith("bench/kernel_speed.py: error: --case") and words in last
    )


BENCH_WITH_A_SLOW_SCRIPT = """import argparse, sys
from pathlib import Path
import ds_sft.bench as bench
from ds_sft.command import execute

bench.available_scripts = lambda only: [Path(sys.argv[1])]
bench.RESULTS_DIR = Path(sys.argv[2])
sys.exit(execute("ds-sft bench", bench, argparse.Namespace(quick=False, only=[], timeout=None)))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_stopped_bench_stops_the_script_it_runs(tmp_path, signum):
    """The script runs in a session of its own: SIGTERM (kill, a timeout) or SIGHUP (the terminal
    closed) ended `ds-sft bench` alone, and the benchmark ran on, writing its results."""
    script = tmp_path / "slow.py"
    script.write_text(
        # written whole, then renamed: an open-then-write file can be read empty
        f"import os, time\nopen({str(tmp_path / 'pid.tmp')!r}, 'w').write(str(os.getpid()))\n"
        f"os.replace({str(tmp_path / 'pid.tmp')!r}, {str(tmp_path / 'pid')!r})\ntime.sleep(300)\n"
    )
    (tmp_path / "results").mkdir()
    driver = subprocess.Popen(
        [sys.executable, "-c", BENCH_WITH_A_SLOW_SCRIPT, str(script), str(tmp_path / "results")],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"), preexec_fn=as_from_a_terminal(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        script_pid = int((tmp_path / "pid").read_text())
        driver.send_signal(signum)
        driver.wait(timeout=60)  # stderr in a file: an orphaned child would hold a pipe open
        err = (tmp_path / "stderr").read_text()
        assert driver.returncode == 128 + signum and err.strip().splitlines() == [
            f"ds-sft bench: stopped by {signum.name}"
        ], err
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{script_pid}").exists():
            time.sleep(0.1)
        stat_file = Path(f"/proc/{script_pid}/stat")
        state = stat_file.read_text().split()[2] if stat_file.exists() else "gone"
        assert state in ("gone", "Z"), f"the benchmark script is still running (state {state})"
    finally:
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
        driver.kill()
        driver.wait()


def test_a_failed_prepare_in_prepare_speed_is_one_line_not_an_assert(tmp_path, monkeypatch):
    """`assert main_for("prepare", ...) == 0` was a bare AssertionError traceback, and under python -O
    no check at all: the bench went on to time a run that had failed."""
    import importlib.util

    import ds_sft.command
    from ds_sft.errors import UserError

    spec = importlib.util.spec_from_file_location("prepare_speed", BENCH_DIR / "prepare_speed.py")
    prepare_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_speed)
    for code in (1, 2, 130):
        monkeypatch.setattr(ds_sft.command, "main_for", lambda name, argv, code=code: code)
        with pytest.raises(UserError, match=rf"`ds-sft prepare` failed \(exit {code}; its error is above\)"):
            prepare_speed.time_ds_sft({"alpaca": [{"instruction": "hi"}]}, tmp_path, tmp_path)


@pytest.mark.parametrize("folder", ["bench", "launch"])
def test_no_bench_or_launch_check_is_an_assert(folder):
    """An assert is a traceback when it fails and nothing under python -O or PYTHONOPTIMIZE: the
    scripts' checks of what they ran (bench/*.py, the Python that launch/*.sh runs) say why in a line."""
    import ast

    root = BENCH_DIR.parent / folder
    asserts = [f"{path.name}:{node.lineno}" for path in sorted(root.glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]  # fmt: skip
    asserts += [f"{path.name}:{number}" for path in sorted(root.glob("*.sh"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if line.lstrip().startswith("assert ")]  # fmt: skip
    assert asserts == []
