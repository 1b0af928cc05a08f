"""``ds-sft``: the front door. Each subcommand lives in its own module (see :mod:`ds_sft.command`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ds_sft import __version__
from ds_sft.command import COMMANDS, execute, load_command, reading_the_command_line
from ds_sft.options import HelpFormatter, OneLineParser


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
            formatter_class=HelpFormatter,
        )
        module.add_arguments(command_parser)
    return parser


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's own parser in ``ds-sft``'s."""
    (found,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return found.choices


def flags_elsewhere(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """Which other commands have the flags ``command`` does not know (``--max_examples`` given to train
    is prepare's): " (--max_examples is a flag of ds-sft prepare)", or "" when none has them."""
    said = []
    for word in unknown:
        flag = word.split("=", 1)[0]
        owners = [
            f"ds-sft {name}"
            for name, sub in command_parsers(parser).items()
            if name != command and flag in sub._option_string_actions
        ]
        if flag.startswith("--") and owners:
            said.append(f"{flag} is a flag of {' and '.join(owners)}")
    return f" ({'; '.join(said)})" if said else ""


def main(argv: Sequence[str] | None = None) -> int:
    with reading_the_command_line("ds-sft"):
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, with the commands that have those flags
            where = flags_elsewhere(parser, args.command, unknown)
            command_parsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}{where}")
    return execute(f"ds-sft {args.command}", load_command(args.command), args)


if __name__ == "__main__":
    sys.exit(main())
