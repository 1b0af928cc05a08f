"""The data side of ds-sft: instruction files in, packed token shards out, and the readers of them.

``prepare`` (the command, ``prepare.py``) runs the stages in this order, each in its own small module::

    sources.py            files or hub ids -> normalized records {id, source, category, instruction, ...}
    clean.py              text normalization, counted drops, dedup, 13-gram decontamination
    tokenizer.py          the base model's tokenizer from tokenizer.json / HF dir / GGUF / "gpt2" / an alias
    templates.py          a record -> prompt text (Alpaca-style or the tokenizer's chat template)
    tokenize.py           prompt and response tokenized apart -> ids + loss mask by construction
    mix.py                the val split per source and the weighted, capped, seeded training mix
    pack.py               best-fit-decreasing packing of documents into rows of seq_len
    shards.py             memory-mapped shards + manifest.json writer, and the training-side PackedDataset
    output.py             the output folder (prepare's, export's, eval's): replaced whole, nothing else lost

What the stages lean on, and what reads the shards::

    prepare.py            the command, wiring the stages above in order, from its parts:
    prepare_flags.py      its flags, in the groups --help shows
    prepare_inputs.py     the sources the flags name, checked before any row is read; read and cleaned
    prepare_reuse.py      the reuse key, and whether an output already there is current
    prepare_selection.py  which rows train and which validate: drops, dedup, decontam, split, mix
    prepare_write.py      the shards, tokenizer and histograms, built aside and swapped in
    prepare_report.py     the manifest's counts and warnings, and the summary printed
    template_sandbox.py   Jinja templates (a tokenizer's chat template, eval's task templates) within bounds
    shown_text.py         find a text in a render "up to whitespace", in time linear in the render
    normalizer_bounds.py  how much a tokenizer's normalizer can change a text's length, from its config
    model_match.py        does a model belong with a data dir? same tokenizer, enough embeddings, positions
    sampler.py            the deterministic, resumable, distributed sampler over a PackedDataset
    val_sample.py         the fixed, stratified val rows that train's evals and ``eval --val_rows`` score

Nothing heavy is imported here, so ``import ds_sft.data`` stays instant.
"""
