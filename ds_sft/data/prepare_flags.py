"""prepare's flags, in the groups ``ds-sft prepare --help`` shows them: the sources, the tokenization,
the mix with its split and packing, and the output.

Every value flag has a declared domain (``ds_sft/options.py``), so the parser refuses a bad value in
one line; ``prepare.add_arguments`` adds these groups and the pairs of flags where one does nothing.
"""

from __future__ import annotations

from ds_sft.options import INT32_MAX, INT64_MAX, SEED, Choice, Float, Int, StoreOnce, Weights


def add_source_flags(src) -> None:
    from ds_sft.data.sources import HUB_IDS

    for kind, (hub_id, _) in HUB_IDS.items():
        src.add_argument(
            f"--{kind}",
            action=StoreOnce,
            nargs="?",
            const=hub_id,
            metavar="PATH_OR_HUB_ID",
            help=f"{kind} data: a .json/.jsonl/.parquet file, or a hub id (bare flag: {hub_id})",
        )
    src.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another source (repeatable): its columns are detected (instruction/input/output, Dolly, "
        "question/answer, prompt/completion, chat messages or ShareGPT conversations) or mapped "
        "with --field_map",
    )
    src.add_argument(
        "--field_map",
        action="append",
        default=[],
        metavar="NAME:FIELD=COL,...",
        help="column mapping for --source NAME, e.g. mydata:instruction=q,input=ctx,response=a "
        "or mydata:messages=conversation (fields: instruction, input, response, category, messages); "
        "one per source, repeatable for several sources",
    )
    src.add_argument(
        "--from_shared",
        action="store_true",
        help="add the ../shared/data mix (Alpaca 5k, GSM8K train, Dolly 5k) for sources not given; "
        "the default when no source flag is passed",
    )
    src.add_argument(
        "--gsm8k_test",
        action=StoreOnce,
        metavar="PATH",
        help="the GSM8K test set to decontaminate against (default: ../shared/data/gsm8k/test.jsonl, "
        "a test file beside --gsm8k, or openai/gsm8k's test split when online)",
    )


def add_tokenization_flags(tok) -> None:
    tok.add_argument(
        "--tokenizer",
        action=StoreOnce,
        help="tokenizer.json, a tokenizer directory, a .gguf file, 'gpt2' or a model alias (default: gpt2)",
    )
    tok.add_argument(
        "--base_model",
        action=StoreOnce,
        help="use this model's tokenizer (a path, a Hugging Face id owner/name[@revision], or an "
        "alias, e.g. smollm2-135m-instruct); --seq_len may not exceed the model's positions",
    )
    tok.add_argument(
        "--template",
        default="auto",
        choices=["auto", "alpaca", "chat"],
        help="prompt format: alpaca, the tokenizer's chat template, or auto (chat if the tokenizer has one)",
    )
    tok.add_argument(
        "--seq_len", type=Int(8, 2**20), default=1024, help="tokens per packed row (default: 1024)"
    )
    tok.add_argument(
        "--train_on",
        type=Choice("all", "last"),
        default="all",
        help="which assistant turns of a conversation (messages) row are trained: all of them "
        "(default), or only the last one, the earlier turns being prompt",
    )
    tok.add_argument(
        "--truncate",
        action="store_true",
        help="cut examples longer than --seq_len at the end of their response instead of dropping them",
    )


def add_mix_flags(mix) -> None:
    mix.add_argument(
        "--mix",
        type=Weights(Float(0, 1000)),
        default="",
        metavar="NAME=W,...",
        help="per-source weights, e.g. alpaca=1,gsm8k=2,dolly=1 (whole epochs + a seeded share; default 1)",
    )
    mix.add_argument(
        "--max_examples",
        type=Int(1, INT64_MAX),
        help="cap on training examples after mixing; every source is scaled down by the same factor",
    )
    mix.add_argument(
        "--val_fraction",
        type=Float(0, 1, max_open=True),
        default=0.02,
        help="share of each source held out for validation (default: 0.02)",
    )
    mix.add_argument(
        "--min_val_rows",
        type=Int(0, INT32_MAX),
        default=20,
        help="hold out at least this many rows per source for val, never more than half of it; rows "
        "dropped later as too long leave fewer, which prepare warns of (default: 20)",
    )
    mix.add_argument("--seed", type=SEED, default=1234, help="seed of the split, the mix and its fractions")
    mix.add_argument("--no_pack", action="store_true", help="one example per row, padded (for comparison)")
    mix.add_argument(
        "--decontam_threshold",
        type=Float(0, 1),
        default=0.1,
        help="drop a row when this share of its 13-grams occurs in the GSM8K test set or in val rows; "
        "13-grams shared by more than 10 rows (a common preamble) are not counted "
        "(default: 0.1; 0 turns decontamination off)",
    )


def add_output_flags(out) -> None:
    out.add_argument(
        "--output_dir", default="data_sft", help="where to write the prepared data (default: data_sft)"
    )
    out.add_argument(
        "--force", action="store_true", help="redo the output even when inputs and flags are unchanged"
    )
    out.add_argument(
        "--skip_bad_rows",
        action="store_true",
        help="drop malformed JSON lines and lines over 64 MiB (counted in the manifest) instead of "
        "stopping at the first one",
    )
