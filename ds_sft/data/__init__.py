"""The data side of ds-sft: instruction files in, packed token shards out, and the readers of them.

``prepare`` (the command) runs the stages in this order, each in its own small module::

    sources   files or hub ids -> normalized records {id, source, category, instruction, input, response}
    clean     text normalization, counted drops, dedup, 13-gram decontamination
    tokenizer the base model's tokenizer from tokenizer.json / HF dir / GGUF / "gpt2" / an alias
    templates a record -> prompt text (Alpaca-style or the tokenizer's chat template)
    tokenize  prompt and response tokenized apart -> ids + loss mask by construction
    pack      best-fit-decreasing packing of documents into rows of seq_len
    shards    memory-mapped shards + manifest.json writer, and the training-side PackedDataset
    sampler   the deterministic, resumable, distributed sampler over a PackedDataset

Nothing heavy is imported here, so ``import ds_sft.data`` stays instant.
"""
