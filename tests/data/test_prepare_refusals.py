"""``prepare`` given what a careless or hostile user hands over: one line each, nothing lost or left.

Found by red-teaming the command (2026-12-02); every case here ended in a traceback, a silent
fallback or a leftover folder before its fix.
"""

from __future__ import annotations

import copy
import os
import signal
import stat
import unicodedata
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ds_sft.data.templates import answer_end_id, conversation_segments, render_prompt
from ds_sft.errors import UserError
from tests.data.helpers import alpaca_rows, gsm8k_rows, write_jsonl

FLAGS = ["--val_fraction", "0", "--decontam_threshold", "0"]

# Chat templates that fail while rendering: the sandbox refusing attribute access, the template's own
# raise_exception(), an undefined name, a template that is not text, a syntax error.
FAILING_TEMPLATES = {
    "sandbox": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "raise_exception": "{{ raise_exception('this template wants a system turn') }}",
    "undefined": "{{ messages[0].content.nothing.deeper }}",
    "not_text": 12345,
    "syntax": "{% for m in messages %}{{ m.content }}",
}


@pytest.fixture(params=sorted(FAILING_TEMPLATES))
def failing_template(request, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = FAILING_TEMPLATES[request.param]
    return tokenizer


def test_a_failing_chat_template_is_one_line_for_one_turn_prompts(failing_template):
    with pytest.raises(UserError, match=r"^row-7: the chat template refused the conversation \("):
        render_prompt({"id": "row-7", "instruction": "Add 2 and 2."}, "chat", failing_template)


def test_a_failing_chat_template_is_one_line_for_conversations(failing_template):
    record = {"history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
              "instruction": "and now?", "response": "bye"}  # fmt: skip
    with pytest.raises(UserError, match="the chat template refused the conversation"):  # not its probe's
        conversation_segments(record, "chat", failing_template, failing_template.eos_token_id)


# Renders one turn as written (so the prefix route works) except that it drops the reasoning of an
# answer that is not the last: the located route, which needs a private-use character as a probe.
DROPS_PAST_REASONING = (
    "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' and not loop.last %}"
    "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_a_conversation_holding_every_private_use_character_is_refused_in_one_line(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = DROPS_PAST_REASONING
    every_probe = "".join(chr(code) for code in range(0xE000, 0xF900))
    history = [
        {"role": "user", "content": every_probe},
        {"role": "assistant", "content": "<think>a</think>b"},
    ]
    record = {"history": history, "instruction": "more", "response": "c"}
    end_id = answer_end_id(tokenizer, "chat")
    with pytest.raises(UserError, match="every private-use character"):
        conversation_segments(record, "chat", tokenizer, end_id)


def test_parquet_values_python_cannot_hold_are_one_line(run_prepare, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = alpaca_rows(3)
    table = pa.table(
        {
            **{key: [row[key] for row in rows] for key in rows[0]},
            "when": pa.array([2**31 - 1] * 3, type=pa.date32()),  # a day past year 9999
        }
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(UserError, match=r"rows\.parquet: a column holds values Python cannot read"):
        run_prepare(
            ["--source", f"mine={tmp_path / 'rows.parquet'}", *FLAGS, "--output_dir", str(tmp_path / "out")]
        )


@pytest.mark.parametrize("kind", ["alpaca", "gsm8k", "dolly"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_source_flag_is_refused_not_read_as_absent(kind, value, run_prepare, tmp_path):
    """``--alpaca "$UNSET"`` used to train on the whole shared mix instead, without a word (every
    flag's empty value: tests/test_command_line.py)."""
    with pytest.raises(SystemExit, match="2"):
        run_prepare([f"--{kind}", value, *FLAGS, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["not json at all\n", '{"instruction": "a", "output": "b"}\n', ""])
def test_a_named_gsm8k_test_set_that_cannot_be_used_is_refused(content, run_prepare, tmp_path):
    """Before: exit 0 with decontamination off, and a note asking for the flag the user had passed."""
    test_set = tmp_path / "test.jsonl"
    test_set.write_text(content)
    train = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(8))
    argv = ["--gsm8k", str(train), "--gsm8k_test", str(test_set), "--val_fraction", "0"]
    with pytest.raises(UserError, match="^--gsm8k_test: "):
        run_prepare([*argv, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def prepare_argv(tmp_path: Path, out: Path) -> list[str]:
    rows = tmp_path / "alpaca.jsonl"
    if not rows.exists():
        write_jsonl(rows, alpaca_rows(12))
    return ["--alpaca", str(rows), *FLAGS, "--output_dir", str(out)]


def staging_left(root: Path) -> list[Path]:
    return list(root.rglob(".*.new-*"))


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o2775])
def test_the_output_folder_keeps_the_mode_the_user_gave_it(mode, run_prepare, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(mode)
    run_prepare(prepare_argv(tmp_path, out))
    assert stat.S_IMODE(out.stat().st_mode) == mode  # an empty folder swapped for a new one
    run_prepare([*prepare_argv(tmp_path, out), "--force"])
    assert stat.S_IMODE(out.stat().st_mode) == mode  # and ds-sft's own output replaced


def test_a_sigterm_while_writing_leaves_no_staging_folder(run_prepare, tmp_path, monkeypatch):
    """A scheduler's kill unwinds like Ctrl-C (every command, ``signals_unwind``): the half-written
    folder goes, the old output stays."""
    from ds_sft.command import Terminated, signals_unwind
    from ds_sft.data import prepare_write

    real_write = prepare_write.write_documents

    def write_then_get_killed(directory, *args):
        result = real_write(directory, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(prepare_write, "write_documents", write_then_get_killed)
    with pytest.raises(Terminated), signals_unwind():
        run_prepare(prepare_argv(tmp_path, tmp_path / "out"))
    assert not staging_left(tmp_path) and not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.usefixtures("run_prepare")  # its setting: no ../shared, hub offline
def test_a_full_disk_while_saving_the_tokenizer_is_one_line(
    tiny_tokenizer_file, tmp_path, monkeypatch, capsys
):
    """tokenizers reports a full disk as a plain Exception; it reaches the user as the OSError it is."""
    from transformers import PreTrainedTokenizerFast

    from ds_sft.command import execute
    from ds_sft.data import prepare
    from tests.data.helpers import parse_prepare_args

    def disk_full(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    argv = [
        "--tokenizer",
        str(tiny_tokenizer_file),
        "--seq_len",
        "256",
        *prepare_argv(tmp_path, tmp_path / "out"),
    ]
    assert execute("ds-sft prepare", prepare, parse_prepare_args(argv)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the bars
    assert errors == [f"ds-sft prepare: error: {tmp_path / 'out'}: No space left on device; "
                      "free some space there, or write somewhere else"]  # fmt: skip
    assert not staging_left(tmp_path) and not (tmp_path / "out").exists()


def test_a_mount_point_is_refused_before_any_work(run_prepare, tmp_path, monkeypatch):
    """The swap renames the output folder, which a mount point refuses (EBUSY) after all the work."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out)
    with pytest.raises(UserError, match="is a mount point"):
        run_prepare(prepare_argv(tmp_path, out))
    assert not staging_left(tmp_path) and list(out.iterdir()) == []


def test_a_refused_swap_says_where_the_finished_output_is(run_prepare, tmp_path, monkeypatch):
    from ds_sft.data import output

    out = tmp_path / "out"
    run_prepare(prepare_argv(tmp_path, out))
    first = sorted(p.relative_to(out) for p in out.rglob("*"))

    def busy(a, b):
        raise OSError(16, os.strerror(16), str(b))

    monkeypatch.setattr(output, "_exchange", busy)
    with pytest.raises(
        UserError, match=r"could not be replaced \(Device or resource busy\); the finished output is in"
    ) as err:
        run_prepare([*prepare_argv(tmp_path, out), "--force"])
    finished = Path(str(err.value).split("the finished output is in ")[1].split(": move it")[0])
    assert (finished / "manifest.json").is_file() and finished.parent == tmp_path
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == first  # the old output untouched


def run_unprivileged_prepare(tmp_path: Path, out: Path, tokenizer: Path):
    import subprocess
    import sys

    from tests.train.helpers import REPO_ROOT
    from tests.unprivileged import unprivileged

    argv = ["--tokenizer", str(tokenizer), "--seq_len", "256", *prepare_argv(tmp_path, out), "--force"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "DS_SFT_SHARED": str(tmp_path / "none"),
    }
    return subprocess.run(
        [*unprivileged(), sys.executable, "-m", "ds_sft.cli", "prepare", *argv],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip


def test_an_output_whose_parent_cannot_be_written_is_refused_before_any_work(tiny_tokenizer_file, tmp_path):
    """The new output is built beside the old one: a writable folder in a read-only parent fails late."""
    parent = tmp_path / "parent"
    (parent / "out").mkdir(parents=True)
    parent.chmod(0o555)
    try:
        result = run_unprivileged_prepare(tmp_path, parent / "out", tiny_tokenizer_file)
    finally:
        parent.chmod(0o755)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and "prepare builds the new output beside it" in err[0], (
        err
    )
    assert list((parent / "out").iterdir()) == []


@pytest.mark.parametrize("hidden", ["train", "train/index.json"])
def test_an_old_output_with_unreadable_parts_is_refused_not_half_checked(
    hidden, run_prepare, tiny_tokenizer_file, tmp_path
):
    """What ds-sft cannot read it cannot prove it wrote: before, an unreadable train/ was skipped by
    the check and left behind unreported, and an unreadable file ended in a traceback."""
    out = tmp_path / "out"
    run_prepare(prepare_argv(tmp_path, out))
    (out / hidden).chmod(0)
    try:
        result = run_unprivileged_prepare(tmp_path, out, tiny_tokenizer_file)
    finally:
        (out / hidden).chmod(0o755)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr[-2000:]
    assert "not as ds-sft wrote them" in err[0] and hidden in err[0]
    assert not staging_left(tmp_path) and (out / "manifest.json").is_file()


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
@pytest.mark.parametrize("where", ["alone", "mid-text", "at the end"])
def test_text_spelling_a_special_token_is_dropped_and_counted_not_tokenized_as_one(
    field, where, run_prepare, tiny_tokenizer, tmp_path
):
    """``<|endoftext|>`` in a row's text became the EOS id itself: the model learned to stop mid-answer
    and trained on what followed as a new document's text."""
    eos = tiny_tokenizer.eos_token
    text = {"alone": eos, "mid-text": f"Hi there{eos}Ignore this and", "at the end": f"All done.{eos}"}[where]
    rows = alpaca_rows(12)
    rows[3] = {**rows[3], field: text}
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    manifest = run_prepare(["--alpaca", str(data), *FLAGS, "--output_dir", str(tmp_path / "out")])
    counts = manifest["counts"]["alpaca"]
    assert counts["dropped"] == {"special_token_text": 1} and counts["kept"] == 11


@pytest.mark.parametrize("no_pack", [True, False])
def test_rows_that_cannot_be_held_are_one_line_before_they_are_laid_out(
    run_prepare, tmp_path, monkeypatch, no_pack
):
    """--no_pack pads every example to --seq_len: 5,000 examples at --seq_len 1048576 asked numpy for
    38 GiB and ended in its MemoryError traceback. Here the machine has 64 MiB available."""
    import ds_sft.machine
    from ds_sft.data import pack

    monkeypatch.setattr(ds_sft.machine, "available_memory", lambda: 64 << 20)
    laid_out = []
    monkeypatch.setattr(pack, "pack_rows", lambda *args: laid_out.append(args) or pytest.fail("laid out"))
    out = tmp_path / "out"
    argv = [*prepare_argv(tmp_path, out), "--seq_len", str(1 << 20), *(["--no_pack"] if no_pack else [])]
    if not no_pack:  # packed, the rows take about the data's size: it goes on to lay them out
        with pytest.raises(pytest.fail.Exception, match="laid out"):
            run_prepare(argv)
        return
    with pytest.raises(
        UserError,
        match=r"^\d+ rows of --seq_len 1,048,576 take [\d.]+ GiB to lay out, more than"
        r" the 0\.1 GiB this machine has available: lower --seq_len, or pack",
    ):
        run_prepare(argv)
    assert not out.exists() and not staging_left(tmp_path)


def test_bytes_per_position_is_what_pack_rows_holds():
    import numpy as np

    from ds_sft.data.pack import BYTES_PER_POSITION, one_per_row, pack_rows
    from tests.data.helpers import documents_with_prompts

    docs = documents_with_prompts(
        np.arange(5, dtype=np.int32), np.array([0, 2, 5]), np.array([1, 1]), np.zeros(2)
    )
    rows = pack_rows(docs, one_per_row(2), 8, 0)
    assert rows["tokens"].itemsize + rows["loss_mask"].itemsize == BYTES_PER_POSITION


@pytest.mark.parametrize(
    ("text", "dropped"),
    [("Hi<|im_start|>user\nforged", True), ("say [INST] now", True), ("hello there", False),
     ("wide    gap", False)],
)  # fmt: skip
def test_text_spelling_an_added_marker_without_the_special_flag_is_dropped(
    text, dropped, run_prepare, tiny_tokenizer_file, tmp_path
):
    """A chat marker added as a plain token (special: false) was matched in the data all the same:
    an answer spelling ``<|im_start|>`` trained that control id and forged a turn. Added words and
    whitespace runs are text, and stay."""
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_file(str(tiny_tokenizer_file))
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in
                        ("<|im_start|>", "[INST]", "hello", "    ")])  # fmt: skip
    saved = tmp_path / "tokenizer.json"
    backend.save(str(saved))
    rows = alpaca_rows(12)
    rows[3] = {**rows[3], "output": text}
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    manifest = run_prepare(["--alpaca", str(data), *FLAGS, "--tokenizer", str(saved), "--output_dir",
                            str(tmp_path / "out")])  # fmt: skip
    counts = manifest["counts"]["alpaca"]
    assert counts["dropped"] == ({"special_token_text": 1} if dropped else {})
    assert counts["kept"] == (11 if dropped else 12)


@settings(max_examples=200, derandomize=True)
@given(name=st.text(st.characters(blacklist_categories=()), min_size=1, max_size=70))
@example(name="\udcff")  # argv bytes that are not UTF-8 (a UnicodeEncodeError after tokenizing)
@example(name="a:b")  # --field_map a:b:instruction=q would map source 'a'
@example(name="a,b")  # --mix a,b=2 would be two pairs
@example(name=" a")  # --mix and --field_map strip it
@example(name="a" * 65)
@example(name="my-data_2.v1")
@example(name="=")  # NAME=PATH is cut at its first "=": no name at all
@example(name="a=b")  # the source is "a"
def test_a_source_name_is_refused_in_one_line_or_round_trips(name, tmp_path_factory):
    """A --source NAME is written into row ids, the manifest and the summary, and read back from
    --mix and --field_map: whatever collect_sources accepts comes back out of each unchanged. A name
    cannot hold "=": --source NAME=PATH ends the name at its first one."""
    import ds_sft.locations
    from ds_sft.data.mix import parse_mix, source_rng
    from ds_sft.data.prepare_inputs import collect_sources
    from ds_sft.data.sources import parse_field_map
    from tests.data.helpers import parse_prepare_args

    rows = tmp_path_factory.mktemp("name") / "rows.jsonl"
    write_jsonl(rows, alpaca_rows(1))
    given = name.partition("=")[0]  # the name collect_sources sees
    try:
        args = parse_prepare_args([f"--source={name}={rows}"])  # one argument, whatever the name starts with
    except SystemExit as exited:  # the parser refuses a value that is not UTF-8 (tests/test_command_line.py)
        assert exited.code == 2  # or holds a control character
        assert any(unicodedata.category(char) in ("Cc", "Cs") for char in name)  # and nothing else
        return
    shared_dir = ds_sft.locations.shared_dir
    ds_sft.locations.shared_dir = lambda: None  # no ../shared sources
    try:
        specs = collect_sources(args)
    except UserError as err:
        assert "\n" not in str(err)
        assert "NAME must be" in str(err) if given else "expected NAME=PATH" in str(err)
        return
    finally:
        ds_sft.locations.shared_dir = shared_dir
    assert [spec.name for spec in specs] == [given]
    assert parse_mix(f"{given}=2", [given]) == {given: 2.0}
    assert parse_field_map(f"{given}:instruction=q") == (given, {"instruction": "q"})
    source_rng(0, given)
    assert f"{given}:1".encode("ascii").decode().partition(":")[0] == given


def test_a_source_name_of_bytes_that_are_not_utf8_is_refused_before_any_reading(
    run_prepare, tmp_path, capsys
):
    write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(4))
    with pytest.raises(SystemExit) as exited:  # by the parser, as every flag value that is not UTF-8
        run_prepare(
            ["--source", f"\udcff={tmp_path / 'rows.jsonl'}", *FLAGS, "--output_dir", str(tmp_path / "out")]
        )
    assert exited.value.code == 2 and "argument --source: '\\udcff=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mix", ["alpaca=1,alpaca=3", "alpaca=2, alpaca =2", "gsm8k=1,alpaca=0.5,gsm8k=0"])
def test_a_mix_naming_a_source_twice_is_one_line(mix):
    """--mix alpaca=1,...,alpaca=3 (a long mix edited in place) took the last weight without a word,
    as a repeated input flag once read the last file."""
    from ds_sft.data.mix import parse_mix

    with pytest.raises(UserError) as refused:
        parse_mix(mix, ["alpaca", "gsm8k"])
    message = str(refused.value)
    assert "\n" not in message and "more than once" in message and "--mix" in message


def backtracking_tokenizer(folder: Path) -> Path:
    """A tokenizer whose normalizer regex backtracks past Oniguruma's retry limit on a run of a's:
    the tokenizers library then panics in Rust (pyo3's PanicException, a BaseException)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {
        "<|endoftext|>": 0,
        "[UNK]": 1,
        **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz0123456789")},
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace(Regex("(a|aa)+b"), "x")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("length", [40, 200])
def test_a_tokenizer_that_panics_in_rust_is_one_line(length, tmp_path, capfd, monkeypatch):
    """It was a PanicException traceback (exit 1): no ``except Exception`` catches it."""
    from ds_sft.cli import main

    monkeypatch.setenv("RUST_BACKTRACE", "0")
    rows = [{"instruction": f"question {i}", "output": "a" * length} for i in range(4)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    argv = [
        "prepare",
        "--source",
        f"s={tmp_path / 'rows.jsonl'}",
        "--tokenizer",
        str(backtracking_tokenizer(tmp_path / "tok")),
    ]
    assert main([*argv, "--seq_len", "256", *FLAGS, "--output_dir", str(out)]) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ds-sft prepare: error: a library's native code failed (Onig"), last
    assert "tokenizer" in last and not out.exists()


def lossy_tokenizer(folder: Path) -> Path:
    """Lower-case letters and a few marks only, no unknown token, no byte fallback: every other
    character encodes to nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz#:")}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("lost", [1, 5, 9])
def test_rows_whose_answers_encode_to_no_token_are_dropped_and_counted(lost, run_prepare, tmp_path):
    """They were kept as examples training on the end-of-text token alone, with exit 0 and no count."""
    rows = [
        {"instruction": f"question {'abcdefghij'[i]}", "output": "1234" if i < lost else "yes"}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    tokenizer = lossy_tokenizer(tmp_path / "tok")
    flags = ["--source", f"mine={tmp_path / 'rows.jsonl'}", "--tokenizer", str(tokenizer), *FLAGS]
    manifest = run_prepare([*flags, "--output_dir", str(tmp_path / "out")])
    counts = manifest["counts"]["mine"]
    assert counts["dropped"] == {"answer_has_no_tokens": lost}
    assert counts["kept"] == 10 - lost


# per source: (rows whose answer encodes to no token, rows whose prompt alone is longer than --seq_len)
PLANTED = {"a": (1, 2), "b": (3, 0), "c": (0, 4), "d": (2, 1)}


@pytest.mark.parametrize("truncate", [False, True])
def test_rows_dropped_for_their_tokens_are_counted_against_their_own_source(truncate, run_prepare, tmp_path):
    """The drops that need tokens (an answer of no token; a row too long for --seq_len, or with
    --truncate one whose prompt fills it) are counted against the row's own source, in train and val
    alike (seed 1234 puts planted rows of a, b and d in val): each source loses its planted number,
    however many the others lose, and its counts still balance. One source alone cannot show a row
    counted against another source."""
    rows_per_source = 15
    flags = ["--tokenizer", str(lossy_tokenizer(tmp_path / "tok")), "--decontam_threshold", "0"]
    for name, (lost, long) in PLANTED.items():
        rows = [
            {
                "instruction": ("q" * 400 if i < long else "question") + f" {i} of {name}",
                "output": "1234" if long <= i < long + lost else "yes",
            }
            for i in range(rows_per_source)
        ]
        flags += ["--source", f"{name}={write_jsonl(tmp_path / f'{name}.jsonl', rows)}"]
    flags += ["--val_fraction", "0.4", "--min_val_rows", "2", "--output_dir", str(tmp_path / "out")]
    manifest = run_prepare(flags + ["--truncate"] * truncate)
    too_long = "prompt_fills_seq_len" if truncate else "longer_than_seq_len"
    for name, (lost, long) in PLANTED.items():
        counts = manifest["counts"][name]
        planted = {"answer_has_no_tokens": lost, too_long: long}
        assert counts["dropped"] == {reason: n for reason, n in planted.items() if n}, name
        assert counts["rows_in"] == rows_per_source and counts["kept"] == rows_per_source - lost - long
        assert counts["train"] + counts["val"] == counts["kept"]


@pytest.mark.parametrize("mix", ["mine=0", "mine=1e-300", "mine=0.001", "mine=0,other=0"])
def test_a_mix_that_keeps_no_row_says_so(mix, run_prepare, tmp_path):
    """It said "no training examples left; rows dropped by reason: {}", naming neither cause nor fix."""
    for offset, name in enumerate(("mine", "other")):
        write_jsonl(tmp_path / f"{name}.jsonl", alpaca_rows(6, offset=100 * offset))
    sources = [arg for name in ("mine", "other") for arg in ("--source", f"{name}={tmp_path / name}.jsonl")]
    if "other" not in mix:
        sources = sources[:2]
    with pytest.raises(
        UserError, match=r"--mix .* keeps none of the 1?[0-9] training examples .*raise a weight"
    ):
        run_prepare([*sources, *FLAGS, "--mix", mix, "--output_dir", str(tmp_path / "out")])


def test_ctrl_c_while_the_rows_are_tokenized_does_not_wait_for_them(run_prepare, tmp_path, monkeypatch):
    """The tokenizing thread was a ThreadPoolExecutor's, joined on the way out: Ctrl-C during dedup
    waited until every row was tokenized (minutes on a large mix, on a chat template's renders)."""
    import threading

    from ds_sft.data import prepare_selection, tokenize

    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def tokenizing_for_long(*args):
        started.set()
        release.wait(60)
        finished.set()

    def interrupted_meanwhile(*args):
        started.wait(60)
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize, "tokenize_records", tokenizing_for_long)
    monkeypatch.setattr(prepare_selection, "select_rows", interrupted_meanwhile)
    write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(8))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_prepare(
                ["--source", f"mine={tmp_path / 'rows.jsonl'}", *FLAGS, "--output_dir", str(tmp_path / "out")]
            )
        assert not finished.is_set()  # prepare stopped while the tokenizing was still under way
    finally:
        release.set()
    assert not (tmp_path / "out").exists()
