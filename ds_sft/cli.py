"""``ds-sft``: the front door. Each subcommand lives in its own module (see :mod:`ds_sft.command`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ds_sft import __version__
from ds_sft.command import COMMANDS, execute, load_command, reading_the_command_line
from ds_sft.options import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ds-sft",
        description="Supervised fine-tuning of small LLaMA-style models with DeepSpeed.",
        epilog="Run 'ds-sft COMMAND --help' for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"ds-sft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        module = load_command(name)
        command_parser = sub.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with reading_the_command_line("ds-sft"):
        args = build_parser().parse_args(argv)
    return execute(f"ds-sft {args.command}", load_command(args.command), args)


if __name__ == "__main__":
    sys.exit(main())
