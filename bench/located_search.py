"""How long the ``located`` route takes to find an answer in a conversation's render: the regular
expression it used (the answer's non-space characters joined by ``\\s*``) against
:func:`ds_sft.data.shown_text.find_shown`, side by side on the same texts, with their ratio.

    python bench/located_search.py [--sizes 4000 16000 64000] [--repeats 3] [--quick]

Cases: a typical render (an answer of ordinary words right before its turn end), a render in which
the answer as given is absent (a template dropped its reasoning: both searches fail, having tried
every start), and the repetitive text on which the regular expression is quadratic. Each case is
checked to give the same span both ways before it is timed; the best of ``--repeats`` counts.
Writes bench/results/located_search[.quick].json.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.data.shown_text import find_shown  # noqa: E402
from ds_sft.options import Int  # noqa: E402

END = "<|im_end|>\n"


def regex_span(text: str, shown: str) -> tuple[int, int] | None:
    joined = r"\s*".join(re.escape(char) for char in shown if not char.isspace())
    found = re.compile(f"({joined}){re.escape(END)}").search(text)
    return found.span(1) if found else None


def cases(size: int) -> dict[str, tuple[str, str]]:
    """name -> (render, answer to find in it), each about ``size`` characters."""
    words = " ".join(f"word{i % 997}" for i in range(size // 8))
    typical = f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n{words}{END}"
    repeated = "ab " * (size // 3)
    render = f"<|im_start|>assistant\n{repeated}{END}"
    return {"typical": (typical, words), "absent": (render, repeated + "x"), "repetitive": (render, repeated)}


def best_of(repeats: int, call) -> float:
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        timings.append(time.perf_counter() - began)
    return min(timings)


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=Int(100, 10**6), nargs="+", default=[4000, 16000, 64000], help="characters"
    )
    parser.add_argument("--repeats", type=Int(1, 100), default=3, help="timed runs of each, the best counts")
    parser.add_argument(
        "--quick", action="store_true", help="sizes 2000 and 4000, one run each (a smoke test)"
    )
    return parser


def run(args: argparse.Namespace) -> None:
    out = check_bench_out(ROOT / "bench" / "results" / f"located_search{'.quick' if args.quick else ''}.json")
    sizes, repeats = ([2000, 4000], 1) if args.quick else (args.sizes, args.repeats)
    rows = []
    print(f"{'case':12} {'chars':>7} {'regex s':>9} {'find_shown s':>13} {'regex / find_shown':>19}")
    for size in sizes:
        for name, (text, shown) in cases(size).items():
            span = find_shown(text, shown, END, 0, len(text), False)
            if span != regex_span(text, shown):
                raise RuntimeError(
                    f"{name} at {size}: find_shown gave {span}, the regex {regex_span(text, shown)}"
                )
            slow = best_of(repeats, lambda: regex_span(text, shown))  # noqa: B023
            fast = best_of(repeats, lambda: find_shown(text, shown, END, 0, len(text), False))  # noqa: B023
            rows.append({"case": name, "chars": len(text), "regex_s": slow, "find_shown_s": fast})
            print(f"{name:12} {len(text):7,} {slow:9.4f} {fast:13.4f} {slow / fast:19.1f}")
    write_bench_json(out, {"rows": rows}, __file__)


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
