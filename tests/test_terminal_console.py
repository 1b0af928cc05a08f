"""Every line a command prints shows the characters that drive a terminal escaped, its layout kept.

``command.execute`` runs each command with its console streams wrapped (``NamedConsole``): whatever
the command prints there (a progress line quoting a name read from a file, a library's message)
passes :func:`ds_sft.errors.terminal_safe`. A stub command prints hostile text through ``print``,
``sys.stderr.write`` and a progress bar, onto strict UTF-8 streams like a terminal's.
"""

from __future__ import annotations

import argparse
import io
import sys
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ds_sft.command import execute

# every control character and lone surrogate, and text around them
HOSTILE = st.lists(
    st.one_of(
        st.characters(codec=None, categories=["Cc", "Cs"]),
        st.sampled_from(["a", "é", " ", "warning: forged", "\x1b]0;PWNED\x07", "\x1b[2J"]),
    ),
    max_size=12,
).map("".join)


class Printing:
    """A command module whose run prints ``text`` in each way a command prints."""

    def __init__(self, text: str):
        self.text = text

    def run(self, args):
        import click
        from tqdm import tqdm

        click.echo(click.style("wandb", fg="blue") + ": syncing", err=True)  # coloured on a terminal
        print(f"eval step 1: {self.text}")
        sys.stderr.write(f"note: {self.text}\n")
        for _ in tqdm(range(2), desc=self.text):
            pass


class Terminal(io.TextIOWrapper):
    """A strict UTF-8 stream that says it is a terminal, as a user's console does."""

    def isatty(self) -> bool:
        return True


def console() -> Terminal:
    return Terminal(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(HOSTILE)
@example("alpaca\x1b]0;PWNED\x07\x9b2J\x7f\b\udcff")
def test_what_a_command_prints_holds_no_terminal_control(text):
    out, err = console(), console()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = execute("ds-sft test", Printing(text), argparse.Namespace())
    finally:
        sys.stdout, sys.stderr = saved
    assert code == 0
    printed = out.buffer.getvalue().decode() + err.buffer.getvalue().decode()
    raw = {c for c in printed if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\r\t"}
    assert not raw, printed
    # the lines are the command's own: each escape is shown as its code (\x1b), nothing dropped
    escaped = "".join(c if c in "\n\r\t" or unicodedata.category(c) not in ("Cc", "Cs") else repr(c)[1:-1]
                      for c in text)  # fmt: skip
    assert f"eval step 1: {escaped}\n" in printed
    assert f"note: {escaped}\n" in printed
    assert "wandb: syncing\n" in printed  # a library's colours left out, not shown as codes
