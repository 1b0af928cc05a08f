"""One contender of ``bench/generate_speed.py``: the GSM8K pass of ``evaluate_model``, timed, with the
``ds_sft`` that comes first on ``PYTHONPATH`` (the tree under test, which the parent sets).

The settings arrive as JSON on stdin, already checked by the parent's flags; no flag names a tree,
so nothing on a command line decides which code runs. Prints one ``RESULT {json}`` line, with the
file ``ds_sft`` was imported from for the parent to check, or one ``ERROR`` line when the tree
refuses the model or data (its one-line error) or fails.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path


def main() -> None:
    settings = json.load(sys.stdin)
    import torch

    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    import ds_sft
    from ds_sft.eval import evaluate, gsm8k

    data = evaluate.EvalData.open(Path(settings["data_dir"]), need_val=False)
    problems = gsm8k.select(gsm8k.load_test_set()[0], settings["problems"], seed=0)
    options = dict(batch_size=settings["batch"], max_new_tokens=settings["max_new_tokens"], val_rows=None)
    if "generate_batch_size" in inspect.signature(evaluate.evaluate_model).parameters:  # not the baseline's
        options["generate_batch_size"] = settings["batch"]
    result = evaluate.evaluate_model(
        settings["model"],
        data,
        problems,
        device=torch.device("cpu"),
        dtype=getattr(torch, settings["dtype"]),
        run_val=False,
        run_generations=False,
        **options,
    )
    score = result["gsm8k"]
    record = {
        "seconds": result["seconds"]["gsm8k"],  # to 0.1 s, in both trees
        "correct": score["correct"],
        "completions": [s["completion"] for s in score["samples"]],
        "threads": torch.get_num_threads(),
        "ds_sft": ds_sft.__file__,
    }
    print("RESULT " + json.dumps(record))


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # the tree's one-line refusal, or its failure: the parent says which
        print(f"ERROR {type(err).__name__}: {(str(err).splitlines() or [''])[0]}", flush=True)
        raise
