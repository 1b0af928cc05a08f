"""ds-sft: supervised fine-tuning of small LLaMA-style models with DeepSpeed.

Data flows one way::

    files -> prepare -> token shards + manifest -> train (DeepSpeed engine) -> checkpoints
          -> eval / export

Package arrows point one way too: ``train`` uses ``data``, ``model`` and ``kernels``; ``eval`` uses
``data`` and ``model``; ``model`` uses ``kernels``; ``kernels`` use nothing of ours. Beside the packages:

    cli.py           ``ds-sft``, the front door: one subcommand per module
    command.py       how a subcommand is wired (``add_arguments``, ``run``), and a bench script's main
    options.py       the domain of every number, choice and name a user can pass
    errors.py        UserError: one line for the user instead of a traceback
    locations.py     where ds-sft's own folders are (the repository, shared/), and a path's ``~``
    model_source.py  a model or tokenizer spec (alias, path, hub id) -> a local path
    safe_read.py     reading what someone else made: regular files only, JSON objects, no remote code
    safe_write.py    writing without harm: output folders checked, results replaced whole, no links
    gguf_file.py     a GGUF file read with its metadata and tensor layout checked
    json_input.py    the one reader of a user's JSON: repeated keys, NaN, depth refused in one line
    written_files.py the record of the files ds-sft wrote into a folder: it removes only those
    run_layout.py    the names in a training run's folder, and the checkpoint tag format
    labels.py        the label that marks a position with nothing to train
    vocab.py         how many embeddings a tokenizer needs
    positions.py     how many positions a model has, by the names trainers give them
    machine.py       the memory this machine can still give a command
    export.py        ``ds-sft export``: a checkpoint as a Hugging Face model
    bench.py         ``ds-sft bench``: run the scripts in ``bench/`` and collect their tables
    bench_result.py  what a benchmark script writes, and what it may write over
    demo.py          the job behind ``make demo``: a small, real SFT run on CPU, end to end
    torchrun.py      ``python -m ds_sft.torchrun``: torchrun as ds-sft's launchers run it
"""

__version__ = "0.1.0"
