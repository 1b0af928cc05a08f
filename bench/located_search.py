"""How long the ``located`` route takes to find an answer in a conversation's render: the regular
expression it used (the answer's non-space characters joined by ``\\s*``) against
:func:`ds_sft.data.shown_text.find_shown`, side by side on the same texts, with their ratio.

Cases: a typical render (an answer of ordinary words right before its turn end), a render whose
first form of the answer is absent (a template that dropped the reasoning: both searches fail), and
the repetitive text on which the regular expression is quadratic. Each case checks that both give
the same span before it is timed.

    python bench/located_search.py [--sizes 4000 16000 64000]
"""

from __future__ import annotations

import argparse
import re
import time

from ds_sft.data.shown_text import find_shown

END = "<|im_end|>\n"


def regex_span(text: str, shown: str, start: int) -> tuple[int, int] | None:
    joined = r"\s*".join(re.escape(char) for char in shown if not char.isspace())
    found = re.compile(f"({joined}){re.escape(END)}").search(text, start)
    return found.span(1) if found else None


def cases(size: int) -> dict[str, tuple[str, str]]:
    """name -> (render, answer shown in it) of about ``size`` characters each."""
    words = " ".join(f"word{i % 997}" for i in range(size // 8))
    typical = f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n{words}{END}"
    repeated = "ab " * (size // 3)
    # the answer as given holds a reasoning block the template dropped: every start fails late
    absent = f"<|im_start|>assistant\n{repeated}{END}"
    return {
        "typical": (typical, words),
        "absent (reasoning dropped)": (absent, repeated + "x"),
        "repetitive, found": (absent, repeated),
    }


def best_of(repeats: int, call) -> float:
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        timings.append(time.perf_counter() - began)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000, 64000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case':28} {'chars':>7} {'regex s':>9} {'find_shown s':>13} {'regex / find_shown':>19}")
    for size in args.sizes:
        for name, (text, shown) in cases(size).items():
            expected = regex_span(text, shown, 0)
            assert find_shown(text, shown, END, 0, len(text), False) == expected, name
            slow = best_of(args.repeats, lambda: regex_span(text, shown, 0))  # noqa: B023
            fast = best_of(args.repeats, lambda: find_shown(text, shown, END, 0, len(text), False))  # noqa: B023
            print(f"{name:28} {len(text):7,} {slow:9.4f} {fast:13.4f} {slow / fast:19.1f}")


if __name__ == "__main__":
    main()
