"""Evaluation: validation loss per source, GSM8K accuracy, fixed-prompt generations (``ds-sft eval``).

    cli.py         the command: how good is a checkpoint, and is it better than another one?
    evaluate.py    what it measures on one model: val metrics per source, GSM8K, fixed-prompt answers
    gsm8k.py       GSM8K accuracy: greedy chain-of-thought answers scored by exact numeric match
    prompts.py     the fixed prompts every evaluation answers
    stats.py       how sure an accuracy is: a Wilson interval, an exact paired test for two models
    harness.py     ``--harness``: EleutherAI's lm-evaluation-harness on the same model, offline
    bounded_re.py  Python's ``re`` with a clock on every match, for patterns ds-sft does not control
    report.py      eval.json, eval.md and a bar chart

``python -m ds_sft.eval`` is the same as ``ds-sft eval``.
"""
