"""A bench writes over its own earlier results only: ``bench/gpu_check.py gemm --out README.md``
replaced the README with a GEMM's timing. Every result names its writer; any other file at ``--out``
is refused in one line, before the work, and left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ds_sft import bench_result
from ds_sft.bench import BENCH_DIR
from ds_sft.bench_result import check_bench_out, write_bench_json, write_bench_page
from ds_sft.errors import UserError
from tests.reliability.test_fuzz_config import bench_parsers

REFUSED = "is not a result a ds-sft bench wrote"


def test_a_result_names_its_writer_and_is_written_over_by_the_next_run(tmp_path):
    out = tmp_path / "gemm.json"
    write_bench_json(out, {"flops": 1.0}, BENCH_DIR / "gpu_check.py", indent=None)
    assert out.read_text().startswith('{"written_by": "ds-sft bench/gpu_check.py", "machine": {')
    write_bench_json(out, {"flops": 2.0}, BENCH_DIR / "kernel_speed.py")
    written = json.loads(out.read_text())
    assert written.pop("machine") and written == {"written_by": "ds-sft bench/kernel_speed.py", "flops": 2.0}
    page = tmp_path / "SUMMARY.md"
    write_bench_page(page, "# gpu_check\n", BENCH_DIR / "gpu_check.py")
    write_bench_page(page, "# gpu_check again\n", BENCH_DIR / "gpu_check.py")
    assert page.read_text() == "<!-- written by ds-sft bench/gpu_check.py -->\n# gpu_check again\n"
    write_bench_json(tmp_path / "summary.json", {"quick": True}, "bench")  # the ds-sft bench command
    assert check_bench_out(tmp_path / "summary.json") == tmp_path / "summary.json"


def test_every_result_says_what_it_was_measured_on(tmp_path):
    """One machine record, stamped on every JSON result (five benches wrote five shapes of it, and
    most benches none): a bench that used torch gets its version and threads."""
    import torch

    out = tmp_path / "result.json"
    write_bench_json(out, {"flops": 1.0}, BENCH_DIR / "model_speed.py")
    machine = json.loads(out.read_text())["machine"]
    assert machine == {
        **machine,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_initialized() else None,  # the GPU it used
    }
    assert {"platform", "processor", "load_average_1min"} <= machine.keys()


# what a user keeps where a result could go; none of them names a ds-sft writer
THEIRS = {
    "a README": b"# My project\n\nNotes.\n",
    "a JSON object of theirs": b'{"model": "mine", "steps": 100}\n',
    "another program's writer": b'{"written_by": "my-tool", "x": 1}\n',
    "a writer that is not a string": b'{"written_by": ["ds-sft bench"]}\n',
    "a JSON list": b'[{"written_by": "ds-sft bench/x.py"}]\n',
    "bytes": bytes(range(256)),
    "the mark below the first line": b"# notes\n<!-- written by ds-sft bench/gpu_check.py -->\n",
    "the mark inside a JSON string": b'{"note": "written_by: ds-sft bench"}\n',
}


@pytest.mark.parametrize("write", ["json", "page"])
@pytest.mark.parametrize("theirs", THEIRS)
def test_a_file_no_bench_wrote_is_refused_and_kept(tmp_path, theirs, write):
    out = tmp_path / "result"
    out.write_bytes(THEIRS[theirs])
    with pytest.raises(UserError, match=f"^{out} exists and {REFUSED}"):
        if write == "json":
            write_bench_json(out, {"flops": 1.0}, "bench")
        else:
            write_bench_page(out, "# page\n", "bench")
    assert out.read_bytes() == THEIRS[theirs]


@settings(
    max_examples=300,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    content=st.one_of(st.binary(min_size=1, max_size=200), st.text(min_size=1, max_size=200).map(str.encode))
)
@example(content=b'{"written_by": "ds-sft"}')  # the writer's name, not "ds-sft " and a script
def test_any_content_without_a_writer_is_kept(tmp_path, content):
    """Any non-empty file (an empty one holds nothing to lose)."""
    out = tmp_path / "result"
    out.write_bytes(content)
    with pytest.raises(UserError, match=REFUSED):
        check_bench_out(out)
    assert out.read_bytes() == content


def test_an_empty_file_or_one_in_the_benches_own_folder_is_replaced(tmp_path, monkeypatch):
    """`--out "$(mktemp)"` holds nothing to lose; bench/results/ (git ignores it) holds the benches'
    results, those from before the mark too. A folder linked from there to elsewhere is elsewhere."""
    empty = tmp_path / "empty.json"
    empty.touch()
    write_bench_json(empty, {"flops": 1.0}, "bench")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(bench_result, "RESULTS_DIR", results)
    earlier = results / "kernel_speed.json"
    earlier.write_text('{"config": {}, "cpu": []}\n')  # a result from before the mark
    write_bench_json(earlier, {"cpu": [1]}, BENCH_DIR / "kernel_speed.py")
    assert json.loads(earlier.read_text())["written_by"] == "ds-sft bench/kernel_speed.py"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "plan.json").write_text("my plan")
    (results / "linked").symlink_to(tmp_path / "notes")
    with pytest.raises(UserError, match=REFUSED):
        write_bench_json(results / "linked" / "plan.json", {"cpu": [1]}, "bench")
    assert (tmp_path / "notes" / "plan.json").read_text() == "my plan"


def test_a_result_too_large_to_be_one_is_not_read_through(tmp_path, monkeypatch):
    out = tmp_path / "result.json"
    write_bench_json(out, {"rows": list(range(100))}, "bench")
    monkeypatch.setattr(bench_result, "MAX_RESULT_BYTES", 64)
    with pytest.raises(UserError, match=REFUSED):
        check_bench_out(out)


def out_flags() -> dict[str, list[str]]:
    """prog -> the argv of every bench script (or subcommand) that takes ``--out``, with its other
    required flags and ``--quick`` where it has one."""
    argvs = {}
    for prog, (_, before, parser) in bench_parsers().items():
        flags = {flag: action for action in parser._actions for flag in action.option_strings}
        if "--out" not in flags:
            continue
        required = [flag for flag, action in flags.items() if action.required and flag != "--out"]
        script = BENCH_DIR / prog.split()[0].split("/")[-1]
        argvs[prog] = [str(script), *before, *(f for flag in required for f in (flag, "."))]
        argvs[prog] += ["--quick"] if "--quick" in flags else []
    return argvs


@pytest.mark.parametrize("prog", sorted(out_flags()))
def test_every_bench_out_flag_refuses_a_users_file_before_the_work(tmp_path, prog):
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n")
    argv = [*out_flags()[prog], "--out", str(readme)]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and f"{readme} exists and {REFUSED}" in done.stderr
    assert done.stdout == ""  # nothing measured first
    assert readme.read_text() == "# My project\n"


def test_the_scripts_with_out_flags_are_found():
    assert {"gpu_check.py gemm", "kernel_speed.py", "fp8.py", "train_throughput.py"} <= {
        " ".join(prog.split("/")[-1].split()) for prog in out_flags()
    }
