"""How a subcommand is wired: one module per command exposing ``add_arguments`` and ``run``.

A command module (``ds_sft.data.prepare``, ``ds_sft.train.cli``, ...) defines::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int | None: ...

and keeps heavy imports (torch, deepspeed, datasets, transformers) inside ``run`` so that
``ds-sft --help`` answers instantly. The same module runs as ``python -m <module>`` through
:func:`main_for`, which is how the deepspeed launcher and torchrun start the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from ds_sft.errors import UserError, one_line, os_error_line

# name -> (module, one-line summary). Modules are imported only when their command is used.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ds_sft.data.prepare", "clean, dedup, decontaminate, tokenize, pack, split a mix"),
    "train": ("ds_sft.train.cli", "fine-tune with the DeepSpeed engine (1 process, launcher, torchrun)"),
    "eval": ("ds_sft.eval.cli", "val loss / perplexity per source, GSM8K accuracy, sample generations"),
    "export": ("ds_sft.export", "write a checkpoint as a Hugging Face LLaMA model"),
    "bench": ("ds_sft.bench", "run the side-by-side benchmarks in bench/ and print their ratios"),
}


def load_command(name: str):
    """Import the module implementing command ``name``."""
    return importlib.import_module(COMMANDS[name][0])


def execute(prog: str, module, args: argparse.Namespace) -> int:
    """Run ``module.run(args)``, turning a :class:`UserError`, or an ``OSError`` the system raised
    for a path (permissions, disk full...), into one line on stderr and exit 2."""
    try:
        code = module.run(args)
    except UserError as err:
        print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno is None:  # raised by a library with a message of its own: a bug to look at
            raise
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def script_parser(file: str, description: str) -> argparse.ArgumentParser:
    """The parser of the script ``file`` in ``bench/``: one-line errors, named ``bench/<file>``."""
    from ds_sft.options import OneLineParser

    return OneLineParser(
        prog=f"bench/{Path(file).name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main_for_script(module, argv: Sequence[str] | None = None) -> int:
    """Entry point of a script in ``bench/``: parse ``module.build_parser()``'s flags, run
    ``module.run(args)``, and end a bad flag, a :class:`UserError` or a system error in one line."""
    parser = module.build_parser()
    return execute(parser.prog, module, parser.parse_args(argv))


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m <command module>``: parse that command's flags and run it."""
    from ds_sft.options import OneLineParser

    module = load_command(name)
    parser = OneLineParser(
        prog=f"python -m {COMMANDS[name][0]}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return execute(f"ds-sft {name}", module, parser.parse_args(argv))
