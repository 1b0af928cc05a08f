"""How many embeddings a tokenizer needs: one past the largest id it can produce.

``len(tokenizer)`` counts entries, and a vocabulary may have holes: 29 words with EOS at id 65,539
need 65,540 embeddings. ``prepare`` sizes its shards' dtype and the manifest's ``vocab_size`` by this
bound, and ``export`` checks the model against it. It lives here, beside ``labels.py``, because data
and model both use it and neither may import the other.
"""

from __future__ import annotations


def id_bound(tokenizer) -> int:
    """One past the largest id ``tokenizer`` (a transformers tokenizer) can produce."""
    ids = [*tokenizer.get_vocab().values(), *tokenizer.added_tokens_decoder]
    return max(len(tokenizer), max(ids, default=-1) + 1)
